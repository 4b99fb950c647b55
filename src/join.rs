//! A later join of another session, served locally (flow 3): what the account already
//! knows of the room, in the order XEP-0045 §7.2 gives.

use std::rc::Rc;

use minidom::Element;

use crate::membership::Membership;
use crate::outcome::{Action, Edit, Out, Outcome};
use crate::stanza::{NS_CLIENT, Payload, n};

/// Serve a join of another session locally, in the order XEP-0045 §7.2 gives: the other
/// occupants, the session's own presence, the history it asked for, the subject.
pub fn serve_join(
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
