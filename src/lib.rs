//! mod_minimix: group chats joined per account instead of per client.
//!
//! `host` is the I/O-free core (one `Host` per VirtualHost, its events split by where they
//! come from, one module per concern beside it, and what it hands back in `outcome`).
//! `bridge` is the mlua side (the constructor and the admin methods), with the hot entry
//! points, written against Lua's C API, in `bridge/` (one file per concern). The Lua shim
//! `lua/mod_minimix.lua` registers the Prosody hooks and carries out what the core decides.

pub mod bridge;
pub mod history;
pub mod host;
pub mod iq;
pub mod join;
pub mod membership;
pub mod note;
pub mod occupants;
pub mod outage;
pub mod outcome;
pub mod presence;
pub mod received;
pub mod stanza;
pub mod time;

/// Entry point Lua's `package.loadlib` looks up: `luaopen_minimix`.
#[mlua::lua_module(skip_memory_check)]
fn minimix(lua: &mlua::Lua) -> mlua::Result<mlua::Table> {
    bridge::exports(lua)
}
