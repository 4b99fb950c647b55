-- luacheck config for mod_minimix: `luacheck spec lua`
std = "lua54"
max_line_length = 120

files["spec/"] = {
	std = "+busted",
}

-- Prosody plugin environment: `module` is the plugin's API object (read-only, except for
-- the callbacks a plugin may define on it) and `prosody` the server's global state.
local module_callbacks = { "load", "unload", "save", "restore", "add_host", "command", "ready" }
local module_fields = {}
for _, name in ipairs(module_callbacks) do
	module_fields[name] = { read_only = false, other_fields = true }
end

files["lua/"] = {
	read_globals = {
		module = { fields = module_fields, other_fields = true },
		prosody = { other_fields = true },
	},
}
