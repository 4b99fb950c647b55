//! The mlua side of the bridge: the module's entry point, the constructor that makes one
//! host's state and its hot entry points (`bridge/`), and the admin methods. Values that
//! cross here are few and small, so mlua's safe API is used throughout.

use std::cell::RefCell;
use std::rc::Rc;

use mlua::{Function, Lua, LuaString, Result as LuaResult, Table, UserData, UserDataMethods};

use crate::host::{Config, Host};
mod entry;
mod index;
mod kept;
mod read;
mod reply;

use entry::Shared;

/// The object the shim keeps for one VirtualHost: the admin methods and `session_ended`.
pub struct HostHandle {
    shared: Rc<Shared>,
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
    c.self_ping_interval = t
        .raw_get::<Option<i64>>("self_ping_interval")?
        .map_or(c.self_ping_interval, |v| v.max(0));
    c.rejoin_attempts = t
        .raw_get::<Option<i64>>("rejoin_attempts")?
        .map_or(c.rejoin_attempts, |v| {
            u32::try_from(v.max(1)).unwrap_or(u32::MAX)
        });
    Ok(c)
}

impl UserData for HostHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // What to store of an account's memberships: a list of { room, nick, password,
        // joined } (joined: the room confirmed the membership at least once).
        methods.add_method("persisted", |lua, this, user: LuaString| {
            let list = lua.create_table()?;
            let user = user.to_str()?;
            let host = this.shared.host.borrow();
            for (room, nick, password) in host.persisted(&user) {
                let row = lua.create_table()?;
                row.raw_set("joined", host.confirmed(&user, &room))?;
                let got = host.received(&user, &room);
                if !got.is_empty() {
                    row.raw_set("got", got)?;
                }
                row.raw_set("room", room)?;
                row.raw_set("nick", nick)?;
                row.raw_set("password", password)?;
                list.raw_push(row)?;
            }
            Ok(list)
        });
        methods.add_method("memberships", |lua, this, user: LuaString| {
            let list = lua.create_table()?;
            let host = this.shared.host.borrow();
            for (room, nick, sessions) in host.memberships_of(&user.to_str()?) {
                let row = lua.create_table()?;
                row.raw_set("room", room)?;
                row.raw_set("nick", nick)?;
                row.raw_set("sessions", sessions)?;
                list.raw_push(row)?;
            }
            Ok(list)
        });
        // The accounts whose record of what they got from rooms changed since last asked:
        // their memberships are stored again (periodically and at shutdown).
        methods.add_method("take_unsaved", |_, this, ()| {
            Ok(this.shared.host.borrow_mut().take_unsaved())
        });
        // `remember(user, room, stamp, xml)`: a message found in the account's archive at
        // start, for the next restore of that membership. False when `xml` is no stanza.
        methods.add_method(
            "remember",
            |_, this, (user, room, stamp, xml): (LuaString, LuaString, i64, LuaString)| {
                let Ok(el) = xml.to_str()?.parse::<minidom::Element>() else {
                    return Ok(false);
                };
                this.shared.host.borrow_mut().remember(
                    &user.to_str()?,
                    &room.to_str()?,
                    &el,
                    stamp,
                );
                Ok(true)
            },
        );
        // When the core's timers next have something to do (Unix seconds), or nil.
        methods.add_method("next_deadline", |_, this, ()| {
            Ok(this.shared.host.borrow_mut().next_deadline())
        });
        // How many timer outcomes wait to be carried out (`control("due", …)` each).
        methods.add_method("due_count", |_, this, ()| {
            Ok(this.shared.due.borrow().len())
        });
        methods.add_method("stats", |lua, this, ()| {
            let s = this.shared.host.borrow().stats();
            let t = lua.create_table()?;
            t.raw_set("accounts", s.accounts)?;
            t.raw_set("memberships", s.memberships)?;
            t.raw_set("joined_sessions", s.joined_sessions)?;
            t.raw_set("cached_presences", s.cached_presences)?;
            t.raw_set("cached_messages", s.cached_messages)?;
            t.raw_set("pending_iqs", s.pending_iqs)?;
            t.raw_set("kept_bytes", s.kept_bytes)?;
            t.raw_set("forked", s.forked)?;
            t.raw_set("joins_served_locally", s.joins_served_locally)?;
            t.raw_set("iqs_proxied", s.iqs_proxied)?;
            t.raw_set("iqs_expired", s.iqs_expired)?;
            t.raw_set("rejoins", s.rejoins)?;
            t.raw_set("rejoins_given_up", s.rejoins_given_up)?;
            t.raw_set("self_pings", s.self_pings)?;
            t.raw_set("self_pings_answered", s.self_pings_answered)?;
            t.raw_set("self_pings_gone", s.self_pings_gone)?;
            t.raw_set("self_pings_failed", s.self_pings_failed)?;
            t.raw_set("replayed_new", s.replayed_new)?;
            t.raw_set("replayed_known", s.replayed_known)?;
            Ok(t)
        });
    }
}

/// `minimix.new(host, config, stanza_mt)` →
/// `core, room_event, session_event, control, session_rooms`.
pub fn exports(lua: &Lua) -> LuaResult<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "new",
        lua.create_function(|lua, (host, config, stanza_mt): (String, Table, Table)| {
            let core = Host::new(&host, config_from_lua(&config)?);
            let shared = RefCell::new(None);
            // SAFETY: `entry::open` gets the stack mlua prepared, with `stanza_mt` at 1.
            type Made = (Table, Function, Function, Function, Table);
            let (_, room_event, session_event, control, session_rooms): Made = unsafe {
                lua.exec_raw(stanza_mt, |l| {
                    *shared.borrow_mut() = Some(entry::open(l, core, 1));
                })?
            };
            let shared = shared
                .into_inner()
                .ok_or_else(|| mlua::Error::runtime("mod_minimix: no state was made"))?;
            Ok((
                HostHandle { shared },
                room_event,
                session_event,
                control,
                session_rooms,
            ))
        })?,
    )?;
    t.raw_set("version", env!("CARGO_PKG_VERSION"))?;
    // Marks kept per membership of what the account got (the most a start reads of each
    // room from the archive after an unclean stop).
    t.raw_set("marks_kept", crate::received::MARKS_KEPT)?;
    // The constants of the replies the hot entry points return (bridge/reply.rs, Reply).
    let flags = lua.create_table()?;
    flags.raw_set("persist", reply::FLAG_PERSIST)?;
    flags.raw_set("archive", reply::FLAG_ARCHIVE)?;
    flags.raw_set("send_original", reply::FLAG_SEND_ORIGINAL)?;
    flags.raw_set("one_session", reply::FLAG_ONE_SESSION)?;
    flags.raw_set("warn", reply::FLAG_WARN)?;
    flags.raw_set("sooner_deadline", reply::FLAG_SOONER_DEADLINE)?;
    t.raw_set("flags", flags)?;
    let ops = lua.create_table()?;
    ops.raw_set("deliver", reply::OP_DELIVER)?;
    ops.raw_set("send", reply::OP_SEND)?;
    t.raw_set("ops", ops)?;
    Ok(t)
}
