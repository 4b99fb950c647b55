//! What the Rust tests share.

use minidom::Element;
use minimix::host::{Action, Out, Outcome};
use minimix::stanza;
use minimix::time::format_stamp;

// The account, the room and the clock of tests/flows.rs and tests/lifecycle.rs. Stanza
// texts below use their shorthands: `$R` the room, `$MUC` and `$MU` (muc#user).
pub const DOMAIN: &str = "example.com";
pub const USER: &str = "alice";
pub const ACCOUNT: &str = "alice@example.com";
pub const R: &str = "room@conference.example.com";
/// 2027-01-15T08:00:00Z, the clock at the start of every test.
pub const T0: i64 = 1_800_000_000;

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

// What sessions and the room send, as texts with the shorthands above.

pub fn membership(nick: &str, sessions: &[&str]) -> Vec<(String, String, Vec<String>)> {
    vec![(
        R.to_owned(),
        nick.to_owned(),
        sessions.iter().map(|s| s.to_string()).collect(),
    )]
}

pub fn join(nick: &str, history: &str) -> String {
    format!("<presence to='$R/{nick}' id='join-{nick}'><x xmlns='$MUC'>{history}</x></presence>")
}

pub fn occupant(nick: &str) -> String {
    format!(
        "<presence from='$R/{nick}'><x xmlns='$MU'><item affiliation='member' role='participant'/></x></presence>"
    )
}

pub fn self_left(nick: &str) -> String {
    format!(
        "<presence type='unavailable' from='$R/{nick}'><x xmlns='$MU'><item affiliation='member' role='none'/><status code='110'/></x></presence>"
    )
}

pub fn groupchat(nick: &str, body: &str) -> String {
    format!("<message type='groupchat' from='$R/{nick}' id='{body}'><body>{body}</body></message>")
}

pub fn room_history(nick: &str, body: &str, stamp: i64) -> String {
    format!(
        "<message type='groupchat' from='$R/{nick}' id='{body}'><body>{body}</body><delay xmlns='urn:xmpp:delay' from='$R' stamp='{}'/></message>",
        format_stamp(stamp)
    )
}

pub fn subject(text: &str) -> String {
    format!("<message type='groupchat' from='$R/bob' id='subj'><subject>{text}</subject></message>")
}
