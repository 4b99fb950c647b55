//! What the Rust tests share.

use minidom::Element;
use minimix::host::{Action, Out, Outcome};
use minimix::stanza;

/// The stanzas an outcome makes leave, in order, as the shim sends them: `Some(resource)`
/// delivered to that session of `account` (`to` set to its full JID), `None` sent from
/// `account` (`from` set). `incoming` is the stanza the event carried.
pub fn leaving(o: &Outcome, incoming: &Element, account: &str) -> Vec<(Option<String>, Element)> {
    o.actions
        .iter()
        .map(|a| {
            let (resource, out) = match a {
                Action::Deliver { resource, stanza } => (Some(resource.to_string()), stanza),
                Action::Send { stanza } => (None, stanza),
            };
            let mut e = match out {
                Out::Original { id } => {
                    let mut e = incoming.clone();
                    if let Some(id) = id {
                        stanza::set_attr(&mut e, "id", id);
                    }
                    e
                }
                made => made.to_element().expect("a kept stanza parses"),
            };
            match &resource {
                Some(r) => stanza::set_attr(&mut e, "to", &format!("{account}/{r}")),
                None => stanza::set_attr(&mut e, "from", account),
            }
            (resource, e)
        })
        .collect()
}
