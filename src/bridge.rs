//! The mlua bridge: Prosody stanzas (Lua tables) in, `minidom::Element`s for the core, and
//! the core's actions back out as Lua values. One `HostHandle` userdata per VirtualHost.

use std::panic::{AssertUnwindSafe, catch_unwind};

use minidom::rxml::{Namespace, NcName};
use minidom::{Element, Node};
use mlua::{
    Error as LuaError, Lua, LuaString, MultiValue, Result as LuaResult, Table, UserData,
    UserDataMethods, Value,
};

use crate::host::{Action, Config, Host, Out, Outcome};
use crate::stanza::NS_CLIENT;

/// Stanzas nested deeper than this are not inspected (they pass on untouched).
const MAX_DEPTH: usize = 64;

pub struct HostHandle {
    host: Host,
    /// Prosody's `util.stanza` metatable, given to every stanza made here.
    stanza_mt: Table,
}

/// Convert a Prosody stanza table into an element. The top-level `xmlns` is Prosody's
/// stream namespace and is read as `jabber:client`; children inherit their parent's.
pub fn element_from_lua(t: &Table) -> LuaResult<Element> {
    convert_in(t, NS_CLIENT, 0)
}

fn convert_in(t: &Table, parent_ns: &str, depth: usize) -> LuaResult<Element> {
    if depth > MAX_DEPTH {
        return Err(LuaError::runtime("stanza nested too deeply"));
    }
    let name: LuaString = t.raw_get("name")?;
    let attr: Table = t.raw_get("attr")?;
    let ns_value: Option<LuaString> = if depth == 0 {
        None
    } else {
        attr.raw_get("xmlns")?
    };
    let ns = match &ns_value {
        Some(s) => s.to_str()?.to_owned(),
        None => parent_ns.to_owned(),
    };
    let mut el = Element::builder(&*name.to_str()?, ns.clone()).build();
    attr.for_each(|k: Value, v: Value| {
        if let (Value::String(k), Value::String(v)) = (k, v) {
            let key = k.to_str()?;
            if &*key != "xmlns"
                && let Some((ans, local)) = split_attr_name(&key)
            {
                el.attrs_mut().insert(ans, local, v.to_str()?.to_owned());
            }
        }
        Ok(())
    })?;
    let len = t.raw_len();
    for i in 1..=len {
        match t.raw_get::<Value>(i)? {
            Value::String(s) => el.append_text_node(s.to_str()?.to_owned()),
            Value::Table(child) => {
                el.append_child(convert_in(&child, &ns, depth + 1)?);
            }
            _ => {}
        }
    }
    Ok(el)
}

/// Prosody writes namespaced attributes as `ns\1name`, and `xml:lang` as is.
fn split_attr_name(key: &str) -> Option<(Namespace<'static>, NcName)> {
    if let Some(local) = key.strip_prefix("xml:") {
        return Some((Namespace::XML, NcName::try_from(local).ok()?));
    }
    if let Some((ns, local)) = key.split_once('\u{1}') {
        return Some((
            Namespace::from(ns.to_owned()),
            NcName::try_from(local).ok()?,
        ));
    }
    Some((Namespace::NONE, NcName::try_from(key).ok()?))
}

/// Convert an element into a Prosody stanza table (with `util.stanza`'s metatable).
pub fn element_to_lua(lua: &Lua, el: &Element, mt: &Table) -> LuaResult<Table> {
    convert_out(lua, el, NS_CLIENT, mt, true)
}

fn convert_out(
    lua: &Lua,
    el: &Element,
    parent_ns: &str,
    mt: &Table,
    top: bool,
) -> LuaResult<Table> {
    let t = lua.create_table_with_capacity(0, 3)?;
    let attr = lua.create_table()?;
    let ns = el.ns();
    if !top && ns != parent_ns {
        attr.raw_set("xmlns", ns.as_str())?;
    }
    for ((ans, name), value) in el.attrs().iter() {
        let key = if *ans == Namespace::NONE {
            name.to_string()
        } else if *ans == Namespace::XML {
            format!("xml:{name}")
        } else {
            format!("{}\u{1}{name}", ans.as_str())
        };
        attr.raw_set(key, value.as_str())?;
    }
    let tags = lua.create_table()?;
    let mut i = 0;
    for node in el.nodes() {
        i += 1;
        match node {
            Node::Element(child) => {
                let c = convert_out(lua, child, &ns, mt, false)?;
                tags.raw_push(&c)?;
                t.raw_seti(i, c)?;
            }
            Node::Text(text) => t.raw_seti(i, text.as_str())?,
        }
    }
    t.raw_set("name", el.name())?;
    t.raw_set("attr", attr)?;
    t.raw_set("tags", tags)?;
    t.set_metatable(Some(mt.clone()))?;
    Ok(t)
}

fn config_from_lua(t: &Table) -> LuaResult<Config> {
    let mut c = Config::default();
    let count = |key: &str, default: usize| -> LuaResult<usize> {
        Ok(t.raw_get::<Option<i64>>(key)?
            .map_or(default, |v| usize::try_from(v).unwrap_or(0)))
    };
    let list = |key: &str| -> LuaResult<Vec<String>> {
        Ok(t.raw_get::<Option<Vec<String>>>(key)?.unwrap_or_default())
    };
    c.history_length = count("history_length", c.history_length)?;
    c.max_rooms = count("max_rooms", c.max_rooms)?;
    c.max_occupants = count("max_occupants", c.max_occupants)?;
    c.max_pending_iqs = count("max_pending_iqs", c.max_pending_iqs)?;
    c.iq_timeout = t
        .raw_get::<Option<i64>>("iq_timeout")?
        .unwrap_or(c.iq_timeout);
    c.excluded_hosts = list("excluded_hosts")?;
    c.excluded_rooms = list("excluded_rooms")?;
    c.test_faults = t.raw_get::<Option<bool>>("test_faults")?.unwrap_or(false);
    Ok(c)
}

/// Run a core call with panics turned into Lua errors, so a bug costs one stanza's
/// handling (the shim logs it and lets the stanza go on), not the server.
fn guarded<T>(f: impl FnOnce() -> LuaResult<T>) -> LuaResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(LuaError::runtime(format!(
                "mod_minimix core panicked: {msg}"
            )))
        }
    }
}

const OP_DELIVER: i64 = 1;
const OP_SEND: i64 = 2;

/// Returns `handled, user, actions, notes`. `actions` is a flat list of quadruples
/// `op, resource|false, stanza|false, id|false`: `stanza` false means the stanza that came
/// in, `id` false means keep its id.
fn outcome_to_lua(lua: &Lua, mt: &Table, out: Outcome) -> LuaResult<MultiValue> {
    if !out.handled && out.notes.is_empty() {
        return Ok(MultiValue::new());
    }
    let actions = lua.create_table_with_capacity(out.actions.len() * 4, 0)?;
    let mut i = 0;
    let mut put = |v: Value| -> LuaResult<()> {
        i += 1;
        actions.raw_seti(i, v)
    };
    for action in out.actions {
        let (op, resource, stanza) = match action {
            Action::Deliver { resource, stanza } => (OP_DELIVER, Some(resource), stanza),
            Action::Send { stanza } => (OP_SEND, None, stanza),
        };
        put(Value::Integer(op))?;
        put(match resource {
            Some(r) => Value::String(lua.create_string(r)?),
            None => Value::Boolean(false),
        })?;
        match stanza {
            Out::Original { id } => {
                put(Value::Boolean(false))?;
                put(match id {
                    Some(id) => Value::String(lua.create_string(id)?),
                    None => Value::Boolean(false),
                })?;
            }
            Out::New(el) => {
                put(Value::Table(element_to_lua(lua, &el, mt)?))?;
                put(Value::Boolean(false))?;
            }
        }
    }
    let notes = if out.notes.is_empty() {
        Value::Nil
    } else {
        Value::Table(lua.create_sequence_from(out.notes)?)
    };
    let user = match out.user {
        Some(u) => Value::String(lua.create_string(u)?),
        None => Value::Nil,
    };
    Ok(MultiValue::from_iter([
        Value::Boolean(out.handled),
        user,
        Value::Table(actions),
        notes,
    ]))
}

impl UserData for HostHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method_mut(
            "session_stanza",
            |lua, this, (user, resource, stanza, now): (LuaString, LuaString, Table, i64)| {
                guarded(|| {
                    let el = element_from_lua(&stanza)?;
                    let out =
                        this.host
                            .session_stanza(&user.to_str()?, &resource.to_str()?, &el, now);
                    outcome_to_lua(lua, &this.stanza_mt, out)
                })
            },
        );
        methods.add_method_mut("room_stanza", |lua, this, (stanza, now): (Table, i64)| {
            guarded(|| {
                let el = element_from_lua(&stanza)?;
                let out = this.host.room_stanza(&el, now);
                outcome_to_lua(lua, &this.stanza_mt, out)
            })
        });
        methods.add_method_mut(
            "session_ended",
            |lua, this, (user, resource): (LuaString, LuaString)| {
                guarded(|| {
                    let out = this
                        .host
                        .session_ended(&user.to_str()?, &resource.to_str()?);
                    outcome_to_lua(lua, &this.stanza_mt, out)
                })
            },
        );
        methods.add_method("memberships", |lua, this, user: LuaString| {
            let list = lua.create_table()?;
            for (room, nick, sessions) in this.host.memberships_of(&user.to_str()?) {
                let row = lua.create_table()?;
                row.raw_set("room", room)?;
                row.raw_set("nick", nick)?;
                row.raw_set("sessions", sessions)?;
                list.raw_push(row)?;
            }
            Ok(list)
        });
        methods.add_method("stats", |lua, this, ()| {
            let s = this.host.stats();
            let t = lua.create_table()?;
            t.raw_set("accounts", s.accounts)?;
            t.raw_set("memberships", s.memberships)?;
            t.raw_set("joined_sessions", s.joined_sessions)?;
            t.raw_set("cached_presences", s.cached_presences)?;
            t.raw_set("cached_messages", s.cached_messages)?;
            t.raw_set("pending_iqs", s.pending_iqs)?;
            Ok(t)
        });
    }
}

/// `require`-style entry point: `minimix.new(host, config, stanza_mt)`.
pub fn exports(lua: &Lua) -> LuaResult<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "new",
        lua.create_function(|_, (host, config, stanza_mt): (String, Table, Table)| {
            let config = config_from_lua(&config)?;
            Ok(HostHandle {
                host: Host::new(&host, config),
                stanza_mt,
            })
        })?,
    )?;
    t.raw_set("version", env!("CARGO_PKG_VERSION"))?;
    Ok(t)
}
