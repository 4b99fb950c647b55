//! The hot entry points, written against Lua's C API.
//!
//! Every stanza a session sends and every stanza a room sends to an account crosses here,
//! so this path reads Prosody's stanza tables in place on the Lua stack: the few
//! attributes and children a decision needs, with no copy of the stanza, no Lua references
//! kept, and the serialized form made only when the core keeps the stanza (and then once
//! for every account the room sent the same table to). Results go back as plain values.
//!
//! Safety: every function here runs inside a Lua C function call on the stack it was
//! given. Strings borrowed from stanza tables stay valid for the call, because the tables
//! hold them and nothing here changes a stanza: [`Frame`] ties their lifetime to the call.
//! All Rust work runs inside `catch_unwind`. An event runs in two phases:
//!
//! 1. With the state borrowed (`host`, `indexed`, `memo`), the stanza is read with raw
//!    accessors that cannot raise (no metamethods; key strings are the closure's upvalues,
//!    so looking them up allocates nothing) and the core decides. What the event changes
//!    on the Lua side is prepared as plain data ([`Reply`], [`IndexChange`]).
//! 2. With every guard released, one protected call ([`encode`], `lua_pcall`) makes every
//!    Lua value of the reply and applies the index change. A Lua error there (not enough
//!    memory) fails that event only: the Rust-side mirror of the index is committed only
//!    after success (the rooms concerned are re-synchronised by the next event otherwise).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use crate::host::{Host, Outcome};
use crate::stanza::{Head, NS_TEST_FAULT, Payload};

use super::{index::*, read::*, reply::*};

/// The state of one VirtualHost, shared by the hot entry points and the admin methods.
pub struct Shared {
    pub host: RefCell<Host>,
    /// The VirtualHost's name, for the full JIDs of forks.
    pub(super) domain: String,
    /// Registry reference to Prosody's `util.stanza` metatable.
    pub(super) stanza_mt: c_int,
    pub(super) memo: RefCell<Option<Memo>>,
    /// `minimix_test_faults`: a stanza with a `memory` fault makes its reply fail.
    pub(super) test_faults: bool,
    /// Registry reference to the session index the shim reads:
    /// `index[full_jid] = { [room] = true, … }` for every session taking part in a room
    /// (joined or joining). It lets the shim send a joined session's groupchat from the
    /// account without a call into the core; only this file writes it, from the rooms each
    /// outcome says changed.
    pub(super) session_rooms: c_int,
    /// What the index holds, by account and room (to update it by difference), with the
    /// list of full JIDs that forks of the room go to.
    pub(super) indexed: RefCell<Indexed>,
    /// Rooms whose index entries an event failed to update (its protected call raised):
    /// the next event brings them up to date.
    pub(super) resync: RefCell<Vec<(String, String)>>,
    /// Entry points still alive: the last one collected frees the registry references.
    pub(super) closures: std::cell::Cell<usize>,
    /// What the last ticks made due and the shim has not carried out yet, in order: the
    /// shim takes them one by one (`control("due", …)`), each a reply of its own.
    pub(super) due: RefCell<std::collections::VecDeque<Outcome>>,
}

pub(super) type Indexed = HashMap<String, HashMap<String, IndexedRoom>>;

/// The sessions of one account taking part in one room.
pub(super) struct IndexedRoom {
    /// The sessions the index has in the room; when `synced` is false (an update failed),
    /// every session the index may have in it.
    pub(super) sessions: Vec<Rc<str>>,
    /// Registry reference to a Lua list of their full JIDs, handed to the shim for every
    /// fork of the room. Never changed once made (a change makes a new list), so a list
    /// the shim is still going through stays as it was.
    pub(super) list: c_int,
    pub(super) synced: bool,
}

/// The last stanza table serialized and its text. A room sends the same table to every
/// occupant in turn (changing only `to`), so one serialization serves every account on
/// this host. The registry reference keeps the table alive: the same address is the same
/// stanza.
pub(super) struct Memo {
    pub(super) table: *const c_void,
    pub(super) reference: c_int,
    pub(super) xml: Rc<str>,
}

/// # Safety
/// `l` is a valid Lua state and `stanza_mt` is at stack index `mt_index`.
pub(super) unsafe fn new_shared(l: *mut lua_State, host: Host, mt_index: c_int) -> Rc<Shared> {
    unsafe {
        ffi::lua_pushvalue(l, mt_index);
        let stanza_mt = ffi::luaL_ref(l, ffi::LUA_REGISTRYINDEX);
        ffi::lua_createtable(l, 0, 0);
        let session_rooms = ffi::luaL_ref(l, ffi::LUA_REGISTRYINDEX);
        Rc::new(Shared {
            domain: host.domain().to_owned(),
            test_faults: host.config().test_faults,
            host: RefCell::new(host),
            stanza_mt,
            memo: RefCell::new(None),
            session_rooms,
            indexed: RefCell::new(HashMap::new()),
            resync: RefCell::new(Vec::new()),
            closures: std::cell::Cell::new(0),
            due: RefCell::new(std::collections::VecDeque::new()),
        })
    }
}

// ---------------------------------------------------------------------------------------
// The protected call that makes an event's Lua values.

/// Everything the protected call works from, prepared while the state was borrowed, and
/// the references it makes.
pub(super) struct Encode<'e> {
    pub(super) shared: &'e Shared,
    pub(super) reply: &'e Reply<'e>,
    pub(super) changes: &'e mut [IndexChange],
    /// Keep a reference to the stanza (argument 2) for the memo.
    pub(super) memo: bool,
    pub(super) memo_ref: c_int,
}

pub(super) unsafe extern "C-unwind" fn encode_protected(l: *mut lua_State) -> c_int {
    unsafe {
        // SAFETY: `encode` passes a pointer to its own `Encode`, alive during this call.
        let enc = &mut *ffi::lua_touserdata(l, 1).cast::<Encode>();
        ffi::luaL_checkstack(l, 16, c"mod_minimix: the reply".as_ptr());
        if enc.memo {
            ffi::lua_pushvalue(l, 2);
            enc.memo_ref = ffi::luaL_ref(l, ffi::LUA_REGISTRYINDEX);
        }
        apply_index(l, enc.shared, enc.changes);
        push_reply(l, enc.shared, enc.reply)
    }
}

/// A Lua allocator that refuses to grow anything (frees and shrinks go to the real one):
/// the `memory` test fault, for the protected call of one event.
pub(super) unsafe extern "C" fn refusing_alloc(
    ud: *mut c_void,
    ptr: *mut c_void,
    osize: usize,
    nsize: usize,
) -> *mut c_void {
    unsafe {
        let (real, real_ud) = *ud.cast::<(ffi::lua_Alloc, *mut c_void)>();
        if nsize == 0 || (!ptr.is_null() && nsize <= osize) {
            real(real_ud, ptr, osize, nsize)
        } else {
            std::ptr::null_mut()
        }
    }
}

/// Make the event's Lua values (and apply its index change) in one protected call; the
/// values are left on the stack and their count returned. `stanza`: the stanza's index,
/// when the memo should keep it (its text is `fresh`). `refuse_memory`: the test fault.
pub(super) fn encode(
    s: Frame<'_>,
    shared: &Shared,
    reply: &Reply,
    mut changes: Vec<IndexChange>,
    fresh: Option<(c_int, Rc<str>)>,
    refuse_memory: bool,
) -> Result<c_int, String> {
    let l = s.l;
    let mut enc = Encode {
        shared,
        reply,
        changes: &mut changes,
        memo: fresh.is_some(),
        memo_ref: ffi::LUA_NOREF,
    };
    let (status, base) = unsafe {
        let base = ffi::lua_gettop(l);
        ffi::lua_pushcfunction(l, encode_protected);
        ffi::lua_pushlightuserdata(l, (&raw mut enc).cast());
        match &fresh {
            Some((idx, _)) => ffi::lua_pushvalue(l, *idx),
            None => ffi::lua_pushnil(l),
        }
        let status = if refuse_memory {
            let mut real_ud = std::ptr::null_mut();
            let real = ffi::lua_getallocf(l, &mut real_ud);
            let mut saved = (real, real_ud);
            ffi::lua_setallocf(l, refusing_alloc, (&raw mut saved).cast());
            let status = ffi::lua_pcall(l, 2, ffi::LUA_MULTRET, 0);
            ffi::lua_setallocf(l, real, real_ud);
            status
        } else {
            ffi::lua_pcall(l, 2, ffi::LUA_MULTRET, 0)
        };
        (status, base)
    };
    let memo_ref = enc.memo_ref;
    let ok = status == ffi::LUA_OK;
    commit_index(l, shared, changes, ok);
    if !ok {
        let message = s.str_at(-1).unwrap_or("a Lua error").to_owned();
        unsafe { ffi::lua_settop(l, base) };
        unref(l, memo_ref);
        return Err(format!("mod_minimix could not make its reply: {message}"));
    }
    if let Some((idx, xml)) = fresh {
        let table = unsafe { ffi::lua_topointer(l, idx) };
        let old = shared.memo.borrow_mut().replace(Memo {
            table,
            reference: memo_ref,
            xml,
        });
        if let Some(old) = old {
            unref(l, old.reference);
        }
    }
    Ok(unsafe { ffi::lua_gettop(l) } - base)
}

// ---------------------------------------------------------------------------------------
// The entry points.

pub(super) fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    format!("mod_minimix core panicked: {msg}")
}

/// Runs `f` with the call's frame and the host's shared state (the closure's first
/// upvalue), panics caught; on failure pushes `nil, message` for the shim to log.
pub(super) unsafe fn guarded(
    l: *mut lua_State,
    f: impl for<'f> FnOnce(Frame<'f>, &'f Shared) -> Result<c_int, String>,
) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| unsafe {
        Frame::enter(l, |s| {
            // SAFETY: the first upvalue of every entry point is the userdata made by
            // `push_closure`, which holds an `Rc<Shared>` until it is collected, and it
            // cannot be while this closure runs.
            let boxed = ffi::lua_touserdata(l, ffi::lua_upvalueindex(1)).cast::<*const Shared>();
            f(s, &**boxed)
        })
    }));
    let message = match result {
        Ok(Some(Ok(n))) => return n,
        Ok(Some(Err(message))) => message,
        Ok(None) => "mod_minimix: no Lua stack space left".to_owned(),
        Err(panic) => panic_text(panic),
    };
    // LUA_MINSTACK slots are always there for a C function: room for these two.
    unsafe {
        ffi::lua_pushnil(l);
        push_str_unprotected(l, &message);
    }
    2
}

/// `push_str` outside a protected call: the one place a failure message is pushed. A
/// memory error here would raise through `guarded` alone, which holds nothing.
pub(super) unsafe fn push_str_unprotected(l: *mut lua_State, s: &str) {
    unsafe { push_str(l, s) }
}

/// Runs `f` on the host's core (phase 1, state borrowed), then makes its reply (phase 2,
/// one protected call, nothing borrowed).
pub(super) fn with_host(
    s: Frame<'_>,
    shared: &Shared,
    fresh: Option<(c_int, &RefCell<Option<Rc<str>>>)>,
    refuse_memory: bool,
    f: impl FnOnce(&mut Host) -> Result<Outcome, String>,
) -> Result<c_int, String> {
    let (out, changes) = {
        let mut host = shared
            .host
            .try_borrow_mut()
            .map_err(|_| "mod_minimix core re-entered".to_owned())?;
        let mut out = f(&mut host)?;
        out.sooner_deadline |= host.take_sooner_deadline();
        let changes = plan_index(shared, &host, &out);
        (out, changes)
    };
    let reply = reply_of(&out, &shared.domain, |user, room, count| {
        fork_list(shared, user, room, count)
    });
    let fresh = fresh.and_then(|(idx, text)| Some((idx, text.borrow_mut().take()?)));
    encode(s, shared, &reply, changes, fresh, refuse_memory)
}

/// Runs one stanza event on the stanza table at `stanza`.
pub(super) fn run_event<'f>(
    s: Frame<'f>,
    shared: &Shared,
    stanza: c_int,
    f: impl FnOnce(&mut Host, &Head<'f>, &RawStanza<'_, 'f>) -> Outcome,
) -> Result<c_int, String> {
    if unsafe { ffi::lua_type(s.l, stanza) } != ffi::LUA_TTABLE {
        return Ok(0);
    }
    let Some(head) = s.read_head(stanza) else {
        return Ok(0);
    };
    let payload = RawStanza {
        s,
        idx: stanza,
        memo: &shared.memo,
        fresh: RefCell::new(None),
    };
    let refuse_memory = shared.test_faults
        && payload
            .child_attr("fault", NS_TEST_FAULT, "kind")
            .as_deref()
            == Some("memory");
    with_host(
        s,
        shared,
        Some((stanza, &payload.fresh)),
        refuse_memory,
        |host| Ok(f(host, &head, &payload)),
    )
}

/// The time given at `idx` (tests and benchmarks), else the clock, in Unix seconds.
pub(super) fn now_at(s: Frame<'_>, idx: c_int) -> i64 {
    unsafe {
        if ffi::lua_isinteger(s.l, idx) != 0 {
            return ffi::lua_tointegerx(s.l, idx, std::ptr::null_mut());
        }
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `room_event(stanza[, now])`: something arrived for an account's bare JID.
pub(super) unsafe extern "C-unwind" fn room_event(l: *mut lua_State) -> c_int {
    unsafe {
        guarded(l, |s, shared| {
            let now = now_at(s, 2);
            run_event(s, shared, 1, |host, head, payload| {
                host.room_event(head, payload, now)
            })
        })
    }
}

/// `session_event(user, resource, stanza[, now])`: a session of this host sent a stanza.
pub(super) unsafe extern "C-unwind" fn session_event(l: *mut lua_State) -> c_int {
    unsafe {
        guarded(l, |s, shared| {
            let (Some(user), Some(resource)) = (s.str_at(1), s.str_at(2)) else {
                return Ok(0);
            };
            let now = now_at(s, 4);
            run_event(s, shared, 3, |host, head, payload| {
                host.session_event(user, resource, head, payload, now)
            })
        })
    }
}

/// `control(op, user, ...)`: what the module does of its own accord.
///   "ended", user, resource            — a session ended without leaving
///   "restore", user, room, nick, password|nil, got|nil — rejoin after a restart (got:
///                                        what was stored of what the account got)
///   "bookmark", user, room, nick|nil, password|nil, autojoin
///   "leave", user, room, reason        — make the account leave (admin)
///   "service", domain, is_muc          — whether a service is a MUC (learned by the shim)
///   "tick", host[, now]                — time passed: the core's timers (IQs no longer
///                                        waited for, self-pings, rejoins); what they
///                                        make due is queued (`due_count`); see
///                                        `next_deadline` for when next
///   "due", host                        — the first queued timer outcome, carried out
///                                        like any other (nothing when none is queued)
pub(super) unsafe extern "C-unwind" fn control(l: *mut lua_State) -> c_int {
    unsafe {
        guarded(l, |s, shared| {
            let (Some(op), Some(user)) = (s.str_at(1), s.str_at(2)) else {
                return Err("control: needs an operation and an account".to_owned());
            };
            let arg = |i| s.str_at(i);
            let flag = |i| ffi::lua_toboolean(l, i) != 0;
            with_host(s, shared, None, false, |host| {
                Ok(match (op, arg(3)) {
                    ("ended", Some(resource)) => host.session_ended(user, resource),
                    ("restore", Some(room)) => {
                        host.restore_with(user, room, arg(4).unwrap_or(user), arg(5), arg(6))
                    }
                    ("bookmark", Some(room)) => host.bookmark(user, room, arg(4), arg(5), flag(6)),
                    ("leave", Some(room)) => {
                        host.leave(user, room, arg(4).unwrap_or("asked by an admin"))
                    }
                    ("service", _) => {
                        host.learn_service(user, flag(3));
                        Outcome::default()
                    }
                    ("tick", _) => {
                        let outcomes = host.tick(now_at(s, 3));
                        shared.due.borrow_mut().extend(outcomes);
                        Outcome::default()
                    }
                    ("due", _) => shared.due.borrow_mut().pop_front().unwrap_or_default(),
                    _ => return Err(format!("control: unknown operation {op}")),
                })
            })
        })
    }
}

/// Free every registry reference the host's state holds. `luaL_unref` allocates nothing.
pub(super) fn release_references(l: *mut lua_State, shared: &Shared) {
    unref(l, shared.stanza_mt);
    unref(l, shared.session_rooms);
    if let Ok(mut indexed) = shared.indexed.try_borrow_mut() {
        for (_, rooms) in indexed.drain() {
            for (_, room) in rooms {
                unref(l, room.list);
            }
        }
    }
    if let Ok(mut memo) = shared.memo.try_borrow_mut()
        && let Some(m) = memo.take()
    {
        unref(l, m.reference);
    }
}

/// `__gc` of the userdata each entry point holds its `Rc<Shared>` in. The last entry
/// point collected frees the registry references (the admin methods' handle, which may
/// outlive them, needs none).
pub(super) unsafe extern "C-unwind" fn gc_shared(l: *mut lua_State) -> c_int {
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
        let boxed = ffi::lua_touserdata(l, 1).cast::<*const Shared>();
        if boxed.is_null() || (*boxed).is_null() {
            return;
        }
        let shared = Rc::from_raw(*boxed);
        *boxed = std::ptr::null();
        let left = shared.closures.get().saturating_sub(1);
        shared.closures.set(left);
        if left == 0 {
            release_references(l, &shared);
        }
    }));
    0
}

/// Push a C closure over `shared`, with the key strings as upvalues 2, 3, … (see
/// [`KEYS`]).
pub(super) unsafe fn push_closure(l: *mut lua_State, shared: &Rc<Shared>, f: ffi::lua_CFunction) {
    unsafe {
        let boxed = ffi::lua_newuserdatauv(l, std::mem::size_of::<*const Shared>(), 0)
            .cast::<*const Shared>();
        *boxed = Rc::into_raw(shared.clone());
        shared.closures.set(shared.closures.get() + 1);
        if ffi::luaL_newmetatable(l, c"minimix.shared".as_ptr()) != 0 {
            ffi::lua_pushcfunction(l, gc_shared);
            ffi::lua_setfield(l, -2, c"__gc".as_ptr());
        }
        ffi::lua_setmetatable(l, -2);
        for key in KEYS {
            ffi::lua_pushstring(l, key.as_ptr());
        }
        ffi::lua_pushcclosure(l, f, 1 + KEYS.len() as c_int);
    }
}

/// Make the shared state for a host and push its entry points `room_event`,
/// `session_event` and `control`, and the session index (see [`Shared`]). `stanza_mt` is
/// at stack index `mt_index`.
///
/// # Safety
/// `l` is a valid Lua state, in a protected call (this allocates).
pub unsafe fn open(l: *mut lua_State, host: Host, mt_index: c_int) -> Rc<Shared> {
    unsafe {
        ffi::luaL_checkstack(l, 4 + KEYS.len() as c_int, c"mod_minimix".as_ptr());
        let shared = new_shared(l, host, mt_index);
        push_closure(l, &shared, room_event);
        push_closure(l, &shared, session_event);
        push_closure(l, &shared, control);
        ffi::lua_rawgeti(
            l,
            ffi::LUA_REGISTRYINDEX,
            shared.session_rooms as ffi::lua_Integer,
        );
        shared
    }
}
