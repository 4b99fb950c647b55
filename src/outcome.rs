//! What the core hands back for one event: the actions (deliver to a session, send from
//! the account), the stanzas they carry and how a kept stanza is edited on the way out.

use std::rc::Rc;

use minidom::Element;

use crate::membership::Membership;
use crate::note::Note;
use crate::stanza::{self, Addr, NS_DELAY, NS_MUC_USER, Status, n};

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
            } => Some(Status::AssignedNick.into()),
            _ => None,
        }
    }

    /// Whether a status code is left out of the self-presence ("room created", 201, is
    /// news only to the session whose join created the room).
    pub fn drops_own_status(&self, code: Option<&str>) -> bool {
        matches!(self, Edit::OwnPresence { .. })
            && code.and_then(stanza::status_of_text) == Some(Status::RoomHasBeenCreated)
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
    /// Lines worth an admin's attention (logged by the shim at info): [`Note`]s, as text
    /// (see [`Outcome::note`]).
    pub notes: Vec<String>,
    /// The notes are warnings (logged at warn): something the admin should act on.
    pub warn: bool,
    /// The host's next timer deadline came sooner (set by the bridge): the shim looks at
    /// it again and re-arms its timer.
    pub sooner_deadline: bool,
    /// The account's memberships changed: the shim stores [`Host::persisted`](crate::host::Host::persisted) again.
    pub persist: bool,
    /// The stanza that came in is a live groupchat message for the account's own archive
    /// (stored once, before it is forked).
    pub archive: bool,
    /// Rooms of `user` whose participating sessions (joined or joining) may have changed,
    /// the membership's end included. The bridge keeps its index of the rooms each session
    /// is in (the shim's fast path for what sessions send) from these: see
    /// [`Host::participants_of`](crate::host::Host::participants_of).
    pub changed_rooms: Vec<String>,
    /// The deliveries are the fork to every session taking part in this room, in order
    /// (so the bridge can hand out the list of them it keeps).
    pub fork_of: Option<Rc<str>>,
}

impl Outcome {
    pub(crate) fn pass() -> Outcome {
        Outcome::default()
    }

    pub(crate) fn handled(user: &str) -> Outcome {
        Outcome {
            handled: true,
            user: Some(user.to_owned()),
            ..Outcome::default()
        }
    }

    pub(crate) fn deliver(&mut self, resource: &str, stanza: Out) {
        self.actions.push(Action::Deliver {
            resource: resource.into(),
            stanza,
        });
    }

    pub(crate) fn deliver_original(&mut self, resource: &str) {
        self.deliver(resource, Out::Original { id: None });
    }

    /// The stanza that came in, to every session of `m` that joined or is joining.
    pub(crate) fn fork(&mut self, m: &Membership) {
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
    pub(crate) fn fork_own(&mut self, m: &Membership, account: &str, xml: &Option<Rc<str>>) {
        self.actions.reserve(m.participants.len());
        for p in &m.participants {
            self.actions.push(Action::Deliver {
                resource: p.resource.clone(),
                stanza: own_copy(xml, account, &p.resource),
            });
        }
    }

    /// A line for the admin.
    pub(crate) fn note(&mut self, note: Note) {
        self.notes.push(note.to_string());
    }

    /// The sessions taking part in `room` may have changed.
    pub(crate) fn participants_changed(&mut self, room: &str) {
        if !self.changed_rooms.iter().any(|r| r == room) {
            self.changed_rooms.push(room.to_owned());
        }
    }

    pub(crate) fn send_original(&mut self, id: Option<String>) {
        self.actions.push(Action::Send {
            stanza: Out::Original { id },
        });
    }
}

/// A self-presence of the room's (`xml`, as kept) as the session `resource` of `account`
/// gets it; the stanza as it came where it could not be kept.
pub(crate) fn own_copy(xml: &Option<Rc<str>>, account: &str, resource: &str) -> Out {
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
