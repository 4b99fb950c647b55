//! The state of one VirtualHost: every account's memberships. Events go in, actions come
//! out; nothing here does I/O, so every flow of the behaviour contract is a plain unit test.

use std::collections::{HashMap, HashSet};

use std::rc::Rc;

use minidom::Element;

use crate::iq::{IqProxy, PendingIq};
use crate::membership::{Membership, Phase};
use crate::presence::{self, SessionPresence};
use crate::stanza::{
    self, Addr, Head, Kind, NS_CLIENT, NS_DELAY, NS_MUC, NS_MUC_USER, NS_PING, NS_TEST_FAULT,
    Payload, n, status,
};

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
        }
    }
}

/// A stanza for an action.
#[derive(Debug)]
pub enum Out {
    /// The stanza that came in, its `id` replaced when given.
    Original { id: Option<String> },
    /// A stanza made by the core.
    New(Element),
    /// A stanza the core kept (serialized), as it goes to a later-joining session.
    Kept { xml: Rc<str>, edit: Edit },
}

/// How a kept stanza is changed before it reaches a session.
#[derive(Debug, Clone)]
pub enum Edit {
    None,
    /// A history message without a delay of its own: add one from the room.
    Delay {
        room: Rc<str>,
        stamp: i64,
    },
    /// The account's self-presence as a later-joining session gets it: drop "room
    /// created" (201); add "nick assigned" (210) when the session asked for another nick;
    /// the session's own full JID where the room named the account.
    OwnPresence {
        nick_differs: bool,
        jid: Rc<str>,
    },
    /// A self-presence of the room's (join, nick change, role change, removal, leave) to
    /// one session: the session's own full JID where the room named the account, as the
    /// session sees itself without the module.
    OwnJid {
        jid: Rc<str>,
    },
}

impl Edit {
    /// The element added at the end of the kept stanza, if any.
    pub fn added_to_stanza(&self) -> Option<Element> {
        match self {
            Edit::Delay { room, stamp } => Some(
                Element::builder("delay", NS_DELAY)
                    .attr(n("from"), &**room)
                    .attr(n("stamp"), crate::time::format_stamp(*stamp))
                    .build(),
            ),
            _ => None,
        }
    }

    /// Whether the self-presence's muc#user payload is edited at all.
    pub fn edits_own_presence(&self) -> bool {
        matches!(self, Edit::OwnPresence { .. } | Edit::OwnJid { .. })
    }

    /// The status added to the self-presence's muc#user payload, if any.
    pub fn added_to_own_presence(&self) -> Option<Element> {
        match self {
            Edit::OwnPresence {
                nick_differs: true, ..
            } => Some(
                Element::builder("status", NS_MUC_USER)
                    .attr(n("code"), status::ASSIGNED_NICK.to_string())
                    .build(),
            ),
            _ => None,
        }
    }

    /// Whether a status code is left out of the self-presence ("room created", 201, is
    /// news only to the session whose join created the room).
    pub fn drops_own_status(&self, code: Option<&str>) -> bool {
        matches!(self, Edit::OwnPresence { .. }) && code == Some("201")
    }

    /// The `jid` an `<item/>` of the self-presence's muc#user payload gets instead of
    /// `current`: the session's full JID where the room named the account (any JID with
    /// the account's bare JID), else nothing to change.
    pub fn own_item_jid(&self, current: &str) -> Option<&str> {
        let (Edit::OwnPresence { jid, .. } | Edit::OwnJid { jid }) = self else {
            return None;
        };
        let bare = jid.split_once('/').map_or(&**jid, |(b, _)| b);
        (Addr::bare_of(current) == bare && current != &**jid).then_some(&**jid)
    }
}

impl Out {
    /// The element an `Out` that is not the original stands for.
    pub fn to_element(&self) -> Option<Element> {
        match self {
            Out::Original { .. } => None,
            Out::New(el) => Some(el.clone()),
            Out::Kept { xml, edit } => {
                let mut el = stanza::parse_kept(xml)?;
                if let Some(added) = edit.added_to_stanza() {
                    el.append_child(added);
                }
                if edit.edits_own_presence() {
                    own_presence_for_join(&mut el, edit);
                }
                Some(el)
            }
        }
    }
}

#[derive(Debug)]
pub enum Action {
    /// Give to one session of the account, `to` set to that session's full JID.
    Deliver { resource: Rc<str>, stanza: Out },
    /// Send into the network from the account's bare JID.
    Send { stanza: Out },
}

/// The result of one event. `handled` false means Prosody goes on as if the module were
/// not loaded; the actions are then empty.
#[derive(Debug, Default)]
pub struct Outcome {
    pub handled: bool,
    /// The account the actions are for.
    pub user: Option<String>,
    pub actions: Vec<Action>,
    /// Lines worth an admin's attention (logged by the shim at info).
    pub notes: Vec<String>,
    /// The account's memberships changed: the shim stores [`Host::persisted`] again.
    pub persist: bool,
    /// The stanza that came in is a live groupchat message for the account's own archive
    /// (stored once, before it is forked).
    pub archive: bool,
    /// Rooms of `user` whose participating sessions (joined or joining) may have changed,
    /// the membership's end included. The bridge keeps its index of the rooms each session
    /// is in (the shim's fast path for what sessions send) from these: see
    /// [`Host::participants_of`].
    pub changed_rooms: Vec<String>,
    /// The deliveries are the fork to every session taking part in this room, in order
    /// (so the bridge can hand out the list of them it keeps).
    pub fork_of: Option<Rc<str>>,
}

impl Outcome {
    fn pass() -> Outcome {
        Outcome::default()
    }

    fn handled(user: &str) -> Outcome {
        Outcome {
            handled: true,
            user: Some(user.to_owned()),
            ..Outcome::default()
        }
    }

    fn deliver(&mut self, resource: &str, stanza: Out) {
        self.actions.push(Action::Deliver {
            resource: resource.into(),
            stanza,
        });
    }

    fn deliver_original(&mut self, resource: &str) {
        self.deliver(resource, Out::Original { id: None });
    }

    /// The stanza that came in, to every session of `m` that joined or is joining.
    fn fork(&mut self, m: &Membership) {
        if self.actions.is_empty() {
            self.fork_of = Some(m.room.clone());
        }
        self.actions.reserve(m.participants.len());
        for p in &m.participants {
            self.actions.push(Action::Deliver {
                resource: p.resource.clone(),
                stanza: Out::Original { id: None },
            });
        }
    }

    /// A self-presence of the room's (`xml`, as kept) to every session taking part, each
    /// seeing its own full JID in it (see [`Edit::OwnJid`]).
    fn fork_own(&mut self, m: &Membership, account: &str, xml: &Option<Rc<str>>) {
        self.actions.reserve(m.participants.len());
        for p in &m.participants {
            self.actions.push(Action::Deliver {
                resource: p.resource.clone(),
                stanza: own_copy(xml, account, &p.resource),
            });
        }
    }

    /// The sessions taking part in `room` may have changed.
    fn participants_changed(&mut self, room: &str) {
        if !self.changed_rooms.iter().any(|r| r == room) {
            self.changed_rooms.push(room.to_owned());
        }
    }

    fn send_original(&mut self, id: Option<String>) {
        self.actions.push(Action::Send {
            stanza: Out::Original { id },
        });
    }
}

#[derive(Debug, Default)]
struct Account {
    rooms: HashMap<String, Membership>,
    iqs: IqProxy,
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
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    forked: u64,
    joins_served_locally: u64,
    iqs_proxied: u64,
}

/// A stanza a session sent to a room or to one of its occupants, with what routing needs.
#[derive(Clone, Copy)]
struct ToRoom<'a> {
    user: &'a str,
    resource: &'a str,
    head: &'a Head<'a>,
    el: &'a dyn Payload,
    room: &'a str,
    /// The occupant's nick the stanza is addressed to, if any.
    nick: Option<&'a str>,
    now: i64,
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

    // ---------------------------------------------------------------------------------
    // A session of this host sent a stanza (Prosody's pre-<kind>/full and /bare events).

    /// A session sent `el` (convenience over [`Host::session_event`]).
    pub fn session_stanza(
        &mut self,
        user: &str,
        resource: &str,
        el: &Element,
        now: i64,
    ) -> Outcome {
        match Head::of(el) {
            Some(head) => self.session_event(user, resource, &head, el, now),
            None => Outcome::pass(),
        }
    }

    pub fn session_event(
        &mut self,
        user: &str,
        resource: &str,
        head: &Head,
        el: &dyn Payload,
        now: i64,
    ) -> Outcome {
        let head = *head;
        let Some(to_text) = head.to else {
            if head.kind == Kind::Presence {
                return self.session_broadcast(user, resource, &head, el);
            }
            return Outcome::pass();
        };
        let Some(to) = Addr::parse(to_text) else {
            return Outcome::pass();
        };
        if to.node.is_none() || to.domain == self.domain {
            return Outcome::pass();
        }
        let room = Addr::bare_of(head.to.unwrap_or_default());
        if self.excluded(room, to.domain) {
            return Outcome::pass();
        }
        if self.config.test_faults
            && el.child_attr("fault", NS_TEST_FAULT, "kind").as_deref() == Some("panic")
        {
            panic!("deliberate test fault");
        }
        let s = ToRoom {
            user,
            resource,
            head: &head,
            el,
            room,
            nick: to.resource,
            now,
        };
        match head.kind {
            Kind::Presence => self.session_presence(&s),
            Kind::Message => self.session_message(user, resource, &head, room),
            Kind::Iq => self.session_iq(&s),
        }
    }

    fn session_presence(&mut self, s: &ToRoom) -> Outcome {
        let ToRoom {
            user,
            resource,
            head,
            room,
            nick,
            ..
        } = *s;
        let Some(nick) = nick else {
            return self.session_presence_to_room(s);
        };
        match head.type_ {
            None => self.session_available(s, nick),
            Some("probe") => self.session_probe(user, resource, room, nick),
            Some("unavailable") => self.session_unavailable(user, resource, room),
            Some("error") => {
                // An error presence from the account would make the room kick it.
                let joined = self
                    .membership(user, room)
                    .is_some_and(|m| m.is_participant(resource));
                if joined {
                    Outcome::handled(user)
                } else {
                    Outcome::pass()
                }
            }
            Some(_) => Outcome::pass(),
        }
    }

    /// A presence to the bare room JID. A join needs a nick (XEP-0045 §7.2.1); a joined
    /// session's presence there is a presence update, as Prosody's MUC takes it from an
    /// occupant; anything else is left to the room.
    fn session_presence_to_room(&mut self, s: &ToRoom) -> Outcome {
        let ToRoom {
            user,
            resource,
            head,
            el,
            room,
            ..
        } = *s;
        if head.type_.is_some() {
            return Outcome::pass();
        }
        if el.has_child("x", NS_MUC) {
            let mut out = Outcome::handled(user);
            let reply = stanza::error_reply(
                head,
                room,
                "modify",
                "jid-malformed",
                "A nickname is required to join a room",
            );
            out.deliver(resource, Out::New(reply));
            return out;
        }
        match self.membership(user, room) {
            Some(m) if m.phase == Phase::Joined && m.is_joined_session(resource) => {
                let nick = m.nick.clone();
                self.session_available(s, &nick)
            }
            _ => Outcome::pass(),
        }
    }

    /// A probe for an occupant's presence from a joined session: answered from what the
    /// account knows, else asked of the room by the account.
    fn session_probe(&mut self, user: &str, resource: &str, room: &str, nick: &str) -> Outcome {
        let Some(m) = self.membership(user, room) else {
            return Outcome::pass();
        };
        if m.phase != Phase::Joined || !m.is_joined_session(resource) {
            return Outcome::pass();
        }
        let mut out = Outcome::handled(user);
        let known = if nick == m.nick {
            m.self_presence.clone().map(|xml| Out::Kept {
                xml,
                edit: Edit::OwnPresence {
                    nick_differs: false,
                    jid: format!("{user}@{}/{resource}", self.domain).into(),
                },
            })
        } else {
            m.occupants.get(nick).map(|xml| Out::Kept {
                xml: xml.clone(),
                edit: Edit::None,
            })
        };
        match known {
            Some(presence) => out.deliver(resource, presence),
            None => out.send_original(None),
        }
        out
    }

    /// An available presence to R/`nick` (a join, an update or a nick change).
    fn session_available(&mut self, s: &ToRoom, nick: &str) -> Outcome {
        let ToRoom {
            user,
            resource,
            head,
            el,
            room,
            now,
            ..
        } = *s;
        let is_join = el.has_child("x", NS_MUC);
        if !is_join && self.membership(user, room).is_none() && !self.known_muc_service(user, room)
        {
            // Not MUC traffic: a directed presence to a contact (SPEC, rules that always
            // hold). It leaves from the session's own full JID, as without the module.
            return Outcome::pass();
        }
        let max_rooms = self.config.max_rooms;
        let mut out = Outcome::handled(user);
        self.presence_seq += 1;
        let seq = self.presence_seq;
        // The session's presence as the room would see it (made only where it is needed).
        let own_presence = || presence::reduce(&el.xml(), seq);
        // (The accounts alone are borrowed, so the domain stays at hand.)
        let Some(m) = self
            .accounts
            .get_mut(user)
            .and_then(|a| a.rooms.get_mut(room))
        else {
            // First join: the account joins. The membership is recorded before the join is
            // sent, because a MUC on this server answers while the join is being sent.
            let joined_rooms = self.accounts.get(user).map_or(0, |a| a.rooms.len());
            if joined_rooms >= max_rooms {
                let text = format!("Too many rooms joined by this account (limit {max_rooms})");
                let reply = stanza::error_reply(
                    head,
                    &format!("{room}/{nick}"),
                    "wait",
                    "resource-constraint",
                    &text,
                );
                out.deliver(resource, Out::New(reply));
                return out;
            }
            if jid::FullJid::new(&format!("{room}/{nick}")).is_err() {
                return Outcome::pass();
            }
            let mut m = Membership::new(room, nick, resource);
            m.password = el.join_password();
            let presence = own_presence();
            m.shown = presence.as_ref().map(|p| p.xml.clone());
            m.participants[0].presence = presence;
            self.accounts
                .entry(user.to_owned())
                .or_default()
                .rooms
                .insert(room.to_owned(), m);
            out.participants_changed(room);
            out.notes.push(format!(
                "{user} joins {room} as {nick} (first session {resource})"
            ));
            out.persist = true;
            out.send_original(None);
            return out;
        };
        let participant = m.participant(resource).map(|p| p.joined);
        let mut served_locally = false;
        match (m.phase, participant) {
            (Phase::Leaving, _) => {
                m.restart(nick, resource);
                out.participants_changed(room);
                m.password = el.join_password();
                let presence = own_presence();
                m.shown = presence.as_ref().map(|p| p.xml.clone());
                m.participants[0].presence = presence;
                out.notes
                    .push(format!("{user} rejoins {room} as {nick} while leaving it"));
                out.persist = true;
                out.send_original(None);
            }
            (Phase::Joined, Some(true)) if !is_join => {
                if nick != m.nick {
                    // A nick change: the room answers with 303 and the new presence. It
                    // carries the account's presence, not just the asker's.
                    m.nick_change_by = Some(resource.to_owned());
                    set_presence(m, resource, own_presence());
                    let change = presence::aggregate(m).and_then(|best| {
                        let mut update = presence::update_for_room(best, room, nick)?;
                        if let Some(id) = head.id {
                            stanza::set_attr(&mut update, "id", id);
                        }
                        Some((best.xml.clone(), update))
                    });
                    match change {
                        Some((shown, update)) => {
                            m.shown = Some(shown);
                            out.actions.push(Action::Send {
                                stanza: Out::New(update),
                            });
                        }
                        None => out.send_original(None),
                    }
                } else {
                    // A presence update: the room sees the account's aggregate only.
                    set_presence(m, resource, own_presence());
                    update_room_presence(m, &mut out);
                }
            }
            (Phase::Joining, Some(false)) if !is_join => {
                set_presence(m, resource, own_presence());
            }
            (Phase::Joined, _) => {
                m.add(resource, true);
                out.participants_changed(room);
                set_presence(m, resource, own_presence());
                let own_jid: Rc<str> = format!("{user}@{}/{resource}", self.domain).into();
                serve_join(m, &own_jid, resource, el, nick, now, &mut out);
                served_locally = true;
                update_room_presence(m, &mut out);
            }
            (Phase::Joining, _) => {
                // The account's join is in flight: replay what arrived, the rest follows.
                m.add(resource, false);
                out.participants_changed(room);
                set_presence(m, resource, own_presence());
                for p in m.occupants.others(&m.nick) {
                    out.deliver(
                        resource,
                        Out::Kept {
                            xml: p.clone(),
                            edit: Edit::None,
                        },
                    );
                }
            }
        }
        if served_locally {
            self.counters.joins_served_locally += 1;
        }
        out
    }

    fn session_unavailable(&mut self, user: &str, resource: &str, room: &str) -> Outcome {
        let own_jid = format!("{user}@{}/{resource}", self.domain);
        let Some(m) = self.membership_mut(user, room) else {
            return Outcome::pass();
        };
        if m.leave_waiters.iter().any(|r| r == resource) && !m.is_participant(resource) {
            // Already waiting for the room's answer to the account's leave: it comes.
            return Outcome::handled(user);
        }
        if !m.remove(resource) {
            return Outcome::pass();
        }
        let mut out = Outcome::handled(user);
        out.participants_changed(room);
        if m.participants.is_empty() {
            // The last session leaves: the account leaves; the room's answer goes to it.
            m.phase = Phase::Leaving;
            m.leave_waiters.push(resource.to_owned());
            out.notes.push(format!(
                "{user} leaves {room} (last session {resource} left)"
            ));
            out.persist = true;
            out.send_original(None);
        } else {
            out.deliver(resource, Out::New(leave_presence(m, &own_jid)));
            update_room_presence(m, &mut out);
        }
        out
    }

    fn session_message(&mut self, user: &str, resource: &str, head: &Head, room: &str) -> Outcome {
        let Some(m) = self.membership(user, room) else {
            return Outcome::pass();
        };
        if !m.is_participant(resource) {
            return Outcome::pass();
        }
        let mut out = Outcome::handled(user);
        if !head.is_type("error") {
            out.send_original(None);
        }
        // An error message from the account would make the room kick it: dropped.
        out
    }

    fn session_iq(&mut self, s: &ToRoom) -> Outcome {
        let ToRoom {
            user,
            resource,
            head,
            el,
            room,
            nick,
            now,
        } = *s;
        let (timeout, limit) = (self.config.iq_timeout, self.config.max_pending_iqs);
        let Some(account) = self.accounts.get_mut(user) else {
            return Outcome::pass();
        };
        let Some(m) = account.rooms.get(room) else {
            return Outcome::pass();
        };
        let is_ping = el
            .first_child()
            .is_some_and(|(name, ns)| name == "ping" && ns == NS_PING);
        let self_ping = is_ping && nick == Some(m.nick.as_str());
        let mut out = Outcome::handled(user);
        if !m.is_participant(resource) {
            if self_ping && head.is_type("get") {
                // XEP-0410: a session that has not joined is not an occupant.
                let reply = stanza::error_reply(
                    head,
                    head.to.unwrap_or_default(),
                    "cancel",
                    "not-acceptable",
                    "This session has not joined the room",
                );
                out.deliver(resource, Out::New(reply));
                return out;
            }
            return Outcome::pass();
        }
        match head.type_ {
            Some("get" | "set") => {
                self.iq_seq += 1;
                self.counters.iqs_proxied += 1;
                let our_id = format!("mmx{}", self.iq_seq);
                account.iqs.track(
                    our_id.clone(),
                    PendingIq {
                        resource: resource.to_owned(),
                        id: head.id.map(str::to_owned),
                        to: head.to.unwrap_or_default().to_owned(),
                        self_ping,
                        sent: now,
                    },
                    timeout,
                    limit,
                );
                out.send_original(Some(our_id));
            }
            // Replies to IQs the room forwarded to the account.
            Some("result" | "error") => out.send_original(None),
            _ => return Outcome::pass(),
        }
        out
    }

    // ---------------------------------------------------------------------------------
    // Something arrived for an account of this host (presence/bare, message/bare, iq/bare).

    /// The room sent `el` to an account (convenience over [`Host::room_event`]).
    pub fn room_stanza(&mut self, el: &Element, now: i64) -> Outcome {
        match Head::of(el) {
            Some(head) => self.room_event(&head, el, now),
            None => Outcome::pass(),
        }
    }

    pub fn room_event(&mut self, head: &Head, el: &dyn Payload, now: i64) -> Outcome {
        let out = self.room_event_inner(head, el, now);
        self.counters.forked += out
            .actions
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Deliver {
                        stanza: Out::Original { .. }
                            | Out::Kept {
                                edit: Edit::OwnJid { .. },
                                ..
                            },
                        ..
                    }
                )
            })
            .count() as u64;
        out
    }

    fn room_event_inner(&mut self, head: &Head, el: &dyn Payload, now: i64) -> Outcome {
        let head = *head;
        let Some(to) = head.to.and_then(Addr::parse) else {
            return Outcome::pass();
        };
        let (Some(user), None) = (to.node, to.resource) else {
            return Outcome::pass();
        };
        if to.domain != self.domain {
            return Outcome::pass();
        }
        let Some(from_text) = head.from else {
            return Outcome::pass();
        };
        let Some(from) = Addr::parse(from_text) else {
            return Outcome::pass();
        };
        let room = Addr::bare_of(from_text);
        match head.kind {
            Kind::Iq => self.room_iq(user, el, &head, room, from_text),
            Kind::Presence => self.room_presence(user, el, &head, room, from.resource),
            Kind::Message => self.room_message(user, el, &head, room, now),
        }
    }

    fn room_presence(
        &mut self,
        user: &str,
        el: &dyn Payload,
        head: &Head,
        room: &str,
        nick: Option<&str>,
    ) -> Outcome {
        let max_occupants = self.config.max_occupants;
        let Some(account) = self.accounts.get_mut(user) else {
            return Outcome::pass();
        };
        let Some(m) = account.rooms.get_mut(room) else {
            return Outcome::pass();
        };
        let mut out = Outcome::handled(user);
        if head.is_type("error") {
            match m.phase {
                Phase::Joining => {
                    out.fork(m);
                    out.notes.push(format!(
                        "{user} could not join {room}: {}",
                        el.error_condition().as_deref().unwrap_or("error")
                    ));
                    account.rooms.remove(room);
                    out.participants_changed(room);
                    out.persist = true;
                    drop_empty(&mut self.accounts, user);
                }
                Phase::Leaving => {
                    for r in &m.leave_waiters {
                        out.deliver_original(r);
                    }
                    account.rooms.remove(room);
                    out.participants_changed(room);
                    out.persist = true;
                    drop_empty(&mut self.accounts, user);
                }
                Phase::Joined => {
                    let about_own_nick = nick.is_none_or(|n| n == m.nick);
                    match m.nick_change_by.take() {
                        // The answer to a nick change goes to the asker only.
                        Some(asker) if !about_own_nick => out.deliver_original(&asker),
                        // Its asker is gone: nobody else asked.
                        None if !about_own_nick => {}
                        _ => out.fork(m),
                    }
                }
            }
            return out;
        }
        if head.type_.is_some() && !head.is_type("unavailable") {
            // Rooms send no other presence types (subscribe, probe, …) to occupants:
            // none of it is room state.
            return Outcome::pass();
        }
        let Some(nick) = nick else {
            out.fork(m);
            return out;
        };
        let unavailable = head.is_type("unavailable");
        let codes = el.status_codes();
        let is_self = codes.contains(&status::SELF_PRESENCE);
        let nick_changed = unavailable && codes.contains(&status::NEW_NICK);
        if !is_self {
            if nick_changed {
                m.occupants.remove(nick);
            } else {
                m.occupants
                    .update(nick, !unavailable, max_occupants, || kept(el));
            }
            if m.phase != Phase::Leaving {
                out.fork(m);
            }
            return out;
        }
        // The account's own presence: each session sees its own full JID in it.
        let account_jid = format!("{user}@{}", self.domain);
        let xml = kept(el);
        if !unavailable {
            if m.phase == Phase::Leaving {
                return out;
            }
            if m.phase == Phase::Joining
                && m.made_by_module
                && codes.contains(&status::ROOM_HAS_BEEN_CREATED)
            {
                // The room was gone and this join made it anew. Prosody locks a new room
                // until its owner configures it, and no session is here to do that: accept
                // the default configuration (an instant room, XEP-0045 §10.1.2), as
                // Prosody does itself without room locking, so that every account and
                // client can come back to it.
                out.notes.push(format!(
                    "{user} made {room} anew, which no longer existed, with the default configuration"
                ));
                out.actions.push(Action::Send {
                    stanza: Out::New(presence::instant_room(room)),
                });
            }
            if m.phase == Phase::Joining {
                out.notes.push(format!("{user} joined {room} as {nick}"));
                out.persist = true;
            }
            m.confirmed = true;
            m.phase = Phase::Joined;
            m.mark_all_joined();
            m.nick = nick.to_owned();
            m.nick_change_by = None;
            m.self_presence = xml.clone().or(m.self_presence.take());
            m.affiliation = el.item_attr("affiliation");
            out.fork_own(m, &account_jid, &xml);
            // Presence changes made while the join was in flight reach the room now.
            update_room_presence(m, &mut out);
            return out;
        }
        if nick_changed {
            if let Some(new_nick) = el.item_attr("nick") {
                m.nick = new_nick;
                out.persist = true;
            }
            out.fork_own(m, &account_jid, &xml);
            return out;
        }
        if !m.leave_waiters.is_empty() || m.phase == Phase::Leaving {
            // The answer to the account's own leave.
            for r in std::mem::take(&mut m.leave_waiters) {
                out.deliver(&r, own_copy(&xml, &account_jid, &r));
            }
            if m.phase == Phase::Leaving {
                account.rooms.remove(room);
                out.participants_changed(room);
                out.persist = true;
                drop_empty(&mut self.accounts, user);
                out.notes.push(format!("{user} left {room}"));
            }
            return out;
        }
        // Removed by the room: kick, ban, affiliation change, members-only, shutdown,
        // error kick or destruction. Every session learns it; nobody rejoins on its own.
        out.fork_own(m, &account_jid, &xml);
        out.notes
            .push(format!("{user} was removed from {room} (status {codes:?})"));
        account.rooms.remove(room);
        out.participants_changed(room);
        out.persist = true;
        drop_empty(&mut self.accounts, user);
        out
    }

    fn room_message(
        &mut self,
        user: &str,
        el: &dyn Payload,
        head: &Head,
        room: &str,
        now: i64,
    ) -> Outcome {
        let history_length = self.config.history_length;
        let Some(m) = self.membership_mut(user, room) else {
            return Outcome::pass();
        };
        let mut out = Outcome::handled(user);
        if m.phase == Phase::Leaving {
            return out;
        }
        if head.is_type("groupchat") {
            let has_body = el.has_child("body", NS_CLIENT);
            // XEP-0045 §8.1: only a subject without a body changes the subject.
            if !has_body && el.has_child("subject", NS_CLIENT) {
                m.subject = kept(el).or(m.subject.take());
                m.complete = true;
            } else if has_body {
                let delay = el
                    .child_attr("delay", NS_DELAY, "stamp")
                    .and_then(|s| crate::time::parse_stamp(&s));
                // Live traffic means the join answer is over, even from a room that sends
                // no subject at all. History the room replays is not archived again.
                if delay.is_none() {
                    m.complete = true;
                    out.archive = true;
                }
                if let Some(xml) = kept(el) {
                    m.history.push(xml, delay, now, history_length);
                }
            }
        } else if head.is_type("chat")
            && el.has_child("body", NS_CLIENT)
            && !el.has_child("delay", NS_DELAY)
        {
            // A private message from an occupant: mod_mam would have archived it.
            out.archive = true;
        }
        out.fork(m);
        out
    }

    fn room_iq(
        &mut self,
        user: &str,
        el: &dyn Payload,
        head: &Head,
        room: &str,
        from: &str,
    ) -> Outcome {
        let Some(account) = self.accounts.get_mut(user) else {
            return Outcome::pass();
        };
        let mut out = Outcome::handled(user);
        match head.type_ {
            Some("result" | "error") => {
                let Some(pending) = head.id.and_then(|id| account.iqs.take(id, from)) else {
                    return Outcome::pass();
                };
                if pending.self_ping
                    && head.is_type("error")
                    && !self_ping_error_means_joined(el.error_condition().as_deref())
                {
                    out.notes.push(format!(
                        "{user} is no longer in {room} (self-ping answered with an error)"
                    ));
                    account.rooms.remove(room);
                    out.participants_changed(room);
                    out.persist = true;
                }
                out.deliver(&pending.resource, Out::Original { id: pending.id });
                drop_empty(&mut self.accounts, user);
                out
            }
            _ => {
                let Some(m) = account.rooms.get(room) else {
                    return Outcome::pass();
                };
                // vCard and PubSub queries are addressed to the bare JID on purpose (the
                // room does so): the user's server answers them, avatars included.
                if el
                    .first_child()
                    .is_some_and(|(_, ns)| ANSWERED_BY_SERVER.contains(&ns.as_str()))
                {
                    return Outcome::pass();
                }
                // An IQ another occupant sent to the account's nick: one joined session
                // answers, as the room does for occupants with several sessions.
                match m.latest_joined() {
                    Some(r) => {
                        out.deliver_original(r);
                        out
                    }
                    None => Outcome::pass(),
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // A session ended without leaving (disconnect, timeout, expired hibernation).

    pub fn session_ended(&mut self, user: &str, resource: &str) -> Outcome {
        let Some(account) = self.accounts.get_mut(user) else {
            return Outcome::pass();
        };
        let mut out = Outcome {
            user: Some(user.to_owned()),
            ..Outcome::default()
        };
        for m in account.rooms.values_mut() {
            if !m.remove(resource) {
                continue;
            }
            out.participants_changed(&m.room);
            if m.phase == Phase::Leaving {
                continue;
            }
            // The account stays in the room, also when no session is left.
            if !m.participants.is_empty() {
                update_room_presence(m, &mut out);
            }
        }
        account.iqs.forget_session(resource);
        out
    }

    /// A session's broadcast presence (no `to`): it is that session's presence in every
    /// room it joined. Prosody goes on with its own broadcast.
    fn session_broadcast(
        &mut self,
        user: &str,
        resource: &str,
        head: &Head,
        el: &dyn Payload,
    ) -> Outcome {
        let Some(account) = self.accounts.get_mut(user) else {
            return Outcome::pass();
        };
        let available = match head.type_ {
            None => true,
            Some("unavailable") => false,
            _ => return Outcome::pass(),
        };
        self.presence_seq += 1;
        let mut reduced: Option<Option<SessionPresence>> = None;
        let mut out = Outcome {
            user: Some(user.to_owned()),
            ..Outcome::default()
        };
        for m in account.rooms.values_mut() {
            if m.phase == Phase::Leaving || !m.is_participant(resource) {
                continue;
            }
            let p = reduced
                .get_or_insert_with(|| {
                    available
                        .then(|| presence::reduce(&el.xml(), self.presence_seq))
                        .flatten()
                })
                .clone();
            set_presence(m, resource, p);
            if m.phase == Phase::Joined {
                update_room_presence(m, &mut out);
            }
        }
        out
    }

    // ---------------------------------------------------------------------------------
    // Memberships the module makes itself: after a restart, from bookmarks, by an admin.

    /// Rejoin a stored membership after a restart, with no session and no history.
    pub fn restore(
        &mut self,
        user: &str,
        room: &str,
        nick: &str,
        password: Option<&str>,
    ) -> Outcome {
        self.join_without_session(user, room, nick, password, "rejoins after a restart")
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
                self.join_without_session(user, room, &nick, password, "joins from a bookmark")
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
        why: &str,
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
            out.notes.push(format!(
                "{user} does not join {room}: already in {max_rooms} rooms (minimix_max_rooms)"
            ));
            return out;
        }
        let mut m = Membership::without_sessions(room, nick);
        m.made_by_module = true;
        m.password = password.map(str::to_owned);
        // The join carries a plain available presence: that is what the room shows until
        // a session says otherwise.
        m.shown = presence::reduce("<presence xmlns='jabber:client'/>", 0).map(|p| p.xml);
        account.rooms.insert(room.to_owned(), m);
        out.notes.push(format!("{user} {why}: {room} as {nick}"));
        out.persist = true;
        out.actions.push(Action::Send {
            stanza: Out::New(presence::join_for_room(room, nick, password)),
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
        out.notes.push(format!("{user} leaves {room}: {why}"));
        out.persist = true;
        out.actions.push(Action::Send {
            stanza: Out::New(presence::leave_for_room(room, &m.nick)),
        });
        out
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
        self.accounts.get_mut(user)?.rooms.get_mut(room)
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

    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            accounts: self.accounts.len(),
            forked: self.counters.forked,
            joins_served_locally: self.counters.joins_served_locally,
            iqs_proxied: self.counters.iqs_proxied,
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

/// A self-presence of the room's (`xml`, as kept) as the session `resource` of `account`
/// gets it; the stanza as it came where it could not be kept.
fn own_copy(xml: &Option<Rc<str>>, account: &str, resource: &str) -> Out {
    match xml {
        Some(xml) => Out::Kept {
            xml: xml.clone(),
            edit: Edit::OwnJid {
                jid: format!("{account}/{resource}").into(),
            },
        },
        None => Out::Original { id: None },
    }
}

/// A stanza's serialized form, to keep; none when it could not be serialized (nested past
/// what the bridge reads): such a stanza is forked but not kept.
fn kept(el: &dyn Payload) -> Option<Rc<str>> {
    Some(el.xml()).filter(|xml| !xml.is_empty())
}

fn set_presence(m: &mut Membership, resource: &str, presence: Option<SessionPresence>) {
    if let Some(p) = m.participant_mut(resource) {
        p.presence = presence;
    }
}

/// Tell the room the account's presence if the aggregate changed (flow 8).
fn update_room_presence(m: &mut Membership, out: &mut Outcome) {
    let Some(best) = presence::aggregate(m) else {
        return;
    };
    if m.shown.as_deref() == Some(&*best.xml) {
        return;
    }
    if let Some(update) = presence::update_for_room(best, &m.room, &m.nick) {
        m.shown = Some(best.xml.clone());
        out.actions.push(Action::Send {
            stanza: Out::New(update),
        });
    }
}

/// Namespaces of IQs to an occupant that the room sends to the occupant's bare JID.
const ANSWERED_BY_SERVER: [&str; 3] = [
    "vcard-temp",
    "http://jabber.org/protocol/pubsub",
    "urn:ietf:params:xml:ns:vcard-4.0",
];

/// XEP-0410 §3.2: these errors to a self-ping mean the occupant is still joined (the room
/// does not answer pings itself) or that nothing is known (the network failed). Any other
/// error means the account is no longer in the room.
fn self_ping_error_means_joined(condition: Option<&str>) -> bool {
    matches!(
        condition,
        Some(
            "service-unavailable"
                | "feature-not-implemented"
                | "remote-server-not-found"
                | "remote-server-timeout"
        )
    )
}

fn drop_empty(accounts: &mut HashMap<String, Account>, user: &str) {
    if accounts
        .get(user)
        .is_some_and(|a| a.rooms.is_empty() && a.iqs.is_empty())
    {
        accounts.remove(user);
    }
}

/// Serve a join of another session locally, in the order XEP-0045 §7.2 gives: the other
/// occupants, the session's own presence, the history it asked for, the subject.
fn serve_join(
    m: &Membership,
    own_jid: &Rc<str>,
    resource: &str,
    request: &dyn Payload,
    asked_nick: &str,
    now: i64,
    out: &mut Outcome,
) {
    // Every action names the session: one shared name for all of them.
    let to: Rc<str> = resource.into();
    let deliver = |out: &mut Outcome, stanza: Out| {
        out.actions.push(Action::Deliver {
            resource: to.clone(),
            stanza,
        });
    };
    let kept = |xml: &Rc<str>, edit: Edit| Out::Kept {
        xml: xml.clone(),
        edit,
    };
    out.actions.reserve(m.occupants.len() + m.history.len() + 2);
    for p in m.occupants.others(&m.nick) {
        deliver(out, kept(p, Edit::None));
    }
    if let Some(own) = &m.self_presence {
        let edit = Edit::OwnPresence {
            nick_differs: asked_nick != m.nick,
            jid: own_jid.clone(),
        };
        deliver(out, kept(own, edit));
    }
    let request = request.history_request();
    for picked in m.history.select(request.as_ref(), now) {
        let edit = match picked.delay {
            Some(stamp) => Edit::Delay {
                room: m.room.clone(),
                stamp,
            },
            None => Edit::None,
        };
        deliver(out, kept(&picked.message, edit));
    }
    if !m.complete {
        // The room is still sending the account's join answer: the subject (and any
        // history still to come) reaches this session through the fork, in order.
        return;
    }
    match &m.subject {
        Some(subject) => deliver(out, kept(subject, Edit::None)),
        None => deliver(
            out,
            Out::New(
                Element::builder("message", NS_CLIENT)
                    .attr(n("type"), "groupchat")
                    .attr(n("from"), &*m.room)
                    .append(Element::bare("subject", NS_CLIENT))
                    .build(),
            ),
        ),
    }
}

/// The account's self-presence as one session gets it (see [`Edit`]).
fn own_presence_for_join(p: &mut Element, edit: &Edit) {
    if let Some(x) = p.get_child_mut("x", NS_MUC_USER) {
        let kept: Vec<Element> = x
            .children()
            .filter(|c| !(c.is("status", NS_MUC_USER) && edit.drops_own_status(c.attr("code"))))
            .map(|c| {
                let mut c = c.clone();
                if c.is("item", NS_MUC_USER)
                    && let Some(jid) = c.attr("jid").and_then(|j| edit.own_item_jid(j))
                {
                    let jid = jid.to_owned();
                    stanza::set_attr(&mut c, "jid", &jid);
                }
                c
            })
            .collect();
        let mut fresh = Element::builder("x", NS_MUC_USER).build();
        for c in kept {
            fresh.append_child(c);
        }
        if let Some(added) = edit.added_to_own_presence() {
            fresh.append_child(added);
        }
        *x = fresh;
    }
}

/// The unavailable self-presence a session (`own_jid`) gets when it leaves while others
/// stay; like the room's, it names the session itself.
fn leave_presence(m: &Membership, own_jid: &str) -> Element {
    let affiliation = m.affiliation.as_deref().unwrap_or("none");
    Element::builder("presence", NS_CLIENT)
        .attr(n("type"), "unavailable")
        .attr(n("from"), format!("{}/{}", m.room, m.nick))
        .append(
            Element::builder("x", NS_MUC_USER)
                .append(
                    Element::builder("item", NS_MUC_USER)
                        .attr(n("affiliation"), affiliation)
                        .attr(n("jid"), own_jid)
                        .attr(n("role"), "none")
                        .build(),
                )
                .append(
                    Element::builder("status", NS_MUC_USER)
                        .attr(n("code"), status::SELF_PRESENCE.to_string())
                        .build(),
                )
                .build(),
        )
        .build()
}
