-- LuaRocks spec for mod_minimix: builds the Rust core with cargo (through the Makefile's
-- rock-build target) and installs the module as
--   <tree>/share/lua/<5.x>/mod_minimix/{mod_minimix.lua, *.lib.lua, minimix.so}
-- which is where Prosody's plugin loader looks in a luarocks tree: the tree given to
-- `prosodyctl install` (its installer_plugin_path), or any tree listed in plugin_paths.
--
--   luarocks --lua-version=5.4 make --tree /some/tree     from a checkout
--   prosodyctl install mod_minimix-scm-1.<arch>.rock      a published (binary) rock
--
-- Building needs cargo (Rust 1.85 or later) and the headers of the Lua that Prosody runs.
rockspec_format = "3.0"
package = "mod_minimix"
version = "scm-1"

source = {
	-- The published repository; `luarocks make` from a checkout does not fetch it.
	url = "git+https://example.org/mod_minimix.git",
}

description = {
	summary = "Prosody module: group chats joined per account, forked to the account's sessions",
	detailed = [[
Each client session speaks plain XEP-0045 MUC; only the account's bare JID joins the room.
mod_minimix tracks which sessions joined which rooms and forks room traffic to exactly
those sessions. For Prosody 13 and trunk. The core is written in Rust (minimix.so).
]],
	license = "MIT",
	labels = { "prosody", "xmpp", "muc" },
}

dependencies = {
	"lua >= 5.2, < 5.5",
}

build = {
	type = "make",
	build_target = "rock-build",
	build_variables = {
		LUA = "$(LUA)",
		CFLAGS = "$(CFLAGS)",
	},
	install_target = "rock-install",
	install_variables = {
		LUADIR = "$(LUADIR)",
	},
	copy_directories = {},
}
