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
//! hold them and nothing here changes a stanza. All Rust work runs inside `catch_unwind`,
//! and nothing here raises a Lua error, so no Rust frame is ever skipped by `longjmp`.

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
use crate::stanza::{Head, Kind, NS_CLIENT, NS_MUC, NS_MUC_USER, NS_STANZAS, Payload};

/// Stanzas nested deeper than this are not serialized (they pass on untouched).
const MAX_DEPTH: usize = 64;

// What the shim reads in an outcome (see `push_outcome`). Handed to Lua as
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

/// The state of one VirtualHost, shared by the hot entry points and the admin methods.
pub struct Shared {
    pub host: RefCell<Host>,
    /// The VirtualHost's name, for the full JIDs of forks.
    domain: String,
    /// Registry reference to Prosody's `util.stanza` metatable.
    stanza_mt: c_int,
    memo: RefCell<Option<Memo>>,
    /// Registry reference to the session index the shim reads:
    /// `index[full_jid] = { [room] = true, … }` for every session taking part in a room
    /// (joined or joining). It lets the shim send a joined session's groupchat from the
    /// account without a call into the core; only this file writes it, from the rooms each
    /// outcome says changed.
    session_rooms: c_int,
    /// What the index holds, by account and room (to update it by difference), with the
    /// list of full JIDs that forks of the room go to.
    indexed: RefCell<Indexed>,
}

type Indexed = HashMap<String, HashMap<String, IndexedRoom>>;

/// The sessions of one account taking part in one room.
struct IndexedRoom {
    sessions: Vec<Rc<str>>,
    /// Registry reference to a Lua list of their full JIDs, handed to the shim for every
    /// fork of the room. Never changed once made (a change makes a new list), so a list
    /// the shim is still going through stays as it was.
    list: c_int,
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
            host: RefCell::new(host),
            stanza_mt,
            memo: RefCell::new(None),
            session_rooms,
            indexed: RefCell::new(HashMap::new()),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Reading stanza tables in place.

/// A string at `idx`, borrowed for as long as whatever holds it does.
unsafe fn str_at<'a>(l: *mut lua_State, idx: c_int) -> Option<&'a str> {
    unsafe {
        if ffi::lua_type(l, idx) != ffi::LUA_TSTRING {
            return None;
        }
        let mut len = 0usize;
        let p = ffi::lua_tolstring(l, idx, &mut len);
        std::str::from_utf8(std::slice::from_raw_parts(p.cast::<u8>(), len)).ok()
    }
}

/// `t[key]` as a string, where `t` is the table at absolute index `t`.
unsafe fn field_str<'a>(l: *mut lua_State, t: c_int, key: &CStr) -> Option<&'a str> {
    unsafe {
        ffi::lua_getfield(l, t, key.as_ptr());
        let s = str_at(l, -1);
        ffi::lua_pop(l, 1);
        s
    }
}

/// `t.attr[key]` as a string.
unsafe fn attr_str<'a>(l: *mut lua_State, t: c_int, key: &CStr) -> Option<&'a str> {
    unsafe {
        if ffi::lua_getfield(l, t, c"attr".as_ptr()) != ffi::LUA_TTABLE {
            ffi::lua_pop(l, 1);
            return None;
        }
        let s = field_str(l, ffi::lua_gettop(l), key);
        ffi::lua_pop(l, 1);
        s
    }
}

/// Call `f` with the absolute index of each child element of the table at `t`, until it
/// returns `Some`.
unsafe fn find_in_children<R>(
    l: *mut lua_State,
    t: c_int,
    mut f: impl FnMut(c_int) -> Option<R>,
) -> Option<R> {
    unsafe {
        if ffi::lua_getfield(l, t, c"tags".as_ptr()) != ffi::LUA_TTABLE {
            ffi::lua_pop(l, 1);
            return None;
        }
        let tags = ffi::lua_gettop(l);
        let n = ffi::lua_rawlen(l, tags);
        let mut found = None;
        for i in 1..=n {
            if ffi::lua_rawgeti(l, tags, i as ffi::lua_Integer) == ffi::LUA_TTABLE {
                found = f(ffi::lua_gettop(l));
            }
            ffi::lua_pop(l, 1);
            if found.is_some() {
                break;
            }
        }
        ffi::lua_pop(l, 1);
        found
    }
}

/// Whether the element table at `t` is `name` in `ns` (its own xmlns, or its parent's).
unsafe fn is_element(l: *mut lua_State, t: c_int, name: &str, ns: &str, parent_ns: &str) -> bool {
    unsafe {
        field_str(l, t, c"name") == Some(name)
            && attr_str(l, t, c"xmlns").unwrap_or(parent_ns) == ns
    }
}

/// Run `f` with the index of the first child `name` in `ns` of the element at `t`.
unsafe fn with_child<R>(
    l: *mut lua_State,
    t: c_int,
    name: &str,
    ns: &str,
    parent_ns: &str,
    f: impl FnOnce(c_int) -> Option<R>,
) -> Option<R> {
    unsafe {
        let mut f = Some(f);
        find_in_children(l, t, |c| {
            if is_element(l, c, name, ns, parent_ns) {
                f.take().and_then(|f| f(c))
            } else {
                None
            }
        })
    }
}

struct RawStanza<'a> {
    l: *mut lua_State,
    idx: c_int,
    memo: &'a RefCell<Option<Memo>>,
}

impl Payload for RawStanza<'_> {
    fn has_child(&self, name: &str, ns: &str) -> bool {
        unsafe { with_child(self.l, self.idx, name, ns, NS_CLIENT, |_| Some(())).is_some() }
    }

    fn child_attr(&self, name: &str, ns: &str, attr: &str) -> Option<String> {
        let key = std::ffi::CString::new(attr).ok()?;
        unsafe {
            with_child(self.l, self.idx, name, ns, NS_CLIENT, |c| {
                attr_str(self.l, c, &key).map(str::to_owned)
            })
        }
    }

    fn first_child(&self) -> Option<(String, String)> {
        unsafe {
            find_in_children(self.l, self.idx, |c| {
                let name = field_str(self.l, c, c"name")?;
                let ns = attr_str(self.l, c, c"xmlns").unwrap_or(NS_CLIENT);
                Some((name.to_owned(), ns.to_owned()))
            })
        }
    }

    fn status_codes(&self) -> Vec<u16> {
        let l = self.l;
        let mut codes = Vec::new();
        unsafe {
            with_child(l, self.idx, "x", NS_MUC_USER, NS_CLIENT, |x| {
                find_in_children::<()>(l, x, |c| {
                    if is_element(l, c, "status", NS_MUC_USER, NS_MUC_USER)
                        && let Some(code) = attr_str(l, c, c"code").and_then(|v| v.parse().ok())
                    {
                        codes.push(code);
                    }
                    None
                })
            });
        }
        codes
    }

    fn item_attr(&self, attr: &str) -> Option<String> {
        let key = std::ffi::CString::new(attr).ok()?;
        let l = self.l;
        unsafe {
            with_child(l, self.idx, "x", NS_MUC_USER, NS_CLIENT, |x| {
                with_child(l, x, "item", NS_MUC_USER, NS_MUC_USER, |i| {
                    attr_str(l, i, &key).map(str::to_owned)
                })
            })
        }
    }

    fn error_condition(&self) -> Option<String> {
        let l = self.l;
        unsafe {
            with_child(l, self.idx, "error", NS_CLIENT, NS_CLIENT, |e| {
                find_in_children(l, e, |c| {
                    let name = field_str(l, c, c"name")?;
                    (attr_str(l, c, c"xmlns") == Some(NS_STANZAS) && name != "text")
                        .then(|| name.to_owned())
                })
            })
        }
    }

    fn history_request(&self) -> Option<HistoryRequest> {
        let l = self.l;
        unsafe {
            with_child(l, self.idx, "x", NS_MUC, NS_CLIENT, |x| {
                with_child(l, x, "history", NS_MUC, NS_MUC, |h| {
                    let number = |key: &CStr| attr_str(l, h, key).and_then(|v| v.parse().ok());
                    Some(HistoryRequest {
                        maxchars: number(c"maxchars"),
                        maxstanzas: number(c"maxstanzas"),
                        seconds: number(c"seconds"),
                        since: attr_str(l, h, c"since").and_then(|v| v.parse().ok()),
                    })
                })
            })
        }
    }

    fn join_password(&self) -> Option<String> {
        let l = self.l;
        unsafe {
            with_child(l, self.idx, "x", NS_MUC, NS_CLIENT, |x| {
                with_child(l, x, "password", NS_MUC, NS_MUC, |p| {
                    ffi::lua_rawgeti(l, p, 1);
                    let text = str_at(l, -1).map(str::to_owned);
                    ffi::lua_pop(l, 1);
                    Some(text.unwrap_or_default())
                })
            })
        }
    }

    fn xml(&self) -> Rc<str> {
        let l = self.l;
        let mut memo = self.memo.borrow_mut();
        unsafe {
            let table = ffi::lua_topointer(l, self.idx);
            if let Some(m) = memo.as_ref()
                && m.table == table
            {
                return m.xml.clone();
            }
            let mut out = String::with_capacity(256);
            if write_xml(l, self.idx, NS_CLIENT, true, 0, &mut out).is_none() {
                out.clear();
            }
            let xml: Rc<str> = out.into();
            if let Some(old) = memo.take() {
                ffi::luaL_unref(l, ffi::LUA_REGISTRYINDEX, old.reference);
            }
            ffi::lua_pushvalue(l, self.idx);
            let reference = ffi::luaL_ref(l, ffi::LUA_REGISTRYINDEX);
            *memo = Some(Memo {
                table,
                reference,
                xml: xml.clone(),
            });
            xml
        }
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
unsafe fn write_xml(
    l: *mut lua_State,
    t: c_int,
    parent_ns: &str,
    top: bool,
    depth: usize,
    out: &mut String,
) -> Option<()> {
    unsafe {
        if depth > MAX_DEPTH || ffi::lua_checkstack(l, 8) == 0 {
            return None;
        }
        let name = field_str(l, t, c"name")?;
        let own_ns = if top { None } else { attr_str(l, t, c"xmlns") };
        let ns = own_ns.unwrap_or(parent_ns);
        out.push('<');
        out.push_str(name);
        if top || ns != parent_ns {
            out.push_str(" xmlns='");
            escape_into(out, ns, true);
            out.push('\'');
        }
        if ffi::lua_getfield(l, t, c"attr".as_ptr()) == ffi::LUA_TTABLE {
            let attr = ffi::lua_gettop(l);
            let mut prefixes = 0;
            ffi::lua_pushnil(l);
            while ffi::lua_next(l, attr) != 0 {
                // Only string keys and values: lua_tolstring on a number key would confuse
                // lua_next.
                if let (Some(key), Some(value)) = (str_at(l, -2), str_at(l, -1))
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
                    if let Some(text) = str_at(l, -1) {
                        escape_into(out, text, false);
                    }
                    Some(())
                }
                ffi::LUA_TTABLE => write_xml(l, ffi::lua_gettop(l), ns, false, depth + 1, out),
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

unsafe fn read_head<'a>(l: *mut lua_State, t: c_int) -> Option<Head<'a>> {
    unsafe {
        let kind = match field_str(l, t, c"name")? {
            "message" => Kind::Message,
            "presence" => Kind::Presence,
            "iq" => Kind::Iq,
            _ => return None,
        };
        if ffi::lua_getfield(l, t, c"attr".as_ptr()) != ffi::LUA_TTABLE {
            ffi::lua_pop(l, 1);
            return None;
        }
        let attr = ffi::lua_gettop(l);
        let head = Head {
            kind,
            from: field_str(l, attr, c"from"),
            to: field_str(l, attr, c"to"),
            type_: field_str(l, attr, c"type"),
            id: field_str(l, attr, c"id"),
        };
        ffi::lua_pop(l, 1);
        Some(head)
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
        ffi::lua_checkstack(l, 8);
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

/// Push `handled, user, actions, notes, recipients, flags` (nothing at all for a plain
/// pass). `actions` is a flat list of quadruples `op, resource|false, stanza|false,
/// id|false`: `stanza` false means the stanza that came in, `id` false means keep its id.
/// A plain fork comes as `recipients` instead (and `actions` nil): the full JIDs to give
/// the stanza that came in to. `flags`: 1 = store the account's memberships again,
/// 2 = archive the stanza that came in for the account (before forking it), 4 = send the
/// stanza that came in from the account (and `actions` is nil), 8 = `actions` is a plain
/// list of stanzas (false: the one that came in), all for the session whose full JID
/// `recipients` is.
unsafe fn push_outcome(l: *mut lua_State, shared: &Shared, out: Outcome) -> Result<c_int, String> {
    unsafe {
        if !out.handled && out.notes.is_empty() && out.actions.is_empty() && !out.persist {
            return Ok(0);
        }
        let flags =
            if out.persist { FLAG_PERSIST } else { 0 } | if out.archive { FLAG_ARCHIVE } else { 0 };
        ffi::lua_checkstack(l, 8);
        ffi::lua_pushboolean(l, c_int::from(out.handled));
        match &out.user {
            Some(u) => push_str(l, u),
            None => ffi::lua_pushnil(l),
        }
        // What a joined session sends to its room: the stanza that came in, sent from the
        // account as it is. Said with a flag, without an actions list.
        if let [
            Action::Send {
                stanza: Out::Original { id: None },
            },
        ] = out.actions.as_slice()
        {
            ffi::lua_pushnil(l);
            push_notes(l, &out.notes);
            ffi::lua_pushnil(l);
            ffi::lua_pushinteger(l, flags | FLAG_SEND_ORIGINAL);
            return Ok(6);
        }
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
            ffi::lua_pushnil(l);
            push_notes(l, &out.notes);
            // A fork to every session in the room: the list kept for it. (When this event
            // changed who takes part, the deliveries may be to those before the change.)
            let kept_list = match &out.fork_of {
                Some(room) if out.changed_rooms.is_empty() => {
                    fork_list(shared, user, room, out.actions.len())
                }
                _ => None,
            };
            if let Some(list) = kept_list {
                ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, list as ffi::lua_Integer);
                ffi::lua_pushinteger(l, flags);
                return Ok(6);
            }
            // Otherwise (a fork that goes with a change of who takes part, or to some of
            // them): a list made for this event.
            ffi::lua_createtable(l, out.actions.len() as c_int, 0);
            for (k, action) in out.actions.iter().enumerate() {
                if let Action::Deliver { resource, .. } = action {
                    push_str(l, &format!("{user}@{}/{resource}", shared.domain));
                    ffi::lua_rawseti(l, -2, k as ffi::lua_Integer + 1);
                }
            }
            ffi::lua_pushinteger(l, flags);
            return Ok(6);
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
            ffi::lua_createtable(l, out.actions.len() as c_int, 0);
            let list = ffi::lua_gettop(l);
            let mut k = 0;
            let mut skipped = 0;
            for action in &out.actions {
                let Action::Deliver { stanza, .. } = action else {
                    continue;
                };
                let pushed = match stanza {
                    Out::Original { .. } => {
                        ffi::lua_pushboolean(l, 0);
                        true
                    }
                    Out::New(el) => {
                        push_element(l, el, NS_CLIENT, true, shared.stanza_mt);
                        true
                    }
                    Out::Kept { xml, edit } => push_kept(l, xml, edit, shared.stanza_mt).is_some(),
                };
                if pushed {
                    k += 1;
                    ffi::lua_rawseti(l, list, k);
                } else {
                    skipped += 1;
                }
            }
            let mut notes = out.notes;
            if skipped > 0 {
                notes.push(format!(
                    "{skipped} kept stanza(s) did not parse and were not sent"
                ));
            }
            push_notes(l, &notes);
            push_str(l, &format!("{user}@{}/{first}", shared.domain));
            ffi::lua_pushinteger(l, flags | FLAG_ONE_SESSION);
            return Ok(6);
        }
        ffi::lua_createtable(l, (out.actions.len() * 4) as c_int, 0);
        let actions = ffi::lua_gettop(l);
        let mut skipped = 0;
        for (k, action) in out.actions.iter().enumerate() {
            // This action's four slots: op, resource, stanza, id.
            let op_slot = k as ffi::lua_Integer * 4 + 1;
            let (op, resource, stanza) = match action {
                Action::Deliver { resource, stanza } => (OP_DELIVER, Some(resource), stanza),
                Action::Send { stanza } => (OP_SEND, None, stanza),
            };
            ffi::lua_pushinteger(l, op);
            ffi::lua_rawseti(l, actions, op_slot);
            match resource {
                Some(r) => push_str(l, r),
                None => ffi::lua_pushboolean(l, 0),
            }
            ffi::lua_rawseti(l, actions, op_slot + 1);
            match stanza {
                Out::Original { .. } => ffi::lua_pushboolean(l, 0),
                Out::New(el) => push_element(l, el, NS_CLIENT, true, shared.stanza_mt),
                Out::Kept { xml, edit } => {
                    if push_kept(l, xml, edit, shared.stanza_mt).is_none() {
                        // Cannot happen for what the core keeps; if it does, this one
                        // stanza is skipped (op 0 does nothing), not the whole event.
                        ffi::lua_pushinteger(l, 0);
                        ffi::lua_rawseti(l, actions, op_slot);
                        ffi::lua_pushboolean(l, 0);
                        skipped += 1;
                    }
                }
            }
            ffi::lua_rawseti(l, actions, op_slot + 2);
            match stanza {
                Out::Original { id: Some(id) } => push_str(l, id),
                _ => ffi::lua_pushboolean(l, 0),
            }
            ffi::lua_rawseti(l, actions, op_slot + 3);
        }
        let mut notes = out.notes;
        if skipped > 0 {
            notes.push(format!(
                "{skipped} kept stanza(s) did not parse and were not sent"
            ));
        }
        push_notes(l, &notes);
        ffi::lua_pushnil(l);
        ffi::lua_pushinteger(l, flags);
        Ok(6)
    }
}

unsafe fn push_notes(l: *mut lua_State, notes: &[String]) {
    unsafe {
        if notes.is_empty() {
            ffi::lua_pushnil(l);
        } else {
            ffi::lua_createtable(l, notes.len() as c_int, 0);
            for (k, note) in notes.iter().enumerate() {
                push_str(l, note);
                ffi::lua_rawseti(l, -2, k as ffi::lua_Integer + 1);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The session index.

/// Set (`on`) or clear `index[full][room]` in the index table at `index`; a session left
/// with no room is dropped from the index.
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

/// Bring the index up to date for `user`'s `rooms`, whose participants may have changed.
unsafe fn update_index(
    l: *mut lua_State,
    shared: &Shared,
    host: &Host,
    user: &str,
    rooms: &[String],
) {
    unsafe {
        ffi::lua_checkstack(l, 8);
        ffi::lua_rawgeti(
            l,
            ffi::LUA_REGISTRYINDEX,
            shared.session_rooms as ffi::lua_Integer,
        );
        let index = ffi::lua_gettop(l);
        let mut indexed = shared.indexed.borrow_mut();
        let full = |r: &str| format!("{user}@{}/{r}", shared.domain);
        for room in rooms {
            let now = host.participants_of(user, room);
            let before = indexed.get_mut(user).and_then(|m| m.remove(room));
            let before_sessions = before.as_ref().map_or(&[][..], |b| &b.sessions[..]);
            if before_sessions == now.as_slice() {
                if let Some(b) = before {
                    indexed
                        .entry(user.to_owned())
                        .or_default()
                        .insert(room.clone(), b);
                }
                continue;
            }
            for r in before_sessions.iter().filter(|r| !now.contains(r)) {
                index_set(l, index, &full(r), room, false);
            }
            for r in now.iter().filter(|r| !before_sessions.contains(r)) {
                index_set(l, index, &full(r), room, true);
            }
            if let Some(b) = before {
                ffi::luaL_unref(l, ffi::LUA_REGISTRYINDEX, b.list);
            }
            if !now.is_empty() {
                ffi::lua_createtable(l, now.len() as c_int, 0);
                for (k, r) in now.iter().enumerate() {
                    push_str(l, &full(r));
                    ffi::lua_rawseti(l, -2, k as ffi::lua_Integer + 1);
                }
                let list = ffi::luaL_ref(l, ffi::LUA_REGISTRYINDEX);
                indexed.entry(user.to_owned()).or_default().insert(
                    room.clone(),
                    IndexedRoom {
                        sessions: now,
                        list,
                    },
                );
            } else if indexed.get(user).is_some_and(HashMap::is_empty) {
                indexed.remove(user);
            }
        }
        ffi::lua_settop(l, index - 1);
    }
}

/// The list of full JIDs kept for a fork of `user`'s `room` to `count` sessions.
fn fork_list(shared: &Shared, user: &str, room: &str, count: usize) -> Option<c_int> {
    let indexed = shared.indexed.borrow();
    let entry = indexed.get(user)?.get(room)?;
    (entry.sessions.len() == count).then_some(entry.list)
}

// ---------------------------------------------------------------------------------------
// The entry points.

unsafe fn shared_of<'a>(l: *mut lua_State) -> &'a Shared {
    unsafe {
        let boxed = ffi::lua_touserdata(l, ffi::lua_upvalueindex(1)).cast::<*const Shared>();
        &**boxed
    }
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    format!("mod_minimix core panicked: {msg}")
}

/// Runs `f` with panics caught; on failure pushes `nil, message` for the shim to log.
unsafe fn guarded(l: *mut lua_State, f: impl FnOnce(&Shared) -> Result<c_int, String>) -> c_int {
    unsafe {
        let shared = shared_of(l);
        let message = match catch_unwind(AssertUnwindSafe(|| f(shared))) {
            Ok(Ok(n)) => return n,
            Ok(Err(message)) => message,
            Err(panic) => panic_text(panic),
        };
        ffi::lua_pushnil(l);
        push_str(l, &message);
        2
    }
}

/// Runs `f` on the host's core and pushes its outcome.
unsafe fn with_host(
    l: *mut lua_State,
    shared: &Shared,
    f: impl FnOnce(&mut Host) -> Result<Outcome, String>,
) -> Result<c_int, String> {
    let out = {
        let mut host = shared
            .host
            .try_borrow_mut()
            .map_err(|_| "mod_minimix core re-entered".to_owned())?;
        let out = f(&mut host)?;
        if let (Some(user), false) = (&out.user, out.changed_rooms.is_empty()) {
            unsafe { update_index(l, shared, &host, user, &out.changed_rooms) };
        }
        out
    };
    unsafe { push_outcome(l, shared, out) }
}

/// Runs one stanza event on the stanza table at `stanza`.
unsafe fn run_event(
    l: *mut lua_State,
    stanza: c_int,
    f: impl FnOnce(&mut Host, &Head, &RawStanza) -> Outcome,
) -> c_int {
    unsafe {
        guarded(l, |shared| {
            if ffi::lua_type(l, stanza) != ffi::LUA_TTABLE {
                return Ok(0);
            }
            let Some(head) = read_head(l, stanza) else {
                return Ok(0);
            };
            let payload = RawStanza {
                l,
                idx: stanza,
                memo: &shared.memo,
            };
            with_host(l, shared, |host| Ok(f(host, &head, &payload)))
        })
    }
}

/// The time given at `idx` (tests and benchmarks), else the clock, in Unix seconds.
unsafe fn now_at(l: *mut lua_State, idx: c_int) -> i64 {
    unsafe {
        if ffi::lua_isinteger(l, idx) != 0 {
            return ffi::lua_tointegerx(l, idx, std::ptr::null_mut());
        }
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `room_event(stanza[, now])`: something arrived for an account's bare JID.
unsafe extern "C-unwind" fn room_event(l: *mut lua_State) -> c_int {
    unsafe {
        let now = now_at(l, 2);
        run_event(l, 1, |host, head, payload| {
            host.room_event(head, payload, now)
        })
    }
}

/// `session_event(user, resource, stanza[, now])`: a session of this host sent a stanza.
unsafe extern "C-unwind" fn session_event(l: *mut lua_State) -> c_int {
    unsafe {
        let (Some(user), Some(resource)) = (str_at(l, 1), str_at(l, 2)) else {
            return 0;
        };
        let now = now_at(l, 4);
        run_event(l, 3, |host, head, payload| {
            host.session_event(user, resource, head, payload, now)
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
        guarded(l, |shared| {
            let (Some(op), Some(user)) = (str_at(l, 1), str_at(l, 2)) else {
                return Err("control: needs an operation and an account".to_owned());
            };
            let arg = |i| str_at(l, i);
            with_host(l, shared, |host| {
                Ok(match (op, arg(3)) {
                    ("ended", Some(resource)) => host.session_ended(user, resource),
                    ("restore", Some(room)) => {
                        host.restore(user, room, arg(4).unwrap_or(user), arg(5))
                    }
                    ("bookmark", Some(room)) => {
                        let autojoin = ffi::lua_toboolean(l, 6) != 0;
                        host.bookmark(user, room, arg(4), arg(5), autojoin)
                    }
                    ("leave", Some(room)) => {
                        host.leave(user, room, arg(4).unwrap_or("asked by an admin"))
                    }
                    ("service", _) => {
                        host.learn_service(user, ffi::lua_toboolean(l, 3) != 0);
                        Outcome::default()
                    }
                    _ => return Err(format!("control: unknown operation {op}")),
                })
            })
        })
    }
}

unsafe extern "C-unwind" fn gc_shared(l: *mut lua_State) -> c_int {
    unsafe {
        let boxed = ffi::lua_touserdata(l, 1).cast::<*const Shared>();
        if !boxed.is_null() && !(*boxed).is_null() {
            let shared = Rc::from_raw(*boxed);
            *boxed = std::ptr::null();
            if Rc::strong_count(&shared) == 1 {
                ffi::luaL_unref(l, ffi::LUA_REGISTRYINDEX, shared.stanza_mt);
                ffi::luaL_unref(l, ffi::LUA_REGISTRYINDEX, shared.session_rooms);
                for (_, rooms) in shared.indexed.borrow_mut().drain() {
                    for (_, room) in rooms {
                        ffi::luaL_unref(l, ffi::LUA_REGISTRYINDEX, room.list);
                    }
                }
                if let Some(m) = shared.memo.borrow_mut().take() {
                    ffi::luaL_unref(l, ffi::LUA_REGISTRYINDEX, m.reference);
                }
            }
        }
        0
    }
}

/// Push a C closure over `shared`.
unsafe fn push_closure(l: *mut lua_State, shared: &Rc<Shared>, f: ffi::lua_CFunction) {
    unsafe {
        let boxed = ffi::lua_newuserdatauv(l, std::mem::size_of::<*const Shared>(), 0)
            .cast::<*const Shared>();
        *boxed = Rc::into_raw(shared.clone());
        if ffi::luaL_newmetatable(l, c"minimix.shared".as_ptr()) != 0 {
            ffi::lua_pushcfunction(l, gc_shared);
            ffi::lua_setfield(l, -2, c"__gc".as_ptr());
        }
        ffi::lua_setmetatable(l, -2);
        ffi::lua_pushcclosure(l, f, 1);
    }
}

/// Make the shared state for a host and push its entry points `room_event`,
/// `session_event` and `control`, and the session index (see [`Shared`]). `stanza_mt` is
/// at stack index `mt_index`.
///
/// # Safety
/// `l` is a valid Lua state with room for four more values.
pub unsafe fn open(l: *mut lua_State, host: Host, mt_index: c_int) -> Rc<Shared> {
    unsafe {
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
