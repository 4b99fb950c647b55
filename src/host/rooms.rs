//! What a room sends to an account of this host (Prosody's presence/bare, message/bare
//! and iq/bare events): forked to the sessions taking part, and kept for later joins.

use minidom::Element;

use super::outage::in_room;
use super::{Counters, Host, drop_empty, kept};
use crate::membership::Membership;
use crate::membership::Phase;
use crate::note::Note;
use crate::outage::{Rejoin, backoff, join_error_is_transient, ping_answer, seed};
use crate::outcome::{Action, Edit, Out, Outcome, own_copy};
use crate::presence;
use crate::received::Mark;
use crate::stanza::{Addr, Head, Kind, NS_CLIENT, NS_DELAY, Payload, Status, has_status};

impl Host {
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
            Kind::Iq => self.room_iq(user, el, &head, room, from_text, now),
            Kind::Presence => self.room_presence(user, el, &head, room, from.resource, now),
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
        now: i64,
    ) -> Outcome {
        let max_occupants = self.config.max_occupants;
        let ping_interval = self.config.self_ping_interval;
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
                    if matches!(m.rejoin, Some(Rejoin::Due { .. } | Rejoin::GaveUp)) {
                        // No join of the module's waits for an answer: this one answers an
                        // attempt already counted as failed (no answer in time). It ends
                        // nothing.
                        return out;
                    }
                    out.fork(m);
                    let condition = el.error_condition();
                    let error_type = el.child_attr("error", NS_CLIENT, "type");
                    if matches!(m.rejoin, Some(Rejoin::InFlight { .. }))
                        && join_error_is_transient(error_type.as_deref(), condition.as_deref())
                    {
                        // The module's rejoin could not reach the room now: the sessions
                        // that waited on it have the error; it is tried again later.
                        let why = condition.unwrap_or_else(|| "error".to_owned());
                        self.rejoin_failed(user, room, &why, now, &mut out);
                        return out;
                    }
                    out.note(Note::JoinFailed {
                        user,
                        room,
                        condition: condition.as_deref(),
                    });
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
        let is_self = has_status(&codes, &Status::SelfPresence);
        let nick_changed = unavailable && has_status(&codes, &Status::NewNick);
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
                && has_status(&codes, &Status::RoomHasBeenCreated)
            {
                // The room was gone and this join made it anew. Prosody locks a new room
                // until its owner configures it, and no session is here to do that: accept
                // the default configuration (an instant room, XEP-0045 §10.1.2), as
                // Prosody does itself without room locking, so that every account and
                // client can come back to it.
                out.note(Note::MadeAnew { user, room });
                out.actions.push(Action::Send {
                    stanza: Out::New(presence::instant_room(room)),
                });
            }
            let was_joining = m.phase == Phase::Joining;
            if was_joining {
                out.note(Note::Joined { user, room, nick });
                out.persist = true;
            }
            m.confirmed = true;
            m.phase = Phase::Joined;
            // The self-ping cycle starts when the account is (back) in the room (every
            // join and rejoin is phase Joining); a later self-presence (a nick or role
            // change, or a room repeating itself) leaves it and the ping in flight alone,
            // and adds no timer entry.
            if was_joining {
                in_room(&mut self.timers, ping_interval, user, m, now);
            }
            m.mark_all_joined();
            m.nick = nick.to_owned();
            m.nick_change_by = None;
            m.self_presence = xml.clone().or(m.self_presence.take());
            m.affiliation = el.item_attr("affiliation");
            out.fork_own(m, &account_jid, &xml);
            // Presence changes made while the join was in flight reach the room now.
            presence::update_room(m, &mut out);
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
                out.note(Note::Left { user, room });
            }
            return out;
        }
        // Removed by the room. Every session learns it. An error kick (333) or a service
        // shutdown (332) is an outage nobody chose: the account comes back (flow 18).
        out.fork_own(m, &account_jid, &xml);
        let outage = if has_status(&codes, &Status::ServiceErrorKick) {
            Some("error kick, status 333")
        } else if has_status(&codes, &Status::ServiceShutdown) {
            Some("service shutdown, status 332")
        } else {
            None
        };
        if let Some(why) = outage {
            m.participants.clear();
            m.self_presence = None;
            out.participants_changed(room);
            let first = now + backoff(1, seed(user, room, 1));
            self.out_of_room(user, room, why, first, now, &mut out);
            return out;
        }
        // Kick, ban, affiliation change, members-only or destruction: final. Nobody
        // rejoins on its own.
        out.note(Note::Removed {
            user,
            room,
            codes: &codes,
        });
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
        let Some(account) = self.accounts.get_mut(user) else {
            return Outcome::pass();
        };
        let Some(m) = account.rooms.get_mut(room) else {
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
                end_replay(m, &mut self.counters, &mut out, user, room);
            } else if has_body {
                let delay = el
                    .child_attr("delay", NS_DELAY, "stamp")
                    .and_then(|s| crate::time::parse_stamp(&s));
                let from = head.from.unwrap_or_default();
                let mark = Mark::of(el, from, room, delay.unwrap_or(now));
                match delay {
                    None => {
                        // Live traffic means the join answer is over, even from a room
                        // that sends no subject at all.
                        m.complete = true;
                        end_replay(m, &mut self.counters, &mut out, user, room);
                        out.archive = true;
                        m.received.got(mark);
                        if !self.unsaved.contains(user) {
                            self.unsaved.insert(user.to_owned());
                        }
                        if let Some(xml) = kept(el) {
                            m.history
                                .push_marked(xml, None, now, history_length, Some(mark));
                        }
                    }
                    Some(stamp) if m.replaying && !m.complete => {
                        // The room's replay of what it said since the last message the
                        // account got (a rejoin made by the module).
                        let known = m.received.take(&mark);
                        if !m.history.contains(&mark)
                            && let Some(xml) = kept(el)
                        {
                            m.history.push_marked(
                                xml,
                                Some(stamp),
                                now,
                                history_length,
                                Some(mark),
                            );
                        }
                        if known {
                            // Only sessions that joined during the rejoin lack it.
                            m.replay_counts.1 += 1;
                            for p in m.participants.iter().filter(|p| !p.joined_before_rejoin) {
                                out.deliver_original(&p.resource);
                            }
                            return out;
                        }
                        m.replay_counts.0 += 1;
                        out.archive = true;
                        m.received.got(mark);
                        if !self.unsaved.contains(user) {
                            self.unsaved.insert(user.to_owned());
                        }
                    }
                    Some(stamp) => {
                        // History the room sends to a join made for a session: kept for
                        // later joins, not archived (the account got it before, or it was
                        // said before the account was there).
                        if let Some(xml) = kept(el) {
                            m.history.push_marked(
                                xml,
                                Some(stamp),
                                now,
                                history_length,
                                Some(mark),
                            );
                        }
                    }
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
        now: i64,
    ) -> Outcome {
        let Some(account) = self.accounts.get_mut(user) else {
            return Outcome::pass();
        };
        let mut out = Outcome::handled(user);
        match head.type_ {
            Some("result" | "error") => {
                // The answer to the account's own self-ping: the module's alone.
                if let Some(m) = account.rooms.get_mut(room)
                    && let Some(id) = head.id
                    && m.ping.as_ref().is_some_and(|p| p.id == id && p.to == from)
                    && let Some(ping) = m.ping.take()
                {
                    let condition = el.error_condition();
                    let answer = ping_answer(head.is_type("error"), condition.as_deref());
                    return self.ping_answered(user, room, ping, answer, condition.as_deref(), now);
                }
                let Some(pending) = head.id.and_then(|id| account.iqs.take(id, from)) else {
                    return Outcome::pass();
                };
                if pending.self_ping
                    && head.is_type("error")
                    && !self_ping_error_means_joined(el.error_condition().as_deref())
                {
                    out.note(Note::GoneBySelfPing { user, room });
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

/// The room's join answer is over: if it was a replay after a rejoin made by the module,
/// end it and say how many messages were new and how many the account already had.
fn end_replay(
    m: &mut Membership,
    counters: &mut Counters,
    out: &mut Outcome,
    user: &str,
    room: &str,
) {
    if !m.replaying {
        return;
    }
    m.replaying = false;
    let (new, known) = std::mem::take(&mut m.replay_counts);
    counters.replayed_new += u64::from(new);
    counters.replayed_known += u64::from(known);
    out.note(Note::CaughtUp {
        user,
        room,
        new,
        known,
    });
}
