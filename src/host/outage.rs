//! Outages end no membership (flow 18). The account checks the rooms no session is joined
//! to with self-pings of its own (XEP-0410); when a room has forgotten it, error-kicked it
//! (333) or shut down (332), the membership stays and the module joins again, with
//! backoff and a bounded number of attempts. All of it runs from the host's timers: each
//! membership has at most one wake time, and [`Host::tick`] looks at those that are due.

use minidom::Element;

use super::{Host, Timers, member};
use crate::membership::{Membership, Phase};
use crate::note::Note;
use crate::occupants::OccupantCache;
use crate::outage::{PingAnswer, Rejoin, SelfPing, backoff, seed, spread};
use crate::outcome::{Action, Out, Outcome};
use crate::presence;
use crate::stanza::{NS_CLIENT, NS_MUC, NS_PING, NS_STANZAS, n};

/// Look at `m` again at `at` (the entry that was current before is stale from now on).
pub(super) fn wake(timers: &mut Timers, user: &str, m: &mut Membership, at: i64) {
    m.wake = Some(at);
    timers.push(at, user, m.room.clone());
}

/// The room confirmed the account as its occupant: whatever outage there was is over,
/// and its self-pings are scheduled (every `interval` seconds, at a point of the period
/// of its own, so that the rooms of a server are not all pinged at once).
pub(super) fn in_room(
    timers: &mut Timers,
    interval: i64,
    user: &str,
    m: &mut Membership,
    now: i64,
) {
    m.rejoin = None;
    m.ping = None;
    if interval > 0 {
        let at = now + 1 + spread(interval, seed(user, &m.room, 0));
        wake(timers, user, m, at);
    } else {
        m.wake = None;
    }
}

/// The join the module sends on its own for a membership: after a restart, for a
/// bookmark, and to come back after an outage. It carries a plain available presence,
/// which is what the room shows until a session says otherwise, and asks for the history
/// since the last message the account got (none when nothing is known of it). Until the
/// join answer is complete, delayed messages are taken for the room's replay; the sessions
/// joined now already have what the account had.
pub(super) fn module_join(m: &mut Membership) -> Element {
    m.shown = Some(presence::Visible::default());
    let since = m.received.since();
    m.replaying = since.is_some();
    m.received.start_replay();
    m.replay_counts = (0, 0);
    for p in &mut m.participants {
        p.joined_before_rejoin = p.joined;
    }
    presence::join_for_room(&m.room, &m.nick, m.password.as_deref(), since)
}

impl Host {
    /// The account is out of `room` by no one's choice (`why`): the membership stays, the
    /// room state it kept is stale, and the first rejoin goes out at `first` (at once when
    /// that is `now`).
    pub(super) fn out_of_room(
        &mut self,
        user: &str,
        room: &str,
        why: &str,
        first: i64,
        now: i64,
        out: &mut Outcome,
    ) {
        let Some(m) = member(&mut self.accounts, user, room) else {
            return;
        };
        m.phase = Phase::Joining;
        m.ping = None;
        m.complete = false;
        m.occupants = OccupantCache::default();
        m.nick_change_by = None;
        m.rejoin = Some(Rejoin::Due { attempt: 1 });
        out.note(Note::OutOfRoom { user, room, why });
        if first <= now {
            self.send_rejoin(user, room, now, out);
        } else {
            wake(&mut self.timers, user, m, first);
        }
    }

    /// Send the rejoin that is due (or, after giving up, a first one again: a session
    /// joined the room). Nothing when a join is in flight already.
    pub(super) fn send_rejoin(&mut self, user: &str, room: &str, now: i64, out: &mut Outcome) {
        let timeout = self.config.iq_timeout;
        let Some(m) = member(&mut self.accounts, user, room) else {
            return;
        };
        let attempt = match m.rejoin {
            Some(Rejoin::Due { attempt }) => attempt,
            Some(Rejoin::GaveUp) => 1,
            _ => return,
        };
        let join = module_join(m);
        out.actions.push(Action::Send {
            stanza: Out::New(join),
        });
        m.rejoin = Some(Rejoin::InFlight {
            attempt,
            sent: Some(now),
        });
        self.counters.rejoins += 1;
        let nick = m.nick.clone();
        wake(&mut self.timers, user, m, now + timeout);
        out.note(Note::Rejoins {
            user,
            room,
            nick: &nick,
            attempt,
        });
    }

    /// Rejoin attempt `attempt` failed (`why`): the sessions that waited on it were told
    /// (by the caller) and take part no more; the next attempt is due after a backoff, or
    /// after the last one the module gives up until the next start.
    pub(super) fn rejoin_failed(
        &mut self,
        user: &str,
        room: &str,
        why: &str,
        now: i64,
        out: &mut Outcome,
    ) {
        let max_attempts = self.config.rejoin_attempts.max(1);
        let Some(m) = member(&mut self.accounts, user, room) else {
            return;
        };
        let Some(Rejoin::InFlight { attempt, .. }) = m.rejoin else {
            return;
        };
        m.participants.clear();
        out.participants_changed(room);
        if attempt >= max_attempts {
            m.rejoin = Some(Rejoin::GaveUp);
            m.wake = None;
            self.counters.rejoins_given_up += 1;
            out.warn = true;
            out.note(Note::RejoinGivenUp {
                user,
                room,
                attempts: attempt,
            });
            return;
        }
        let next = attempt + 1;
        let delay = backoff(next, seed(user, room, next));
        m.rejoin = Some(Rejoin::Due { attempt: next });
        wake(&mut self.timers, user, m, now + delay);
        out.note(Note::RejoinFailed {
            user,
            room,
            why,
            next_in: delay,
        });
    }

    /// The room answered the account's self-ping.
    pub(super) fn ping_answered(
        &mut self,
        user: &str,
        room: &str,
        ping: SelfPing,
        answer: PingAnswer,
        condition: Option<&str>,
        now: i64,
    ) -> Outcome {
        let interval = self.config.self_ping_interval;
        // Nothing of it reaches any session.
        let mut out = Outcome::handled(user);
        match answer {
            PingAnswer::Joined => {
                self.counters.self_pings_answered += 1;
                self.next_ping(user, room, ping.sent, interval);
            }
            PingAnswer::Unknown => {
                self.counters.self_pings_failed += 1;
                out.note(Note::SelfPingFailed {
                    user,
                    room,
                    why: condition.unwrap_or("error"),
                });
                self.next_ping(user, room, ping.sent, interval);
            }
            PingAnswer::Gone => {
                self.counters.self_pings_gone += 1;
                let why = format!(
                    "its self-ping was answered with {}",
                    condition.unwrap_or("an error")
                );
                self.out_of_room(user, room, &why, now, now, &mut out);
            }
        }
        out
    }

    /// The next self-ping check of a room, one period after the last ping went out.
    fn next_ping(&mut self, user: &str, room: &str, sent: i64, interval: i64) {
        let Some(m) = member(&mut self.accounts, user, room) else {
            return;
        };
        if interval > 0 && m.phase == Phase::Joined {
            wake(&mut self.timers, user, m, sent + interval);
        } else {
            m.wake = None;
        }
    }

    /// The wake time of `user`'s membership of `room` came: what is due then.
    pub(super) fn due(&mut self, user: &str, room: &str, now: i64) -> Option<Outcome> {
        let interval = self.config.self_ping_interval;
        let timeout = self.config.iq_timeout;
        let m = member(&mut self.accounts, user, room)?;
        m.wake = None;
        let mut out = Outcome::handled(user);
        match (m.phase, m.rejoin) {
            (Phase::Joined, _) => {
                if let Some(ping) = &m.ping {
                    if now < ping.sent + timeout {
                        let at = ping.sent + timeout;
                        wake(&mut self.timers, user, m, at);
                        return None;
                    }
                    // No answer: nothing is known, so try later.
                    let sent = ping.sent;
                    m.ping = None;
                    self.counters.self_pings_failed += 1;
                    out.note(Note::SelfPingFailed {
                        user,
                        room,
                        why: "no answer",
                    });
                    let at = (sent + interval).max(now + 1);
                    if interval > 0 {
                        wake(&mut self.timers, user, m, at);
                    }
                    return Some(out);
                }
                if interval <= 0 {
                    return None;
                }
                if m.participants.iter().any(|p| p.joined) {
                    // Its clients check the room (they self-ping); look again later.
                    wake(&mut self.timers, user, m, now + interval);
                    return None;
                }
                self.iq_seq += 1;
                let ping = SelfPing {
                    id: format!("mmxping{}", self.iq_seq),
                    to: format!("{room}/{}", m.nick),
                    sent: now,
                };
                out.actions.push(Action::Send {
                    stanza: Out::New(self_ping(&ping)),
                });
                m.ping = Some(ping);
                self.counters.self_pings += 1;
                wake(&mut self.timers, user, m, now + timeout);
                Some(out)
            }
            (Phase::Joining, Some(Rejoin::Due { .. })) => {
                self.send_rejoin(user, room, now, &mut out);
                Some(out)
            }
            (
                Phase::Joining,
                Some(Rejoin::InFlight {
                    attempt,
                    sent: None,
                }),
            ) => {
                // A join sent with no clock at hand (after a restart): waited for from now.
                m.rejoin = Some(Rejoin::InFlight {
                    attempt,
                    sent: Some(now),
                });
                wake(&mut self.timers, user, m, now + timeout);
                None
            }
            (
                Phase::Joining,
                Some(Rejoin::InFlight {
                    sent: Some(sent), ..
                }),
            ) => {
                if now < sent + timeout {
                    wake(&mut self.timers, user, m, sent + timeout);
                    return None;
                }
                // No answer to the join: the sessions waiting on it learn it failed, as
                // a client learns it from its own server when a room does not answer.
                let error = no_answer(room, &m.nick);
                for p in &m.participants {
                    out.deliver(&p.resource, Out::New(error.clone()));
                }
                self.rejoin_failed(user, room, "no answer", now, &mut out);
                Some(out)
            }
            _ => None,
        }
    }
}

/// The account's XEP-0410 self-ping (`from` is set to the account when it is sent).
fn self_ping(ping: &SelfPing) -> Element {
    Element::builder("iq", NS_CLIENT)
        .attr(n("type"), "get")
        .attr(n("to"), &*ping.to)
        .attr(n("id"), &*ping.id)
        .append(Element::bare("ping", NS_PING))
        .build()
}

/// What a session waiting on a join gets when the room never answered it.
fn no_answer(room: &str, nick: &str) -> Element {
    let error = Element::builder("error", NS_CLIENT)
        .attr(n("type"), "wait")
        .append(Element::bare("remote-server-timeout", NS_STANZAS))
        .build();
    Element::builder("presence", NS_CLIENT)
        .attr(n("type"), "error")
        .attr(n("from"), format!("{room}/{nick}"))
        .append(Element::bare("x", NS_MUC))
        .append(error)
        .build()
}
