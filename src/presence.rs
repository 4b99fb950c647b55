//! One presence per account in each room (flow 8): the most available joined session's,
//! the latest on ties. The room hears of it only when what other occupants see of that
//! aggregate changes ([`Visible`]): a client's entity capabilities, priority and other
//! per-client payload alone never make a broadcast to every occupant.

use std::rc::Rc;

use minidom::Element;

use crate::membership::Membership;
use crate::outcome::{Action, Out, Outcome};
use crate::stanza::{self, NS_CLIENT, NS_MUC, NS_MUC_USER, n};

/// A session's presence toward a room, reduced to what the room should see.
#[derive(Debug, Clone)]
pub struct SessionPresence {
    /// `<presence>` with the session's payload (show, status, priority, caps, …) and no
    /// addresses, id, type or MUC elements, serialized.
    pub xml: Rc<str>,
    /// How available the session is: chat 5, available 4, away 3, xa 2, dnd 1.
    pub rank: u8,
    /// When it was last set (larger is later).
    pub seq: u64,
    /// What other occupants see of it.
    pub visible: Visible,
}

const NS_IDLE: &str = "urn:xmpp:idle:1";
const NS_NICK: &str = "http://jabber.org/protocol/nick";
const NS_VCARD_UPDATE: &str = "vcard-temp:x:update";

/// What other occupants see of the account's presence: what their clients display.
///
/// In: `<show/>`; every `<status/>` with its `xml:lang`; the avatar hash of XEP-0153
/// (`vcard-temp:x:update`); a XEP-0172 `<nick/>`; the XEP-0319 `<idle since=…/>` (clients
/// show "idle since"; it changes with auto-away, which changes `<show/>` too).
/// Out: entity capabilities (XEP-0115, XEP-0390) describe one client's features, of no use
/// in a room where the account is the occupant; `<priority/>` means nothing to occupants
/// and routes nothing in a room; anything else a client adds (signatures, delay, unknown
/// extensions) is per-client. When an update is sent it still carries all of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visible {
    show: Option<String>,
    /// `(xml:lang, text)` in document order.
    statuses: Vec<(Option<String>, String)>,
    /// The `<photo/>` of `vcard-temp:x:update`: a hash, or empty for "no avatar". None when
    /// the presence says nothing about it (no such element, or one without `<photo/>`, "not
    /// ready"): occupants then keep the avatar they had (XEP-0153 §4).
    avatar: Option<String>,
    nick: Option<String>,
    idle: Option<String>,
}

impl Visible {
    /// What other occupants see in a reduced presence.
    pub fn of(presence: &Element) -> Visible {
        let text = |name: &str, ns: &str| presence.get_child(name, ns).map(|c| c.text());
        let statuses = presence
            .children()
            .filter(|c| c.is("status", NS_CLIENT))
            .map(|c| {
                let lang = c
                    .attr_ns(&minidom::rxml::Namespace::XML, "lang")
                    .map(str::to_owned);
                (lang, c.text())
            })
            .collect();
        let avatar = presence
            .get_child("x", NS_VCARD_UPDATE)
            .and_then(|x| x.get_child("photo", NS_VCARD_UPDATE))
            .map(|photo| photo.text().trim().to_ascii_lowercase());
        Visible {
            show: text("show", NS_CLIENT).map(|s| s.trim().to_owned()),
            statuses,
            avatar,
            nick: text("nick", NS_NICK),
            idle: presence
                .get_child("idle", NS_IDLE)
                .and_then(|i| i.attr("since"))
                .map(str::to_owned),
        }
    }

    /// What occupants see once they get `self` after `before`: a presence that says
    /// nothing about the avatar leaves the one they had.
    pub fn after(&self, before: Option<&Visible>) -> Visible {
        let mut next = self.clone();
        if next.avatar.is_none() {
            next.avatar = before.and_then(|b| b.avatar.clone());
        }
        next
    }
}

pub fn rank(show: Option<&str>) -> u8 {
    match show {
        Some("chat") => 5,
        Some("away") => 3,
        Some("xa") => 2,
        Some("dnd") => 1,
        _ => 4,
    }
}

/// Reduce a session's presence (serialized) to what the room should see of it.
pub fn reduce(xml: &str, seq: u64) -> Option<SessionPresence> {
    let el = stanza::parse_kept(xml)?;
    let mut out = Element::builder("presence", NS_CLIENT).build();
    for child in el.children() {
        if child.is("x", NS_MUC) || child.is("x", NS_MUC_USER) {
            continue;
        }
        out.append_child(child.clone());
    }
    let show = out.get_child("show", NS_CLIENT).map(Element::text);
    Some(SessionPresence {
        xml: String::from(&out).into(),
        rank: rank(show.as_deref()),
        seq,
        visible: Visible::of(&out),
    })
}

/// The presence the room should show for the account, if any session is joined.
pub fn aggregate(m: &Membership) -> Option<&SessionPresence> {
    m.participants
        .iter()
        .filter(|p| p.joined)
        .filter_map(|p| p.presence.as_ref())
        .max_by_key(|p| (p.rank, p.seq))
}

/// Tell the room the account's presence if what occupants see of the aggregate changed.
pub fn update_room(m: &mut Membership, out: &mut Outcome) {
    let Some(best) = aggregate(m) else {
        return;
    };
    let next = best.visible.after(m.shown.as_ref());
    if m.shown.as_ref() == Some(&next) {
        return;
    }
    if let Some(update) = update_for_room(best, &m.room, &m.nick) {
        m.shown = Some(next);
        out.actions.push(Action::Send {
            stanza: Out::New(update),
        });
    }
}

/// The update the room gets, from a reduced presence.
pub fn update_for_room(p: &SessionPresence, room: &str, nick: &str) -> Option<Element> {
    let mut el = stanza::parse_kept(&p.xml)?;
    stanza::set_attr(&mut el, "to", &format!("{room}/{nick}"));
    Some(el)
}

/// A join presence made by the module (after a restart, for a bookmark, after an outage):
/// asking for the history since `since` (XEP-0045 §7.2.15) when the account got messages
/// from the room before, else for none; the room's password if one is known.
pub fn join_for_room(
    room: &str,
    nick: &str,
    password: Option<&str>,
    since: Option<i64>,
) -> Element {
    let history = match since {
        Some(since) => Element::builder("history", NS_MUC)
            .attr(n("since"), crate::time::format_stamp(since))
            .build(),
        None => Element::builder("history", NS_MUC)
            .attr(n("maxstanzas"), "0")
            .build(),
    };
    let mut x = Element::builder("x", NS_MUC).append(history).build();
    if let Some(p) = password {
        x.append_child(Element::builder("password", NS_MUC).append(p).build());
    }
    Element::builder("presence", NS_CLIENT)
        .attr(n("to"), format!("{room}/{nick}"))
        .append(x)
        .build()
}

/// The account's own leave, made by the module.
pub fn leave_for_room(room: &str, nick: &str) -> Element {
    Element::builder("presence", NS_CLIENT)
        .attr(n("to"), format!("{room}/{nick}"))
        .attr(n("type"), "unavailable")
        .build()
}

/// Accept a new room's default configuration (XEP-0045 §10.1.2, an instant room).
pub fn instant_room(room: &str) -> Element {
    Element::builder("iq", NS_CLIENT)
        .attr(n("type"), "set")
        .attr(n("to"), room)
        .attr(n("id"), "minimix-instant-room")
        .append(
            Element::builder("query", "http://jabber.org/protocol/muc#owner")
                .append(
                    Element::builder("x", "jabber:x:data")
                        .attr(n("type"), "submit")
                        .build(),
                )
                .build(),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(payload: &str) -> Visible {
        let xml = format!("<presence xmlns='jabber:client'>{payload}</presence>");
        reduce(&xml, 0).expect("parses").visible
    }

    #[test]
    fn caps_priority_and_unknown_payload_are_not_seen() {
        let plain = visible("<show>away</show><status>out</status>");
        let noisy = visible(
            "<show>away</show><priority>-1</priority><status>out</status>\
             <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/>\
             <c xmlns='urn:xmpp:caps'><hash xmlns='urn:xmpp:hashes:2' algo='sha-256'>x</hash></c>\
             <x xmlns='jabber:x:signed'>sig</x><unknown xmlns='urn:example'/>",
        );
        assert_eq!(plain, noisy);
        assert_ne!(plain, visible("<show>xa</show><status>out</status>"));
        assert_ne!(plain, visible("<show>away</show>"));
    }

    #[test]
    fn the_avatar_hash_is_seen_and_a_presence_without_one_keeps_it() {
        let photo = |h: &str| {
            visible(&format!(
                "<x xmlns='vcard-temp:x:update'><photo>{h}</photo></x>"
            ))
        };
        let abc = photo("ABC");
        assert_eq!(abc, photo(" abc "));
        assert_ne!(abc, photo("abd"));
        assert_ne!(abc, photo(""));
        let silent = visible("");
        assert_eq!(silent.after(Some(&abc)), abc);
        assert_eq!(
            visible("<x xmlns='vcard-temp:x:update'/>").after(Some(&abc)),
            abc
        );
        assert_eq!(photo("").after(Some(&abc)), photo(""));
        assert_eq!(silent.after(None), silent);
    }
}
