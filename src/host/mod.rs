//! The state of one VirtualHost: every account's memberships. Events go in, actions come
//! out; nothing here does I/O, so every flow of the behaviour contract is a plain unit test.
//!
//! The events, by where they come from: what sessions send ([`sessions`]), what rooms send
//! to the account ([`rooms`]) and what the module does on its own (restore, bookmarks,
//! admin leaves, timers: [`actions`]).

mod actions;
mod outage;
mod rooms;
mod sessions;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use std::rc::Rc;

use crate::iq::IqProxy;
use crate::membership::{Membership, Phase};
use crate::received::Received;
use crate::stanza::{Addr, Payload};

pub use crate::outcome::{Action, Edit, Out, Outcome};

/// Settings, read by the shim from `minimix_*` options.
#[derive(Clone, Debug)]
pub struct Config {
    /// Groupchat messages kept per room for later joins.
    pub history_length: usize,
    /// Rooms one account may be in through the module.
    pub max_rooms: usize,
    /// Occupant presences kept per room.
    pub max_occupants: usize,
    /// IQs pending per account, and how long (seconds) a reply is waited for.
    pub max_pending_iqs: usize,
    pub iq_timeout: i64,
    /// MUC hosts and rooms left alone (e.g. IRC gateways).
    pub excluded_hosts: Vec<String>,
    pub excluded_rooms: Vec<String>,
    /// Honour test-fault payloads (for the specs that prove failures are contained).
    pub test_faults: bool,
    /// Seconds between the account's self-pings of a room while no session is joined to
    /// it (0: never); a ping and a rejoin are waited for `iq_timeout` seconds.
    pub self_ping_interval: i64,
    /// Joins the module tries to bring the account back into a room after an outage
    /// before it gives up until the next start.
    pub rejoin_attempts: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            history_length: 20,
            max_rooms: 100,
            max_occupants: 1000,
            max_pending_iqs: 256,
            iq_timeout: 120,
            excluded_hosts: Vec::new(),
            excluded_rooms: Vec::new(),
            test_faults: false,
            self_ping_interval: 300,
            rejoin_attempts: 8,
        }
    }
}

#[derive(Debug, Default)]
struct Account {
    rooms: HashMap<String, Membership>,
    iqs: IqProxy,
}

/// `user`'s membership in `room`, borrowing the accounts alone: the host's other fields
/// (its timers, counters, configuration) stay at hand beside it.
fn member<'a>(
    accounts: &'a mut HashMap<String, Account>,
    user: &str,
    room: &str,
) -> Option<&'a mut Membership> {
    accounts.get_mut(user)?.rooms.get_mut(room)
}

/// Counts for the admin and the tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub accounts: usize,
    pub memberships: usize,
    pub joined_sessions: usize,
    pub cached_presences: usize,
    pub cached_messages: usize,
    pub pending_iqs: usize,
    /// Bytes of kept stanza text (shared text counted once per membership).
    pub kept_bytes: usize,
    /// Counters since the host's state was made.
    pub forked: u64,
    pub joins_served_locally: u64,
    pub iqs_proxied: u64,
    /// Proxied IQs whose reply was not waited for any longer (dropped by a tick).
    pub iqs_expired: u64,
    /// Joins the module sent to bring the account back into a room it was in (after a
    /// restart, an error kick, a shutdown, a room that forgot it), and the rooms it gave
    /// up on (every attempt failed; kept for the next start).
    pub rejoins: u64,
    pub rejoins_given_up: u64,
    /// The account's own self-pings sent, and how they ended: answered (still joined),
    /// gone (the room forgot the account: rejoin), failed (network error or no answer:
    /// try later).
    pub self_pings: u64,
    pub self_pings_answered: u64,
    pub self_pings_gone: u64,
    pub self_pings_failed: u64,
    /// Messages a room replayed after such a rejoin: new to the account (archived and
    /// forked once), and already got (neither).
    pub replayed_new: u64,
    pub replayed_known: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    forked: u64,
    joins_served_locally: u64,
    iqs_proxied: u64,
    iqs_expired: u64,
    rejoins: u64,
    rejoins_given_up: u64,
    self_pings: u64,
    self_pings_answered: u64,
    self_pings_gone: u64,
    self_pings_failed: u64,
    replayed_new: u64,
    replayed_known: u64,
}

/// When the timers next look at each membership: (time, account, room), earliest first.
/// A membership's `wake` says which entry is current; others are stale and skipped.
#[derive(Debug, Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(i64, String, Rc<str>)>>,
    /// An entry came before every other since this was last taken: the host's next
    /// deadline is sooner than the shim may have armed its timer for.
    sooner: bool,
}

impl Timers {
    fn push(&mut self, at: i64, user: &str, room: Rc<str>) {
        if self
            .heap
            .peek()
            .is_none_or(|Reverse((first, _, _))| at < *first)
        {
            self.sooner = true;
        }
        self.heap.push(Reverse((at, user.to_owned(), room)));
    }

    fn peek_entry(&self) -> Option<(i64, &str, &str)> {
        self.heap
            .peek()
            .map(|Reverse((at, user, room))| (*at, user.as_str(), &**room))
    }

    fn pop(&mut self) {
        self.heap.pop();
    }

    fn first(&self) -> Option<i64> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The entries due at `now`, taken off.
    fn take_due(&mut self, now: i64) -> Vec<(i64, String, Rc<str>)> {
        let mut due = Vec::new();
        while self.first().is_some_and(|at| at <= now) {
            if let Some(Reverse(entry)) = self.heap.pop() {
                due.push(entry);
            }
        }
        due
    }
}

pub struct Host {
    domain: String,
    config: Config,
    accounts: HashMap<String, Account>,
    iq_seq: u64,
    /// Orders session presences, for "the latest on ties".
    presence_seq: u64,
    counters: Counters,
    /// Services known to be MUCs (local MUC components; others by disco#info), as the
    /// shim learned them: a presence without `<x/>` to one of these is a join.
    muc_services: HashSet<String>,
    /// Memberships with something due (self-pings, rejoins), by time.
    timers: Timers,
    /// What the shim found in the archives at start, per (account, room), until the
    /// membership is restored (see [`Host::remember`]).
    remembered: HashMap<(String, String), Received>,
    /// Accounts whose memberships' [`Received`] changed since the shim last asked.
    unsaved: HashSet<String>,
}

impl Host {
    pub fn new(domain: &str, config: Config) -> Host {
        Host {
            domain: domain.to_owned(),
            config,
            accounts: HashMap::new(),
            iq_seq: 0,
            presence_seq: 0,
            counters: Counters::default(),
            muc_services: HashSet::new(),
            timers: Timers::default(),
            remembered: HashMap::new(),
            unsaved: HashSet::new(),
        }
    }

    /// The shim learned whether `domain` is a MUC service.
    pub fn learn_service(&mut self, domain: &str, is_muc: bool) {
        if is_muc {
            self.muc_services.insert(domain.to_owned());
        } else {
            self.muc_services.remove(domain);
        }
    }

    /// Whether a presence to `room` is MUC traffic even without `<x/>`: the room's service
    /// is known to be a MUC, or the account is in rooms there already.
    fn known_muc_service(&self, user: &str, room: &str) -> bool {
        let domain = Addr::parse(room).map_or(room, |a| a.domain);
        self.muc_services.contains(domain)
            || self.accounts.get(user).is_some_and(|a| {
                a.rooms
                    .keys()
                    .any(|r| Addr::parse(r).is_some_and(|a| a.domain == domain))
            })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn excluded(&self, room: &str, muc_host: &str) -> bool {
        self.config.excluded_hosts.iter().any(|h| h == muc_host)
            || self.config.excluded_rooms.iter().any(|r| r == room)
    }

    /// Whether the room ever confirmed the account's membership (a self-presence, 110):
    /// stored with it, so that only confirmed memberships are trusted after a restart.
    pub fn confirmed(&self, user: &str, room: &str) -> bool {
        self.membership(user, room).is_some_and(|m| m.confirmed)
    }

    /// What to store of an account's memberships: room, nick and password of each room it
    /// is in or joining, sorted by room.
    pub fn persisted(&self, user: &str) -> Vec<(String, String, Option<String>)> {
        let mut v: Vec<_> = self
            .accounts
            .get(user)
            .map(|a| {
                a.rooms
                    .values()
                    .filter(|m| m.phase != Phase::Leaving)
                    .map(|m| (m.room.to_string(), m.nick.clone(), m.password.clone()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    // ---------------------------------------------------------------------------------

    fn membership(&self, user: &str, room: &str) -> Option<&Membership> {
        self.accounts.get(user)?.rooms.get(room)
    }

    fn membership_mut(&mut self, user: &str, room: &str) -> Option<&mut Membership> {
        member(&mut self.accounts, user, room)
    }

    /// The sessions of `user` taking part in `room` (joined or joining), oldest first.
    pub fn participants_of(&self, user: &str, room: &str) -> Vec<Rc<str>> {
        self.membership(user, room).map_or_else(Vec::new, |m| {
            m.participants.iter().map(|p| p.resource.clone()).collect()
        })
    }

    /// Rooms of an account with the account's nick and joined sessions, sorted by room.
    pub fn memberships_of(&self, user: &str) -> Vec<(String, String, Vec<String>)> {
        let mut v: Vec<_> = self
            .accounts
            .get(user)
            .map(|a| {
                a.rooms
                    .values()
                    .map(|m| {
                        let sessions = m
                            .participants
                            .iter()
                            .filter(|p| p.joined)
                            .map(|p| p.resource.to_string())
                            .collect();
                        (m.room.to_string(), m.nick.clone(), sessions)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Whether the host's next deadline came sooner since this was last asked (and the
    /// shim should look at [`Host::next_deadline`] again).
    pub fn take_sooner_deadline(&mut self) -> bool {
        std::mem::take(&mut self.timers.sooner)
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            accounts: self.accounts.len(),
            forked: self.counters.forked,
            joins_served_locally: self.counters.joins_served_locally,
            iqs_proxied: self.counters.iqs_proxied,
            iqs_expired: self.counters.iqs_expired,
            rejoins: self.counters.rejoins,
            rejoins_given_up: self.counters.rejoins_given_up,
            self_pings: self.counters.self_pings,
            self_pings_answered: self.counters.self_pings_answered,
            self_pings_gone: self.counters.self_pings_gone,
            self_pings_failed: self.counters.self_pings_failed,
            replayed_new: self.counters.replayed_new,
            replayed_known: self.counters.replayed_known,
            ..Stats::default()
        };
        for a in self.accounts.values() {
            s.memberships += a.rooms.len();
            s.pending_iqs += a.iqs.len();
            for m in a.rooms.values() {
                s.joined_sessions += m.participants.iter().filter(|p| p.joined).count();
                s.cached_presences += m.occupants.len();
                s.cached_messages += m.history.len();
                s.kept_bytes += m.occupants.text_bytes()
                    + m.history.text_bytes()
                    + m.self_presence.as_ref().map_or(0, |p| p.len())
                    + m.subject.as_ref().map_or(0, |p| p.len());
            }
        }
        s
    }
}

/// A stanza's serialized form, to keep; none when it could not be serialized (nested past
/// what the bridge reads): such a stanza is forked but not kept.
fn kept(el: &dyn Payload) -> Option<Rc<str>> {
    Some(el.xml()).filter(|xml| !xml.is_empty())
}

fn drop_empty(accounts: &mut HashMap<String, Account>, user: &str) {
    if accounts
        .get(user)
        .is_some_and(|a| a.rooms.is_empty() && a.iqs.is_empty())
    {
        accounts.remove(user);
    }
}
