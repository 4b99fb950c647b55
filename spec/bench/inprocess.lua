-- In-process benchmark: the shim's real hook handlers and the built Rust core, driven by
-- Prosody's own util.stanza objects without a server, against a straightforward pure-Lua
-- implementation of the same paths written for this benchmark. Also measures memory.
--
--   lua5.4 spec/bench/inprocess.lua [iterations]
--
-- Prints nanoseconds per event for each path and the ratio Rust/pure-Lua.
package.path = "./?.lua;./spec/?.lua;" .. package.path
local Server = require "spec.helpers.server"
local libdir = Server.prosody_lib_dir()
package.path = libdir .. "/?.lua;" .. package.path
package.cpath = libdir .. "/?.so;" .. package.cpath
pcall(require, "loader")
local st = require "util.stanza"

local ITER = tonumber(arg[1]) or 20000
local HOST = "localhost"
local MUC = "conference.localhost"
local NS_MUC = "http://jabber.org/protocol/muc"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"

local clock = os.clock

---------------------------------------------------------------------------------------
-- A minimal stand-in for Prosody's module environment: enough for the shim to load and
-- register its hooks. Sessions count what they are sent; module:send counts too.

local function load_shim(options)
	-- The pure-Lua implementation keeps no archive either.
	if options.minimix_archive == nil then options.minimix_archive = false end
	local hooks, sent = {}, { n = 0 }
	local full_sessions = {}
	local env_module = {
		host = HOST,
		get_host_type = function() return "local" end,
		get_directory = function() return "build/mod_minimix" end,
		log = function() end,
		hook = function(_, event, handler, priority)
			hooks[event] = hooks[event] or {}
			table.insert(hooks[event], { handler = handler, priority = priority or 0 })
		end,
		send = function(_, stanza) sent.n = sent.n + 1; sent.last = stanza end,
		get_option_integer = function(_, name, default) return options[name] or default end,
		get_option_array = function(_, name, default) return options[name] or default end,
		get_option_string = function(_, name, default) return options[name] or default end,
		open_store = function()
			return { get = function() end, set = function() return true end, users = function() return next, {} end }
		end,
		handle_items = function() end,
		add_timer = function() end,
		require = function() error("no admin library in the benchmark") end,
		get_option_boolean = function(_, name, default)
			if options[name] == nil then return default end
			return options[name]
		end,
	}
	local fake_prosody = { full_sessions = full_sessions, version = "13.0.1",
		started = { next = function() end } }
	local env = setmetatable({ module = env_module, prosody = fake_prosody },
		{ __index = _G })
	local chunk = assert(loadfile("build/mod_minimix/mod_minimix.lua", "t", env))
	chunk()
	local function fire(event, data)
		for _, h in ipairs(hooks[event]) do
			local r = h.handler(data)
			if r ~= nil then return r end
		end
	end
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

function PureLua.new(sessions) return setmetatable({ accounts = {}, sessions = sessions }, PureLua) end

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

-- A joined session's groupchat leaves from the account.
function PureLua:outgoing(origin, stanza, send)
	local room = stanza.attr.to:match("^[^/]+")
	local m = self:membership(origin.username, room)
	if not m then return end
	stanza.attr.from = origin.username .. "@" .. HOST
	send(stanza)
	return true
end

---------------------------------------------------------------------------------------

local function time_per(n, f)
	collectgarbage("collect")
	local t0 = clock()
	for i = 1, n do f(i) end
	return (clock() - t0) / n * 1e9
end

local ROUNDS = 5

-- The machine is noisy: time both implementations in alternating rounds and keep each
-- one's median. `rust(i)` and `lua(i)` get iteration numbers that never repeat.
local function compare(n, rust, lua)
	local rs, ls = {}, {}
	local per = math.max(n // ROUNDS, 1)
	for r = 0, ROUNDS - 1 do
		rs[#rs + 1] = time_per(per, function(i) rust(r * per + i) end)
		ls[#ls + 1] = time_per(per, function(i) lua(r * per + i) end)
	end
	table.sort(rs); table.sort(ls)
	return rs[(ROUNDS + 1) // 2], ls[(ROUNDS + 1) // 2]
end

local results = {}
local function report(name, rust_ns, lua_ns)
	results[#results + 1] = { name, rust_ns, lua_ns }
	print(("%-44s rust %9.0f ns   pure-Lua %9.0f ns   ratio %.2f"):format(name, rust_ns, lua_ns, rust_ns / lua_ns))
end

print(("in-process, %d iterations per path, lua %s, Prosody libraries from %s"):format(ITER, _VERSION, libdir))

-- 1. Fork a room groupchat message to 1, 3 and 10 sessions.
for _, n in ipairs{ 1, 3, 10 } do
	local shim = load_shim{}
	local room = "fork" .. n .. "@" .. MUC
	setup_room(shim, "alice", room, n, 20)
	local pure_sessions = {}
	local pure = PureLua.new(pure_sessions)
	pure:setup("alice", room, n, 20)
	-- A room sends a new stanza for every message: each iteration gets its own, made
	-- before the clock starts, for both implementations.
	local function messages()
		local list = {}
		for i = 1, ITER do list[i] = groupchat(room, "occ2", "alice@" .. HOST, i) end
		return list
	end
	local for_rust, for_lua = messages(), messages()
	local rust, lua = compare(ITER,
		function(i) shim.fire("message/bare", { origin = {}, stanza = for_rust[i] }) end,
		function(i) pure:room_message(for_lua[i]) end)
	local delivered = 0
	for _, s in pairs(shim.sessions) do delivered = delivered + s.count end
	assert(delivered >= (ITER // ROUNDS) * ROUNDS * n, "the shim did not deliver every fork")
	report(("fork groupchat to %d session(s)"):format(n), rust, lua)
end

-- 2. A later join served locally in a room with 50 and 500 occupants.
for _, occupants in ipairs{ 50, 500 } do
	local shim = load_shim{ minimix_max_occupants = 1000 }
	local room = "big" .. occupants .. "@" .. MUC
	local sessions = setup_room(shim, "alice", room, 1, occupants)
	local joiner = new_session(shim.sessions, "alice", "joiner")
	local pure_sessions = {}
	local pure = PureLua.new(pure_sessions)
	pure:setup("alice", room, 1, occupants)
	local pure_joiner = new_session(pure_sessions, "alice", "joiner")
	local leave = st.presence({ to = room .. "/alice", type = "unavailable" })
	local n = math.max(ITER // occupants, 5 * ROUNDS)
	local rust, lua = compare(n, function()
		shim.fire("pre-presence/full", { origin = joiner, stanza = join_stanza(room, "alice") })
		shim.fire("pre-presence/full", { origin = joiner, stanza = leave })
	end, function()
		pure:later_join(pure_joiner, join_stanza(room, "alice"))
	end)
	assert(joiner.count >= (n // ROUNDS) * ROUNDS * (occupants + 22), "the later join was not served in full")
	assert(sessions[1].count > 0)
	report(("later join, %d occupants (join+leave vs join)"):format(occupants), rust, lua)
end

-- 3. An outgoing groupchat message from a joined session, rewritten to the account.
do
	local shim = load_shim{}
	local room = "out@" .. MUC
	local sessions = setup_room(shim, "alice", room, 3, 5)
	local pure = PureLua.new({})
	pure:setup("alice", room, 3, 5)
	local msg = st.message({ to = room, type = "groupchat", id = "x" }):text_tag("body", "hello there")
	local event = { origin = sessions[2], stanza = msg }
	local before = shim.sent.n
	local count = 0
	local rust, lua = compare(ITER, function() shim.fire("pre-message/bare", event) end,
		function() pure:outgoing(sessions[2], msg, function() count = count + 1 end) end)
	assert(shim.sent.n - before == (ITER // ROUNDS) * ROUNDS, "the shim did not send every message from the account")
	report("outgoing groupchat rewritten", rust, lua)
end

-- 4. Memory: per membership with 50 occupants and the default history (20 messages),
-- and for 10,000 memberships in total, measured as the process's resident size (the
-- Rust heap) plus Lua's own heap, before and after.
local function rss_bytes()
	for line in io.lines("/proc/self/status") do
		local v = line:match("^VmRSS:%s+(%d+)")
		if v then return tonumber(v) * 1024 end
	end
end
do
	local shim = load_shim{}
	local count = tonumber(os.getenv("MEMBERSHIPS")) or 10000
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
end
