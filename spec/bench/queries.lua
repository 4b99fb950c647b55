-- What the MAM queries clients really send cost with the shared archive, next to the same
-- queries on per-account copies: one real Prosody, two VirtualHosts with mod_mam and the
-- module, per.localhost with `minimix_shared_archive = false` (each account's groupchat in
-- its own archive; mod_mam answers) and shared.localhost with the default (the room's
-- groupchat stored once; the module answers from the account's view), the same traffic on
-- both.
--
--   lua5.4 spec/bench/queries.lua [rounds] [room_messages] [storages]
--     rounds (default 5; medians are reported, after one warm-up round), room_messages
--     (default 2000), storages (comma-separated, default internal,sqlite)
--
-- The traffic: alice and 10 other accounts of each host in one room (one session each),
-- bob (on localhost) says `room_messages` lines there; spread among them, bob sends alice
-- 20 private messages through the room and dave (localhost, a contact) 50 one-to-one chat
-- messages, each to alice on both hosts at the same point of the room's traffic. So alice's
-- archive holds the same messages on both hosts: per.localhost stores 11 copies of each
-- room line (one per account), shared.localhost one.
--
-- The queries, as clients send them, by a fresh session of alice on each host:
--   (a) the newest page, no `with`: RSM <before/>, max 20 (Conversations, Dino on opening)
--   (b) the newest page with `with` = the room's bare JID, max 20
--   (c) catching up: no `with`, `after` = the id of the message 100 from the end, max 50
--   (d) `with` = the contact, the newest page, max 20
--   (e) <metadata/>
--   (f) `with` = an occupant's full JID (room@service/Bob), the newest page, max 20
-- Wall time runs from sending the <iq/> to reading its <iq type=result/> (client side; the
-- result messages before it are parsed on the way); server CPU is the Prosody process's
-- main thread's time on a CPU (/proc/<pid>/schedstat, ns) around each query. In each round
-- every query goes to both hosts, which goes first alternating by round. Each query's
-- answers on both hosts are compared (bodies in order, complete, count): a difference is
-- reported, since then the two would not be doing the same work. The server runs without
-- Nagle's algorithm (`network_settings = { nagle = false }`; BENCH_NAGLE=1 keeps Prosody's
-- default): with it, the last segment of an answer often waited for the client's delayed
-- ACK (40 ms on loopback), at random on either host, which hid the server's own time.
--
-- BENCH_PROFILE=1 then asks each query once more on each host (untimed) with the archive
-- storage's find and get wrapped inside the server (through the admin shell), and on SQL
-- storage every SQL statement too, and prints each call: store, user, the query's fields,
-- the items it gave and the CPU time spent in it (os.clock, the iteration included).
package.path = "./?.lua;./spec/?.lua;" .. package.path
local Server = require "spec.helpers.server"
local stream_count = require "spec.bench.stream_count"
local Client = require "spec.helpers.client"
local mam = require "spec.helpers.mam"
local socket = require "socket"

local st = Client.stanza
local ROUNDS = tonumber(arg[1]) or 5
local ROOM_MESSAGES = tonumber(arg[2]) or 2000
local STORAGES = {}
for s in (arg[3] or "internal,sqlite"):gmatch("[^,]+") do STORAGES[#STORAGES + 1] = s end
local PRIVATE, CHATS, OTHERS = 20, 50, 10

local PER, SHARED = "per.localhost", "shared.localhost"
local HOSTS = { PER, SHARED }
local PREFIX = { [PER] = "P-", [SHARED] = "S-" }
local ROOM = "bench@conference.localhost"
local CONTACT = "dave@localhost"
local NS_MAM = "urn:xmpp:mam:2"

-- The main thread's time on a CPU, in seconds (ns in /proc/<pid>/schedstat).
local function cpu_seconds(pid)
	local f = assert(io.open("/proc/" .. pid .. "/schedstat"))
	local ns = f:read("n")
	f:close()
	return ns / 1e9
end

local function median(list)
	local s = { table.unpack(list) }
	table.sort(s)
	return s[(#s + 1) // 2]
end

---------------------------------------------------------------------------
-- The traffic

-- A session whose stream is scanned for the benchmark's body marker instead of parsed
-- (as in e2e.lua), so the client side stays cheap while the room is busy.
local MARK = "<body>b"
local counter = stream_count.counter

local function pump(counters, by_sock, timeout)
	return stream_count.pump(counters, by_sock, timeout, MARK)
end

local function start(storage)
	local accounts = { alice = "pass" }
	for i = 1, OTHERS do accounts["user" .. i] = "pass" end
	local function vhost(host, options)
		return { host = host, module = true, modules = { "mam" }, options = options, accounts = accounts }
	end
	local global = {}
	for k, v in pairs(mam.storages[storage]) do global[k] = v end
	-- Without Nagle's algorithm: with it, the answer's last segment waits (on loopback) for
	-- the client's delayed ACK, 40 ms, in about half of the queries of either kind at random.
	if not os.getenv("BENCH_NAGLE") then global.network_settings = { nagle = false } end
	return Server.start{
		module = false, log_level = "warn", accounts = { bob = "pass", dave = "pass" },
		vhosts = { vhost(PER, { minimix_shared_archive = false }), vhost(SHARED, {}) },
		global_options = global,
		muc_options = { muc_room_locking = false, max_history_messages = 20 },
	}
end

-- Everyone in the room, then the traffic. Returns the query session of alice per host.
local function traffic(srv)
	local function join(c, nick)
		c:send(Client.muc_join(ROOM .. "/" .. nick, { history = { maxstanzas = 0 } }))
		assert(c:wait_for(function(el)
			return el.attr.from == ROOM .. "/" .. nick and Client.muc_status(el)[110]
		end, 10))
	end
	local bob = Client.connect{ port = srv.port, user = "bob", resource = "pc" }
	local dave = Client.connect{ port = srv.port, user = "dave", resource = "pc" }
	join(bob, "Bob")
	local in_room, alice = { bob }, {}
	for _, h in ipairs(HOSTS) do
		alice[h] = Client.connect{ port = srv.port, host = h, user = "alice", resource = "phone" }
		join(alice[h], PREFIX[h] .. "alice")
		in_room[#in_room + 1] = alice[h]
		for i = 1, OTHERS do
			local c = Client.connect{ port = srv.port, host = h, user = "user" .. i, resource = "pc" }
			join(c, PREFIX[h] .. "user" .. i)
			in_room[#in_room + 1] = c
		end
	end
	for _, c in ipairs(in_room) do c:collect(0.05) end
	dave:collect(0.05)
	local counters, by_sock, alices = {}, {}, {}
	for i, c in ipairs(in_room) do
		counters[i] = counter(c, ROOM_MESSAGES)
		by_sock[c.sock] = counters[i]
	end
	for _, h in ipairs(HOSTS) do
		for _, c in ipairs(counters) do
			if c.client == alice[h] then
				c.want = ROOM_MESSAGES + PRIVATE + CHATS
				alices[#alices + 1] = c
			end
		end
	end
	local function until_delivered(list, n)
		local deadline = socket.gettime() + 120
		local function done()
			for _, c in ipairs(list) do if c.count < (n or c.want) then return false end end
			return true
		end
		while not done() do
			assert(socket.gettime() < deadline, "the traffic was not delivered in time")
			pump(counters, by_sock, 0.5)
		end
	end
	-- Where the private and chat messages go among the room's lines: evenly spread, the
	-- private ones evenly among them.
	local extras, private, chat, total = {}, 0, 0, PRIVATE + CHATS
	for i = 1, total do
		local kind = (i * PRIVATE) // total > ((i - 1) * PRIVATE) // total and "private" or "chat"
		if kind == "private" then private = private + 1 else chat = chat + 1 end
		local at = (i * ROOM_MESSAGES) // (total + 1)
		extras[at] = extras[at] or {}
		table.insert(extras[at], kind)
	end
	local t0 = socket.gettime()
	local sent_extra = 0
	bob.sock:settimeout(5)
	dave.sock:settimeout(5)
	for n = 1, ROOM_MESSAGES do
		bob.sock:send(tostring(st.message({ to = ROOM, type = "groupchat", id = "g" .. n }):text_tag("body", "bg" .. n)))
		for _, kind in ipairs(extras[n] or {}) do
			-- Both alices at the same point of the room's traffic: everything said so far
			-- delivered to both first.
			until_delivered(alices, n + sent_extra)
			sent_extra = sent_extra + 1
			for _, h in ipairs(HOSTS) do
				if kind == "private" then
					bob.sock:send(tostring(st.message({ to = ROOM .. "/" .. PREFIX[h] .. "alice", type = "chat",
						id = "p" .. sent_extra }):text_tag("body", "bp" .. sent_extra)))
				else
					dave.sock:send(tostring(st.message({ to = "alice@" .. h, type = "chat", id = "c" .. sent_extra })
						:text_tag("body", "bc" .. sent_extra)))
				end
			end
			until_delivered(alices, n + sent_extra)
		end
		if n % 10 == 0 then pump(counters, by_sock, 0) end
	end
	until_delivered(counters)
	local wall = socket.gettime() - t0
	for _, c in ipairs(counters) do
		assert(c.count == c.want, ("%s got %d of %d"):format(c.client.jid, c.count, c.want))
	end
	io.stderr:write(("  traffic: %d room lines, %d private, %d chat messages in %.1f s\n"):format(ROOM_MESSAGES,
		private, chat, wall))
	local q = {}
	for _, h in ipairs(HOSTS) do
		q[h] = Client.connect{ port = srv.port, host = h, user = "alice", resource = "query" }
		q[h]:collect(0.2)
	end
	return q
end

---------------------------------------------------------------------------
-- The queries

local QUERIES = {
	{ key = "a", label = "(a) newest page, no with, max 20", o = { before = true, max = 20 } },
	{ key = "b", label = "(b) newest page, with = room, max 20", o = { with = ROOM, before = true, max = 20 } },
	{ key = "c", label = "(c) catch-up: after the 100th newest, max 50", o = { max = 50 } },
	{ key = "d", label = "(d) with = contact, newest page, max 20", o = { with = CONTACT, before = true, max = 20 } },
	{ key = "e", label = "(e) <metadata/>", metadata = true },
	{ key = "f", label = "(f) with = room/Bob, newest page, max 20",
		o = { with = ROOM .. "/Bob", before = true, max = 20 } },
}

-- One query, timed: wall seconds, CPU seconds, and what it answered (for the comparison).
local function run(srv, c, query, after_id)
	local iq, queryid
	if query.metadata then
		iq = mam.metadata_iq(c.bare)
	else
		local o = {}
		for k, v in pairs(query.o) do o[k] = v end
		if query.key == "c" then o.after = after_id end
		iq, queryid = mam.query_iq(c.bare, o)
	end
	local cpu0, t0 = cpu_seconds(srv.pid), socket.gettime()
	local reply = assert(c:iq(iq, 60))
	local wall, cpu = socket.gettime() - t0, cpu_seconds(srv.pid) - cpu0
	assert(reply.attr.type == "result", tostring(reply))
	local answer = {}
	if query.metadata then
		local meta = reply:get_child("metadata", NS_MAM)
		answer[1] = ("start %s end %s"):format(tostring(meta:get_child("start") ~= nil),
			tostring(meta:get_child("end") ~= nil))
	else
		local fin = reply:get_child("fin", NS_MAM)
		local set = fin:get_child("set", "http://jabber.org/protocol/rsm")
		for _, el in ipairs(c.inbox) do
			local r = el.name == "message" and el:get_child("result", NS_MAM)
			if r and r.attr.queryid == queryid then
				answer[#answer + 1] = r:find("{urn:xmpp:forward:0}forwarded/{jabber:client}message/body#") or "?"
			end
		end
		answer[#answer + 1] = ("complete=%s count=%s"):format(tostring(fin.attr.complete),
			tostring(set and set:get_child_text("count")))
	end
	c.inbox = {}
	return wall, cpu, table.concat(answer, " "), #answer - 1
end


---------------------------------------------------------------------------
-- Profiling (BENCH_PROFILE)

-- Runs inside the server: wraps the archive storage class's find and get (each top-level
-- call recorded with its CPU time, the iteration of what it returns included) and, on SQL
-- storage, the SQL engine's select; prosody.minimix_bench_calls holds the records.
local PROBE = [[
local sm = require "prosody.core.storagemanager"
local calls = {}
prosody.minimix_bench_calls = calls
local depth = 0
local function describe(q)
	local parts = {}
	for _, k in ipairs({ "with", "start", "end", "after", "before", "key", "limit", "total", "reverse" }) do
		local v = q and q[k]
		if v ~= nil then parts[#parts + 1] = k .. "=" .. tostring(v) end
	end
	if q and q.ids then parts[#parts + 1] = "ids=" .. #q.ids end
	return table.concat(parts, " ")
end
local function wrap(cls, name)
	local orig = cls[name]
	cls[name] = function(self, user, q)
		if depth > 0 then return orig(self, user, q) end
		local rec = { what = name, store = self.store, user = user, q = name == "find" and describe(q) or tostring(q),
			t = 0, n = 0 }
		calls[#calls + 1] = rec
		depth = depth + 1
		local c = os.clock()
		local r = table.pack(pcall(orig, self, user, q))
		depth = depth - 1
		rec.t = os.clock() - c
		if not r[1] then error(r[2], 0) end
		if name == "find" and type(r[2]) == "function" then
			local it = r[2]
			r[2] = function(...)
				local c2 = os.clock()
				local out = table.pack(it(...))
				rec.t = rec.t + os.clock() - c2
				if out[1] ~= nil then rec.n = rec.n + 1 end
				return table.unpack(out, 1, out.n)
			end
		end
		return table.unpack(r, 2, r.n)
	end
end
-- (Each host loads its own storage module: a class per host.)
for _, h in ipairs({ "per.localhost", "shared.localhost" }) do
	local cls = getmetatable(sm.get_driver(h, "archive"):open("archive", "archive")).__index
	wrap(cls, "find")
	wrap(cls, "get")
end
local ok, sql = pcall(require, "prosody.util.sql")
if ok and %s then
	local engine = getmetatable(sql:create_engine({ driver = "SQLite3", database = ":memory:" })).__index
	local select = engine.select
	engine.select = function(self, text, ...)
		local rec = { what = "  sql", store = "", user = "", q = (text:gsub("%%s+", " ")), t = 0, n = 0 }
		local c = os.clock()
		local out = table.pack(select(self, text, ...))
		rec.t = os.clock() - c
		calls[#calls + 1] = rec
		return table.unpack(out, 1, out.n)
	end
end
return "wrapped"
]]

-- What the probe recorded since the last call, one line per call, and cleared.
local REPORT = [[
local calls = prosody.minimix_bench_calls
local out = {}
for i, r in ipairs(calls) do
	out[i] = r.what == "  sql" and ("  sql [%%s] %%.2f ms"):format(r.q, r.t * 1000)
		or ("%%s %%s %%s [%%s] %%d items %%.2f ms"):format(r.what, r.store, r.user, r.q, r.n, r.t * 1000)
	calls[i] = nil
end
return table.concat(out, " | ")
]]

-- The <metadata/> handler fired inside the server `n` times in a row (no network; the
-- answer is sent to a stand-in session): CPU ms per call, and the share of it spent in the
-- storage's find and get.
local LOOP = [[
local st = require "prosody.util.stanza"
local h, n = %q, %d
local calls = prosody.minimix_bench_calls
local origin = { username = "alice", host = h, full_jid = "alice@" .. h .. "/loop", type = "c2s",
	send = function() end }
local iq = st.iq({ type = "get", to = "alice@" .. h, from = origin.full_jid, id = "loop" })
	:tag("metadata", { xmlns = "urn:xmpp:mam:2" }):up()
local events = prosody.hosts[h].events
for i = #calls, 1, -1 do calls[i] = nil end
collectgarbage()
local c = os.clock()
for _ = 1, n do events.fire_event("iq-get/self/urn:xmpp:mam:2:metadata", { origin = origin, stanza = iq }) end
local total = os.clock() - c
local in_storage = 0
for i, r in ipairs(calls) do
	if r.what ~= "  sql" then in_storage = in_storage + r.t end
	calls[i] = nil
end
return ("%%.2f ms per call, %%.2f ms of it in the storage's find/get"):format(total / n * 1000,
	in_storage / n * 1000)
]]

local function profile(srv, storage, q, after_id)
	local file = srv.dir .. "/probe.lua"
	local f = assert(io.open(file, "w"))
	f:write(PROBE:format(tostring(storage == "sqlite")))
	f:close()
	local report_file = srv.dir .. "/report.lua"
	f = assert(io.open(report_file, "w"))
	f:write(REPORT:format())
	f:close()
	local result, out = srv:eval(("dofile(%q)"):format(file))
	assert(result == "wrapped", "could not wrap the storage: " .. out)
	for _, h in ipairs(HOSTS) do
		local loop_file = srv.dir .. "/loop.lua"
		f = assert(io.open(loop_file, "w"))
		f:write(LOOP:format(h, 50))
		f:close()
		local res, loop_out = srv:eval(("dofile(%q)"):format(loop_file))
		print(("storage %s, <metadata/> handler on %s, 50 calls in a loop: %s"):format(storage, h,
			res or loop_out))
	end
	print(("storage %s, storage calls per query (BENCH_PROFILE; CPU ms inside the server):"):format(storage))
	for _, query in ipairs(QUERIES) do
		for _, h in ipairs(HOSTS) do
			srv:eval(("dofile(%q)"):format(report_file))
			run(srv, q[h], query, after_id[h])
			local report = srv:eval(("dofile(%q)"):format(report_file)) or "?"
			print(("  %s %s:"):format(query.label, h))
			for call in report:gmatch("[^|]+") do print("    " .. call:gsub("^ (.-)%s*$", "%1")) end
		end
	end
end

local function bench(storage)
	local srv = start(storage)
	local q = traffic(srv)
	-- (c)'s id: the 100th newest item of each account's own archive.
	local after_id = {}
	for _, h in ipairs(HOSTS) do
		local page1 = mam.query(q[h], { before = true, max = 50 })
		local page2 = mam.query(q[h], { before = page1.first, max = 50 })
		assert(#page2.results == 50, "fewer than 100 items in the archive of alice@" .. h)
		after_id[h] = page2.results[1].id
	end
	local times = {}
	for _, query in ipairs(QUERIES) do
		times[query.key] = {}
		for _, h in ipairs(HOSTS) do times[query.key][h] = { wall = {}, cpu = {} } end
	end
	local differ = {}
	for round = 0, ROUNDS do
		for _, query in ipairs(QUERIES) do
			local order = round % 2 == 0 and { PER, SHARED } or { SHARED, PER }
			local answers, results = {}, 0
			for _, h in ipairs(order) do
				local wall, cpu, answer, n = run(srv, q[h], query, after_id[h])
				answers[h], results = answer, n
				-- Round 0 warms up (the first query of each kind opens files and fills caches).
				if round > 0 then
					table.insert(times[query.key][h].wall, wall)
					table.insert(times[query.key][h].cpu, cpu)
				end
				io.stderr:write(("  %s round %d %-48s %-16s %7.2f ms wall %7.2f ms CPU %d results\n"):format(storage,
					round, query.label, h, wall * 1000, cpu * 1000, n))
			end
			times[query.key].results = results
			if answers[PER] ~= answers[SHARED] then
				differ[query.key] = ("per-account: %s\n    shared: %s"):format(answers[PER], answers[SHARED])
			end
		end
	end
	if os.getenv("BENCH_PROFILE") then profile(srv, storage, q, after_id) end
	srv:destroy()

	print(("storage %s: %d room lines (11 accounts of each host in the room), %d private and %d chat messages;"
		.. " medians of %d rounds"):format(storage, ROOM_MESSAGES, PRIVATE, CHATS, ROUNDS))
	print(("  %-48s %9s %11s %6s   %9s %11s %6s  %s"):format("query", "shared", "per-account", "ratio",
		"CPU shared", "per-account", "ratio", "results"))
	local bad = 0
	for _, query in ipairs(QUERIES) do
		local t = times[query.key]
		local ws, wp = median(t[SHARED].wall) * 1000, median(t[PER].wall) * 1000
		local cs, cp = median(t[SHARED].cpu) * 1000, median(t[PER].cpu) * 1000
		print(("  %-48s %6.2f ms %8.2f ms %6.2f   %6.2f ms %8.2f ms %6.2f  %d"):format(query.label, ws, wp, ws / wp,
			cs, cp, cs / cp, t.results))
		if differ[query.key] then
			bad = bad + 1
			print("    the answers differ: per-account: " .. differ[query.key])
		end
	end
	return bad
end

local bad = 0
for _, storage in ipairs(STORAGES) do
	assert(mam.storages[storage], "storage: internal or sqlite, not " .. storage)
	bad = bad + bench(storage)
end
os.exit(bad == 0 and 0 or 1)
