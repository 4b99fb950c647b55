//! What a session of this host sends (Prosody's pre-<kind>/full and /bare events), and a
//! session ending without leaving.

use std::rc::Rc;

use minidom::Element;

use super::{Host, member};
use crate::iq::PendingIq;
use crate::membership::{Membership, Phase};
use crate::note::Note;
use crate::outage::Rejoin;
use crate::outcome::{Action, Edit, Out, Outcome};
use crate::presence::{self, SessionPresence};
use crate::stanza::{
    self, Addr, Head, Kind, NS_CLIENT, NS_MUC, NS_MUC_USER, NS_PING, NS_TEST_FAULT, Payload,
    Status, n,
};

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

impl Host {
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
        let Some(m) = member(&mut self.accounts, user, room) else {
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
            m.shown = presence.as_ref().map(|p| p.visible.clone());
            m.participants[0].presence = presence;
            self.accounts
                .entry(user.to_owned())
                .or_default()
                .rooms
                .insert(room.to_owned(), m);
            out.participants_changed(room);
            out.note(Note::Joins {
                user,
                room,
                nick,
                resource,
            });
            out.persist = true;
            out.send_original(None);
            return out;
        };
        let participant = m.participant(resource).map(|p| p.joined);
        let mut served_locally = false;
        let mut rejoin_now = false;
        match (m.phase, participant) {
            (Phase::Leaving, _) => {
                m.restart(nick, resource);
                out.participants_changed(room);
                m.password = el.join_password();
                let presence = own_presence();
                m.shown = presence.as_ref().map(|p| p.visible.clone());
                m.participants[0].presence = presence;
                out.note(Note::RejoinsWhileLeaving { user, room, nick });
                out.persist = true;
                out.send_original(None);
            }
            (Phase::Joined, Some(true)) if !is_join => {
                if nick != m.nick {
                    // A nick change: the room answers with 303 and the new presence. It
                    // carries the account's presence, not just the asker's.
                    m.nick_change_by = Some(resource.to_owned());
                    m.set_presence(resource, own_presence());
                    let change = presence::aggregate(m).and_then(|best| {
                        let mut update = presence::update_for_room(best, room, nick)?;
                        if let Some(id) = head.id {
                            stanza::set_attr(&mut update, "id", id);
                        }
                        Some((best.visible.after(m.shown.as_ref()), update))
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
                    m.set_presence(resource, own_presence());
                    presence::update_room(m, &mut out);
                }
            }
            (Phase::Joining, Some(false)) if !is_join => {
                m.set_presence(resource, own_presence());
            }
            (Phase::Joined, _) => {
                m.add(resource, true);
                out.participants_changed(room);
                m.set_presence(resource, own_presence());
                let own_jid: Rc<str> = format!("{user}@{}/{resource}", self.domain).into();
                crate::join::serve_join(m, &own_jid, resource, el, nick, now, &mut out);
                served_locally = true;
                presence::update_room(m, &mut out);
            }
            (Phase::Joining, _) => {
                // The account's join is in flight: replay what arrived, the rest follows.
                // Out of the room after an outage with no join on its way (waiting for
                // the next attempt, or given up): the module joins at once.
                rejoin_now = m.rejoin.is_some_and(Rejoin::waiting);
                m.add(resource, false);
                out.participants_changed(room);
                m.set_presence(resource, own_presence());
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
        if rejoin_now {
            self.send_rejoin(user, room, now, &mut out);
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
            out.note(Note::LastSessionLeaves {
                user,
                room,
                resource,
            });
            out.persist = true;
            out.send_original(None);
        } else {
            out.deliver(resource, Out::New(leave_presence(m, &own_jid)));
            presence::update_room(m, &mut out);
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
                presence::update_room(m, &mut out);
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
            m.set_presence(resource, p);
            if m.phase == Phase::Joined {
                presence::update_room(m, &mut out);
            }
        }
        out
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
                .append(Status::SelfPresence)
                .build(),
        )
        .build()
}
