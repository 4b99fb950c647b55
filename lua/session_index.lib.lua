-- The one rule the shim applies without asking the Rust core, for speed: what a session's
-- message or broadcast presence is, given the rooms the session takes part in. The core
-- keeps the session index (`session_rooms[full_jid][room] == true`, see src/bridge/index.rs) and
-- makes the same decision itself; spec/index_spec.lua loads this very file and checks,
-- after every event of a long random sequence, that both agree for every session and room.
--
-- Plain Lua (no Prosody API), so that the shim (module:require "session_index") and the
-- specs (dofile) share it.

local find, sub = string.find, string.sub;

--- What to do with `stanza` from a session that takes part in `rooms` (its index entry, or
--- nil for a session in no room):
---   nil        not the module's at all: Prosody goes on as without it
---   "account"  a message to one of the session's rooms or to an occupant of one: it goes
---              out from the account, so the room sees its occupant
---   "drop"     an error message there: from the account it would make the room kick it
---   "core"     anything else with an address, and a session's broadcast presence while it
---              is in rooms: the core decides
local function decide(rooms, stanza)
	local to, name = stanza.attr.to, stanza.name;
	if name == "message" then
		if not (rooms and to) then return nil; end
		if not rooms[to] then
			local slash = find(to, "/", 1, true);
			if not (slash and rooms[sub(to, 1, slash - 1)]) then return nil; end
		end
		if stanza.attr.type == "error" then return "drop"; end
		return "account";
	end
	if not to then
		-- A broadcast presence concerns the rooms the session is in; nothing else without
		-- an address is the module's.
		if name == "presence" and rooms then return "core"; end
		return nil;
	end
	return "core";
end

return { decide = decide };
