//! What the module does on its own: rejoin after a restart, follow bookmarks, leave when
//! an admin asks, and what is due when time passes (timers as events).

use minidom::Element;

use super::{Host, drop_empty};
use crate::membership::{Membership, Phase};
use crate::note::Note;
use crate::occupants::OccupantCache;
use crate::outcome::{Action, Out, Outcome};
use crate::presence;
use crate::received::{Mark, Received};
use crate::stanza::Addr;

/// Why the module joins a room on its own.
enum ModuleJoin {
    /// A stored membership after a start, with what the account had got from the room.
    Restart(Received),
    Bookmark,
}

impl Host {
    /// Rejoin a stored membership after a restart, with no session. With nothing known of
    /// what the account got from the room, the join asks for no history.
    pub fn restore(
        &mut self,
        user: &str,
        room: &str,
        nick: &str,
        password: Option<&str>,
    ) -> Outcome {
        self.restore_with(user, room, nick, password, None)
    }

    /// [`Host::restore`] with what was stored of what the account got from the room
    /// ([`Host::received`]), and what [`Host::remember`] was told of it: the join asks for
    /// the history since the last message (see [`Host::rejoin`]).
    pub fn restore_with(
        &mut self,
        user: &str,
        room: &str,
        nick: &str,
        password: Option<&str>,
        received: Option<&str>,
    ) -> Outcome {
        let mut got = received.map(Received::from_text).unwrap_or_default();
        if let Some(found) = self.remembered.remove(&(user.to_owned(), room.to_owned())) {
            got.merge(&found);
        }
        self.join_without_session(user, room, nick, password, ModuleJoin::Restart(got))
    }

    /// The account got `message` from `room` before this start (the shim found it in the
    /// account's archive, stored at `stamp`): the next [`Host::restore_with`] of that
    /// membership knows it. Bounded as [`Received`] is, per room.
    pub fn remember(&mut self, user: &str, room: &str, message: &Element, stamp: i64) {
        let from = message.attr("from").unwrap_or_default();
        let mark = Mark::of(message, from, room, stamp);
        self.remembered
            .entry((user.to_owned(), room.to_owned()))
            .or_default()
            .got(mark);
    }

    /// The module joins `room` again for a membership it holds (kept through an outage:
    /// an error kick, a shutdown, a room that forgot the account). The same join a restart
    /// makes: it asks for the history since the last message the account got, and what
    /// the room replays is archived and forked once (see `Host::room_message`). The
    /// sessions stay; the room sends its occupants again. `why` goes to the log.
    pub fn rejoin(&mut self, user: &str, room: &str, why: &str) -> Outcome {
        let Some(m) = self.membership_mut(user, room) else {
            return Outcome::pass();
        };
        if m.phase == Phase::Leaving {
            return Outcome::pass();
        }
        let mut out = Outcome::handled(user);
        m.phase = Phase::Joining;
        m.complete = false;
        m.occupants = OccupantCache::default();
        m.nick_change_by = None;
        m.made_by_module = true;
        m.shown = Some(presence::Visible::default());
        out.note(Note::RejoinsAfter {
            user,
            room,
            nick: &m.nick,
            why,
        });
        let join = begin_rejoin(m);
        self.counters.rejoins += 1;
        out.actions.push(Action::Send {
            stanza: Out::New(join),
        });
        out
    }

    /// What to store of what the account got from `room` (see [`Received::to_text`]);
    /// empty when nothing.
    pub fn received(&self, user: &str, room: &str) -> String {
        self.membership(user, room)
            .map(|m| m.received.to_text())
            .unwrap_or_default()
    }

    /// The accounts whose [`Host::received`] changed since this was last asked: the shim
    /// stores their memberships again (periodically and at shutdown, not per message).
    pub fn take_unsaved(&mut self) -> Vec<String> {
        let mut v: Vec<String> = self.unsaved.drain().collect();
        v.sort();
        v
    }

    /// A XEP-0402 bookmark was published (`autojoin` as it says) or retracted (false).
    pub fn bookmark(
        &mut self,
        user: &str,
        room: &str,
        nick: Option<&str>,
        password: Option<&str>,
        autojoin: bool,
    ) -> Outcome {
        let joined = self
            .membership(user, room)
            .is_some_and(|m| m.phase != Phase::Leaving);
        match (autojoin, joined) {
            (true, false) => {
                let nick = nick.unwrap_or(user).to_owned();
                self.join_without_session(user, room, &nick, password, ModuleJoin::Bookmark)
            }
            (false, true) => self.leave(user, room, "its bookmark no longer asks to join"),
            _ => Outcome::pass(),
        }
    }

    fn join_without_session(
        &mut self,
        user: &str,
        room: &str,
        nick: &str,
        password: Option<&str>,
        why: ModuleJoin,
    ) -> Outcome {
        if self.membership(user, room).is_some() {
            return Outcome::pass();
        }
        // The same rules as for what sessions send: a room has a node, no resource, and
        // lives on another host than this one.
        let Some(muc_host) = Addr::parse(room)
            .filter(|a| a.node.is_some() && a.resource.is_none() && a.domain != self.domain)
            .map(|a| a.domain)
        else {
            return Outcome::pass();
        };
        if self.excluded(room, muc_host) || jid::FullJid::new(&format!("{room}/{nick}")).is_err() {
            return Outcome::pass();
        }
        let max_rooms = self.config.max_rooms;
        let account = self.accounts.entry(user.to_owned()).or_default();
        let mut out = Outcome::handled(user);
        if account.rooms.len() >= max_rooms {
            out.note(Note::RoomLimit {
                user,
                room,
                max_rooms,
            });
            return out;
        }
        let mut m = Membership::without_sessions(room, nick);
        m.made_by_module = true;
        m.password = password.map(str::to_owned);
        // The join carries a plain available presence: that is what the room shows until
        // a session says otherwise.
        m.shown = Some(presence::Visible::default());
        let join = match why {
            ModuleJoin::Restart(received) => {
                out.note(Note::RejoinsAfterRestart { user, room, nick });
                m.received = received;
                self.counters.rejoins += 1;
                begin_rejoin(&mut m)
            }
            ModuleJoin::Bookmark => {
                out.note(Note::JoinsFromBookmark { user, room, nick });
                presence::join_for_room(room, nick, password, None)
            }
        };
        account.rooms.insert(room.to_owned(), m);
        out.persist = true;
        out.actions.push(Action::Send {
            stanza: Out::New(join),
        });
        out
    }

    /// Make the account leave a room; its joined sessions get the room's answer.
    pub fn leave(&mut self, user: &str, room: &str, why: &str) -> Outcome {
        let Some(m) = self.membership_mut(user, room) else {
            return Outcome::pass();
        };
        if m.phase == Phase::Leaving {
            return Outcome::pass();
        }
        let mut out = Outcome::handled(user);
        m.phase = Phase::Leaving;
        let resources: Vec<String> = m.recipients().map(str::to_owned).collect();
        m.participants.clear();
        out.participants_changed(room);
        for r in resources {
            if !m.leave_waiters.contains(&r) {
                m.leave_waiters.push(r);
            }
        }
        out.note(Note::Leaves { user, room, why });
        out.persist = true;
        out.actions.push(Action::Send {
            stanza: Out::New(presence::leave_for_room(room, &m.nick)),
        });
        out
    }

    /// Time passed: do what is due at `now` (Unix seconds, the clock the other events
    /// carry). Today that is dropping the proxied IQs whose reply has been waited for
    /// longer than `iq_timeout`, so that a reply coming later is not routed to the session
    /// any more (it passes on, and Prosody discards a reply nobody waits for). The asking
    /// session is told nothing, as Prosody tells a client nothing when an IQ it routed
    /// goes unanswered. Returns one outcome per account with something to carry out
    /// (none today: expiry sends nothing); the shim handles each as it would any other.
    pub fn tick(&mut self, now: i64) -> Vec<Outcome> {
        let timeout = self.config.iq_timeout;
        let mut expired = 0;
        let mut emptied = Vec::new();
        for (user, account) in &mut self.accounts {
            if account.iqs.is_empty() {
                continue;
            }
            expired += account.iqs.expire(now, timeout);
            if account.iqs.is_empty() && account.rooms.is_empty() {
                emptied.push(user.clone());
            }
        }
        for user in emptied {
            drop_empty(&mut self.accounts, &user);
        }
        self.counters.iqs_expired += expired as u64;
        Vec::new()
    }

    /// When [`Host::tick`] next has something to do: the first second at which a pending
    /// IQ expires; none while nothing waits. The shim runs `tick` then, or, when this is
    /// none, `iq_timeout` seconds later (an IQ proxied in between expires after that).
    pub fn next_deadline(&self) -> Option<i64> {
        let timeout = self.config.iq_timeout;
        self.accounts
            .values()
            .filter_map(|a| a.iqs.next_expiry(timeout))
            .min()
    }
}

/// Start a rejoin made by the module: the join presence, asking for the history since the
/// last message the account got (none when nothing is known). Until the join answer is
/// complete, delayed messages are taken for the room's replay; the sessions joined now
/// already have what the account had.
fn begin_rejoin(m: &mut Membership) -> Element {
    let since = m.received.since();
    m.replaying = since.is_some();
    m.replay_counts = (0, 0);
    for p in &mut m.participants {
        p.joined_before_rejoin = p.joined;
    }
    presence::join_for_room(&m.room, &m.nick, m.password.as_deref(), since)
}
