-- Soak test: many sessions of many accounts in many rooms, a steady stream of groupchat
-- messages, and join / leave / disconnect / reconnect churn all the while, against a real
-- Prosody with mod_minimix on loopback. Every session's stream is parsed and every message
-- it gets is checked against when it was joined to that message's room.
--
--   lua5.4 spec/load/soak.lua [full|reduced] [seed]      (make soak: the full run)
--
-- full:    300 sessions of 100 accounts (3 each), 30 rooms (each account in 3, 10 accounts
--          per room), 20,000 messages, churn for at most 240 s.
-- reduced: 30 sessions of 10 accounts, 5 rooms, 2,000 messages (what the busted spec runs).
--
-- How a message is judged for a session. The driver is one thread, so everything it does
-- and sees is ordered by one counter (the clock). Message k is sent by its room's anchor (a
-- session that stays joined throughout) at sent_k and comes back to the anchor at echo_k;
-- the room handed it to the module somewhere in between. A session's join is sent at j_lo
-- and confirmed (self-presence 110) at j_hi; a leave is sent at l_lo and confirmed at l_hi.
-- Before a session is cut off (closed or its TCP connection dropped) and at the end, it
-- pings the server: everything the server wrote to it before the pong has then been read
-- (obs, the ping's send time). So for each interval a session was in a room:
--   must get k exactly once   if j_hi < sent_k and echo_k < (l_lo or obs)
--   may get k at most once    if [sent_k, echo_k] overlaps [j_lo, l_hi or end]
--   must not get k            otherwise
-- Messages whose window straddles a join or leave are the "in transition" ones, allowed
-- either way; every other delivery is exact. History is never asked for (maxstanzas='0').
--
-- The server's RSS and Lua heap are read after setup (the baseline), during the run (peak)
-- and at the end, when the sessions are back in their first shape and the server has run
-- a full garbage collection (through the admin shell).
--
-- As a library (the reduced run in spec/resilience_spec.lua): require "load.soak" gives
-- { run = function(config) -> report, configs = { full = ..., reduced = ... } }.
package.path = "./?.lua;./spec/?.lua;" .. package.path
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local PLUGIN_PATH = os.getenv("MINIMIX_PLUGIN_PATH") ~= "" and os.getenv("MINIMIX_PLUGIN_PATH") or nil
local socket = require "socket"

local Soak = {}

Soak.configs = {
	full = {
		accounts = 100, sessions_per_account = 3, rooms = 30, rooms_per_account = 3,
		messages = 20000, churn_every = 20, churn_seconds = 240, in_flight = 150,
		time_limit = 900, join_chance = 0.6,
	},
	reduced = {
		accounts = 10, sessions_per_account = 3, rooms = 5, rooms_per_account = 2,
		messages = 2000, churn_every = 20, churn_seconds = 40, in_flight = 60,
		time_limit = 55, join_chance = 0.6,
	},
}

local MUC = "conference.localhost"
local NS_DELAY = "urn:xmpp:delay"

local function rss_kib(pid)
	local f = io.open("/proc/" .. pid .. "/status")
	if not f then return nil end
	local text = f:read("a")
	f:close()
	return tonumber(text:match("VmRSS:%s+(%d+)"))
end

-- utime + stime of a process, in seconds.
local function cpu_seconds(pid)
	local f = io.open("/proc/" .. pid .. "/stat")
	if not f then return 0 end
	local rest = f:read("a"):match("%) (.*)$")
	f:close()
	local fields = {}
	for v in rest:gmatch("%S+") do fields[#fields + 1] = v end
	return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

local function bare(jid)
	return jid and jid:match("^[^/]+")
end

function Soak.run(cfg, out)
	out = out or print
	local seed = cfg.seed or 1
	math.randomseed(seed)
	local t_start = socket.gettime()
	local R, A, S = cfg.rooms, cfg.accounts, cfg.sessions_per_account
	assert(A >= R, "every room needs an anchor account")
	local stride = R // cfg.rooms_per_account

	local room_jid, room_index = {}, {}
	for r = 0, R - 1 do
		room_jid[r] = "soak" .. r .. "@" .. MUC
		room_index[room_jid[r]] = r
	end
	local accounts, account_rooms = {}, {}
	for a = 0, A - 1 do
		local user = "u" .. a
		accounts[user] = "pass"
		local rooms = {}
		for k = 0, cfg.rooms_per_account - 1 do rooms[#rooms + 1] = (a + k * stride) % R end
		account_rooms[user] = rooms
	end

	local srv = Server.start{
		module = true,
		plugin_path = PLUGIN_PATH,
		accounts = accounts,
		log_level = "warn",
		muc_options = { muc_room_locking = false },
		start_timeout = 20,
	}
	local idle_rss = rss_kib(srv.pid)

	local clock = 0
	local function tick() clock = clock + 1; return clock end

	local sessions, by_sock = {}, {}   -- every session record ever; live ones by socket
	local slots = {}                    -- [user .. "/" .. index] = current record
	local msgs, room_msgs = {}, {}
	for r = 0, R - 1 do room_msgs[r] = {} end
	local anchor_of = {}                -- room index -> record
	local pings = 0
	local ops = { join = 0, leave = 0, close = 0, drop = 0, reconnect = 0 }
	local problems = {}                 -- protocol-level surprises, reported as failures
	local function problem(text)
		if #problems < 50 then problems[#problems + 1] = text end
		problems.total = (problems.total or 0) + 1
	end

	local function handle(s, el)
		if el.name == "message" and el.attr.type == "groupchat" then
			local body = el:get_child_text("body")
			local k = body and tonumber(body:match("^m(%d+)$"))
			if not k then return end
			local m = msgs[k]
			if not m or room_jid[m.room] ~= bare(el.attr.from) then
				s.foreign = s.foreign + 1
			elseif el:get_child("delay", NS_DELAY) then
				s.history = s.history + 1
			else
				s.recv[k] = (s.recv[k] or 0) + 1
				if s == m.sender and not m.echo then
					m.echo = tick()
					s.in_flight = s.in_flight - 1
				end
			end
		elseif el.name == "presence" then
			local r = room_index[bare(el.attr.from)]
			if not r then return end
			if el.attr.type == "error" then
				s.errors = s.errors + 1
				problem(("%s got an error from %s: %s"):format(s.jid, el.attr.from, tostring(el):sub(1, 300)))
				if s.state[r] == "joining" then
					s.state[r] = "out"
					s.open[r] = nil
				end
				return
			end
			if not Client.muc_status(el)[110] then return end
			if el.attr.type == "unavailable" then
				if s.state[r] == "leaving" then
					s.open[r].l_hi = tick()
					s.open[r] = nil
					s.state[r] = "out"
					s.pending = s.pending - 1
				elseif s.state[r] == "joined" then
					problem(s.jid .. " was removed from " .. room_jid[r])
				end
			elseif s.state[r] == "joining" then
				s.open[r].j_hi = tick()
				s.state[r] = "joined"
				s.pending = s.pending - 1
			end
		elseif el.name == "iq" and el.attr.id == s.barrier_id then
			s.barrier_done = tick()
		end
	end

	local function read(s)
		local c = s.client
		c:_pump(0)
		local inbox = c.inbox
		c.inbox = {}
		if s.observing then
			for i = 1, #inbox do handle(s, inbox[i]) end
		end
		if c.closed and s.alive and not s.cutting then
			problem(s.jid .. " was disconnected by the server"
				.. (c.stream_error and (": " .. tostring(c.stream_error)) or ""))
			s.alive = false
			by_sock[c.sock] = nil
		end
	end

	local function live_socks()
		local socks = {}
		for sock in pairs(by_sock) do socks[#socks + 1] = sock end
		return socks
	end

	local last_rss_at, peak_rss = 0, 0
	local function sample_rss()
		local now = socket.gettime()
		if now - last_rss_at >= 1 then
			last_rss_at = now
			peak_rss = math.max(peak_rss, rss_kib(srv.pid) or 0)
		end
	end

	local function pump(timeout)
		local readable = socket.select(live_socks(), nil, timeout)
		for _, sock in ipairs(readable) do
			local s = by_sock[sock]
			if s then read(s) end
		end
		sample_rss()
	end

	local function new_session(user, index, gen)
		local resource = ("s%d-%d"):format(index, gen)
		local c = Client.connect{ port = srv.port, user = user, resource = resource }
		c.logging = false
		local s = {
			user = user, index = index, gen = gen, client = c, jid = c.jid, alive = true, observing = true,
			state = {}, open = {}, intervals = {}, recv = {}, pending = 0, in_flight = 0,
			foreign = 0, history = 0, errors = 0,
		}
		for _, r in ipairs(account_rooms[user]) do s.state[r] = "out" end
		sessions[#sessions + 1] = s
		by_sock[c.sock] = s
		slots[user .. "/" .. index] = s
		return s
	end

	local function join(s, r)
		local iv = { room = r, j_lo = tick() }
		s.intervals[#s.intervals + 1] = iv
		s.open[r] = iv
		s.state[r] = "joining"
		s.pending = s.pending + 1
		s.client:send(Client.muc_join(room_jid[r] .. "/" .. s.user, { history = { maxstanzas = 0 } }))
		ops.join = ops.join + 1
	end

	local function leave(s, r)
		s.open[r].l_lo = tick()
		s.state[r] = "leaving"
		s.pending = s.pending + 1
		s.client:send(Client.muc_leave(room_jid[r] .. "/" .. s.user))
		ops.leave = ops.leave + 1
	end

	-- Ping the server; once the pong is read, everything sent to the session before it was.
	local function barrier(s)
		pings = pings + 1
		s.barrier_id = "bar" .. pings
		s.barrier_done = nil
		s.barrier_sent = tick()
		s.client:send(Client.stanza.iq({ type = "get", id = s.barrier_id, to = srv.host })
			:tag("ping", { xmlns = "urn:xmpp:ping" }):up())
	end

	local function wait_barriers(list, limit)
		local deadline = socket.gettime() + limit
		while socket.gettime() < deadline do
			local waiting = false
			for _, s in ipairs(list) do
				if s.alive and not s.barrier_done then waiting = true end
			end
			if not waiting then return true end
			pump(0.2)
		end
		return false
	end

	-- End of observation for the session's open intervals (its last barrier); a session
	-- about to be cut off reads nothing more.
	local function close_observation(s, cutting)
		for _, iv in pairs(s.open) do iv.obs = s.barrier_sent end
		if cutting then s.observing = false end
	end

	local function cut(s, how)
		s.cutting = true
		s.cut_at = tick()
		by_sock[s.client.sock] = nil
		s.alive = false
		if how == "close" then
			ops.close = ops.close + 1
			s.client:close()
		else
			ops.drop = ops.drop + 1
			s.client:kill()
		end
	end

	---------------------------------------------------------------------------
	-- Setup: every session connects; anchors join their account's rooms, the others a
	-- random part of them.

	local first_rooms = {} -- slot -> rooms joined at setup (to restore the shape at the end)
	for a = 0, A - 1 do
		local user = "u" .. a
		for i = 1, S do
			local s = new_session(user, i, 0)
			local key = user .. "/" .. i
			first_rooms[key] = {}
			local is_anchor = i == 1 and a < R
			if is_anchor then
				s.anchor = a
				anchor_of[a] = s
			end
			for _, r in ipairs(account_rooms[user]) do
				if is_anchor or math.random() < cfg.join_chance then
					join(s, r)
					first_rooms[key][#first_rooms[key] + 1] = r
				end
			end
			pump(0)
		end
	end
	local function all_settled()
		for _, s in ipairs(sessions) do
			if s.alive and s.pending > 0 then return false end
		end
		return true
	end
	local deadline = socket.gettime() + 60
	while not all_settled() and socket.gettime() < deadline do pump(0.1) end
	assert(all_settled(), "setup: joins not confirmed within 60 s")
	for _ = 1, 5 do pump(0.1) end
	srv:eval("collectgarbage('collect'); collectgarbage('collect')")
	local base_rss = rss_kib(srv.pid)
	local base_heap = tonumber((srv:eval("return math.floor(collectgarbage('count'))")))
	local t_setup = socket.gettime() - t_start
	out(("setup: %d sessions of %d accounts in %d rooms in %.1f s; server RSS %d KiB idle, %d KiB set up, "
		.. "Lua heap %d KiB"):format(#sessions, A, R, t_setup, idle_rss or 0, base_rss or 0, base_heap or 0))

	---------------------------------------------------------------------------
	-- Messages with churn.

	local function pick(list)
		if #list == 0 then return nil end
		return list[math.random(#list)]
	end

	local function churn_once()
		local live, dead = {}, {}
		for _, s in pairs(slots) do
			if not s.anchor then
				if s.alive then
					if not s.cutting and not s.barrier_id then live[#live + 1] = s end
				else
					dead[#dead + 1] = s
				end
			end
		end
		local roll = math.random()
		if roll < 0.15 and #dead > 0 then
			local old = pick(dead)
			ops.reconnect = ops.reconnect + 1
			local s = new_session(old.user, old.index, old.gen + 1)
			for _, r in ipairs(account_rooms[s.user]) do
				if math.random() < cfg.join_chance then join(s, r) end
			end
			return
		end
		local s = pick(live)
		if not s then return end
		if roll < 0.3 then
			if s.pending == 0 and not s.barrier_id then barrier(s) end
			return
		end
		local joined, out_rooms = {}, {}
		for r, state in pairs(s.state) do
			if state == "joined" then joined[#joined + 1] = r end
			if state == "out" then out_rooms[#out_rooms + 1] = r end
		end
		table.sort(joined); table.sort(out_rooms)
		if roll < 0.65 and #joined > 0 then
			leave(s, pick(joined))
		elseif #out_rooms > 0 then
			join(s, pick(out_rooms))
		end
	end

	-- Sessions whose barrier came back are cut off: alternately closed and dropped.
	local cut_count = 0
	local function finish_cuts()
		for _, s in pairs(slots) do
			if s.alive and s.barrier_id and s.barrier_done and not s.cutting then
				if s.pending == 0 then
					close_observation(s, true)
					cut_count = cut_count + 1
					cut(s, cut_count % 2 == 0 and "close" or "drop")
				else
					s.barrier_id = nil -- a join or leave went out meanwhile: try again later
				end
			end
		end
	end

	local t_msgs = socket.gettime()
	local cpu_msgs = cpu_seconds(srv.pid)
	local next_k, echoed_target = 1, cfg.messages
	local churn_until = t_msgs + cfg.churn_seconds
	local hard_deadline = t_start + cfg.time_limit
	local aborted
	while next_k <= echoed_target do
		local progressed = false
		for _ = 1, 10 do
			if next_k > echoed_target then break end
			local r = (next_k - 1) % R
			local sender = anchor_of[r]
			if sender.in_flight >= math.max(1, cfg.in_flight // R) then break end
			local k = next_k
			msgs[k] = { room = r, sender = sender, sent = tick() }
			room_msgs[r][#room_msgs[r] + 1] = k
			sender.in_flight = sender.in_flight + 1
			sender.client:_write(("<message type='groupchat' to='%s' id='m%d'><body>m%d</body></message>")
				:format(room_jid[r], k, k))
			next_k = next_k + 1
			progressed = true
			if k % cfg.churn_every == 0 and socket.gettime() < churn_until then churn_once() end
		end
		finish_cuts()
		pump(progressed and 0 or 0.05)
		if socket.gettime() > hard_deadline then
			aborted = "time limit reached while sending"
			break
		end
	end
	local t_sent = socket.gettime()
	local cpu_sent = cpu_seconds(srv.pid)
	-- Every echo, every join and leave in flight, every barrier.
	local function quiet()
		for k = 1, next_k - 1 do
			if not msgs[k].echo then return false end
		end
		return all_settled()
	end
	deadline = math.min(hard_deadline, socket.gettime() + 60)
	while not quiet() and socket.gettime() < deadline do
		finish_cuts()
		pump(0.1)
	end
	for _, s in pairs(slots) do
		if s.alive and s.barrier_id and not s.barrier_done then s.barrier_id = nil end
	end
	local t_churn_end = socket.gettime()

	-- Final barrier: everything the server wrote to every live session has been read.
	local live = {}
	for _, s in ipairs(sessions) do
		if s.alive and not s.cutting then
			barrier(s)
			live[#live + 1] = s
		end
	end
	if not wait_barriers(live, 30) then problem("final barrier: some pongs never came") end
	for _ = 1, 3 do pump(0.1) end
	for _, s in ipairs(live) do close_observation(s) end

	---------------------------------------------------------------------------
	-- Verdicts.

	local totals = { must = 0, maybe = 0, got = 0, lost = 0, dup = 0, unexpected = 0, foreign = 0,
		history = 0, errors = 0, unechoed = 0 }
	for k = 1, next_k - 1 do
		if not msgs[k].echo then totals.unechoed = totals.unechoed + 1 end
	end
	local passed, failed = 0, 0
	local failures = {}
	local function verdict(ok, what)
		if ok then
			passed = passed + 1
		else
			failed = failed + 1
			if #failures < 20 then failures[#failures + 1] = what end
		end
	end
	for _, s in ipairs(sessions) do
		local must, possible = {}, {}
		for _, iv in ipairs(s.intervals) do
			local stop = iv.l_lo or iv.obs
			local hi = iv.l_hi or s.cut_at or math.huge
			for _, k in ipairs(room_msgs[iv.room]) do
				local m = msgs[k]
				local echo = m.echo or math.huge
				if iv.j_hi and m.sent > iv.j_hi and stop and echo < stop then must[k] = true end
				if echo >= iv.j_lo and m.sent <= hi then possible[k] = true end
			end
		end
		local lost, dup, unexpected, n_must, n_maybe = 0, 0, 0, 0, 0
		for k in pairs(must) do
			n_must = n_must + 1
			if (s.recv[k] or 0) == 0 then lost = lost + 1 end
		end
		for k in pairs(possible) do
			if not must[k] then n_maybe = n_maybe + 1 end
		end
		local got = 0
		for k, n in pairs(s.recv) do
			got = got + n
			if n > 1 then dup = dup + n - 1 end
			if not possible[k] then unexpected = unexpected + n end
		end
		totals.must = totals.must + n_must
		totals.maybe = totals.maybe + n_maybe
		totals.got = totals.got + got
		totals.lost = totals.lost + lost
		totals.dup = totals.dup + dup
		totals.unexpected = totals.unexpected + unexpected
		totals.foreign = totals.foreign + s.foreign
		totals.history = totals.history + s.history
		totals.errors = totals.errors + s.errors
		verdict(lost + dup + unexpected + s.foreign + s.history + s.errors == 0,
			("%s: lost %d, duplicated %d, unexpected %d, foreign %d, history %d, errors %d (of %d due)")
				:format(s.jid, lost, dup, unexpected, s.foreign, s.history, s.errors, n_must))
	end
	verdict(totals.unechoed == 0, ("%d messages never came back to their sender"):format(totals.unechoed))
	verdict(not aborted, aborted or "")
	verdict((problems.total or 0) == 0, ("%d protocol surprises: %s"):format(problems.total or 0,
		table.concat(problems, "; ")))

	---------------------------------------------------------------------------
	-- Back to the first shape (every slot connected, in the rooms it joined at setup),
	-- then memory.

	local restore = {}
	for key, s in pairs(slots) do
		if not s.anchor then
			if s.alive then
				for r, state in pairs(s.state) do
					if state == "joined" then leave(s, r) end
				end
			else
				s = new_session(s.user, s.index, s.gen + 1)
			end
			restore[#restore + 1] = { s = s, rooms = first_rooms[key] }
		end
	end
	deadline = socket.gettime() + 60
	while not all_settled() and socket.gettime() < deadline do pump(0.1) end
	for _, item in ipairs(restore) do
		for _, r in ipairs(item.rooms) do join(item.s, r) end
	end
	deadline = socket.gettime() + 60
	while not all_settled() and socket.gettime() < deadline do pump(0.1) end
	verdict(all_settled(), "restoring the first shape: joins or leaves not confirmed")
	for _ = 1, 5 do pump(0.1) end
	srv:eval("collectgarbage('collect'); collectgarbage('collect')")
	local end_rss = rss_kib(srv.pid)
	local end_heap = tonumber((srv:eval("return math.floor(collectgarbage('count'))")))
	local stats = srv:eval([[local mm = require "prosody.core.modulemanager".get_module("localhost", "minimix"); ]]
		.. [[local s = mm.module.save().core:stats(); return ("memberships %d, joined sessions %d, ]]
		.. [[cached presences %d, cached messages %d, kept %d KiB, pending IQs %d, forked %d, served locally %d")]]
		.. [[:format(s.memberships, s.joined_sessions, s.cached_presences, s.cached_messages, s.kept_bytes // 1024, ]]
		.. [[s.pending_iqs, s.forked, s.joins_served_locally)]])
	-- "Near the baseline": what the run leaves behind is the history the module and the
	-- rooms keep (bounded by their settings), not something that grows with the traffic.
	local rss_growth = end_rss - base_rss
	local heap_growth = end_heap - base_heap
	local rss_limit = math.max(16 * 1024, base_rss // 4)
	local heap_limit = math.max(4 * 1024, base_heap // 10)
	verdict(rss_growth <= rss_limit, ("RSS grew %d KiB (limit %d)"):format(rss_growth, rss_limit))
	verdict(heap_growth <= heap_limit, ("Lua heap grew %d KiB (limit %d)"):format(heap_growth, heap_limit))
	local traces = srv:tracebacks()
	verdict(#traces == 0, "server log errors: " .. table.concat(traces, "\n", 1, math.min(#traces, 10)))

	for _, s in ipairs(sessions) do
		if s.alive then pcall(s.client.close, s.client) end
	end
	srv:destroy()

	local t_end = socket.gettime()
	local report = {
		passed = passed, failed = failed, failures = failures, totals = totals, ops = ops,
		sessions_total = #sessions, messages = next_k - 1,
		seconds = t_end - t_start, message_seconds = t_sent - t_msgs, server_cpu = cpu_sent - cpu_msgs,
		churn_seconds = t_churn_end - t_msgs,
		rss = { idle = idle_rss, base = base_rss, peak = math.max(peak_rss, base_rss), finish = end_rss },
		heap = { base = base_heap, finish = end_heap }, stats = stats,
	}
	out(("messages: %d in %.1f s (%.0f/s, server CPU %.1f s), %d deliveries read; churn: %d joins, %d leaves, "
		.. "%d closes, %d drops, %d reconnects (%d session connections in all)"):format(report.messages,
		report.message_seconds, report.messages / math.max(report.message_seconds, 0.001), report.server_cpu,
		totals.got, ops.join, ops.leave, ops.close, ops.drop, ops.reconnect, #sessions))
	out(("deliveries: %d due and checked exactly, %d in a join/leave transition (either way), lost %d, "
		.. "duplicated %d, unexpected %d, foreign %d, history %d, error presences %d, unechoed %d"):format(
		totals.must, totals.maybe, totals.lost, totals.dup, totals.unexpected, totals.foreign, totals.history,
		totals.errors, totals.unechoed))
	out(("server RSS KiB: idle %d, baseline %d, peak %d, after churn %d (%+d); Lua heap KiB: baseline %d, "
		.. "after %d (%+d)"):format(idle_rss or 0, base_rss, report.rss.peak, end_rss, rss_growth, base_heap,
		end_heap, heap_growth))
	out("module: " .. tostring(stats))
	for _, f in ipairs(failures) do out("FAILED: " .. f) end
	out(("%d passed, %d failed (%.1f s)"):format(passed, failed, report.seconds))
	return report
end

local is_main = arg and arg[0] and arg[0]:match("soak%.lua$") and not package.loaded["busted"]
if is_main then
	local name = arg[1] or "full"
	local cfg = assert(Soak.configs[name], "unknown config " .. name .. " (full, reduced)")
	cfg.seed = tonumber(arg[2]) or 1
	local ok, report = pcall(Soak.run, cfg)
	Server.stop_all()
	if not ok then
		print("soak run failed: " .. tostring(report))
		print("0 passed, 1 failed")
		os.exit(1)
	end
	os.exit(report.failed == 0 and 0 or 1)
end

return Soak
