//! The bridge itself (`src/bridge/`, `src/bridge.rs`) on a real Lua 5.4 state, driven as
//! the shim drives it, without Prosody running: the module is opened by its own entry point
//! `luaopen_minimix`, stanzas are made by Prosody's real `util.stanza` (plain Lua, from
//! `$PROSODY_LIB_DIR`, default `/usr/lib/prosody`), and every value the entry points hand
//! back is checked exactly: the reply's six values, the stanzas of a later join (each with
//! Prosody's stanza metatable), the fork lists and the session index.
//!
//! Linking: the module is built with mlua's "module" feature, so neither the cdylib nor the
//! rlib links a Lua; their Lua symbols come from the process that loads them (Prosody's
//! `lua5.4`). This test binary is that process here, so it links the system's Lua 5.4 itself
//! with the `#[link]` below (Debian: liblua5.4-dev). Only this binary is affected: the
//! cdylib and the other tests link exactly as before. Built only for the `lua54` feature
//! (the default), so that the headers mlua was built for match the library linked.
#![cfg(feature = "lua54")]

// The crate itself, for its `luaopen_minimix` (an exported symbol, not a Rust item).
extern crate minimix;

use mlua::{Function, Lua, MultiValue, ObjectLike, Table, Value};

#[link(name = "lua5.4")]
unsafe extern "C" {}

unsafe extern "C-unwind" {
    /// What Lua's `package.loadlib` finds in `minimix.so` (src/lib.rs).
    fn luaopen_minimix(l: *mut mlua::lua_State) -> std::ffi::c_int;
}

const ROOM: &str = "room@conference.example.org";
const NOW: i64 = 1_700_000_000;
const NS_MUC: &str = "http://jabber.org/protocol/muc";
const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";

/// The Lua side the tests share: Prosody's libraries on the path, `st` (util.stanza) and
/// `canon` (a stanza as text with its attributes sorted, failing for any element without
/// Prosody's stanza metatable; `tostring` follows the table's order, which Lua 5.4
/// randomises).
const PRELUDE: &str = r#"
local dir = ...
package.path = dir .. "/?.lua;" .. package.path
package.cpath = dir .. "/?.so;" .. package.cpath
require "loader" -- Prosody 13's libraries require "prosody.util.*"; this maps those names
st = require "util.stanza"
function canon(s)
  if type(s) ~= "table" then return tostring(s) end
  assert(getmetatable(s) == st.stanza_mt, "not a Prosody stanza: " .. tostring(s.name))
  local keys = {}
  for k in pairs(s.attr) do keys[#keys + 1] = k end
  table.sort(keys)
  local out = { "<", s.name }
  for _, k in ipairs(keys) do out[#out + 1] = (" %s='%s'"):format(k, s.attr[k]) end
  out[#out + 1] = ">"
  for _, child in ipairs(s) do out[#out + 1] = canon(child) end
  out[#out + 1] = "</" .. s.name .. ">"
  return table.concat(out)
end
"#;

/// One host's module state in a fresh Lua state, as the shim holds it.
struct Bridge {
    lua: Lua,
    minimix: Table,
    core: Value,
    room_event: Function,
    session_event: Function,
    control: Function,
    index: Table,
}

/// What one event hands back: nothing at all (a plain pass), `nil, message` (a failure),
/// or `handled, user, actions, notes, recipients, flags`.
#[derive(Debug)]
struct Reply {
    count: usize,
    values: Vec<Value>,
}

impl Reply {
    fn handled(&self) -> Option<bool> {
        self.values.first().and_then(Value::as_boolean)
    }
    fn user(&self) -> Option<String> {
        self.values.get(1).and_then(|v| v.to_string().ok())
    }
    fn is_nil(&self, k: usize) -> bool {
        self.values.get(k).is_none_or(Value::is_nil)
    }
    fn table(&self, k: usize) -> Table {
        match self.values.get(k) {
            Some(Value::Table(t)) => t.clone(),
            other => panic!("value {k} is not a table: {other:?}"),
        }
    }
    fn notes(&self) -> Vec<String> {
        strings(&self.table(3))
    }
    fn recipients(&self) -> Vec<String> {
        strings(&self.table(4))
    }
    fn flags(&self) -> i64 {
        self.values
            .get(5)
            .and_then(Value::as_integer)
            .expect("flags")
    }
}

fn strings(t: &Table) -> Vec<String> {
    t.sequence_values::<String>()
        .collect::<mlua::Result<_>>()
        .expect("a list of strings")
}

impl Bridge {
    fn new(config: &str) -> Bridge {
        // SAFETY: C modules are loaded (Prosody's util.encodings), as Prosody does.
        let lua = unsafe { Lua::unsafe_new() };
        let dir =
            std::env::var("PROSODY_LIB_DIR").unwrap_or_else(|_| "/usr/lib/prosody".to_owned());
        lua.load(PRELUDE)
            .set_name("prelude")
            .call::<()>(dir)
            .expect("Prosody's util.stanza (PROSODY_LIB_DIR names another Prosody)");
        // SAFETY: `luaopen_minimix` is a Lua C function of this Lua's version.
        let open = unsafe { lua.create_c_function(luaopen_minimix) }.expect("entry point");
        let minimix: Table = open.call(()).expect("luaopen_minimix");
        let config: Table = lua.load(config).eval().expect("config");
        let st: Table = lua.globals().get("st").unwrap();
        let mt: Table = st.get("stanza_mt").unwrap();
        let new: Function = minimix.get("new").unwrap();
        let (core, room_event, session_event, control, index) = new
            .call::<(Value, Function, Function, Function, Table)>(("localhost", config, mt))
            .expect("minimix.new");
        Bridge {
            lua,
            minimix,
            core,
            room_event,
            session_event,
            control,
            index,
        }
    }

    fn flag(&self, name: &str) -> i64 {
        let flags: Table = self.minimix.get("flags").unwrap();
        flags.get(name).unwrap()
    }

    /// A stanza made by a Lua expression over `st`.
    fn stanza(&self, expr: &str) -> Table {
        self.lua
            .load(format!("return {expr}"))
            .eval()
            .expect("a stanza")
    }

    fn canon(&self, v: Value) -> String {
        let canon: Function = self.lua.globals().get("canon").unwrap();
        canon.call(v).expect("canon")
    }

    fn reply(values: MultiValue) -> Reply {
        let values: Vec<Value> = values.into_iter().collect();
        Reply {
            count: values.len(),
            values,
        }
    }

    fn session(&self, resource: &str, expr: &str) -> Reply {
        let stanza = self.stanza(expr);
        Self::reply(
            self.session_event
                .call(("alice", resource, stanza, NOW))
                .unwrap(),
        )
    }

    fn room(&self, expr: &str) -> Reply {
        Self::reply(self.room_event.call((self.stanza(expr), NOW)).unwrap())
    }

    fn join(&self, resource: &str, extra: &str) -> Reply {
        self.session(
            resource,
            &format!(
                "st.presence{{ to = '{ROOM}/Al' }}:tag('x', {{ xmlns = '{NS_MUC}' }}):up(){extra}"
            ),
        )
    }

    /// A groupchat message of the room (Bo's) to the account.
    fn groupchat(&self, id: &str, body: &str) -> Reply {
        self.room(&format!(
            "st.message{{ from = '{ROOM}/Bo', to = 'alice@localhost', type = 'groupchat', id = '{id}' }}:text_tag('body', '{body}')"
        ))
    }

    /// The session index, as `full JID: rooms` lines, sorted.
    fn index(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for pair in self.index.pairs::<String, Table>() {
            let (full, rooms) = pair.unwrap();
            let mut names: Vec<String> = Vec::new();
            for room in rooms.pairs::<String, bool>() {
                let (room, on) = room.unwrap();
                assert!(on, "{full}: {room} = false");
                names.push(room);
            }
            names.sort();
            lines.push(format!("{full}: {}", names.join(" ")));
        }
        lines.sort();
        lines
    }
}

fn occupant_presence(nick: &str, codes: &str) -> String {
    format!(
        "st.presence{{ from = '{ROOM}/{nick}', to = 'alice@localhost' }}:tag('x', {{ xmlns = '{NS_MUC_USER}' }}):tag('item', {{ affiliation = 'member', role = 'participant' }}):up(){codes}:up()"
    )
}

/// alice/phone joined the room as Al, where Bo is; Bo has said "hello"; the subject is set.
fn joined() -> Bridge {
    let b = Bridge::new("return { history_length = 3, test_faults = true }");
    b.join("phone", "");
    b.room(&occupant_presence("Bo", ""));
    b.room(&occupant_presence(
        "Al",
        ":tag('status', { code = '110' }):up()",
    ));
    b.room(&format!(
        "st.message{{ from = '{ROOM}/Bo', to = 'alice@localhost', type = 'groupchat', id = 's1' }}:text_tag('subject', 'Topic')"
    ));
    b.groupchat("m1", "hello");
    b
}

#[test]
fn the_module_hands_over_its_constants() {
    let b = Bridge::new("return {}");
    assert_eq!(
        (
            b.flag("persist"),
            b.flag("archive"),
            b.flag("send_original"),
            b.flag("one_session")
        ),
        (1, 2, 4, 8)
    );
    let ops: Table = b.minimix.get("ops").unwrap();
    assert_eq!(ops.get::<i64>("deliver").unwrap(), 1);
    assert_eq!(ops.get::<i64>("send").unwrap(), 2);
    assert_eq!(
        b.minimix.get::<String>("version").unwrap(),
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn a_first_join_goes_out_from_the_account_and_the_answers_are_forked() {
    let b = Bridge::new("return { history_length = 3 }");
    let join = b.join("phone", "");
    assert_eq!(join.count, 6);
    assert_eq!(join.handled(), Some(true));
    assert_eq!(join.user().as_deref(), Some("alice"));
    assert!(join.is_nil(2) && join.is_nil(4));
    assert_eq!(
        join.notes(),
        [format!("alice joins {ROOM} as Al (first session phone)")]
    );
    assert_eq!(join.flags(), b.flag("persist") | b.flag("send_original"));
    // Joining: the session is in the index at once.
    assert_eq!(b.index(), [format!("alice@localhost/phone: {ROOM}")]);

    // Another occupant's presence: a fork to the one session, with the list kept for it.
    let bo = b.room(&occupant_presence("Bo", ""));
    assert_eq!((bo.count, bo.handled()), (6, Some(true)));
    assert!(bo.is_nil(2) && bo.is_nil(3));
    assert_eq!(bo.recipients(), ["alice@localhost/phone"]);
    assert_eq!(bo.flags(), 0);

    // The self-presence confirms the join: it goes to the session that joined, as one
    // session's list, and the memberships are stored again.
    let own = b.room(&occupant_presence(
        "Al",
        ":tag('status', { code = '110' }):up()",
    ));
    assert_eq!(own.count, 6);
    // (Its first self-ping check is due now, sooner than anything else: the shim's timer
    // is re-armed.)
    assert_eq!(
        own.flags(),
        b.flag("persist") | b.flag("one_session") | b.flag("sooner_deadline")
    );
    assert_eq!(own.notes(), [format!("alice joined {ROOM} as Al")]);
    assert_eq!(own.values[4].to_string().unwrap(), "alice@localhost/phone");
    let stanzas: Vec<Value> = own.table(2).sequence_values().map(Result::unwrap).collect();
    assert_eq!(stanzas.len(), 1);
    assert_eq!(
        b.canon(stanzas[0].clone()),
        format!(
            "<presence from='{ROOM}/Al'><x xmlns='{NS_MUC_USER}'><item affiliation='member' role='participant'></item><status code='110'></status></x></presence>"
        )
    );

    // A groupchat message: forked, to be archived first; the same list as before.
    let hello = b.groupchat("m1", "hello");
    assert_eq!(hello.flags(), b.flag("archive"));
    assert_eq!(hello.recipients(), ["alice@localhost/phone"]);
    assert_eq!(
        hello.table(4),
        bo.table(4),
        "the kept fork list is handed out again"
    );
}

#[test]
fn a_later_join_is_served_locally_as_one_list_of_stanzas() {
    let b = joined();
    let later = b.join("laptop", "");
    assert_eq!((later.count, later.handled()), (6, Some(true)));
    assert_eq!(later.user().as_deref(), Some("alice"));
    assert!(later.is_nil(3));
    assert_eq!(
        later.values[4].to_string().unwrap(),
        "alice@localhost/laptop"
    );
    assert_eq!(later.flags(), b.flag("one_session"));
    let got: Vec<String> = later
        .table(2)
        .sequence_values::<Value>()
        .map(|v| b.canon(v.unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            format!(
                "<presence from='{ROOM}/Bo'><x xmlns='{NS_MUC_USER}'><item affiliation='member' role='participant'></item></x></presence>"
            ),
            format!(
                "<presence from='{ROOM}/Al'><x xmlns='{NS_MUC_USER}'><item affiliation='member' role='participant'></item><status code='110'></status></x></presence>"
            ),
            format!(
                "<message from='{ROOM}/Bo' id='m1' type='groupchat'><body>hello</body><delay from='{ROOM}' stamp='2023-11-14T22:13:20Z' xmlns='urn:xmpp:delay'></delay></message>"
            ),
            format!(
                "<message from='{ROOM}/Bo' id='s1' type='groupchat'><subject>Topic</subject></message>"
            ),
        ]
    );
    assert_eq!(
        b.index(),
        [
            format!("alice@localhost/laptop: {ROOM}"),
            format!("alice@localhost/phone: {ROOM}"),
        ]
    );
    // The next fork goes to both sessions, in the order they joined.
    let again = b.groupchat("m2", "again");
    assert_eq!(
        again.recipients(),
        ["alice@localhost/phone", "alice@localhost/laptop"]
    );
}

#[test]
fn a_joined_sessions_message_is_sent_from_the_account_and_a_contacts_passes() {
    let b = joined();
    let mine = b.session(
        "phone",
        &format!(
            "st.message{{ to = '{ROOM}', type = 'groupchat', id = 'a1' }}:text_tag('body', 'mine')"
        ),
    );
    assert_eq!((mine.count, mine.handled()), (6, Some(true)));
    assert_eq!(mine.user().as_deref(), Some("alice"));
    assert!(mine.is_nil(2) && mine.is_nil(3) && mine.is_nil(4));
    assert_eq!(mine.flags(), b.flag("send_original"));

    // One-to-one traffic is none of the module's business: nothing at all comes back.
    let chat = b.session(
        "phone",
        "st.message{ to = 'bob@localhost', type = 'chat' }:text_tag('body', 'hi')",
    );
    assert_eq!(chat.count, 0);
}

#[test]
fn a_session_that_ends_leaves_the_index_and_the_forks() {
    let b = joined();
    b.join("laptop", "");
    let ended: MultiValue = b.control.call(("ended", "alice", "laptop")).unwrap();
    assert_eq!(ended.len(), 0);
    assert_eq!(b.index(), [format!("alice@localhost/phone: {ROOM}")]);
    assert_eq!(
        b.groupchat("m2", "again").recipients(),
        ["alice@localhost/phone"]
    );
    // An unknown operation is an error for the shim to log, not a Lua error.
    let bad = Bridge::reply(b.control.call(("nonsense", "alice")).unwrap());
    assert_eq!(bad.count, 2);
    assert!(bad.is_nil(0));
    assert_eq!(
        bad.values[1].to_string().unwrap(),
        "control: unknown operation nonsense"
    );
}

#[test]
fn a_memory_error_while_the_reply_is_made_fails_that_event_only() {
    let b = joined();
    let fault = b.join(
        "tablet",
        ":tag('fault', { xmlns = 'urn:xmpp:minimix:test-fault', kind = 'memory' }):up()",
    );
    assert_eq!(fault.count, 2);
    assert!(fault.is_nil(0));
    assert_eq!(
        fault.values[1].to_string().unwrap(),
        "mod_minimix could not make its reply: not enough memory"
    );
    // The index was not changed by the failed event ...
    assert_eq!(b.index(), [format!("alice@localhost/phone: {ROOM}")]);
    // ... and the next event works (the core is not left borrowed) and brings the index up
    // to date: the core has the tablet in the room.
    let after = b.groupchat("m2", "after");
    assert_eq!((after.count, after.handled()), (6, Some(true)));
    assert_eq!(after.flags(), b.flag("archive"));
    assert_eq!(
        after.recipients(),
        ["alice@localhost/phone", "alice@localhost/tablet"]
    );
    assert_eq!(
        b.index(),
        [
            format!("alice@localhost/phone: {ROOM}"),
            format!("alice@localhost/tablet: {ROOM}"),
        ]
    );
    let stats: Table = match &b.core {
        Value::UserData(core) => core.call_method("stats", ()).unwrap(),
        other => panic!("core: {other:?}"),
    };
    assert_eq!(stats.get::<i64>("joined_sessions").unwrap(), 2);
    assert_eq!(stats.get::<i64>("memberships").unwrap(), 1);
}
