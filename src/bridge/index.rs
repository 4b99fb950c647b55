//! The session index the shim reads, `session_rooms[full_jid][room] = true`.

use std::ffi::c_int;
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use crate::host::{Host, Outcome};

use super::{entry::*, reply::*};

/// Set (`on`) or clear `index[full][room]` in the index table at `index`; a session left
/// with no room is dropped from the index. Allocates: protected call only.
pub(super) unsafe fn index_set(l: *mut lua_State, index: c_int, full: &str, room: &str, on: bool) {
    unsafe {
        push_str(l, full);
        let key = ffi::lua_gettop(l);
        ffi::lua_pushvalue(l, key);
        if ffi::lua_rawget(l, index) != ffi::LUA_TTABLE {
            if !on {
                ffi::lua_settop(l, key - 1);
                return;
            }
            ffi::lua_settop(l, key);
            ffi::lua_createtable(l, 0, 1);
            ffi::lua_pushvalue(l, key);
            ffi::lua_pushvalue(l, -2);
            ffi::lua_rawset(l, index);
        }
        let rooms = ffi::lua_gettop(l);
        push_str(l, room);
        if on {
            ffi::lua_pushboolean(l, 1);
        } else {
            ffi::lua_pushnil(l);
        }
        ffi::lua_rawset(l, rooms);
        if !on {
            ffi::lua_pushnil(l);
            if ffi::lua_next(l, rooms) == 0 {
                ffi::lua_pushvalue(l, key);
                ffi::lua_pushnil(l);
                ffi::lua_rawset(l, index);
            }
        }
        ffi::lua_settop(l, key - 1);
    }
}

/// One room's change of the index, prepared (as plain data) while the state is borrowed,
/// applied by the protected call, and committed to [`Shared::indexed`] after it succeeded.
#[derive(Debug)]
pub(super) struct IndexChange {
    pub(super) user: String,
    pub(super) room: String,
    /// Full JIDs to take out of the room, and to put in it.
    pub(super) clear: Vec<String>,
    pub(super) set: Vec<String>,
    /// The sessions taking part now, and their full JIDs (the fork list; none if empty).
    pub(super) now: Vec<Rc<str>>,
    pub(super) now_full: Vec<String>,
    /// The fork list the protected call made (a registry reference), else `LUA_NOREF`.
    pub(super) list: c_int,
}

/// What the index must change after `out`: the rooms it says changed, and those an
/// earlier event failed to bring up to date.
pub(super) fn plan_index(shared: &Shared, host: &Host, out: &Outcome) -> Vec<IndexChange> {
    let mut rooms: Vec<(String, String)> = std::mem::take(&mut *shared.resync.borrow_mut());
    if let Some(user) = &out.user {
        for room in &out.changed_rooms {
            if !rooms.iter().any(|(u, r)| u == user && r == room) {
                rooms.push((user.clone(), room.clone()));
            }
        }
    }
    let indexed = shared.indexed.borrow();
    let full = |user: &str, r: &str| format!("{user}@{}/{r}", shared.domain);
    let mut changes = Vec::with_capacity(rooms.len());
    for (user, room) in rooms {
        let now = host.participants_of(&user, &room);
        let before = indexed.get(&user).and_then(|m| m.get(&room));
        let (before_sessions, synced) =
            before.map_or((&[][..], true), |b| (&b.sessions[..], b.synced));
        if synced && before_sessions == now.as_slice() {
            continue;
        }
        let clear = before_sessions
            .iter()
            .filter(|r| !now.contains(r))
            .map(|r| full(&user, r))
            .collect();
        // After a failed update the index may miss any of them: all are set again.
        let set = now
            .iter()
            .filter(|r| !synced || !before_sessions.contains(r))
            .map(|r| full(&user, r))
            .collect();
        let now_full = now.iter().map(|r| full(&user, r)).collect();
        changes.push(IndexChange {
            user,
            room,
            clear,
            set,
            now,
            now_full,
            list: ffi::LUA_NOREF,
        });
    }
    changes
}

/// Apply `changes` to the index and make their fork lists. Protected call only.
pub(super) unsafe fn apply_index(l: *mut lua_State, shared: &Shared, changes: &mut [IndexChange]) {
    unsafe {
        ffi::luaL_checkstack(l, 8, c"mod_minimix: the session index".as_ptr());
        ffi::lua_rawgeti(
            l,
            ffi::LUA_REGISTRYINDEX,
            shared.session_rooms as ffi::lua_Integer,
        );
        let index = ffi::lua_gettop(l);
        for change in changes.iter_mut() {
            for full in &change.clear {
                index_set(l, index, full, &change.room, false);
            }
            for full in &change.set {
                index_set(l, index, full, &change.room, true);
            }
            if !change.now_full.is_empty() {
                push_list(l, &change.now_full);
                change.list = ffi::luaL_ref(l, ffi::LUA_REGISTRYINDEX);
            }
        }
        ffi::lua_settop(l, index - 1);
    }
}

/// After the protected call: on success the mirror takes the new state (and the old
/// lists are freed); on failure the lists made are freed, and the rooms are marked as
/// not known to be in sync (with every session the index may have in them) and brought
/// up to date by the next event.
pub(super) fn commit_index(
    l: *mut lua_State,
    shared: &Shared,
    changes: Vec<IndexChange>,
    ok: bool,
) {
    let mut indexed = shared.indexed.borrow_mut();
    let mut resync = shared.resync.borrow_mut();
    for change in changes {
        let rooms = indexed.entry(change.user.clone()).or_default();
        let before = rooms.remove(&change.room);
        let next = if ok {
            if let Some(b) = before {
                unref(l, b.list);
            }
            (!change.now.is_empty()).then_some(IndexedRoom {
                sessions: change.now,
                list: change.list,
                synced: true,
            })
        } else {
            unref(l, change.list);
            let (mut sessions, list) =
                before.map_or((Vec::new(), ffi::LUA_NOREF), |b| (b.sessions, b.list));
            for r in change.now {
                if !sessions.contains(&r) {
                    sessions.push(r);
                }
            }
            resync.push((change.user.clone(), change.room.clone()));
            Some(IndexedRoom {
                sessions,
                list,
                synced: false,
            })
        };
        match next {
            Some(entry) => {
                rooms.insert(change.room, entry);
            }
            None if rooms.is_empty() => {
                indexed.remove(&change.user);
            }
            None => {}
        }
    }
}

/// Free a registry reference (`LUA_NOREF` is none). `luaL_unref` allocates nothing.
pub(super) fn unref(l: *mut lua_State, reference: c_int) {
    if reference != ffi::LUA_NOREF {
        unsafe { ffi::luaL_unref(l, ffi::LUA_REGISTRYINDEX, reference) };
    }
}

/// The list of full JIDs kept for a fork of `user`'s `room` to `count` sessions.
pub(super) fn fork_list(shared: &Shared, user: &str, room: &str, count: usize) -> Option<c_int> {
    let indexed = shared.indexed.borrow();
    let entry = indexed.get(user)?.get(room)?;
    (entry.synced && entry.sessions.len() == count).then_some(entry.list)
}
