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

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;

use minidom::rxml::Namespace;
use minidom::{Element, Node};
use mlua::ffi::{self, lua_State};
use xmpp_parsers::muc::muc::History as HistoryRequest;

use crate::host::{Action, Edit, Host, Out, Outcome};
use crate::stanza::{
    Head, Kind, NS_CLIENT, NS_MUC, NS_MUC_USER, NS_STANZAS, NS_TEST_FAULT, Payload,
};

/// Stanzas nested deeper than this are not serialized (they pass on untouched).
const MAX_DEPTH: usize = 64;

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

/// The op of an action quadruple: deliver to a session, or send from the account.
pub(crate) const OP_DELIVER: i64 = 1;
pub(crate) const OP_SEND: i64 = 2;

/// Stack slots an entry point reserves before it reads anything (the readers nest a few
/// tables deep; the serializer reserves more per level itself).
const READ_STACK: c_int = 32;

/// The key strings the readers look up, kept as upvalues of every entry point (2, 3, …)
/// in this order, so that reading a stanza pushes them without allocating.
const KEYS: [&CStr; 9] = [
    c"name", c"attr", c"tags", c"xmlns", c"from", c"to", c"type", c"id", c"code",
];
#[derive(Clone, Copy)]
enum Key {
    Name = 0,
    Attr,
    Tags,
    Xmlns,
    From,
    To,
    Type,
    Id,
    Code,
}

/// The state of one VirtualHost, shared by the hot entry points and the admin methods.
pub struct Shared {
    pub host: RefCell<Host>,
    /// The VirtualHost's name, for the full JIDs of forks.
    domain: String,
    /// Registry reference to Prosody's `util.stanza` metatable.
    stanza_mt: c_int,
    memo: RefCell<Option<Memo>>,
    /// `minimix_test_faults`: a stanza with a `memory` fault makes its reply fail.
    test_faults: bool,
    /// Registry reference to the session index the shim reads:
    /// `index[full_jid] = { [room] = true, … }` for every session taking part in a room
    /// (joined or joining). It lets the shim send a joined session's groupchat from the
    /// account without a call into the core; only this file writes it, from the rooms each
    /// outcome says changed.
    session_rooms: c_int,
    /// What the index holds, by account and room (to update it by difference), with the
    /// list of full JIDs that forks of the room go to.
    indexed: RefCell<Indexed>,
    /// Rooms whose index entries an event failed to update (its protected call raised):
    /// the next event brings them up to date.
    resync: RefCell<Vec<(String, String)>>,
    /// Entry points still alive: the last one collected frees the registry references.
    closures: std::cell::Cell<usize>,
}

type Indexed = HashMap<String, HashMap<String, IndexedRoom>>;

/// The sessions of one account taking part in one room.
struct IndexedRoom {
    /// The sessions the index has in the room; when `synced` is false (an update failed),
    /// every session the index may have in it.
    sessions: Vec<Rc<str>>,
    /// Registry reference to a Lua list of their full JIDs, handed to the shim for every
    /// fork of the room. Never changed once made (a change makes a new list), so a list
    /// the shim is still going through stays as it was.
    list: c_int,
    synced: bool,
}

/// The last stanza table serialized and its text. A room sends the same table to every
/// occupant in turn (changing only `to`), so one serialization serves every account on
/// this host. The registry reference keeps the table alive: the same address is the same
/// stanza.
struct Memo {
    table: *const c_void,
    reference: c_int,
    xml: Rc<str>,
}

/// # Safety
/// `l` is a valid Lua state and `stanza_mt` is at stack index `mt_index`.
unsafe fn new_shared(l: *mut lua_State, host: Host, mt_index: c_int) -> Rc<Shared> {
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
        })
    }
}

// ---------------------------------------------------------------------------------------
// Reading stanza tables in place.

/// The Lua stack of one call into an entry point. Strings borrowed through it live for
/// `'f`, the call: the values on the stack (and the stanza tables reachable from them, which
/// nothing here changes) hold them that long. Every reader uses raw accessors only, with
/// key strings pushed from the closure's upvalues, so none of them can raise a Lua error;
/// the stack space they use is reserved on entry ([`Frame::enter`]).
#[derive(Clone, Copy)]
pub(crate) struct Frame<'f> {
    l: *mut lua_State,
    _call: std::marker::PhantomData<&'f ()>,
}

impl<'f> Frame<'f> {
    /// Run `f` with the frame of this call, after reserving [`READ_STACK`] slots.
    ///
    /// # Safety
    /// `l` is the state of a running C function that has the key strings as upvalues
    /// 2, 3, … ([`KEYS`]), and the stanza tables on its stack are not changed during `f`.
    unsafe fn enter<R>(l: *mut lua_State, f: impl for<'g> FnOnce(Frame<'g>) -> R) -> Option<R> {
        if unsafe { ffi::lua_checkstack(l, READ_STACK) } == 0 {
            return None;
        }
        Some(f(Frame {
            l,
            _call: std::marker::PhantomData,
        }))
    }

    /// Push `t[key]` for the table at absolute index `t`, without metamethods; returns its
    /// type.
    fn raw_field(self, t: c_int, key: Key) -> c_int {
        unsafe {
            ffi::lua_pushvalue(self.l, ffi::lua_upvalueindex(key as c_int + 2));
            ffi::lua_rawget(self.l, t)
        }
    }

    fn pop(self, n: c_int) {
        unsafe { ffi::lua_pop(self.l, n) }
    }

    fn top(self) -> c_int {
        unsafe { ffi::lua_gettop(self.l) }
    }

    /// A string at `idx`.
    fn str_at(self, idx: c_int) -> Option<&'f str> {
        unsafe {
            if ffi::lua_type(self.l, idx) != ffi::LUA_TSTRING {
                return None;
            }
            let mut len = 0usize;
            let p = ffi::lua_tolstring(self.l, idx, &mut len);
            std::str::from_utf8(std::slice::from_raw_parts(p.cast::<u8>(), len)).ok()
        }
    }

    /// `t[key]` as a string, where `t` is the table at absolute index `t`.
    fn field_str(self, t: c_int, key: Key) -> Option<&'f str> {
        self.raw_field(t, key);
        let s = self.str_at(-1);
        self.pop(1);
        s
    }

    /// `t.attr[key]` as a string.
    fn attr_str(self, t: c_int, key: Key) -> Option<&'f str> {
        if self.raw_field(t, Key::Attr) != ffi::LUA_TTABLE {
            self.pop(1);
            return None;
        }
        let s = self.field_str(self.top(), key);
        self.pop(1);
        s
    }

    /// `t.attr[name]` as a string, for a name without a key string of its own: found by
    /// going through the attributes (a handful), which allocates nothing.
    fn attr_named(self, t: c_int, name: &str) -> Option<&'f str> {
        if self.raw_field(t, Key::Attr) != ffi::LUA_TTABLE {
            self.pop(1);
            return None;
        }
        let attr = self.top();
        let mut found = None;
        unsafe {
            ffi::lua_pushnil(self.l);
            while ffi::lua_next(self.l, attr) != 0 {
                if self.str_at(-2) == Some(name) {
                    found = self.str_at(-1);
                    self.pop(2);
                    break;
                }
                self.pop(1);
            }
        }
        self.pop(1);
        found
    }

    /// Call `f` with the absolute index of each child element of the table at `t`, until
    /// it returns `Some`.
    fn find_in_children<R>(self, t: c_int, mut f: impl FnMut(c_int) -> Option<R>) -> Option<R> {
        if self.raw_field(t, Key::Tags) != ffi::LUA_TTABLE {
            self.pop(1);
            return None;
        }
        let tags = self.top();
        let n = unsafe { ffi::lua_rawlen(self.l, tags) };
        let mut found = None;
        for i in 1..=n {
            if unsafe { ffi::lua_rawgeti(self.l, tags, i as ffi::lua_Integer) } == ffi::LUA_TTABLE {
                found = f(self.top());
            }
            self.pop(1);
            if found.is_some() {
                break;
            }
        }
        self.pop(1);
        found
    }

    /// Whether the element table at `t` is `name` in `ns` (its own xmlns, or its parent's).
    fn is_element(self, t: c_int, name: &str, ns: &str, parent_ns: &str) -> bool {
        self.field_str(t, Key::Name) == Some(name)
            && self.attr_str(t, Key::Xmlns).unwrap_or(parent_ns) == ns
    }

    /// Run `f` with the index of the first child `name` in `ns` of the element at `t`.
    fn with_child<R>(
        self,
        t: c_int,
        name: &str,
        ns: &str,
        parent_ns: &str,
        f: impl FnOnce(c_int) -> Option<R>,
    ) -> Option<R> {
        let mut f = Some(f);
        self.find_in_children(t, |c| {
            if self.is_element(c, name, ns, parent_ns) {
                f.take().and_then(|f| f(c))
            } else {
                None
            }
        })
    }

    fn read_head(self, t: c_int) -> Option<Head<'f>> {
        let kind = match self.field_str(t, Key::Name)? {
            "message" => Kind::Message,
            "presence" => Kind::Presence,
            "iq" => Kind::Iq,
            _ => return None,
        };
        if self.raw_field(t, Key::Attr) != ffi::LUA_TTABLE {
            self.pop(1);
            return None;
        }
        let attr = self.top();
        let head = Head {
            kind,
            from: self.field_str(attr, Key::From),
            to: self.field_str(attr, Key::To),
            type_: self.field_str(attr, Key::Type),
            id: self.field_str(attr, Key::Id),
        };
        self.pop(1);
        Some(head)
    }
}

struct RawStanza<'a, 'f> {
    s: Frame<'f>,
    idx: c_int,
    memo: &'a RefCell<Option<Memo>>,
    /// The text of this stanza when the memo did not hold it: kept in the memo (with a
    /// reference to the table) by the protected call, once the event succeeded.
    fresh: RefCell<Option<Rc<str>>>,
}

impl Payload for RawStanza<'_, '_> {
    fn has_child(&self, name: &str, ns: &str) -> bool {
        self.s
            .with_child(self.idx, name, ns, NS_CLIENT, |_| Some(()))
            .is_some()
    }

    fn child_attr(&self, name: &str, ns: &str, attr: &str) -> Option<String> {
        let s = self.s;
        s.with_child(self.idx, name, ns, NS_CLIENT, |c| {
            s.attr_named(c, attr).map(str::to_owned)
        })
    }

    fn first_child(&self) -> Option<(String, String)> {
        let s = self.s;
        s.find_in_children(self.idx, |c| {
            let name = s.field_str(c, Key::Name)?;
            let ns = s.attr_str(c, Key::Xmlns).unwrap_or(NS_CLIENT);
            Some((name.to_owned(), ns.to_owned()))
        })
    }

    fn status_codes(&self) -> Vec<u16> {
        let s = self.s;
        let mut codes = Vec::new();
        s.with_child(self.idx, "x", NS_MUC_USER, NS_CLIENT, |x| {
            s.find_in_children::<()>(x, |c| {
                if s.is_element(c, "status", NS_MUC_USER, NS_MUC_USER)
                    && let Some(code) = s.attr_str(c, Key::Code).and_then(|v| v.parse().ok())
                {
                    codes.push(code);
                }
                None
            })
        });
        codes
    }

    fn item_attr(&self, attr: &str) -> Option<String> {
        let s = self.s;
        s.with_child(self.idx, "x", NS_MUC_USER, NS_CLIENT, |x| {
            s.with_child(x, "item", NS_MUC_USER, NS_MUC_USER, |i| {
                s.attr_named(i, attr).map(str::to_owned)
            })
        })
    }

    fn error_condition(&self) -> Option<String> {
        let s = self.s;
        s.with_child(self.idx, "error", NS_CLIENT, NS_CLIENT, |e| {
            s.find_in_children(e, |c| {
                let name = s.field_str(c, Key::Name)?;
                (s.attr_str(c, Key::Xmlns) == Some(NS_STANZAS) && name != "text")
                    .then(|| name.to_owned())
            })
        })
    }

    fn history_request(&self) -> Option<HistoryRequest> {
        let s = self.s;
        s.with_child(self.idx, "x", NS_MUC, NS_CLIENT, |x| {
            s.with_child(x, "history", NS_MUC, NS_MUC, |h| {
                let number = |key: &str| s.attr_named(h, key).and_then(|v| v.parse().ok());
                Some(HistoryRequest {
                    maxchars: number("maxchars"),
                    maxstanzas: number("maxstanzas"),
                    seconds: number("seconds"),
                    since: s.attr_named(h, "since").and_then(|v| v.parse().ok()),
                })
            })
        })
    }

    fn join_password(&self) -> Option<String> {
        let s = self.s;
        s.with_child(self.idx, "x", NS_MUC, NS_CLIENT, |x| {
            s.with_child(x, "password", NS_MUC, NS_MUC, |p| {
                unsafe { ffi::lua_rawgeti(s.l, p, 1) };
                let text = s.str_at(-1).map(str::to_owned);
                s.pop(1);
                Some(text.unwrap_or_default())
            })
        })
    }

    fn xml(&self) -> Rc<str> {
        let table = unsafe { ffi::lua_topointer(self.s.l, self.idx) };
        if let Some(m) = self.memo.borrow().as_ref()
            && m.table == table
        {
            return m.xml.clone();
        }
        if let Some(xml) = self.fresh.borrow().as_ref() {
            return xml.clone();
        }
        let mut out = String::with_capacity(256);
        if write_xml(self.s, self.idx, NS_CLIENT, true, 0, &mut out).is_none() {
            out.clear();
        }
        let xml: Rc<str> = out.into();
        *self.fresh.borrow_mut() = Some(xml.clone());
        xml
    }
}

fn escape_into(out: &mut String, text: &str, attr: bool) {
    let special = |b: u8| matches!(b, b'&' | b'<' | b'>') || (attr && matches!(b, b'\'' | b'"'));
    let mut rest = text;
    while let Some(i) = rest.bytes().position(special) {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'\'' => "&apos;",
            _ => "&quot;",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

/// Serialize the stanza table at `t` as XML, leaving out the top element's `to`.
fn write_xml(
    s: Frame<'_>,
    t: c_int,
    parent_ns: &str,
    top: bool,
    depth: usize,
    out: &mut String,
) -> Option<()> {
    let l = s.l;
    unsafe {
        if depth > MAX_DEPTH || ffi::lua_checkstack(l, 8) == 0 {
            return None;
        }
        let name = s.field_str(t, Key::Name)?;
        let own_ns = if top { None } else { s.attr_str(t, Key::Xmlns) };
        let ns = own_ns.unwrap_or(parent_ns);
        out.push('<');
        out.push_str(name);
        if top || ns != parent_ns {
            out.push_str(" xmlns='");
            escape_into(out, ns, true);
            out.push('\'');
        }
        if s.raw_field(t, Key::Attr) == ffi::LUA_TTABLE {
            let attr = ffi::lua_gettop(l);
            let mut prefixes = 0;
            ffi::lua_pushnil(l);
            while ffi::lua_next(l, attr) != 0 {
                // Only string keys and values: lua_tolstring on a number key would confuse
                // lua_next.
                if let (Some(key), Some(value)) = (s.str_at(-2), s.str_at(-1))
                    && key != "xmlns"
                    && !(top && key == "to")
                {
                    out.push(' ');
                    if let Some((ans, local)) = key.split_once('\u{1}') {
                        prefixes += 1;
                        out.push_str(&format!("xmlns:p{prefixes}='"));
                        escape_into(out, ans, true);
                        out.push_str(&format!("' p{prefixes}:{local}"));
                    } else {
                        out.push_str(key);
                    }
                    out.push_str("='");
                    escape_into(out, value, true);
                    out.push('\'');
                }
                ffi::lua_pop(l, 1);
            }
        }
        ffi::lua_pop(l, 1);
        let n = ffi::lua_rawlen(l, t);
        if n == 0 {
            out.push_str("/>");
            return Some(());
        }
        out.push('>');
        for i in 1..=n {
            let kind = ffi::lua_rawgeti(l, t, i as ffi::lua_Integer);
            let ok = match kind {
                ffi::LUA_TSTRING => {
                    if let Some(text) = s.str_at(-1) {
                        escape_into(out, text, false);
                    }
                    Some(())
                }
                ffi::LUA_TTABLE => write_xml(s, ffi::lua_gettop(l), ns, false, depth + 1, out),
                _ => Some(()),
            };
            ffi::lua_pop(l, 1);
            ok?;
        }
        out.push_str("</");
        out.push_str(name);
        out.push('>');
        Some(())
    }
}

// ---------------------------------------------------------------------------------------
// Writing results.

unsafe fn push_str(l: *mut lua_State, s: &str) {
    unsafe {
        ffi::lua_pushlstring(l, s.as_ptr().cast(), s.len());
    }
}

/// Push `el` as a Prosody stanza table with `util.stanza`'s metatable.
unsafe fn push_element(l: *mut lua_State, el: &Element, parent_ns: &str, top: bool, mt: c_int) {
    unsafe {
        ffi::luaL_checkstack(l, 8, c"mod_minimix: a stanza".as_ptr());
        let nodes = el.nodes().count();
        ffi::lua_createtable(l, nodes as c_int, 3);
        let t = ffi::lua_gettop(l);
        push_str(l, el.name());
        ffi::lua_setfield(l, t, c"name".as_ptr());
        ffi::lua_createtable(l, 0, 4);
        let ns = el.ns();
        if !top && ns != parent_ns {
            push_str(l, &ns);
            ffi::lua_setfield(l, -2, c"xmlns".as_ptr());
        }
        for ((ans, name), value) in el.attrs().iter() {
            if *ans == Namespace::NONE {
                push_str(l, name);
            } else if *ans == Namespace::XML {
                push_str(l, &format!("xml:{name}"));
            } else {
                push_str(l, &format!("{}\u{1}{name}", ans.as_str()));
            }
            push_str(l, value);
            ffi::lua_rawset(l, -3);
        }
        ffi::lua_setfield(l, t, c"attr".as_ptr());
        ffi::lua_createtable(l, el.children().count() as c_int, 0);
        let tags = ffi::lua_gettop(l);
        let (mut i, mut k) = (0, 0);
        for node in el.nodes() {
            i += 1;
            match node {
                Node::Element(child) => {
                    k += 1;
                    push_element(l, child, &ns, false, mt);
                    ffi::lua_pushvalue(l, -1);
                    ffi::lua_rawseti(l, tags, k);
                    ffi::lua_rawseti(l, t, i);
                }
                Node::Text(text) => {
                    push_str(l, text);
                    ffi::lua_rawseti(l, t, i);
                }
            }
        }
        ffi::lua_setfield(l, t, c"tags".as_ptr());
        ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, mt as ffi::lua_Integer);
        ffi::lua_setmetatable(l, t);
    }
}

/// A reader of kept stanza text (made by `write_xml`, or by minidom in tests) that builds
/// Prosody stanza tables directly, without an intermediate tree.
struct KeptReader<'x> {
    /// The kept text (made by [`write_xml`], so well-formed and split only at ASCII
    /// delimiters, which are character boundaries).
    text: &'x str,
    xml: &'x [u8],
    pos: usize,
    l: *mut lua_State,
    mt: c_int,
    /// Scratch stacks shared by all elements of the stanza (each element uses the entries
    /// above where it started and drops them when done), so parsing allocates nothing
    /// per element: attributes, namespace prefixes, and whether each child is a tag.
    attrs: Vec<(&'x str, Cow<'x, str>)>,
    prefixes: Vec<(&'x str, Cow<'x, str>)>,
    kinds: Vec<bool>,
}

/// What a parsed element tells its parent (for the edits of a later join).
struct Parsed {
    is_status_201: bool,
}

impl<'x> KeptReader<'x> {
    fn peek(&self) -> Option<u8> {
        self.xml.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn name(&mut self) -> Option<&'x str> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| !c.is_ascii_whitespace() && !matches!(c, b'=' | b'>' | b'/'))
        {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        self.text.get(start..self.pos)
    }

    /// Text up to `end` (exclusive), entities decoded.
    fn text_until(&mut self, end: u8) -> Option<Cow<'x, str>> {
        let start = self.pos;
        let len = self.xml[start..].iter().position(|&c| c == end)?;
        self.pos += len;
        let raw = self.text.get(start..self.pos)?;
        if !raw.contains('&') {
            return Some(Cow::Borrowed(raw));
        }
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(i) = rest.find('&') {
            out.push_str(&rest[..i]);
            let semi = rest[i..].find(';')? + i;
            let entity = &rest[i + 1..semi];
            match entity {
                "amp" => out.push('&'),
                "lt" => out.push('<'),
                "gt" => out.push('>'),
                "apos" => out.push('\''),
                "quot" => out.push('"'),
                _ => {
                    let code = match entity.strip_prefix("#x").or(entity.strip_prefix("#X")) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => entity.strip_prefix('#')?.parse().ok()?,
                    };
                    out.push(char::from_u32(code)?);
                }
            }
            rest = &rest[semi + 1..];
        }
        out.push_str(rest);
        Some(Cow::Owned(out))
    }

    /// Parse one element at `<` and leave its table on the stack. Children are built on
    /// the stack first, so every table is made at its final size.
    unsafe fn element(
        &mut self,
        parent_ns: &str,
        depth: usize,
        edit: Option<&Edit>,
    ) -> Option<Parsed> {
        unsafe {
            let l = self.l;
            if depth > MAX_DEPTH || ffi::lua_checkstack(l, 10) == 0 {
                return None;
            }
            self.pos += 1; // '<'
            let name = self.name()?;
            let mut ns: Cow<'x, str> = Cow::Borrowed("");
            let mut own_ns = false;
            let attrs_from = self.attrs.len();
            let prefixes_from = self.prefixes.len();
            let mut code = None;
            let closed = loop {
                self.skip_space();
                match self.peek()? {
                    b'/' => {
                        self.pos += 2; // "/>"
                        break true;
                    }
                    b'>' => {
                        self.pos += 1;
                        break false;
                    }
                    _ => {}
                }
                let key = self.name()?;
                self.skip_space();
                self.pos += 1; // '='
                self.skip_space();
                let quote = self.peek()?;
                self.pos += 1;
                let value = self.text_until(quote)?;
                self.pos += 1;
                if key == "xmlns" {
                    ns = value;
                    own_ns = true;
                } else if let Some(prefix) = key.strip_prefix("xmlns:") {
                    self.prefixes.push((prefix, value));
                } else {
                    if key == "code" {
                        code = Some(value.clone());
                    }
                    self.attrs.push((key, value));
                }
            };
            let attrs_to = self.attrs.len();
            let prefixes_to = self.prefixes.len();
            let ns: &str = if own_ns { &ns } else { parent_ns };
            // An item of the self-presence's payload names the session, not the account.
            if depth == 2
                && name == "item"
                && ns == NS_MUC_USER
                && let Some(edit) = edit
            {
                for (key, value) in &mut self.attrs[attrs_from..attrs_to] {
                    if *key == "jid"
                        && let Some(jid) = edit.own_item_jid(value)
                    {
                        *value = Cow::Owned(jid.to_owned());
                    }
                }
            }
            // The edits of a later join, on the self-presence's muc#user payload.
            let in_own_x = edit.is_some_and(Edit::edits_own_presence)
                && depth == 1
                && name == "x"
                && ns == NS_MUC_USER;
            // Children, in order, on the stack above `base`.
            let base = ffi::lua_gettop(l);
            let kinds_from = self.kinds.len();
            if !closed {
                loop {
                    if self.peek()? == b'<' {
                        if self.xml.get(self.pos + 1) == Some(&b'/') {
                            while self.peek()? != b'>' {
                                self.pos += 1;
                            }
                            self.pos += 1;
                            break;
                        }
                        // Only the top element's direct children, and the items of the
                        // self-presence's payload, need to know the edit.
                        let child_edit = if depth == 0 || in_own_x { edit } else { None };
                        let parsed = self.element(ns, depth + 1, child_edit)?;
                        if in_own_x
                            && parsed.is_status_201
                            && edit.is_some_and(|e| e.drops_own_status(Some("201")))
                        {
                            ffi::lua_pop(l, 1);
                            continue;
                        }
                        self.kinds.push(true);
                    } else {
                        let text = self.text_until(b'<')?;
                        if ffi::lua_checkstack(l, 4) == 0 {
                            return None;
                        }
                        push_str(l, &text);
                        self.kinds.push(false);
                    }
                }
            }
            let added = match edit {
                Some(edit) if depth == 0 => edit.added_to_stanza(),
                Some(edit) if in_own_x => edit.added_to_own_presence(),
                _ => None,
            };
            if let Some(el) = &added {
                push_element(l, el, ns, false, self.mt);
                self.kinds.push(true);
            }
            let is_tag = &self.kinds[kinds_from..];
            let nodes = is_tag.len() as c_int;
            let ntags = is_tag.iter().filter(|t| **t).count() as c_int;
            ffi::lua_createtable(l, nodes, 3);
            let t = ffi::lua_gettop(l);
            ffi::lua_createtable(l, ntags, 0);
            let tags = t + 1;
            let mut k = 0;
            for (i, tag) in is_tag.iter().enumerate() {
                ffi::lua_pushvalue(l, base + 1 + i as c_int);
                if *tag {
                    k += 1;
                    ffi::lua_pushvalue(l, -1);
                    ffi::lua_rawseti(l, tags, k);
                }
                ffi::lua_rawseti(l, t, i as ffi::lua_Integer + 1);
            }
            ffi::lua_setfield(l, t, c"tags".as_ptr());
            push_str(l, name);
            ffi::lua_setfield(l, t, c"name".as_ptr());
            let with_xmlns = depth > 0 && ns != parent_ns;
            // The top element gets its `to` when it is sent: room for it from the start.
            let extra = c_int::from(with_xmlns) + c_int::from(depth == 0);
            self.kinds.truncate(kinds_from);
            let pending = &self.attrs[attrs_from..attrs_to];
            let prefixes = &self.prefixes[prefixes_from..prefixes_to];
            ffi::lua_createtable(l, 0, pending.len() as c_int + extra);
            if with_xmlns {
                push_str(l, ns);
                ffi::lua_setfield(l, -2, c"xmlns".as_ptr());
            }
            for (key, value) in pending {
                match key.split_once(':') {
                    Some((prefix, local)) if prefix != "xml" => {
                        match prefixes.iter().find(|(p, _)| *p == prefix) {
                            Some((_, uri)) => push_str(l, &format!("{uri}\u{1}{local}")),
                            None => push_str(l, key),
                        }
                    }
                    _ => push_str(l, key),
                }
                push_str(l, value);
                ffi::lua_rawset(l, -3);
            }
            self.attrs.truncate(attrs_from);
            self.prefixes.truncate(prefixes_from);
            ffi::lua_setfield(l, t, c"attr".as_ptr());
            ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, self.mt as ffi::lua_Integer);
            ffi::lua_setmetatable(l, t);
            // Move the new table down over its children and drop them.
            ffi::lua_rotate(l, base + 1, 1);
            ffi::lua_settop(l, base + 1);
            Some(Parsed {
                is_status_201: name == "status"
                    && ns == NS_MUC_USER
                    && code.as_deref() == Some("201"),
            })
        }
    }
}

/// Push a kept stanza as a stanza table, changed as `edit` says. On malformed text the
/// stack is left as it was and `None` returned.
unsafe fn push_kept(l: *mut lua_State, xml: &str, edit: &Edit, mt: c_int) -> Option<()> {
    unsafe {
        let top = ffi::lua_gettop(l);
        let mut reader = KeptReader {
            text: xml,
            xml: xml.as_bytes(),
            pos: 0,
            l,
            mt,
            attrs: Vec::new(),
            prefixes: Vec::new(),
            kinds: Vec::new(),
        };
        reader.skip_space();
        let ok = reader.peek() == Some(b'<') && reader.element(NS_CLIENT, 0, Some(edit)).is_some();
        if !ok {
            ffi::lua_settop(l, top);
            return None;
        }
        Some(())
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
    let flags =
        if out.persist { FLAG_PERSIST } else { 0 } | if out.archive { FLAG_ARCHIVE } else { 0 };
    let reply = |flags, body| Reply {
        handled: out.handled,
        user: out.user.as_deref(),
        notes: &out.notes,
        flags,
        body,
    };
    if !out.handled && out.notes.is_empty() && out.actions.is_empty() && !out.persist {
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
unsafe fn push_reply(l: *mut lua_State, shared: &Shared, reply: &Reply) -> c_int {
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
unsafe fn push_actions(l: *mut lua_State, shared: &Shared, actions: &[Action]) -> usize {
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
unsafe fn push_list(l: *mut lua_State, items: &[String]) {
    unsafe {
        ffi::lua_createtable(l, items.len() as c_int, 0);
        for (k, item) in items.iter().enumerate() {
            push_str(l, item);
            ffi::lua_rawseti(l, -2, k as ffi::lua_Integer + 1);
        }
    }
}

/// Push the notes (nil when there are none), with one more when kept stanzas were skipped.
unsafe fn push_notes(l: *mut lua_State, notes: &[String], skipped: usize) {
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

// ---------------------------------------------------------------------------------------
// The session index.

/// Set (`on`) or clear `index[full][room]` in the index table at `index`; a session left
/// with no room is dropped from the index. Allocates: protected call only.
unsafe fn index_set(l: *mut lua_State, index: c_int, full: &str, room: &str, on: bool) {
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
struct IndexChange {
    user: String,
    room: String,
    /// Full JIDs to take out of the room, and to put in it.
    clear: Vec<String>,
    set: Vec<String>,
    /// The sessions taking part now, and their full JIDs (the fork list; none if empty).
    now: Vec<Rc<str>>,
    now_full: Vec<String>,
    /// The fork list the protected call made (a registry reference), else `LUA_NOREF`.
    list: c_int,
}

/// What the index must change after `out`: the rooms it says changed, and those an
/// earlier event failed to bring up to date.
fn plan_index(shared: &Shared, host: &Host, out: &Outcome) -> Vec<IndexChange> {
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
unsafe fn apply_index(l: *mut lua_State, shared: &Shared, changes: &mut [IndexChange]) {
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
fn commit_index(l: *mut lua_State, shared: &Shared, changes: Vec<IndexChange>, ok: bool) {
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
fn unref(l: *mut lua_State, reference: c_int) {
    if reference != ffi::LUA_NOREF {
        unsafe { ffi::luaL_unref(l, ffi::LUA_REGISTRYINDEX, reference) };
    }
}

/// The list of full JIDs kept for a fork of `user`'s `room` to `count` sessions.
fn fork_list(shared: &Shared, user: &str, room: &str, count: usize) -> Option<c_int> {
    let indexed = shared.indexed.borrow();
    let entry = indexed.get(user)?.get(room)?;
    (entry.synced && entry.sessions.len() == count).then_some(entry.list)
}

// ---------------------------------------------------------------------------------------
// The protected call that makes an event's Lua values.

/// Everything the protected call works from, prepared while the state was borrowed, and
/// the references it makes.
struct Encode<'e> {
    shared: &'e Shared,
    reply: &'e Reply<'e>,
    changes: &'e mut [IndexChange],
    /// Keep a reference to the stanza (argument 2) for the memo.
    memo: bool,
    memo_ref: c_int,
}

unsafe extern "C-unwind" fn encode_protected(l: *mut lua_State) -> c_int {
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
unsafe extern "C" fn refusing_alloc(
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
fn encode(
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

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    format!("mod_minimix core panicked: {msg}")
}

/// Runs `f` with the call's frame and the host's shared state (the closure's first
/// upvalue), panics caught; on failure pushes `nil, message` for the shim to log.
unsafe fn guarded(
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
unsafe fn push_str_unprotected(l: *mut lua_State, s: &str) {
    unsafe { push_str(l, s) }
}

/// Runs `f` on the host's core (phase 1, state borrowed), then makes its reply (phase 2,
/// one protected call, nothing borrowed).
fn with_host(
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
        let out = f(&mut host)?;
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
fn run_event<'f>(
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
fn now_at(s: Frame<'_>, idx: c_int) -> i64 {
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
unsafe extern "C-unwind" fn room_event(l: *mut lua_State) -> c_int {
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
unsafe extern "C-unwind" fn session_event(l: *mut lua_State) -> c_int {
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
///   "restore", user, room, nick, password|nil — rejoin after a restart
///   "bookmark", user, room, nick|nil, password|nil, autojoin
///   "leave", user, room, reason        — make the account leave (admin)
///   "service", domain, is_muc          — whether a service is a MUC (learned by the shim)
unsafe extern "C-unwind" fn control(l: *mut lua_State) -> c_int {
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
                        host.restore(user, room, arg(4).unwrap_or(user), arg(5))
                    }
                    ("bookmark", Some(room)) => host.bookmark(user, room, arg(4), arg(5), flag(6)),
                    ("leave", Some(room)) => {
                        host.leave(user, room, arg(4).unwrap_or("asked by an admin"))
                    }
                    ("service", _) => {
                        host.learn_service(user, flag(3));
                        Outcome::default()
                    }
                    _ => return Err(format!("control: unknown operation {op}")),
                })
            })
        })
    }
}

/// Free every registry reference the host's state holds. `luaL_unref` allocates nothing.
fn release_references(l: *mut lua_State, shared: &Shared) {
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
unsafe extern "C-unwind" fn gc_shared(l: *mut lua_State) -> c_int {
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
unsafe fn push_closure(l: *mut lua_State, shared: &Rc<Shared>, f: ffi::lua_CFunction) {
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
