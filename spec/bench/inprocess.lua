-- In-process benchmark: the shim's real hook handlers and the built Rust core, driven by
-- Prosody's own util.stanza objects without a server, against a straightforward pure-Lua
-- implementation of the same paths written for this benchmark. Also measures memory.
--
--   lua5.4 spec/bench/inprocess.lua [options]
--     --iter N     events per path over all rounds (20000)
--     --rounds R   alternating rounds; medians are reported (5; 0: memory only)
--     --gc G       prosody: Lua's collector as Prosody sets it (the default);
--                  lua: Lua 5.4's own defaults
--     --state M    other memberships the server holds while timing (0): each
--                  implementation keeps its own (the pure-Lua one as Lua tables, the
--                  Rust core in its own memory)
--     --time S     seconds each path runs at least, per round and implementation (0.3)
--     --memory M   memberships for the memory measurement (10000; 0 leaves it out)
--
-- Prints nanoseconds per event for each path and the ratio Rust/pure-Lua. Each round
-- runs each implementation in a process of its own (alternating which goes first), so
-- that neither one's heap weighs on the other's garbage collection. Both get the same
-- events through the same hook dispatch.
package.path = "./?.lua;./spec/?.lua;" .. package.path
local Server = require "spec.helpers.server"
local libdir = Server.use_prosody_libraries()
local st = require "util.stanza"

local options = { iter = 20000, rounds = 5, gc = "prosody", state = 0, memory = 10000, time = 0.3, worker = false }
do
	local i = 1
	while arg[i] do
		local key, value = arg[i]:match("^%-%-(%w+)$"), arg[i + 1]
		assert(key and value and options[key] ~= nil, "unknown option " .. tostring(arg[i]))
		options[key] = tonumber(value) or value
		i = i + 2
	end
end
local ITER = options.iter
local HOST = "localhost"
local MUC = "conference.localhost"
local NS_MUC = "http://jabber.org/protocol/muc"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"

local clock = os.clock

-- Prosody's own GC settings (util/startup.lua, default_gc_params: incremental, threshold
-- 105, speed 500): a collection cycle starts once the heap has grown by 5 %. Lua 5.4's
-- own defaults are threshold 200, speed 100.
local GC = options.gc
if GC == "prosody" then
	collectgarbage("incremental", 105, 500)
elseif GC == "lua" then
	collectgarbage("incremental", 200, 100)
else
	error("GC mode: prosody or lua, not " .. GC)
end

-- Prosody's event dispatch, reduced to what the benchmark needs: handlers of an event by
-- priority, the first non-nil answer wins. Both implementations are driven through it.
local function new_dispatch()
	local hooks = {}
	local function hook(event, handler, priority)
		hooks[event] = hooks[event] or {}
		table.insert(hooks[event], { handler = handler, priority = priority or 0 })
		table.sort(hooks[event], function(a, b) return a.priority > b.priority end)
	end
	local function fire(event, data)
		for _, h in ipairs(hooks[event] or {}) do
			local r = h.handler(data)
			if r ~= nil then return r end
		end
	end
	return hook, fire
end

-- What rooms' stanzas come from in Prosody's events (a component session), one object.
local room_origin = { type = "component", host = "conference.localhost" }

---------------------------------------------------------------------------------------
-- A minimal stand-in for Prosody's module environment: enough for the shim to load and
-- register its hooks. Sessions count what they are sent; module:send counts too.

local function load_shim(settings)
	-- The pure-Lua implementation keeps no archive either.
	if settings.minimix_archive == nil then settings.minimix_archive = false end
	local hook, fire = new_dispatch()
	local sent = { n = 0 }
	local full_sessions = {}
	local env_module = {
		host = HOST,
		get_host_type = function() return "local" end,
		get_directory = function() return "build/mod_minimix" end,
		log = function() end,
		hook = function(_, event, handler, priority) hook(event, handler, priority) end,
		send = function(_, stanza) sent.n = sent.n + 1; sent.last = stanza end,
		get_option_integer = function(_, name, default) return settings[name] or default end,
		get_option_array = function(_, name, default) return settings[name] or default end,
		get_option_string = function(_, name, default) return settings[name] or default end,
		open_store = function()
			return { get = function() end, set = function() return true end, users = function() return next, {} end }
		end,
		handle_items = function() end,
		add_timer = function() end,
		hook_global = function() end,
		-- The shim's own libraries as Prosody's module:require loads them. Those of the
		-- admin shell and the archive (which need a running Prosody; the benchmark keeps
		-- no archive) are left out: the shim logs that and goes on without them, and gets
		-- an archive upkeep that is never asked to do anything.
		require = function(_, name)
			if name == "admin" or name == "room_log" or name == "archive_queries" then
				error("no " .. name .. " library in the benchmark")
			elseif name == "archive_upkeep" then
				return { wrap = function(store) return store end, schedule = function() end }
			end
			return assert(loadfile("build/mod_minimix/" .. name .. ".lib.lua"))()
		end,
		get_option_boolean = function(_, name, default)
			if settings[name] == nil then return default end
			return settings[name]
		end,
	}
	-- Prosody's module manager needs a running server: the shim asks it only whether
	-- mod_mam is loaded (for the archive), and here nothing is.
	package.loaded["prosody.core.modulemanager"] = { is_loaded = function() return false end }
	local fake_prosody = { full_sessions = full_sessions, version = "13.0.1", hosts = {},
		started = { next = function() end } }
	local env = setmetatable({ module = env_module, prosody = fake_prosody },
		{ __index = _G })
	local chunk = assert(loadfile("build/mod_minimix/mod_minimix.lua", "t", env))
	chunk()
	return { fire = fire, sessions = full_sessions, sent = sent, env = env }
end

local function new_session(sessions, user, resource)
	local s = { type = "c2s", host = HOST, username = user, resource = resource,
		full_jid = user .. "@" .. HOST .. "/" .. resource, count = 0 }
	s.send = function() s.count = s.count + 1; return true end
	sessions[s.full_jid] = s
	return s
end

local function join_stanza(room, nick)
	return st.presence({ to = room .. "/" .. nick }):tag("x", { xmlns = NS_MUC })
		:tag("history", { xmlns = NS_MUC, maxstanzas = "20" }):up():up()
end

local function occupant_presence(room, nick, to, self)
	local p = st.presence({ from = room .. "/" .. nick, to = to, ["xml:lang"] = "en" })
		:tag("occupant-id", { xmlns = "urn:xmpp:occupant-id:0", id = ("%044d"):format(#nick) }):up()
		:tag("x", { xmlns = NS_MUC_USER })
		:tag("item", { affiliation = "member", role = "participant" }):up()
	if self then p:tag("status", { code = "110" }):up() end
	return p:up()
end

local function groupchat(room, nick, to, i)
	return st.message({ from = room .. "/" .. nick, to = to, type = "groupchat", id = "m" .. i,
		["xml:lang"] = "en" })
		:text_tag("body", "Message number " .. i .. " with a typical sentence of chat in it.")
		:tag("occupant-id", { xmlns = "urn:xmpp:occupant-id:0", id = ("%044d"):format(7) }):up()
end

-- Join `user` to `room` through the shim with `n` sessions and `occupants` other occupants.
local function setup_room(shim, user, room, n, occupants)
	local bare = user .. "@" .. HOST
	local sessions = {}
	for r = 1, n do sessions[r] = new_session(shim.sessions, user, "r" .. r) end
	local first = sessions[1]
	shim.fire("pre-presence/full", { origin = first, stanza = join_stanza(room, user) })
	for k = 1, occupants do
		shim.fire("presence/bare", { origin = {}, stanza = occupant_presence(room, "occ" .. k, bare) })
	end
	shim.fire("presence/bare", { origin = {}, stanza = occupant_presence(room, user, bare, true) })
	for i = 1, 20 do shim.fire("message/bare", { origin = {}, stanza = groupchat(room, "occ1", bare, i) }) end
	shim.fire("message/bare", { origin = {}, stanza = st.message({ from = room, to = bare, type = "groupchat" })
		:tag("subject"):text("Topic"):up() })
	for r = 2, n do
		shim.fire("pre-presence/full", { origin = sessions[r], stanza = join_stanza(room, user) })
	end
	return sessions
end

---------------------------------------------------------------------------------------
-- The pure-Lua implementation of the same paths, written plainly for comparison: a table
-- of memberships per account, each with its joined sessions, cached presences, history.

local PureLua = {}
PureLua.__index = PureLua

-- `send`: what sends a stanza into the network (module:send in a module).
function PureLua.new(sessions, send)
	local self = setmetatable({ accounts = {}, sessions = sessions, send = send }, PureLua)
	-- Hooked as a module would: the same events as the shim, through the same dispatch.
	local hook, fire = new_dispatch()
	hook("message/bare", function(event) return self:room_message(event.stanza) end, 50)
	hook("pre-presence/full", function(event)
		if event.stanza.attr.type == "unavailable" then return self:leave(event.origin, event.stanza) end
		return self:later_join(event.origin, event.stanza)
	end, 0.5)
	hook("pre-message/bare", function(event) return self:outgoing(event.origin, event.stanza) end, 0.5)
	hook("pre-message/full", function(event) return self:outgoing(event.origin, event.stanza) end, 0.5)
	self.fire = fire
	return self
end

function PureLua:membership(user, room)
	local a = self.accounts[user]
	return a and a[room]
end

function PureLua:setup(user, room, n, occupants)
	local m = { joined = {}, presences = {}, history = {}, nick = user }
	self.accounts[user] = self.accounts[user] or {}
	self.accounts[user][room] = m
	local bare = user .. "@" .. HOST
	for r = 1, n do
		new_session(self.sessions, user, "r" .. r)
		m.joined[#m.joined + 1] = bare .. "/r" .. r
	end
	for k = 1, occupants do m.presences["occ" .. k] = occupant_presence(room, "occ" .. k, bare) end
	m.self = occupant_presence(room, user, bare, true)
	for i = 1, 20 do m.history[i] = groupchat(room, "occ1", bare, i) end
	m.subject = st.message({ from = room, type = "groupchat" }):tag("subject"):text("Topic"):up()
end

-- What the room sends to the account: fork to the joined sessions; keep history.
function PureLua:room_message(stanza)
	local node = stanza.attr.to:match("^([^@]+)@")
	local room = stanza.attr.from:match("^[^/]+")
	local m = self:membership(node, room)
	if not m then return end
	if stanza.attr.type == "groupchat" and stanza:get_child("body") then
		local h = m.history
		h[#h + 1] = st.clone(stanza)
		if #h > 20 then table.remove(h, 1) end
	end
	for _, full in ipairs(m.joined) do
		local s = self.sessions[full]
		stanza.attr.to = full
		s.send(stanza)
	end
	return true
end

-- A later join served locally.
function PureLua:later_join(origin, stanza)
	local room = stanza.attr.to:match("^[^/]+")
	local m = self:membership(origin.username, room)
	if not m then return end
	local full = origin.full_jid
	m.joined[#m.joined + 1] = full
	for nick, p in pairs(m.presences) do
		if nick ~= m.nick then
			local c = st.clone(p); c.attr.to = full; origin.send(c)
		end
	end
	local own = st.clone(m.self); own.attr.to = full; origin.send(own)
	for _, h in ipairs(m.history) do
		local c = st.clone(h); c.attr.to = full
		c:tag("delay", { xmlns = "urn:xmpp:delay", from = room, stamp = "2026-11-27T00:00:00Z" }):up()
		origin.send(c)
	end
	local subj = st.clone(m.subject); subj.attr.to = full; origin.send(subj)
	return true
end

-- A session leaves while others stay: it gets the room's answer, made here.
function PureLua:leave(origin, stanza)
	local room = stanza.attr.to:match("^[^/]+")
	local m = self:membership(origin.username, room)
	if not m then return end
	for i, full in ipairs(m.joined) do
		if full == origin.full_jid then table.remove(m.joined, i); break end
	end
	origin.send(st.presence({ from = room .. "/" .. m.nick, to = origin.full_jid, type = "unavailable" })
		:tag("x", { xmlns = NS_MUC_USER })
		:tag("item", { affiliation = "member", role = "none" }):up()
		:tag("status", { code = "110" }):up():up())
	return true
end

-- A joined session's groupchat leaves from the account.
function PureLua:outgoing(origin, stanza)
	local room = stanza.attr.to:match("^[^/]+")
	local m = self:membership(origin.username, room)
	if not m then return end
	stanza.attr.from = origin.username .. "@" .. HOST
	self.send(stanza)
	return true
end

---------------------------------------------------------------------------------------

-- Inputs are made in batches of this many with the clock stopped, so that what the
-- benchmark made in advance never weighs on the heap the collector goes through.
local BATCH = 200

-- ns per call of `f(i, input)` over at least `n` calls and `options.time` seconds of
-- them (a round much shorter than a collection cycle would say little); `make(i)`, if
-- given, makes each call's input beforehand. Returns ns per call and the calls made.
local function time_per(n, f, make)
	collectgarbage("collect")
	local spent, inputs, done = 0, {}, 0
	local batch = math.min(BATCH, n)
	while done < n or spent < options.time do
		local first, last = done + 1, done + batch
		if make then
			for i = first, last do inputs[i - first + 1] = make(i) end
		end
		local t0 = clock()
		for i = first, last do f(i, inputs[i - first + 1]) end
		spent = spent + (clock() - t0)
		done = last
	end
	return spent / done * 1e9, done
end

-- What every path does, for one implementation: `rust` (the shim and the core) or `lua`.
-- Each `setup(impl)` returns `run(i, input)`, `make(i)` (or nil), `check()` and the
-- number of events to time per round.
local ROUNDS = options.rounds

local function per_round(n) return math.max(n // ROUNDS, 1) end

-- An implementation as the paths drive it: `fire`, `sessions` (full JID → session), the
-- number of stanzas sent from the account, and `setup(user, room, n, occupants)`.
local function implementation(impl, shim_options)
	if impl == "rust" then
		local shim = load_shim(shim_options or {})
		return {
			fire = shim.fire, sessions = shim.sessions,
			sent = function() return shim.sent.n end,
			setup = function(user, room, n, occupants) return setup_room(shim, user, room, n, occupants) end,
		}
	end
	local sessions, sent = {}, 0
	local pure = PureLua.new(sessions, function() sent = sent + 1 end)
	return {
		fire = pure.fire, sessions = sessions,
		sent = function() return sent end,
		setup = function(user, room, n, occupants)
			pure:setup(user, room, n, occupants)
			local list = {}
			for r = 1, n do list[r] = sessions[user .. "@" .. HOST .. "/r" .. r] end
			return list
		end,
	}
end

local PATHS = {}

-- 1. A room groupchat message forked to 1, 3 and 10 sessions. A room sends a new stanza
-- for every message: each event gets its own, made with the clock stopped.
for _, n in ipairs{ 1, 3, 10 } do
	PATHS[#PATHS + 1] = { name = ("fork groupchat to %d session(s)"):format(n), setup = function(impl, x)
		local room = "fork" .. n .. "@" .. MUC
		x.setup("alice", room, n, 20)
		local events = per_round(ITER)
		local before = 0
		for _, s in pairs(x.sessions) do before = before + s.count end
		return function(_, stanza) x.fire("message/bare", { origin = room_origin, stanza = stanza }) end,
			function(i) return groupchat(room, "occ2", "alice@" .. HOST, i) end,
			function(done)
				local delivered = 0
				for _, s in pairs(x.sessions) do delivered = delivered + s.count end
				assert(delivered - before == done * n, impl .. " did not deliver every fork")
			end, events
	end }
end

-- 2. A later join served locally in a room with 50 and 500 occupants, and the leave
-- that follows it (so that the next join is a later join again).
for _, occupants in ipairs{ 50, 500 } do
	PATHS[#PATHS + 1] = { name = ("later join and leave, %d occupants"):format(occupants), setup = function(impl, x)
		local room = "big" .. occupants .. "@" .. MUC
		x.setup("alice", room, 1, occupants)
		local joiner = new_session(x.sessions, "alice", "joiner")
		local leave = st.presence({ to = room .. "/alice", type = "unavailable" })
		local events = per_round(math.max(ITER // occupants, 20 * ROUNDS))
		return function()
				x.fire("pre-presence/full", { origin = joiner, stanza = join_stanza(room, "alice") })
				x.fire("pre-presence/full", { origin = joiner, stanza = leave })
			end, nil,
			function(done)
				assert(joiner.count == done * (occupants + 23), impl .. " did not serve the later join in full")
			end, events
	end }
end

-- 3. An outgoing groupchat message from a joined session, rewritten to the account.
PATHS[#PATHS + 1] = { name = "outgoing groupchat rewritten", setup = function(impl, x)
	local room = "out@" .. MUC
	local sessions = x.setup("alice", room, 3, 5)
	local msg = st.message({ to = room, type = "groupchat", id = "x" }):text_tag("body", "hello there")
	local event = { origin = sessions[2], stanza = msg }
	local before = x.sent()
	local events = per_round(ITER)
	return function() x.fire("pre-message/bare", event) end, nil,
		function(done)
			assert(x.sent() - before == done, impl .. " did not send every message from the account")
			assert(msg.attr.from == "alice@" .. HOST)
		end, events
end }

-- 4. A one-to-one chat message from a session that is in a room, to a contact's full
-- JID: neither implementation has anything to do with it.
PATHS[#PATHS + 1] = { name = "one-to-one chat passed on", setup = function(impl, x)
	local sessions = x.setup("alice", "chatter@" .. MUC, 2, 5)
	local msg = st.message({ to = "bob@" .. HOST .. "/pc", type = "chat", id = "c" }):text_tag("body", "hi bob")
	local event = { origin = sessions[2], stanza = msg }
	local before = x.sent()
	return function() assert(x.fire("pre-message/full", event) == nil) end, nil,
		function()
			assert(x.sent() == before, impl .. " sent a one-to-one message from the account")
			assert(msg.attr.from == nil)
		end, per_round(ITER)
end }

-- Other memberships the server holds: 100 accounts in `count` / 100 rooms each, 50
-- occupants and 20 messages kept per room.
local function hold_state(x, count)
	for i = 1, count do
		x.setup("user" .. (i % 100), "state" .. (i // 100) .. "@" .. MUC, 1, 50)
	end
end

-- A worker: one implementation, every path once; prints `path<TAB>ns` lines.
local function worker(impl)
	local x = implementation(impl, { minimix_max_occupants = 1000 })
	hold_state(x, options.state)
	for k, path in ipairs(PATHS) do
		local run, make, check, events = path.setup(impl, x)
		local ns, done = time_per(events, run, make)
		check(done)
		print(("%d\t%.1f"):format(k, ns))
	end
end

local function run_worker(impl)
	local command = ("%s %s --worker %s --iter %d --rounds %d --gc %s --state %d --time %s --memory 0"):format(
		arg[-1], arg[0], impl, ITER, ROUNDS, GC, options.state, options.time)
	local f = assert(io.popen(command))
	local out = {}
	for line in f:lines() do
		local k, ns = line:match("^(%d+)\t([%d.]+)$")
		if k then out[tonumber(k)] = tonumber(ns) end
	end
	assert(f:close(), "the " .. impl .. " worker failed: " .. command)
	assert(#out == #PATHS, "the " .. impl .. " worker reported " .. #out .. " of " .. #PATHS .. " paths")
	return out
end

local function median(list)
	table.sort(list)
	return list[(#list + 1) // 2]
end

-- The driver: alternating rounds, medians.
local function driver()
	print(("in-process, %d events per path in %d rounds, %s, GC settings of %s, %d other memberships held")
		:format(ITER, ROUNDS, _VERSION, GC == "prosody" and "Prosody" or "Lua", options.state))
	print("Prosody libraries from " .. libdir)
	local rs, ls = {}, {}
	for k = 1, #PATHS do rs[k], ls[k] = {}, {} end
	for r = 1, ROUNDS do
		local first, second = "rust", "lua"
		if r % 2 == 0 then first, second = second, first end
		local a, b = run_worker(first), run_worker(second)
		local rust, lua = a, b
		if first == "lua" then rust, lua = b, a end
		for k = 1, #PATHS do
			table.insert(rs[k], rust[k]); table.insert(ls[k], lua[k])
		end
	end
	if os.getenv("BENCH_VERBOSE") then
		for k, path in ipairs(PATHS) do
			local function list(t)
				local out = {}
				for i, v in ipairs(t) do out[i] = ("%.0f"):format(v) end
				return table.concat(out, " ")
			end
			print(path.name, "rust: " .. list(rs[k]), "lua: " .. list(ls[k]))
		end
	end
	for k, path in ipairs(PATHS) do
		local rust, lua = median(rs[k]), median(ls[k])
		print(("%-40s rust %11.0f ns   pure-Lua %11.0f ns   ratio %.2f"):format(path.name, rust, lua, rust / lua))
	end
end

-- Memory: per membership with 50 occupants and the default history (20 messages), and
-- for `--memory` memberships in total, measured as the process's resident size (the Rust
-- heap) plus Lua's own heap, before and after.
local function rss_bytes()
	for line in io.lines("/proc/self/status") do
		local v = line:match("^VmRSS:%s+(%d+)")
		if v then return tonumber(v) * 1024 end
	end
end

local function memory(count)
	local shim = load_shim{}
	collectgarbage("collect"); collectgarbage("collect")
	local rss0, lua0 = rss_bytes(), collectgarbage("count") * 1024
	for i = 1, count do
		-- 1,000 accounts in 10 rooms each, one session each.
		setup_room(shim, "user" .. (i % 1000), "mem" .. (i // 1000) .. "@" .. MUC, 1, 50)
	end
	collectgarbage("collect"); collectgarbage("collect")
	local rss1, lua1 = rss_bytes(), collectgarbage("count") * 1024
	local total = (rss1 - rss0) + (lua1 - lua0)
	print(("memory: %d memberships (50 occupants, 20 messages of history each): %.1f MiB, %.1f KiB per membership")
		:format(count, total / 1048576, total / count / 1024))
	print(("  of which Lua's heap %.1f MiB, the rest of the process (Rust's heap) %.1f MiB")
		:format((lua1 - lua0) / 1048576, (rss1 - rss0) / 1048576))
end

if options.worker then
	worker(options.worker)
else
	if ROUNDS > 0 then driver() end
	if options.memory > 0 then memory(options.memory) end
end
