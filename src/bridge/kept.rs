//! The kept-stanza text format: a stanza table serialized (`write_xml`) when the core
//! keeps it, and kept text turned straight back into stanza tables (`push_kept`).

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

pub(super) fn escape_into(out: &mut String, text: &str, attr: bool) {
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
pub(super) fn write_xml(
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

/// A reader of kept stanza text (made by `write_xml`, or by minidom in tests) that builds
/// Prosody stanza tables directly, without an intermediate tree.
pub(super) struct KeptReader<'x> {
    /// The kept text (made by [`write_xml`], so well-formed and split only at ASCII
    /// delimiters, which are character boundaries).
    pub(super) text: &'x str,
    pub(super) xml: &'x [u8],
    pub(super) pos: usize,
    pub(super) l: *mut lua_State,
    pub(super) mt: c_int,
    /// Scratch stacks shared by all elements of the stanza (each element uses the entries
    /// above where it started and drops them when done), so parsing allocates nothing
    /// per element: attributes, namespace prefixes, and whether each child is a tag.
    pub(super) attrs: Vec<(&'x str, Cow<'x, str>)>,
    pub(super) prefixes: Vec<(&'x str, Cow<'x, str>)>,
    pub(super) kinds: Vec<bool>,
}

/// What a parsed element tells its parent (for the edits of a later join).
pub(super) struct Parsed {
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
pub(super) unsafe fn push_kept(l: *mut lua_State, xml: &str, edit: &Edit, mt: c_int) -> Option<()> {
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
