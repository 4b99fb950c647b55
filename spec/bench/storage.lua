-- The storage's own cost of one archived message, timed inside a real Prosody (through the
-- admin shell), on Prosody's files (internal) and on SQLite: archive:append of a groupchat
-- message as the room sends it, spread over 60 accounts, and the parts of the internal
-- storage's append. This is what any per-account copy costs at the least, whoever makes it
-- (mod_mam for a one-to-one message, mod_minimix for a room's message).
--
--   lua5.4 spec/bench/storage.lua [appends] [rounds] [storages]
--     appends per round (default 2000; SQLite gets a quarter), rounds (default 5, the
--     median is reported), storages (default internal,sqlite)
package.path = "./?.lua;./spec/?.lua;" .. package.path
local Server = require "spec.helpers.server"

local N = tonumber(arg[1]) or 2000
local ROUNDS = tonumber(arg[2]) or 5
local STORAGES = {}
for s in (arg[3] or "internal,sqlite"):gmatch("[^,]+") do STORAGES[#STORAGES + 1] = s end

local OPTIONS = {
	internal = { storage = "internal" },
	sqlite = { storage = { archive = "sql" }, sql = { driver = "SQLite3", database = "archive.sqlite" } },
}

-- Runs inside the server: µs of CPU per call of each timed function (os.clock), medians.
local PROBE = [[
local st = require "prosody.util.stanza"
local time_now = require "prosody.util.time".now
local N, ROUNDS, STORAGE = %d, %d, %q
local store = prosody.hosts.localhost.modules.mam.module:open_store("archive", "archive")
local msg = st.message({ from = "bench@conference.localhost/user7", to = "u1@localhost", type = "groupchat",
	id = "b123" }):text_tag("body", "bmk123")
local function per_call(f, n)
	local times = {}
	for r = 1, ROUNDS do
		collectgarbage()
		local c = os.clock()
		for i = 1, n do f(i) end
		times[r] = (os.clock() - c) / n * 1e6
	end
	table.sort(times)
	return ("%%.1f"):format(times[(ROUNDS + 1) // 2])
end
local out = {}
local n = STORAGE == "sqlite" and math.max(1, N // 4) or N
out[#out + 1] = "append " .. per_call(function(i)
	msg.attr.to = "u" .. (i %% 60) .. "@localhost"
	assert(store:append("u" .. (i %% 60), nil, msg, time_now(), "bench@conference.localhost"))
end, n)
if STORAGE == "internal" then
	local pre = st.preserialize(msg)
	local serialize = require "prosody.util.serialization".serialize
	local dm = require "prosody.util.datamanager"
	local uuid = require "prosody.util.uuid".v7
	out[#out + 1] = "clone+preserialize " .. per_call(function() return st.preserialize(st.clone(msg)) end, N)
	out[#out + 1] = "serialize " .. per_call(function() return serialize(pre) end, N)
	out[#out + 1] = "uuid " .. per_call(function() return uuid() end, N)
	out[#out + 1] = "list_append " .. per_call(function(i)
		return dm.list_append("v" .. (i %% 60), "localhost", "probe", pre)
	end, N)
end
return table.concat(out, ", ")
]]

for _, storage in ipairs(STORAGES) do
	local srv = Server.start{ module = false, log_level = "warn", modules = { "mam" },
		global_options = OPTIONS[storage] }
	local file = srv.dir .. "/probe.lua"
	local f = assert(io.open(file, "w"))
	f:write(PROBE:format(N, ROUNDS, storage))
	f:close()
	local result, out = srv:eval(("dofile(%q)"):format(file))
	srv:destroy()
	if not result or result:match("^Error") then error("the probe failed on " .. storage .. ":\n" .. out) end
	print(("%-8s µs of server CPU per call, medians of %d rounds: %s"):format(storage, ROUNDS, result))
end
