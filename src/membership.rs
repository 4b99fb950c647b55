//! One account's membership in one room: which of its sessions joined, where the join
//! stands, and the room state kept to serve later joins.

use std::rc::Rc;

use crate::history::RoomHistory;
use crate::occupants::OccupantCache;
use crate::outage::{Rejoin, SelfPing};
use crate::presence::{SessionPresence, Visible};
use crate::received::Received;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The account's join was sent; the room's self-presence (110) has not come yet.
    Joining,
    /// The account is an occupant.
    Joined,
    /// The last session left; the account's unavailable presence was sent.
    Leaving,
}

#[derive(Debug)]
pub struct Participant {
    /// Shared with the actions that deliver to it, so a fork allocates nothing per session.
    pub resource: Rc<str>,
    /// False while the session waits for the account's in-flight join.
    pub joined: bool,
    /// The session's presence toward the room; none after it went unavailable.
    pub presence: Option<SessionPresence>,
    /// The session was joined when the module's latest rejoin began: it got what the
    /// account got, so what the room replays and the account already had is not its news.
    pub joined_before_rejoin: bool,
}

#[derive(Debug)]
pub struct Membership {
    pub room: Rc<str>,
    /// The account's nick in the room, as the room last confirmed it (or asked, while joining).
    pub nick: String,
    pub phase: Phase,
    /// The room's join answer is complete (its subject, which comes last, has arrived):
    /// from then on later joins get a locally made subject.
    pub complete: bool,
    /// Sessions that joined or are joining, oldest first.
    pub participants: Vec<Participant>,
    /// Sessions that left as the last ones and wait for the room's unavailable self-presence.
    pub leave_waiters: Vec<String>,
    /// The session that asked for a nick change still unanswered, to route a conflict to.
    pub nick_change_by: Option<String>,
    pub occupants: OccupantCache,
    /// The account's self-presence as the room last sent it, and the affiliation in it.
    pub self_presence: Option<Rc<str>>,
    pub affiliation: Option<String>,
    pub history: RoomHistory,
    pub subject: Option<Rc<str>>,
    /// The room's password, as the first join gave it (for rejoins after a restart).
    pub password: Option<String>,
    /// What other occupants see of the account's presence, as the room was last told it.
    pub shown: Option<Visible>,
    /// The join was made by the module (after a restart, for a bookmark), not a session.
    pub made_by_module: bool,
    /// The room confirmed the account as an occupant (a self-presence, 110) at least once.
    pub confirmed: bool,
    /// The module is bringing the account back into the room after an outage (flow 18).
    pub rejoin: Option<Rejoin>,
    /// The account's own self-ping of the room in flight, if any.
    pub ping: Option<SelfPing>,
    /// When the host's timers next look at this membership (a self-ping due, a rejoin
    /// due, a join or a ping no longer waited for); none: nothing is due.
    pub wake: Option<i64>,
    /// What the account got from the room: where a rejoin asks history since, and what a
    /// replay may bring again.
    pub received: Received,
    /// The module's rejoin asked for the history since the last message: until the join
    /// answer is complete, delayed messages are the room's replay of it.
    pub replaying: bool,
    /// Messages of the current replay: (new, already had).
    pub replay_counts: (u32, u32),
}

impl Membership {
    pub fn new(room: &str, nick: &str, first: &str) -> Membership {
        Membership {
            room: room.into(),
            nick: nick.to_owned(),
            phase: Phase::Joining,
            complete: false,
            participants: vec![Participant {
                resource: first.into(),
                joined: false,
                presence: None,
                joined_before_rejoin: false,
            }],
            leave_waiters: Vec::new(),
            nick_change_by: None,
            occupants: OccupantCache::default(),
            self_presence: None,
            affiliation: None,
            history: RoomHistory::default(),
            subject: None,
            password: None,
            shown: None,
            made_by_module: false,
            confirmed: false,
            rejoin: None,
            ping: None,
            wake: None,
            received: Received::default(),
            replaying: false,
            replay_counts: (0, 0),
        }
    }

    /// A membership with no session yet (after a restart, from a bookmark).
    pub fn without_sessions(room: &str, nick: &str) -> Membership {
        let mut m = Membership::new(room, nick, "");
        m.participants.clear();
        m
    }

    pub fn participant_mut(&mut self, resource: &str) -> Option<&mut Participant> {
        self.participants
            .iter_mut()
            .find(|p| &*p.resource == resource)
    }

    /// Set a session's presence toward the room (none: it went unavailable).
    pub fn set_presence(&mut self, resource: &str, presence: Option<SessionPresence>) {
        if let Some(p) = self.participant_mut(resource) {
            p.presence = presence;
        }
    }

    /// Start afresh after a leave was sent: a new join of the account is in flight.
    pub fn restart(&mut self, nick: &str, first: &str) {
        let waiters = std::mem::take(&mut self.leave_waiters);
        let password = self.password.take();
        let received = std::mem::take(&mut self.received);
        *self = Membership::new(&self.room.clone(), nick, first);
        self.leave_waiters = waiters;
        self.password = password;
        self.received = received;
    }

    pub fn participant(&self, resource: &str) -> Option<&Participant> {
        self.participants.iter().find(|p| &*p.resource == resource)
    }

    pub fn is_participant(&self, resource: &str) -> bool {
        self.participant(resource).is_some()
    }

    pub fn is_joined_session(&self, resource: &str) -> bool {
        self.participant(resource).is_some_and(|p| p.joined)
    }

    pub fn add(&mut self, resource: &str, joined: bool) {
        match self
            .participants
            .iter_mut()
            .find(|p| &*p.resource == resource)
        {
            Some(p) => p.joined = joined,
            None => self.participants.push(Participant {
                resource: resource.into(),
                joined,
                presence: None,
                joined_before_rejoin: false,
            }),
        }
    }

    /// Forget a session; true if it was a participant.
    pub fn remove(&mut self, resource: &str) -> bool {
        let before = self.participants.len();
        self.participants.retain(|p| &*p.resource != resource);
        self.leave_waiters.retain(|r| r != resource);
        if self.nick_change_by.as_deref() == Some(resource) {
            self.nick_change_by = None;
        }
        before != self.participants.len()
    }

    /// Sessions that get what the room sends: joined ones and those waiting on the join.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        self.participants.iter().map(|p| &*p.resource)
    }

    pub fn mark_all_joined(&mut self) {
        for p in &mut self.participants {
            p.joined = true;
        }
    }

    /// The most recently joined session, to take IQs the room forwards to the account.
    pub fn latest_joined(&self) -> Option<&str> {
        self.participants
            .iter()
            .rev()
            .find(|p| p.joined)
            .map(|p| &*p.resource)
    }
}
