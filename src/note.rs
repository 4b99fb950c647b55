//! What an admin reads in the server log about an account's memberships: one typed value
//! per kind of line, with the text in one place. The specs count these lines in the log,
//! so a text changes here or nowhere.

use std::fmt;

/// A line worth an admin's attention (logged by the shim at info). `user` is the
/// account's username, `room` the room's bare JID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note<'a> {
    /// A session's join made the account join.
    Joins {
        user: &'a str,
        room: &'a str,
        nick: &'a str,
        resource: &'a str,
    },
    /// A session joined again while the account's leave was in flight.
    RejoinsWhileLeaving {
        user: &'a str,
        room: &'a str,
        nick: &'a str,
    },
    /// The module made the account join a stored membership after a restart.
    RejoinsAfterRestart {
        user: &'a str,
        room: &'a str,
        nick: &'a str,
    },
    /// The room's replay after a rejoin made by the module is over: `new` messages the
    /// account had not got (archived and forked), `known` it had (neither).
    CaughtUp {
        user: &'a str,
        room: &'a str,
        new: u32,
        known: u32,
    },
    /// The module made the account join for an autojoin bookmark.
    JoinsFromBookmark {
        user: &'a str,
        room: &'a str,
        nick: &'a str,
    },
    /// A join the module would make on its own is past `minimix_max_rooms`.
    RoomLimit {
        user: &'a str,
        room: &'a str,
        max_rooms: usize,
    },
    /// The room confirmed the account's join (its self-presence, 110).
    Joined {
        user: &'a str,
        room: &'a str,
        nick: &'a str,
    },
    /// The room answered the account's join with an error (its defined condition).
    JoinFailed {
        user: &'a str,
        room: &'a str,
        condition: Option<&'a str>,
    },
    /// The module's rejoin made a room anew and accepted its default configuration.
    MadeAnew { user: &'a str, room: &'a str },
    /// The last joined session left, so the account leaves.
    LastSessionLeaves {
        user: &'a str,
        room: &'a str,
        resource: &'a str,
    },
    /// The account leaves on the module's own account (a bookmark, an admin): `why`.
    Leaves {
        user: &'a str,
        room: &'a str,
        why: &'a str,
    },
    /// The room confirmed the account's leave.
    Left { user: &'a str, room: &'a str },
    /// The room removed the account (kick, ban, …), with the status codes it gave.
    Removed {
        user: &'a str,
        room: &'a str,
        codes: &'a [u16],
    },
    /// A self-ping was answered with an error that means the account is not an occupant.
    GoneBySelfPing { user: &'a str, room: &'a str },
    /// The account is out of a room by no one's choice (`why`: an error kick, a shutdown,
    /// a room that forgot it): the membership stays and the module rejoins.
    OutOfRoom {
        user: &'a str,
        room: &'a str,
        why: &'a str,
    },
    /// The module sends join attempt `attempt` to bring the account back into a room.
    Rejoins {
        user: &'a str,
        room: &'a str,
        nick: &'a str,
        attempt: u32,
    },
    /// A rejoin failed (`why`); the next attempt goes out in `next_in` seconds.
    RejoinFailed {
        user: &'a str,
        room: &'a str,
        why: &'a str,
        next_in: i64,
    },
    /// Every rejoin attempt failed: the membership is kept for the next start (a warning).
    RejoinGivenUp {
        user: &'a str,
        room: &'a str,
        attempts: u32,
    },
    /// The account's own self-ping of a room told nothing (`why`: a network error, no
    /// answer): it is tried again later.
    SelfPingFailed {
        user: &'a str,
        room: &'a str,
        why: &'a str,
    },
}

impl fmt::Display for Note<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Note::Joins {
                user,
                room,
                nick,
                resource,
            } => write!(
                f,
                "{user} joins {room} as {nick} (first session {resource})"
            ),
            Note::RejoinsWhileLeaving { user, room, nick } => {
                write!(f, "{user} rejoins {room} as {nick} while leaving it")
            }
            Note::RejoinsAfterRestart { user, room, nick } => {
                write!(f, "{user} rejoins after a restart: {room} as {nick}")
            }
            Note::CaughtUp {
                user,
                room,
                new,
                known,
            } => write!(
                f,
                "{user} caught up in {room}: {new} new message(s), {known} already got"
            ),
            Note::JoinsFromBookmark { user, room, nick } => {
                write!(f, "{user} joins from a bookmark: {room} as {nick}")
            }
            Note::RoomLimit {
                user,
                room,
                max_rooms,
            } => write!(
                f,
                "{user} does not join {room}: already in {max_rooms} rooms (minimix_max_rooms)"
            ),
            Note::Joined { user, room, nick } => write!(f, "{user} joined {room} as {nick}"),
            Note::JoinFailed {
                user,
                room,
                condition,
            } => write!(
                f,
                "{user} could not join {room}: {}",
                condition.unwrap_or("error")
            ),
            Note::MadeAnew { user, room } => write!(
                f,
                "{user} made {room} anew, which no longer existed, with the default configuration"
            ),
            Note::LastSessionLeaves {
                user,
                room,
                resource,
            } => write!(f, "{user} leaves {room} (last session {resource} left)"),
            Note::Leaves { user, room, why } => write!(f, "{user} leaves {room}: {why}"),
            Note::Left { user, room } => write!(f, "{user} left {room}"),
            Note::Removed { user, room, codes } => {
                write!(f, "{user} was removed from {room} (status {codes:?})")
            }
            Note::GoneBySelfPing { user, room } => write!(
                f,
                "{user} is no longer in {room} (self-ping answered with an error)"
            ),
            Note::OutOfRoom { user, room, why } => {
                write!(f, "{user} is out of {room} ({why}): rejoining")
            }
            Note::Rejoins {
                user,
                room,
                nick,
                attempt,
            } => write!(f, "{user} rejoins {room} as {nick} (attempt {attempt})"),
            Note::RejoinFailed {
                user,
                room,
                why,
                next_in,
            } => write!(
                f,
                "{user} could not rejoin {room} ({why}): next attempt in {next_in} s"
            ),
            Note::RejoinGivenUp {
                user,
                room,
                attempts,
            } => write!(
                f,
                "{user} gave up rejoining {room} after {attempts} attempts: the membership is kept \
                 for the next start"
            ),
            Note::SelfPingFailed { user, room, why } => write!(
                f,
                "{user} could not self-ping {room} ({why}): trying again later"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "room@conference.example.com";

    /// The texts the specs (spec/*_spec.lua) and admins look for in the server log.
    #[test]
    fn notes_read_as_the_log_has_them() {
        let (user, room, nick) = ("alice", R, "N");
        let cases = [
            (
                Note::Joins {
                    user,
                    room,
                    nick,
                    resource: "phone",
                },
                "alice joins room@conference.example.com as N (first session phone)",
            ),
            (
                Note::RejoinsWhileLeaving { user, room, nick },
                "alice rejoins room@conference.example.com as N while leaving it",
            ),
            (
                Note::RejoinsAfterRestart { user, room, nick },
                "alice rejoins after a restart: room@conference.example.com as N",
            ),
            (
                Note::CaughtUp {
                    user,
                    room,
                    new: 2,
                    known: 1,
                },
                "alice caught up in room@conference.example.com: 2 new message(s), 1 already got",
            ),
            (
                Note::JoinsFromBookmark { user, room, nick },
                "alice joins from a bookmark: room@conference.example.com as N",
            ),
            (
                Note::RoomLimit {
                    user,
                    room,
                    max_rooms: 2,
                },
                "alice does not join room@conference.example.com: already in 2 rooms \
                 (minimix_max_rooms)",
            ),
            (
                Note::Joined { user, room, nick },
                "alice joined room@conference.example.com as N",
            ),
            (
                Note::JoinFailed {
                    user,
                    room,
                    condition: Some("item-not-found"),
                },
                "alice could not join room@conference.example.com: item-not-found",
            ),
            (
                Note::JoinFailed {
                    user,
                    room,
                    condition: None,
                },
                "alice could not join room@conference.example.com: error",
            ),
            (
                Note::MadeAnew { user, room },
                "alice made room@conference.example.com anew, which no longer existed, with \
                 the default configuration",
            ),
            (
                Note::LastSessionLeaves {
                    user,
                    room,
                    resource: "phone",
                },
                "alice leaves room@conference.example.com (last session phone left)",
            ),
            (
                Note::Leaves {
                    user,
                    room,
                    why: "asked by an admin",
                },
                "alice leaves room@conference.example.com: asked by an admin",
            ),
            (
                Note::Left { user, room },
                "alice left room@conference.example.com",
            ),
            (
                Note::Removed {
                    user,
                    room,
                    codes: &[307, 110],
                },
                "alice was removed from room@conference.example.com (status [307, 110])",
            ),
            (
                Note::OutOfRoom {
                    user,
                    room,
                    why: "error kick, status 333",
                },
                "alice is out of room@conference.example.com (error kick, status 333): rejoining",
            ),
            (
                Note::Rejoins {
                    user,
                    room,
                    nick,
                    attempt: 2,
                },
                "alice rejoins room@conference.example.com as N (attempt 2)",
            ),
            (
                Note::RejoinFailed {
                    user,
                    room,
                    why: "remote-server-not-found",
                    next_in: 11,
                },
                "alice could not rejoin room@conference.example.com (remote-server-not-found): \
                 next attempt in 11 s",
            ),
            (
                Note::RejoinGivenUp {
                    user,
                    room,
                    attempts: 8,
                },
                "alice gave up rejoining room@conference.example.com after 8 attempts: the \
                 membership is kept for the next start",
            ),
            (
                Note::SelfPingFailed {
                    user,
                    room,
                    why: "no answer",
                },
                "alice could not self-ping room@conference.example.com (no answer): trying \
                 again later",
            ),
            (
                Note::GoneBySelfPing { user, room },
                "alice is no longer in room@conference.example.com (self-ping answered with \
                 an error)",
            ),
        ];
        for (note, text) in cases {
            assert_eq!(note.to_string(), text);
        }
    }
}
