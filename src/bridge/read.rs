//! Readers of Prosody's stanza tables, in place on the Lua stack, that cannot raise.

use std::cell::RefCell;
use std::ffi::{CStr, c_int};
use std::rc::Rc;

use mlua::ffi::{self, lua_State};
use xmpp_parsers::muc::muc::History as HistoryRequest;

use crate::stanza::{Head, Kind, NS_CLIENT, NS_MUC, NS_MUC_USER, NS_STANZAS, Payload};

use super::{entry::*, kept::*};

/// Stack slots an entry point reserves before it reads anything (the readers nest a few
/// tables deep; the serializer reserves more per level itself).
pub(super) const READ_STACK: c_int = 32;

/// The key strings the readers look up, kept as upvalues of every entry point (2, 3, …)
/// in this order, so that reading a stanza pushes them without allocating.
pub(super) const KEYS: [&CStr; 9] = [
    c"name", c"attr", c"tags", c"xmlns", c"from", c"to", c"type", c"id", c"code",
];
#[derive(Clone, Copy)]
pub(super) enum Key {
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

/// The Lua stack of one call into an entry point. Strings borrowed through it live for
/// `'f`, the call: the values on the stack (and the stanza tables reachable from them, which
/// nothing here changes) hold them that long. Every reader uses raw accessors only, with
/// key strings pushed from the closure's upvalues, so none of them can raise a Lua error;
/// the stack space they use is reserved on entry ([`Frame::enter`]).
#[derive(Clone, Copy)]
pub(crate) struct Frame<'f> {
    pub(super) l: *mut lua_State,
    pub(super) _call: std::marker::PhantomData<&'f ()>,
}

impl<'f> Frame<'f> {
    /// Run `f` with the frame of this call, after reserving [`READ_STACK`] slots.
    ///
    /// # Safety
    /// `l` is the state of a running C function that has the key strings as upvalues
    /// 2, 3, … ([`KEYS`]), and the stanza tables on its stack are not changed during `f`.
    pub(super) unsafe fn enter<R>(
        l: *mut lua_State,
        f: impl for<'g> FnOnce(Frame<'g>) -> R,
    ) -> Option<R> {
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
    pub(super) fn raw_field(self, t: c_int, key: Key) -> c_int {
        unsafe {
            ffi::lua_pushvalue(self.l, ffi::lua_upvalueindex(key as c_int + 2));
            ffi::lua_rawget(self.l, t)
        }
    }

    pub(super) fn pop(self, n: c_int) {
        unsafe { ffi::lua_pop(self.l, n) }
    }

    pub(super) fn top(self) -> c_int {
        unsafe { ffi::lua_gettop(self.l) }
    }

    /// A string at `idx`.
    pub(super) fn str_at(self, idx: c_int) -> Option<&'f str> {
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
    pub(super) fn field_str(self, t: c_int, key: Key) -> Option<&'f str> {
        self.raw_field(t, key);
        let s = self.str_at(-1);
        self.pop(1);
        s
    }

    /// `t.attr[key]` as a string.
    pub(super) fn attr_str(self, t: c_int, key: Key) -> Option<&'f str> {
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
    pub(super) fn attr_named(self, t: c_int, name: &str) -> Option<&'f str> {
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
    pub(super) fn find_in_children<R>(
        self,
        t: c_int,
        mut f: impl FnMut(c_int) -> Option<R>,
    ) -> Option<R> {
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
    pub(super) fn is_element(self, t: c_int, name: &str, ns: &str, parent_ns: &str) -> bool {
        self.field_str(t, Key::Name) == Some(name)
            && self.attr_str(t, Key::Xmlns).unwrap_or(parent_ns) == ns
    }

    /// Run `f` with the index of the first child `name` in `ns` of the element at `t`.
    pub(super) fn with_child<R>(
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

    pub(super) fn read_head(self, t: c_int) -> Option<Head<'f>> {
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

pub(super) struct RawStanza<'a, 'f> {
    pub(super) s: Frame<'f>,
    pub(super) idx: c_int,
    pub(super) memo: &'a RefCell<Option<Memo>>,
    /// The text of this stanza when the memo did not hold it: kept in the memo (with a
    /// reference to the table) by the protected call, once the event succeeded.
    pub(super) fresh: RefCell<Option<Rc<str>>>,
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

    fn child_attr_where(
        &self,
        name: &str,
        ns: &str,
        key: &str,
        value: &str,
        attr: &str,
    ) -> Option<String> {
        let s = self.s;
        s.find_in_children(self.idx, |c| {
            if s.is_element(c, name, ns, NS_CLIENT) && s.attr_named(c, key) == Some(value) {
                s.attr_named(c, attr).map(str::to_owned)
            } else {
                None
            }
        })
    }

    fn child_text(&self, name: &str, ns: &str) -> Option<String> {
        let s = self.s;
        s.with_child(self.idx, name, ns, NS_CLIENT, |c| {
            let mut text = String::new();
            let n = unsafe { ffi::lua_rawlen(s.l, c) };
            for i in 1..=n {
                unsafe { ffi::lua_rawgeti(s.l, c, i as ffi::lua_Integer) };
                if let Some(part) = s.str_at(-1) {
                    text.push_str(part);
                }
                s.pop(1);
            }
            Some(text)
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
        let source = Table {
            s: self.s,
            t: self.idx,
        };
        if write_xml(&source, NS_CLIENT, true, 0, &mut out).is_none() {
            out.clear();
        }
        let xml: Rc<str> = out.into();
        *self.fresh.borrow_mut() = Some(xml.clone());
        xml
    }
}
