//! The kept-stanza text format: a stanza serialized (`write_xml`) when the core keeps it,
//! and kept text parsed (`parse_kept`) straight back into stanza tables (`push_kept`).
//!
//! Both are pure Rust: the serializer reads a [`Source`], the parser builds into a
//! [`Sink`] and applies an [`Edit`] on the way. On the hot path the source is a stanza
//! table read in place on the Lua stack ([`Table`]) and the sink builds stanza tables on
//! the Lua stack ([`LuaSink`]), both statically dispatched; the tests use a
//! `minidom::Element` for either, and check the format against minidom.

use std::borrow::Cow;
use std::ffi::c_int;

use minidom::rxml::Namespace;
use minidom::{Element, Node};
use mlua::ffi::{self, lua_State};

use crate::host::Edit;
use crate::stanza::{NS_CLIENT, NS_MUC_USER};

use super::{read::*, reply::*};

/// Stanzas nested deeper than this are not serialized (they pass on untouched).
pub(super) const MAX_DEPTH: usize = 64;

/// Escape `text` as XML character data (`attr`: an attribute value in quotes). A carriage
/// return, and in an attribute a tab or a line feed, are written as character references:
/// an XML parser would otherwise read them as a line feed or a space.
pub(super) fn escape_into(out: &mut String, text: &str, attr: bool) {
    let special = |b: u8| {
        matches!(b, b'&' | b'<' | b'>' | b'\r')
            || (attr && matches!(b, b'\'' | b'"' | b'\t' | b'\n'))
    };
    let mut rest = text;
    while let Some(i) = rest.bytes().position(special) {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'\'' => "&apos;",
            b'"' => "&quot;",
            b'\t' => "&#x9;",
            b'\n' => "&#xA;",
            _ => "&#xD;",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

/// A stanza element as the serializer reads it: a stanza table on the Lua stack
/// ([`Table`]), or a `minidom::Element` (tests).
pub(crate) trait Source: Sized {
    /// Whether there is room to read this element (Lua stack space).
    fn reserve(&self) -> bool {
        true
    }
    fn name(&self) -> Option<&str>;
    /// The `xmlns` attribute, when the element has one of its own.
    fn xmlns(&self) -> Option<&str>;
    /// Call `f` with each attribute (the `xmlns` one included) as a Prosody stanza table
    /// keys it (`uri\u{1}local` for one in a namespace) and its value.
    fn attrs(&self, f: impl FnMut(&str, &str));
    /// Whether the element has any child node at all.
    fn has_nodes(&self) -> bool;
    /// Call `f` with each child node in order, until it returns `None` (then `None`).
    fn nodes(&self, f: impl FnMut(Child<'_, Self>) -> Option<()>) -> Option<()>;
}

/// A child node of a [`Source`].
pub(crate) enum Child<'a, S> {
    Text(&'a str),
    Element(S),
}

/// Serialize `el` as XML, leaving out the top element's `to`.
pub(crate) fn write_xml<S: Source>(
    el: &S,
    parent_ns: &str,
    top: bool,
    depth: usize,
    out: &mut String,
) -> Option<()> {
    if depth > MAX_DEPTH || !el.reserve() {
        return None;
    }
    let name = el.name()?;
    let own_ns = if top { None } else { el.xmlns() };
    let ns = own_ns.unwrap_or(parent_ns);
    out.push('<');
    out.push_str(name);
    if top || ns != parent_ns {
        out.push_str(" xmlns='");
        escape_into(out, ns, true);
        out.push('\'');
    }
    let mut prefixes = 0;
    el.attrs(|key, value| {
        if key == "xmlns" || (top && key == "to") {
            return;
        }
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
    });
    if !el.has_nodes() {
        out.push_str("/>");
        return Some(());
    }
    out.push('>');
    el.nodes(|node| match node {
        Child::Text(text) => {
            escape_into(out, text, false);
            Some(())
        }
        Child::Element(child) => write_xml(&child, ns, false, depth + 1, out),
    })?;
    out.push_str("</");
    out.push_str(name);
    out.push('>');
    Some(())
}

/// A stanza table on the Lua stack, at absolute index `t`, read in place.
#[derive(Clone, Copy)]
pub(super) struct Table<'f> {
    pub(super) s: Frame<'f>,
    pub(super) t: c_int,
}

impl Source for Table<'_> {
    fn reserve(&self) -> bool {
        unsafe { ffi::lua_checkstack(self.s.l, 8) != 0 }
    }

    fn name(&self) -> Option<&str> {
        self.s.field_str(self.t, Key::Name)
    }

    fn xmlns(&self) -> Option<&str> {
        self.s.attr_str(self.t, Key::Xmlns)
    }

    fn attrs(&self, mut f: impl FnMut(&str, &str)) {
        let (s, l) = (self.s, self.s.l);
        unsafe {
            if s.raw_field(self.t, Key::Attr) == ffi::LUA_TTABLE {
                let attr = ffi::lua_gettop(l);
                ffi::lua_pushnil(l);
                while ffi::lua_next(l, attr) != 0 {
                    // Only string keys and values: lua_tolstring on a number key would
                    // confuse lua_next.
                    if let (Some(key), Some(value)) = (s.str_at(-2), s.str_at(-1)) {
                        f(key, value);
                    }
                    ffi::lua_pop(l, 1);
                }
            }
            ffi::lua_pop(l, 1);
        }
    }

    fn has_nodes(&self) -> bool {
        unsafe { ffi::lua_rawlen(self.s.l, self.t) != 0 }
    }

    fn nodes(&self, mut f: impl FnMut(Child<'_, Self>) -> Option<()>) -> Option<()> {
        let (s, l) = (self.s, self.s.l);
        unsafe {
            let n = ffi::lua_rawlen(l, self.t);
            for i in 1..=n {
                let kind = ffi::lua_rawgeti(l, self.t, i as ffi::lua_Integer);
                let ok = match kind {
                    ffi::LUA_TSTRING => match s.str_at(-1) {
                        Some(text) => f(Child::Text(text)),
                        None => Some(()),
                    },
                    ffi::LUA_TTABLE => f(Child::Element(Table {
                        s,
                        t: ffi::lua_gettop(l),
                    })),
                    _ => Some(()),
                };
                ffi::lua_pop(l, 1);
                ok?;
            }
        }
        Some(())
    }
}

/// Push `el` as a Prosody stanza table with `util.stanza`'s metatable.
pub(super) unsafe fn push_element(
    l: *mut lua_State,
    el: &Element,
    parent_ns: &str,
    top: bool,
    mt: c_int,
) {
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

/// What the parser hands a [`Sink`] when an element ends (its children were handed over
/// before, in order).
pub(crate) struct Ended<'a> {
    pub(crate) name: &'a str,
    pub(crate) ns: &'a str,
    pub(crate) parent_ns: &'a str,
    /// 0 for the top element.
    pub(crate) depth: usize,
    attrs: &'a [(&'a str, Cow<'a, str>)],
    /// The prefixes declared on this element and its ancestors, the innermost last.
    prefixes: &'a [(&'a str, Cow<'a, str>)],
    /// For each child node handed over (an added one included, a dropped one not):
    /// whether it is an element.
    pub(crate) kinds: &'a [bool],
}

/// An attribute's name as the kept text gives it.
pub(crate) enum AttrName<'a> {
    /// Unprefixed, or with the `xml:` prefix or one the text does not declare: as written.
    Plain(&'a str),
    /// A prefix the element declares, resolved to its namespace.
    Qualified { ns: &'a str, local: &'a str },
}

impl<'a> Ended<'a> {
    /// The attributes other than namespace declarations, in the order of the text.
    pub(crate) fn attrs(&self) -> impl Iterator<Item = (AttrName<'a>, &'a str)> + use<'a> {
        let prefixes = self.prefixes;
        self.attrs.iter().map(move |(key, value)| {
            let name = match key.split_once(':') {
                Some((prefix, local)) if prefix != "xml" => {
                    match prefixes.iter().rev().find(|(p, _)| *p == prefix) {
                        Some((_, uri)) => AttrName::Qualified { ns: uri, local },
                        None => AttrName::Plain(key),
                    }
                }
                _ => AttrName::Plain(key),
            };
            (name, &**value)
        })
    }

    pub(crate) fn attr_count(&self) -> usize {
        self.attrs.len()
    }
}

/// What the parser builds from kept text: Prosody stanza tables on the Lua stack
/// ([`LuaSink`]) or a `minidom::Element` ([`ElementSink`]). Children come first (text and
/// elements, in order), then the element they belong to ends.
pub(crate) trait Sink {
    /// Whether there is room to build one more element (Lua stack space).
    fn reserve(&mut self) -> bool {
        true
    }
    /// An element starts: its children follow.
    fn start(&mut self) {}
    fn text(&mut self, text: &str) -> Option<()>;
    /// An element an edit adds, as the next child (`parent_ns`: its parent's namespace).
    fn added(&mut self, el: Element, parent_ns: &str);
    /// The child just handed over is left out after all (an edit drops it).
    fn drop_last(&mut self);
    fn end(&mut self, el: &Ended<'_>) -> Option<()>;
}

/// A reader of kept stanza text (made by [`write_xml`], or by minidom in tests) that hands
/// what it reads to a [`Sink`], applying an [`Edit`] on the way.
struct KeptReader<'x, S> {
    /// The kept text (made by [`write_xml`], so well-formed and split only at ASCII
    /// delimiters, which are character boundaries).
    text: &'x str,
    xml: &'x [u8],
    pos: usize,
    sink: S,
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

impl<'x, S: Sink> KeptReader<'x, S> {
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

    /// Parse one element at `<` and hand it to the sink: its children first, then its end.
    fn element(&mut self, parent_ns: &str, depth: usize, edit: Option<&Edit>) -> Option<Parsed> {
        if depth > MAX_DEPTH || !self.sink.reserve() {
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
        self.sink.start();
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
                        self.sink.drop_last();
                        continue;
                    }
                    self.kinds.push(true);
                } else {
                    let text = self.text_until(b'<')?;
                    self.sink.text(&text)?;
                    self.kinds.push(false);
                }
            }
        }
        let added = match edit {
            Some(edit) if depth == 0 => edit.added_to_stanza(),
            Some(edit) if in_own_x => edit.added_to_own_presence(),
            _ => None,
        };
        if let Some(el) = added {
            self.sink.added(el, ns);
            self.kinds.push(true);
        }
        let ended = Ended {
            name,
            ns,
            parent_ns,
            depth,
            attrs: &self.attrs[attrs_from..attrs_to],
            prefixes: &self.prefixes[..prefixes_to],
            kinds: &self.kinds[kinds_from..],
        };
        self.sink.end(&ended)?;
        self.kinds.truncate(kinds_from);
        self.attrs.truncate(attrs_from);
        self.prefixes.truncate(prefixes_from);
        Some(Parsed {
            is_status_201: name == "status" && ns == NS_MUC_USER && code.as_deref() == Some("201"),
        })
    }
}

/// Parse kept stanza text into `sink`, changed as `edit` says; `None` on malformed text
/// (the sink may then hold part of it).
pub(crate) fn parse_kept<S: Sink>(xml: &str, edit: Option<&Edit>, sink: S) -> Option<S> {
    let mut reader = KeptReader {
        text: xml,
        xml: xml.as_bytes(),
        pos: 0,
        sink,
        attrs: Vec::new(),
        prefixes: Vec::new(),
        kinds: Vec::new(),
    };
    reader.skip_space();
    if reader.peek() != Some(b'<') {
        return None;
    }
    reader.element(NS_CLIENT, 0, edit)?;
    Some(reader.sink)
}

/// Builds Prosody stanza tables on the Lua stack: each child is pushed as it is read, and
/// an element's table is made at its final size once its children are there, then moved
/// down over them (no intermediate tree).
pub(super) struct LuaSink {
    pub(super) l: *mut lua_State,
    /// Registry reference to `util.stanza`'s metatable.
    pub(super) mt: c_int,
}

impl Sink for LuaSink {
    #[inline]
    fn reserve(&mut self) -> bool {
        unsafe { ffi::lua_checkstack(self.l, 10) != 0 }
    }

    #[inline]
    fn text(&mut self, text: &str) -> Option<()> {
        unsafe {
            if ffi::lua_checkstack(self.l, 4) == 0 {
                return None;
            }
            push_str(self.l, text);
        }
        Some(())
    }

    fn added(&mut self, el: Element, parent_ns: &str) {
        unsafe { push_element(self.l, &el, parent_ns, false, self.mt) }
    }

    fn drop_last(&mut self) {
        unsafe { ffi::lua_pop(self.l, 1) }
    }

    #[inline]
    fn end(&mut self, el: &Ended<'_>) -> Option<()> {
        let l = self.l;
        unsafe {
            // The children, in order, are the top `nodes` values of the stack.
            let nodes = el.kinds.len() as c_int;
            let base = ffi::lua_gettop(l) - nodes;
            let ntags = el.kinds.iter().filter(|t| **t).count() as c_int;
            ffi::lua_createtable(l, nodes, 3);
            let t = ffi::lua_gettop(l);
            ffi::lua_createtable(l, ntags, 0);
            let tags = t + 1;
            let mut k = 0;
            for (i, tag) in el.kinds.iter().enumerate() {
                ffi::lua_pushvalue(l, base + 1 + i as c_int);
                if *tag {
                    k += 1;
                    ffi::lua_pushvalue(l, -1);
                    ffi::lua_rawseti(l, tags, k);
                }
                ffi::lua_rawseti(l, t, i as ffi::lua_Integer + 1);
            }
            ffi::lua_setfield(l, t, c"tags".as_ptr());
            push_str(l, el.name);
            ffi::lua_setfield(l, t, c"name".as_ptr());
            let with_xmlns = el.depth > 0 && el.ns != el.parent_ns;
            // The top element gets its `to` when it is sent: room for it from the start.
            let extra = c_int::from(with_xmlns) + c_int::from(el.depth == 0);
            ffi::lua_createtable(l, 0, el.attr_count() as c_int + extra);
            if with_xmlns {
                push_str(l, el.ns);
                ffi::lua_setfield(l, -2, c"xmlns".as_ptr());
            }
            for (key, value) in el.attrs() {
                match key {
                    AttrName::Plain(key) => push_str(l, key),
                    AttrName::Qualified { ns, local } => push_str(l, &format!("{ns}\u{1}{local}")),
                }
                push_str(l, value);
                ffi::lua_rawset(l, -3);
            }
            ffi::lua_setfield(l, t, c"attr".as_ptr());
            ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, self.mt as ffi::lua_Integer);
            ffi::lua_setmetatable(l, t);
            // Move the new table down over its children and drop them.
            ffi::lua_rotate(l, base + 1, 1);
            ffi::lua_settop(l, base + 1);
        }
        Some(())
    }
}

/// Push a kept stanza as a stanza table, changed as `edit` says. On malformed text the
/// stack is left as it was and `None` returned.
pub(super) unsafe fn push_kept(l: *mut lua_State, xml: &str, edit: &Edit, mt: c_int) -> Option<()> {
    unsafe {
        let top = ffi::lua_gettop(l);
        if parse_kept(xml, Some(edit), LuaSink { l, mt }).is_none() {
            ffi::lua_settop(l, top);
            return None;
        }
        Some(())
    }
}

/// A `minidom::Element` as a [`Source`] (tests): attributes keyed as Prosody keys them.
#[cfg(test)]
pub(crate) struct ElementSource<'a> {
    el: &'a Element,
    ns: String,
}

#[cfg(test)]
impl<'a> ElementSource<'a> {
    pub(crate) fn new(el: &'a Element) -> ElementSource<'a> {
        ElementSource { el, ns: el.ns() }
    }
}

#[cfg(test)]
impl Source for ElementSource<'_> {
    fn name(&self) -> Option<&str> {
        Some(self.el.name())
    }

    fn xmlns(&self) -> Option<&str> {
        Some(&self.ns)
    }

    fn attrs(&self, mut f: impl FnMut(&str, &str)) {
        for ((ans, name), value) in self.el.attrs().iter() {
            if *ans == Namespace::NONE {
                f(name, value);
            } else if *ans == Namespace::XML {
                f(&format!("xml:{name}"), value);
            } else {
                f(&format!("{}\u{1}{name}", ans.as_str()), value);
            }
        }
    }

    fn has_nodes(&self) -> bool {
        self.el.nodes().next().is_some()
    }

    fn nodes(&self, mut f: impl FnMut(Child<'_, Self>) -> Option<()>) -> Option<()> {
        for node in self.el.nodes() {
            match node {
                Node::Text(text) => f(Child::Text(text))?,
                Node::Element(child) => f(Child::Element(ElementSource::new(child)))?,
            }
        }
        Some(())
    }
}

/// Builds a `minidom::Element` from kept text (tests).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct ElementSink {
    /// The child nodes of each element being read, innermost last.
    open: Vec<Vec<Node>>,
    done: Option<Element>,
}

#[cfg(test)]
impl ElementSink {
    pub(crate) fn into_element(self) -> Option<Element> {
        self.done
    }
}

#[cfg(test)]
impl Sink for ElementSink {
    fn start(&mut self) {
        self.open.push(Vec::new());
    }

    fn text(&mut self, text: &str) -> Option<()> {
        self.open.last_mut()?.push(Node::Text(text.to_owned()));
        Some(())
    }

    fn added(&mut self, el: Element, _parent_ns: &str) {
        if let Some(nodes) = self.open.last_mut() {
            nodes.push(Node::Element(el));
        }
    }

    fn drop_last(&mut self) {
        if let Some(nodes) = self.open.last_mut() {
            nodes.pop();
        }
    }

    fn end(&mut self, ended: &Ended<'_>) -> Option<()> {
        let nodes = self.open.pop()?;
        if ended.name.contains(':') {
            return None;
        }
        let mut el = Element::builder(ended.name, ended.ns)
            .append_all(nodes)
            .build();
        for (key, value) in ended.attrs() {
            let (ns, name) = match key {
                AttrName::Plain(key) => match key.split_once(':') {
                    Some(("xml", local)) => (Namespace::XML, local),
                    Some(_) => return None,
                    None => (Namespace::NONE, key),
                },
                AttrName::Qualified { ns, local } => (Namespace::from(ns.to_owned()), local),
            };
            let name = minidom::rxml::NcName::try_from(name).ok()?;
            el.attrs_mut().insert(ns, name, value.to_owned());
        }
        match self.open.last_mut() {
            Some(parent) => parent.push(Node::Element(el)),
            None => self.done = Some(el),
        }
        Some(())
    }
}

/// Kept text as an element, changed as `edit` says.
#[cfg(test)]
pub(crate) fn kept_element(xml: &str, edit: Option<&Edit>) -> Option<Element> {
    parse_kept(xml, edit, ElementSink::default())?.into_element()
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use minidom::rxml::NcName;
    use proptest::prelude::*;

    use super::*;
    use crate::host::Out;

    /// 256 cases, or `PROPTEST_CASES`; no files written on failure.
    fn config() -> ProptestConfig {
        ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    const NAMESPACES: [&str; 4] = [NS_CLIENT, NS_MUC_USER, "urn:example:a", "urn:example:b&'<"];

    fn serialize(el: &Element) -> Option<String> {
        let mut out = String::new();
        write_xml(&ElementSource::new(el), NS_CLIENT, true, 0, &mut out)?;
        Some(out)
    }

    /// The element without its `to` (the serializer leaves the top one's out).
    fn without_to(el: &Element) -> Element {
        let mut el = el.clone();
        crate::stanza::remove_attr(&mut el, "to");
        el
    }

    fn ncname() -> impl Strategy<Value = String> {
        "[a-wyz_][a-z0-9_.-]{0,5}"
    }

    /// Text with what needs escaping, what looks like entities, and more than ASCII.
    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                "[a-z ]{1,4}",
                Just("&".to_owned()),
                Just("<".to_owned()),
                Just(">".to_owned()),
                Just("'".to_owned()),
                Just("\"".to_owned()),
                Just("&amp;".to_owned()),
                Just("&#x41;".to_owned()),
                Just("]]>".to_owned()),
                Just("é€😀".to_owned()),
                Just("\t\n\r".to_owned()),
            ],
            1..5,
        )
        .prop_map(|parts| parts.concat())
    }

    fn attr_ns() -> impl Strategy<Value = Namespace<'static>> {
        prop_oneof![
            4 => Just(Namespace::NONE),
            1 => Just(Namespace::XML),
            1 => Just(Namespace::from("urn:example:attr".to_owned())),
            1 => Just(Namespace::from("urn:example:other&'".to_owned())),
        ]
    }

    fn attrs() -> impl Strategy<Value = Vec<(Namespace<'static>, String, String)>> {
        proptest::collection::vec((attr_ns(), ncname(), text()), 0..4)
    }

    fn build(
        name: &str,
        ns: &str,
        attrs: Vec<(Namespace<'static>, String, String)>,
        nodes: Vec<Node>,
    ) -> Element {
        let mut el = Element::builder(name, ns).build();
        for (ans, key, value) in attrs {
            el.attrs_mut()
                .insert(ans, NcName::try_from(key).unwrap(), value);
        }
        // Adjacent text is one text node, as any parser reads it.
        for node in nodes {
            match (node, el.nodes_mut().last()) {
                (Node::Text(t), Some(Node::Text(last))) => last.push_str(&t),
                (node, _) => el.append_node(node),
            }
        }
        el
    }

    /// Random elements nested up to `depth` levels below the one made.
    fn element(depth: u32) -> impl Strategy<Value = Element> {
        let leaf = (ncname(), proptest::sample::select(&NAMESPACES[..]), attrs())
            .prop_map(|(name, ns, attrs)| build(&name, ns, attrs, Vec::new()));
        leaf.prop_recursive(depth, 64, 4, |inner| {
            (
                ncname(),
                proptest::sample::select(&NAMESPACES[..]),
                attrs(),
                proptest::collection::vec(
                    prop_oneof![inner.prop_map(Node::Element), text().prop_map(Node::Text)],
                    0..5,
                ),
            )
                .prop_map(|(name, ns, attrs, nodes)| build(&name, ns, attrs, nodes))
        })
    }

    /// A stanza: the top element in `jabber:client`.
    fn stanza(depth: u32) -> impl Strategy<Value = Element> {
        (
            proptest::sample::select(&["message", "presence", "iq"][..]),
            attrs(),
            proptest::collection::vec(
                prop_oneof![
                    element(depth).prop_map(Node::Element),
                    text().prop_map(Node::Text)
                ],
                0..4,
            ),
        )
            .prop_map(|(name, attrs, nodes)| build(name, NS_CLIENT, attrs, nodes))
    }

    proptest! {
        #![proptest_config(config())]

        /// What the serializer writes parses back to the same element (its `to` left out).
        #[test]
        fn serialized_text_parses_back(el in stanza(6)) {
            let xml = serialize(&el).unwrap();
            prop_assert_eq!(kept_element(&xml, None), Some(without_to(&el)), "{}", xml);
        }

        /// Text minidom itself writes (as the Rust tests keep it) parses to the same element.
        #[test]
        fn minidom_text_parses(el in stanza(6)) {
            let xml = String::from(&el);
            prop_assert_eq!(kept_element(&xml, None), Some(el), "{}", xml);
        }

        /// And minidom reads what the serializer writes as the same element.
        #[test]
        fn minidom_reads_serialized_text(el in stanza(6)) {
            let xml = serialize(&el).unwrap();
            prop_assert_eq!(xml.parse::<Element>().ok(), Some(without_to(&el)), "{}", xml);
        }
    }

    #[test]
    fn too_deep_is_refused() {
        let mut el = Element::bare("leaf", "urn:example:a");
        for _ in 0..MAX_DEPTH {
            el = Element::builder("e", "urn:example:a").append(el).build();
        }
        let top = Element::builder("message", NS_CLIENT).append(el).build();
        assert!(serialize(&top).is_none());
        assert!(kept_element(&String::from(&top), None).is_none());
    }

    /// How the core applied an edit before the parser did (minidom's parser, then the
    /// element changed): the model the parser's edits are checked against.
    fn edited_by_model(xml: &str, edit: &Edit) -> Option<Element> {
        let mut el: Element = xml.parse().ok()?;
        if let Some(added) = edit.added_to_stanza() {
            el.append_child(added);
        }
        if edit.edits_own_presence()
            && let Some(x) = el.get_child_mut("x", NS_MUC_USER)
        {
            let kept: Vec<Element> = x
                .children()
                .filter(|c| !(c.is("status", NS_MUC_USER) && edit.drops_own_status(c.attr("code"))))
                .map(|c| {
                    let mut c = c.clone();
                    if c.is("item", NS_MUC_USER)
                        && let Some(jid) = c.attr("jid").and_then(|j| edit.own_item_jid(j))
                    {
                        let jid = jid.to_owned();
                        crate::stanza::set_attr(&mut c, "jid", &jid);
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
        Some(el)
    }

    fn jid() -> impl Strategy<Value = String> {
        proptest::sample::select(
            &[
                "alice@example.org",
                "alice@example.org/phone",
                "alice@example.org/laptop",
                "bob@example.org/phone",
                "room@conf.example.org/alice",
            ][..],
        )
        .prop_map(str::to_owned)
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let session: Rc<str> = "alice@example.org/phone".into();
        let (a, b) = (session.clone(), session);
        prop_oneof![
            Just(Edit::None),
            (0i64..2_000_000_000).prop_map(|stamp| Edit::Delay {
                room: "room@conf.example.org".into(),
                stamp
            }),
            any::<bool>().prop_map(move |nick_differs| Edit::OwnPresence {
                nick_differs,
                jid: a.clone()
            }),
            Just(Edit::OwnJid { jid: b }),
        ]
    }

    /// A self-presence as a room sends it: one muc#user payload (statuses, items with and
    /// without a jid) among other children.
    fn self_presence() -> impl Strategy<Value = Element> {
        let status =
            proptest::sample::select(&["110", "201", "210", "100", "2010"][..]).prop_map(|code| {
                Element::builder("status", NS_MUC_USER)
                    .attr(crate::stanza::n("code"), code)
                    .build()
            });
        let item = (proptest::option::of(jid()), attrs()).prop_map(|(jid, attrs)| {
            let mut item = build("item", NS_MUC_USER, attrs, Vec::new());
            if let Some(jid) = jid {
                crate::stanza::set_attr(&mut item, "jid", &jid);
            }
            item
        });
        let payload = proptest::collection::vec(prop_oneof![status, item, element(2)], 0..5)
            .prop_map(|children| {
                Element::builder("x", NS_MUC_USER)
                    .append_all(children)
                    .build()
            });
        (
            attrs(),
            proptest::collection::vec(element(2), 0..2),
            payload,
            proptest::collection::vec(element(2), 0..2),
        )
            .prop_map(|(attrs, before, x, after)| {
                let nodes = before
                    .into_iter()
                    .chain(std::iter::once(x))
                    .chain(after)
                    .map(Node::Element)
                    .collect();
                build("presence", NS_CLIENT, attrs, nodes)
            })
    }

    proptest! {
        #![proptest_config(config())]

        /// Edits applied while parsing give what the model gives, on text from either
        /// serializer.
        #[test]
        fn edits_while_parsing_match_the_model(
            el in prop_oneof![self_presence(), stanza(3)],
            edit in edit(),
        ) {
            for xml in [serialize(&el).unwrap(), String::from(&without_to(&el))] {
                let out = Out::Kept { xml: xml.as_str().into(), edit: edit.clone() };
                let model = edited_by_model(&xml, &edit);
                prop_assert!(model.is_some());
                prop_assert_eq!(&kept_element(&xml, Some(&edit)), &model, "{}", xml);
                prop_assert_eq!(&out.to_element(), &model, "{}", xml);
            }
        }
    }
}
