//! The reply of one event: one typed value made by a pure function, and its Lua values.

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

use crate::host::{Action, Out, Outcome};
use crate::stanza::NS_CLIENT;

use super::{entry::*, kept::*};

// What the shim reads in a reply (see [`Reply`]). Handed to Lua as
// `minimix.flags` and `minimix.ops` (bridge.rs), never written down again on that side.
/// Store the account's memberships again.
pub(crate) const FLAG_PERSIST: ffi::lua_Integer = 1;
/// Archive the stanza that came in for the account, before forking it.
pub(crate) const FLAG_ARCHIVE: ffi::lua_Integer = 2;
/// Send the stanza that came in from the account.
pub(crate) const FLAG_SEND_ORIGINAL: ffi::lua_Integer = 4;
/// `actions` is a plain list of stanzas, all for the one session whose full JID is in
/// `recipients` (a later join served locally).
pub(crate) const FLAG_ONE_SESSION: ffi::lua_Integer = 8;
/// The notes are warnings: the shim logs them at `warn`, not `info`.
pub(crate) const FLAG_WARN: ffi::lua_Integer = 16;
/// The core's next timer deadline came sooner: the shim re-arms its timer.
pub(crate) const FLAG_SOONER_DEADLINE: ffi::lua_Integer = 32;

/// The op of an action quadruple: deliver to a session, or send from the account.
pub(crate) const OP_DELIVER: i64 = 1;
pub(crate) const OP_SEND: i64 = 2;

pub(super) unsafe fn push_str(l: *mut lua_State, s: &str) {
    unsafe {
        ffi::lua_pushlstring(l, s.as_ptr().cast(), s.len());
    }
}

/// What one event hands back to the shim, as one typed value made from the core's outcome
/// by [`reply_of`] (a pure function) and turned into Lua values by [`push_reply`]. The
/// shim receives `handled, user, actions, notes, recipients, flags` (nothing at all for
/// [`Body::Pass`]) and decodes it in one place (`finish` in the shim), with the constants
/// of `minimix.flags` and `minimix.ops`.
#[derive(Debug)]
pub(crate) struct Reply<'o> {
    pub handled: bool,
    pub user: Option<&'o str>,
    pub notes: &'o [String],
    /// [`FLAG_PERSIST`], [`FLAG_ARCHIVE`], and the body's own flag.
    pub flags: ffi::lua_Integer,
    pub body: Body<'o>,
}

#[derive(Debug)]
pub(crate) enum Body<'o> {
    /// A plain pass: nothing at all goes back.
    Pass,
    /// Send the stanza that came in from the account ([`FLAG_SEND_ORIGINAL`]; `actions`
    /// and `recipients` nil).
    SendOriginal,
    /// The stanza that came in, to these sessions (`recipients`; `actions` nil).
    Fork(Recipients),
    /// A plain list of stanzas (`actions`; false: the one that came in), all for the
    /// session whose full JID is `recipients` ([`FLAG_ONE_SESSION`]).
    OneSession { full: String, stanzas: Vec<&'o Out> },
    /// `actions`, a flat list of quadruples `op, resource|false, stanza|false, id|false`:
    /// `stanza` false means the stanza that came in, `id` false keeps its id.
    Actions(&'o [Action]),
}

#[derive(Debug, PartialEq)]
pub(crate) enum Recipients {
    /// The list kept for forks of the room to every session in it (a registry reference).
    Kept(c_int),
    /// The full JIDs, for a list made for this event.
    Made(Vec<String>),
}

/// The reply for `out`. `kept_list(user, room, count)` is the registry reference of the
/// list kept for forks of `user`'s `room` when it has exactly `count` sessions.
pub(crate) fn reply_of<'o>(
    out: &'o Outcome,
    domain: &str,
    kept_list: impl FnOnce(&str, &str, usize) -> Option<c_int>,
) -> Reply<'o> {
    let flags = if out.persist { FLAG_PERSIST } else { 0 }
        | if out.archive { FLAG_ARCHIVE } else { 0 }
        | if out.warn { FLAG_WARN } else { 0 }
        | if out.sooner_deadline {
            FLAG_SOONER_DEADLINE
        } else {
            0
        };
    let reply = |flags, body| Reply {
        handled: out.handled,
        user: out.user.as_deref(),
        notes: &out.notes,
        flags,
        body,
    };
    if !out.handled
        && out.notes.is_empty()
        && out.actions.is_empty()
        && !out.persist
        && !out.sooner_deadline
    {
        return reply(0, Body::Pass);
    }
    // What a joined session sends to its room: the stanza that came in, sent from the
    // account as it is. Said with a flag, without an actions list.
    if let [
        Action::Send {
            stanza: Out::Original { id: None },
        },
    ] = out.actions.as_slice()
    {
        return reply(flags | FLAG_SEND_ORIGINAL, Body::SendOriginal);
    }
    let full = |user: &str, resource: &str| format!("{user}@{domain}/{resource}");
    // The common case, a fork: the stanza that came in, to these sessions. Their full
    // JIDs go back as one list, so the shim's loop is as short as it can be.
    let is_fork = |a: &Action| {
        matches!(
            a,
            Action::Deliver {
                stanza: Out::Original { id: None },
                ..
            }
        )
    };
    if let Some(user) = &out.user
        && !out.actions.is_empty()
        && out.actions.iter().all(is_fork)
    {
        // A fork to every session in the room: the list kept for it. (When this event
        // changed who takes part, the deliveries may be to those before the change.)
        let kept = match &out.fork_of {
            Some(room) if out.changed_rooms.is_empty() => kept_list(user, room, out.actions.len()),
            _ => None,
        };
        // Otherwise (a fork that goes with a change of who takes part, or to some of
        // them): a list made for this event.
        let recipients = kept.map_or_else(
            || {
                Recipients::Made(
                    out.actions
                        .iter()
                        .filter_map(|a| match a {
                            Action::Deliver { resource, .. } => Some(full(user, resource)),
                            Action::Send { .. } => None,
                        })
                        .collect(),
                )
            },
            Recipients::Kept,
        );
        return reply(flags, Body::Fork(recipients));
    }
    // Everything to one session (a later join served locally, its leave): a plain list
    // of stanzas and the session's full JID.
    if let (
        Some(user),
        Some(Action::Deliver {
            resource: first, ..
        }),
    ) = (&out.user, out.actions.first())
        && out.actions.iter().all(|a| match a {
            Action::Deliver { resource, stanza } => {
                resource == first && !matches!(stanza, Out::Original { id: Some(_) })
            }
            Action::Send { .. } => false,
        })
    {
        let stanzas = out
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { stanza, .. } => Some(stanza),
                Action::Send { .. } => None,
            })
            .collect();
        return reply(
            flags | FLAG_ONE_SESSION,
            Body::OneSession {
                full: full(user, first),
                stanzas,
            },
        );
    }
    reply(flags, Body::Actions(&out.actions))
}

/// Push `reply` as the shim receives it; returns how many values. Runs only inside the
/// protected call of an event ([`encode`]): it allocates, and so may raise.
pub(super) unsafe fn push_reply(l: *mut lua_State, shared: &Shared, reply: &Reply) -> c_int {
    unsafe {
        if matches!(reply.body, Body::Pass) {
            return 0;
        }
        ffi::lua_pushboolean(l, c_int::from(reply.handled));
        match reply.user {
            Some(u) => push_str(l, u),
            None => ffi::lua_pushnil(l),
        }
        let mut skipped = 0;
        match &reply.body {
            Body::Pass | Body::SendOriginal | Body::Fork(_) => ffi::lua_pushnil(l),
            Body::OneSession { stanzas, .. } => {
                ffi::lua_createtable(l, stanzas.len() as c_int, 0);
                let list = ffi::lua_gettop(l);
                let mut k = 0;
                for stanza in stanzas {
                    let pushed = match stanza {
                        Out::Original { .. } => {
                            ffi::lua_pushboolean(l, 0);
                            true
                        }
                        Out::New(el) => {
                            push_element(l, el, NS_CLIENT, true, shared.stanza_mt);
                            true
                        }
                        Out::Kept { xml, edit } => {
                            push_kept(l, xml, edit, shared.stanza_mt).is_some()
                        }
                    };
                    if pushed {
                        k += 1;
                        ffi::lua_rawseti(l, list, k);
                    } else {
                        skipped += 1;
                    }
                }
            }
            Body::Actions(actions) => {
                skipped = push_actions(l, shared, actions);
            }
        }
        push_notes(l, reply.notes, skipped);
        match &reply.body {
            Body::Fork(Recipients::Kept(list)) => {
                ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, *list as ffi::lua_Integer);
            }
            Body::Fork(Recipients::Made(fulls)) => push_list(l, fulls),
            Body::OneSession { full, .. } => push_str(l, full),
            _ => ffi::lua_pushnil(l),
        }
        ffi::lua_pushinteger(l, reply.flags);
        6
    }
}

/// Push the actions list (see [`Body::Actions`]); returns how many kept stanzas did not
/// parse (each left out, with op 0, which does nothing).
pub(super) unsafe fn push_actions(l: *mut lua_State, shared: &Shared, actions: &[Action]) -> usize {
    unsafe {
        ffi::lua_createtable(l, (actions.len() * 4) as c_int, 0);
        let list = ffi::lua_gettop(l);
        let mut skipped = 0;
        for (k, action) in actions.iter().enumerate() {
            // This action's four slots: op, resource, stanza, id.
            let op_slot = k as ffi::lua_Integer * 4 + 1;
            let (op, resource, stanza) = match action {
                Action::Deliver { resource, stanza } => (OP_DELIVER, Some(resource), stanza),
                Action::Send { stanza } => (OP_SEND, None, stanza),
            };
            ffi::lua_pushinteger(l, op);
            ffi::lua_rawseti(l, list, op_slot);
            match resource {
                Some(r) => push_str(l, r),
                None => ffi::lua_pushboolean(l, 0),
            }
            ffi::lua_rawseti(l, list, op_slot + 1);
            match stanza {
                Out::Original { .. } => ffi::lua_pushboolean(l, 0),
                Out::New(el) => push_element(l, el, NS_CLIENT, true, shared.stanza_mt),
                Out::Kept { xml, edit } => {
                    if push_kept(l, xml, edit, shared.stanza_mt).is_none() {
                        // Cannot happen for what the core keeps; if it does, this one
                        // stanza is skipped (op 0 does nothing), not the whole event.
                        ffi::lua_pushinteger(l, 0);
                        ffi::lua_rawseti(l, list, op_slot);
                        ffi::lua_pushboolean(l, 0);
                        skipped += 1;
                    }
                }
            }
            ffi::lua_rawseti(l, list, op_slot + 2);
            match stanza {
                Out::Original { id: Some(id) } => push_str(l, id),
                _ => ffi::lua_pushboolean(l, 0),
            }
            ffi::lua_rawseti(l, list, op_slot + 3);
        }
        skipped
    }
}

/// Push a Lua list of strings.
pub(super) unsafe fn push_list(l: *mut lua_State, items: &[String]) {
    unsafe {
        ffi::lua_createtable(l, items.len() as c_int, 0);
        for (k, item) in items.iter().enumerate() {
            push_str(l, item);
            ffi::lua_rawseti(l, -2, k as ffi::lua_Integer + 1);
        }
    }
}

/// Push the notes (nil when there are none), with one more when kept stanzas were skipped.
pub(super) unsafe fn push_notes(l: *mut lua_State, notes: &[String], skipped: usize) {
    unsafe {
        if notes.is_empty() && skipped == 0 {
            ffi::lua_pushnil(l);
            return;
        }
        push_list(l, notes);
        if skipped > 0 {
            let line = format!("{skipped} kept stanza(s) did not parse and were not sent");
            push_str(l, &line);
            ffi::lua_rawseti(l, -2, notes.len() as ffi::lua_Integer + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(resource: &str, stanza: Out) -> Action {
        Action::Deliver {
            resource: resource.into(),
            stanza,
        }
    }

    fn original() -> Out {
        Out::Original { id: None }
    }

    fn handled(actions: Vec<Action>) -> Outcome {
        Outcome {
            handled: true,
            user: Some("alice".to_owned()),
            actions,
            ..Outcome::default()
        }
    }

    const NO_LIST: fn(&str, &str, usize) -> Option<c_int> = |_, _, _| None;

    #[test]
    fn a_plain_pass_gives_nothing_back() {
        let out = Outcome::default();
        assert!(matches!(reply_of(&out, "h", NO_LIST).body, Body::Pass));
        let noted = Outcome {
            notes: vec!["n".to_owned()],
            ..Outcome::default()
        };
        let reply = reply_of(&noted, "h", NO_LIST);
        assert!(matches!(reply.body, Body::Actions([])));
        assert_eq!(reply.notes.len(), 1);
    }

    #[test]
    fn the_original_sent_from_the_account_is_a_flag() {
        let mut out = handled(vec![Action::Send { stanza: original() }]);
        out.persist = true;
        let reply = reply_of(&out, "h", NO_LIST);
        assert!(matches!(reply.body, Body::SendOriginal));
        assert_eq!(reply.flags, FLAG_SEND_ORIGINAL | FLAG_PERSIST);
        assert_eq!(reply.user, Some("alice"));
    }

    #[test]
    fn a_fork_hands_out_the_kept_list_unless_the_sessions_changed() {
        let mut out = handled(vec![deliver("a", original()), deliver("b", original())]);
        out.fork_of = Some("r@m".into());
        out.archive = true;
        let kept = |u: &str, r: &str, n: usize| (u == "alice" && r == "r@m" && n == 2).then_some(7);
        let reply = reply_of(&out, "h", kept);
        assert_eq!(reply.flags, FLAG_ARCHIVE);
        assert!(matches!(reply.body, Body::Fork(Recipients::Kept(7))));
        out.changed_rooms = vec!["r@m".to_owned()];
        let Body::Fork(Recipients::Made(fulls)) = reply_of(&out, "h", kept).body else {
            panic!("a list made for the event");
        };
        assert_eq!(fulls, ["alice@h/a", "alice@h/b"]);
    }

    #[test]
    fn everything_for_one_session_is_a_plain_list() {
        let el = minidom::Element::bare("presence", NS_CLIENT);
        let out = handled(vec![deliver("a", Out::New(el)), deliver("a", original())]);
        let reply = reply_of(&out, "h", NO_LIST);
        assert_eq!(reply.flags, FLAG_ONE_SESSION);
        let Body::OneSession { full, stanzas } = reply.body else {
            panic!("one session");
        };
        assert_eq!(full, "alice@h/a");
        assert_eq!(stanzas.len(), 2);
    }

    #[test]
    fn anything_else_is_an_actions_list() {
        let out = handled(vec![
            deliver(
                "a",
                Out::Original {
                    id: Some("x".into()),
                },
            ),
            Action::Send { stanza: original() },
        ]);
        assert!(matches!(
            reply_of(&out, "h", NO_LIST).body,
            Body::Actions([_, _])
        ));
    }
}
