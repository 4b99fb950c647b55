//! What the module does on its own: rejoin after a restart, follow bookmarks, leave when
//! an admin asks, and what is due when time passes (timers as events).

use minidom::Element;

use super::outage::{module_join, wake};
use super::{Host, drop_empty};
use crate::membership::{Membership, Phase};
use crate::note::Note;
use crate::outage::Rejoin;
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
    /// Rejoin a stored membership after a restart, with no session. The join asks for the
    /// history since the last message the account got (none when nothing is known of it);
    /// a join the room's server cannot take now is tried again with backoff (flow 18).
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
        let restart = matches!(why, ModuleJoin::Restart(_));
        match why {
            ModuleJoin::Restart(received) => {
                out.note(Note::RejoinsAfterRestart { user, room, nick });
                m.received = received;
            }
            ModuleJoin::Bookmark => out.note(Note::JoinsFromBookmark { user, room, nick }),
        }
        let join = module_join(&mut m);
        if restart {
            // No clock comes with this event: the join is waited for from the next tick.
            m.rejoin = Some(Rejoin::InFlight {
                attempt: 1,
                sent: None,
            });
            wake(&mut self.timers, user, &mut m, 0);
            self.counters.rejoins += 1;
        }
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
        if m.rejoin.is_some_and(Rejoin::waiting) {
            // Out of the room after an outage, with no join on its way: nothing to tell
            // the room, and no session takes part.
            if let Some(account) = self.accounts.get_mut(user) {
                account.rooms.remove(room);
            }
            drop_empty(&mut self.accounts, user);
            out.participants_changed(room);
            out.note(Note::Leaves { user, room, why });
            out.persist = true;
            return out;
        }
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
    /// carry). That is:
    /// - dropping the proxied IQs whose reply has been waited for longer than
    ///   `iq_timeout`, so that a reply coming later is not routed to the session any more
    ///   (it passes on, and Prosody discards a reply nobody waits for). The asking session
    ///   is told nothing, as Prosody tells a client nothing when an IQ it routed goes
    ///   unanswered;
    /// - what is due for memberships (flow 18): the account's self-pings of rooms no
    ///   session is joined to, rejoins after an outage, and the pings and joins that were
    ///   not answered in time.
    ///
    /// Returns the outcomes to carry out, in order (several may be for one account); the
    /// shim handles each as it would any other.
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
        // What is due for memberships. Taken off first: what they schedule anew is for a
        // later tick.
        let due = self.timers.take_due(now);
        let mut outcomes = Vec::new();
        for (at, user, room) in due {
            // Only the membership's current wake time counts; the rest are stale.
            if self
                .membership(&user, &room)
                .is_some_and(|m| m.wake == Some(at))
                && let Some(out) = self.due(&user, &room, now)
            {
                outcomes.push(out);
            }
        }
        outcomes
    }

    /// When [`Host::tick`] next has something to do: the first second at which a pending
    /// IQ expires or a membership's wake time comes; none while nothing waits. The shim
    /// runs `tick` then, or, when this is none, `iq_timeout` seconds later (an IQ proxied
    /// in between expires after that). Stale timer entries at the front are dropped here.
    pub fn next_deadline(&mut self) -> Option<i64> {
        while let Some((at, user, room)) = self.timers.peek_entry() {
            if self
                .membership(user, room)
                .is_some_and(|m| m.wake == Some(at))
            {
                break;
            }
            self.timers.pop();
        }
        let timeout = self.config.iq_timeout;
        let iqs = self
            .accounts
            .values()
            .filter_map(|a| a.iqs.next_expiry(timeout))
            .min();
        let memberships = self.timers.first();
        match (iqs, memberships) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
