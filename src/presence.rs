//! One presence per account in each room (flow 8): the most available joined session's,
//! the latest on ties. The room hears of it only when that aggregate changes.

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

/// Tell the room the account's presence if the aggregate changed.
pub fn update_room(m: &mut Membership, out: &mut Outcome) {
    let Some(best) = aggregate(m) else {
        return;
    };
    if m.shown.as_deref() == Some(&*best.xml) {
        return;
    }
    if let Some(update) = update_for_room(best, &m.room, &m.nick) {
        m.shown = Some(best.xml.clone());
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

/// A plain join presence made by the module (after a restart, for a bookmark): no history,
/// the room's password if one is known.
pub fn join_for_room(room: &str, nick: &str, password: Option<&str>) -> Element {
    let mut x = Element::builder("x", NS_MUC)
        .append(
            Element::builder("history", NS_MUC)
                .attr(n("maxstanzas"), "0")
                .build(),
        )
        .build();
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
