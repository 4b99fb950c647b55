-- luacheck: read globals module
-- Test-only module (spec/helpers/server.lua loads it when a server has s2s): outgoing s2s
-- connections of this host go to fixed loopback ports instead of a DNS lookup.
--
-- Config (global or per host): test_s2s_pins = { ["remote.localhost"] = 45269, ... }.
-- mod_s2s fires "s2sout-pre-connect" on the sending host before it connects; we replace
-- event.resolver with a net.resolvers.manual one. A pinned domain gets the single target
-- tcp4 127.0.0.1:<port>; any other domain gets a resolver with no targets, so the
-- connection fails at once (the stanzas bounce) and no query leaves the machine. Load it
-- on every host that may open s2s: VirtualHosts and components alike.
local ok, manual = pcall(require, "prosody.net.resolvers.manual")
if not ok then manual = require "net.resolvers.manual" end -- Prosody 0.12

local pins = module:get_option("test_s2s_pins", {})

module:hook("s2sout-pre-connect", function(event)
	local to_host = event.session and event.session.to_host
	local port = to_host and pins[to_host]
	if port then
		module:log("info", "s2s to %s pinned to 127.0.0.1:%d", to_host, port)
		event.resolver = manual.new({ { "tcp4", "127.0.0.1", tonumber(port), {} } }, "tcp")
	else
		module:log("warn", "s2s to %s refused: not a test domain", tostring(to_host))
		event.resolver = manual.new({}, "tcp")
	end
end, -1000) -- last, so no other handler's resolver wins
