-- End-to-end benchmark: the same groupchat load on plain Prosody and on Prosody with
-- mod_minimix (without and with its MAM archive), side by side in one run, alternating,
-- reporting medians and ratios.
--
--   lua5.4 spec/bench/e2e.lua [shape] [runs] [messages] [modes]
--     shape: multi  (20 accounts x 3 sessions in one room; the default)
--            single (200 accounts x 1 session, 50 rooms of 20 accounts each)
--            both
--     modes: comma-separated, default plain,minimix,minimix+archive
--
-- Server CPU is read from /proc/<pid>/stat (utime + stime) around the message phase only;
-- wall time runs from the first message sent until every session has every message.
-- Sessions are counted by scanning the raw stream for the benchmark's body marker, so the
-- client side stays cheap.
package.path = "./?.lua;./spec/?.lua;" .. package.path
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local socket = require "socket"

local st = Client.stanza
local shape_arg = arg[1] or "multi"
local RUNS = tonumber(arg[2]) or 3
local MESSAGES = tonumber(arg[3]) or 2000
local MUC = "conference.localhost"
local CLK_TCK = 100
-- What a typical production VirtualHost loads on top of the harness's base set; the
-- clients enable carbons, as real ones do.
local TYPICAL_MODULES = { "mam", "carbons", "csi_simple", "vcard_legacy", "pep", "bookmarks", "blocklist" }

local function cpu_seconds(pid)
	local f = assert(io.open("/proc/" .. pid .. "/stat"))
	local stat = f:read("*a"); f:close()
	-- Fields after the command name (which is in parentheses and may hold spaces).
	local rest = stat:match("%) (.*)$")
	local fields = {}
	for v in rest:gmatch("%S+") do fields[#fields + 1] = v end
	return (tonumber(fields[12]) + tonumber(fields[13])) / CLK_TCK
end

local function rss_kib(pid)
	for line in io.lines("/proc/" .. pid .. "/status") do
		local v = line:match("^VmRSS:%s+(%d+)")
		if v then return tonumber(v) end
	end
end

-- A session whose stream is scanned for the marker instead of parsed.
local function counter(client)
	return { client = client, sock = client.sock, count = 0, tail = "" }
end

local MARK = "<body>bmk"

local function pump(counters, by_sock, timeout)
	local socks = {}
	for i, c in ipairs(counters) do socks[i] = c.sock end
	local readable = socket.select(socks, nil, timeout)
	for _, s in ipairs(readable) do
		local c = by_sock[s]
		s:settimeout(0)
		local data, err, partial = s:receive(65536)
		data = data or partial
		if data and #data > 0 then
			local chunk = c.tail .. data
			local from = 1
			while true do
				local i = chunk:find(MARK, from, true)
				if not i then break end
				c.count = c.count + 1
				from = i + #MARK
			end
			c.tail = chunk:sub(-(#MARK - 1))
		end
		if err == "closed" then error("a benchmark session was disconnected") end
	end
end

local function accounts_for(names)
	local t = {}
	for _, n in ipairs(names) do t[n] = "pass" end
	return t
end

-- Build the shape on a server: returns { senders = {{client, room}...}, sessions = {...},
-- expected = { [counter] = n } }.
local shapes = {}

-- Modes: plain Prosody; mod_minimix doing the same work (no archive: plain Prosody's
-- mod_mam never archives groupchat); mod_minimix also storing every message in each
-- account's MAM archive (flow 16, on by default when mod_mam is loaded).
local MODES = { "plain", "minimix", "minimix+archive" }
if arg[4] then
	MODES = {}
	for mode in arg[4]:gmatch("[^,]+") do MODES[#MODES + 1] = mode end
end

local function server_for(mode, names)
	return Server.start{
		module = mode ~= "plain", accounts = accounts_for(names), log_level = "warn", modules = TYPICAL_MODULES,
		options = { minimix_archive = mode == "minimix+archive" },
		muc_options = { muc_room_locking = false, max_history_messages = 20 },
	}
end

function shapes.multi(mode)
	local with_module = mode ~= "plain"
	local names = { "sender" }
	for i = 1, 20 do names[#names + 1] = "user" .. i end
	local srv = server_for(mode, names)
	local room = "bench@" .. MUC
	local sender = Client.connect{ port = srv.port, user = "sender", resource = "s" }
	sender:send(Client.muc_join(room .. "/sender", { history = { maxstanzas = 0 } }))
	assert(sender:wait_for(function(el) return Client.muc_status(el)[110] end, 10))
	local sessions = {}
	for i = 1, 20 do
		for r = 1, 3 do
			local c = Client.connect{ port = srv.port, user = "user" .. i, resource = "r" .. r }
			-- Plain MUC: each session is its own occupant (nick per session). With the
			-- module: the account's nick; later sessions are served locally.
			local nick = with_module and ("user" .. i) or ("user" .. i .. "-" .. r)
			c:send(Client.muc_join(room .. "/" .. nick, { history = { maxstanzas = 0 } }))
			assert(c:wait_for(function(el) return Client.muc_status(el)[110] end, 10))
			sessions[#sessions + 1] = c
		end
	end
	return srv, { { client = sender, room = room, count = MESSAGES } }, sessions, function() return MESSAGES end
end

function shapes.single(mode)
	local names = {}
	for i = 1, 200 do names[i] = "user" .. i end
	local srv = server_for(mode, names)
	local sessions, members = {}, {}
	for i = 1, 200 do
		local c = Client.connect{ port = srv.port, user = "user" .. i, resource = "r" }
		sessions[i] = c
		for k = 0, 4 do
			local r = ((i - 1) * 5 + k) % 50 + 1
			local room = "room" .. r .. "@" .. MUC
			c:send(Client.muc_join(room .. "/user" .. i, { history = { maxstanzas = 0 } }))
			assert(c:wait_for(function(el)
				return el.attr.from == room .. "/user" .. i and Client.muc_status(el)[110]
			end, 10))
			members[r] = members[r] or {}
			table.insert(members[r], i)
		end
	end
	local per_room = MESSAGES // 50
	local senders = {}
	for r = 1, 50 do
		senders[r] = { client = sessions[members[r][1]], room = "room" .. r .. "@" .. MUC, count = per_room }
	end
	return srv, senders, sessions, function() return per_room * 5 end
end

local function run_once(shape, mode)
	local srv, senders, sessions, expected_each = shapes[shape](mode)
	local all = {}
	for _, c in ipairs(sessions) do all[#all + 1] = c end
	for _, s in ipairs(senders) do
		local known = false
		for _, c in ipairs(all) do if c == s.client then known = true end end
		if not known then all[#all + 1] = s.client end
	end
	for _, c in ipairs(all) do c:collect(0.05) end
	local counters, by_sock, by_client = {}, {}, {}
	for i, c in ipairs(all) do
		counters[i] = counter(c); by_sock[c.sock] = counters[i]; by_client[c] = counters[i]
	end
	local expected = {}
	for _, c in ipairs(sessions) do expected[by_client[c]] = expected_each() end
	-- The multi shape's sender is not one of the counted sessions but gets reflections.
	for _, s in ipairs(senders) do
		if not expected[by_client[s.client]] then expected[by_client[s.client]] = s.count end
	end

	local cpu0, t0 = cpu_seconds(srv.pid), socket.gettime()
	local rss0 = rss_kib(srv.pid)
	local sent, total = 0, 0
	for _, s in ipairs(senders) do total = total + s.count end
	local progress = {}
	while sent < total do
		for _, s in ipairs(senders) do
			local k = progress[s] or 0
			for _ = 1, 10 do
				if k < s.count then
					k = k + 1; sent = sent + 1
					s.client.sock:settimeout(5)
					s.client.sock:send(tostring(st.message({ to = s.room, type = "groupchat", id = "b" .. sent })
						:text_tag("body", "bmk" .. sent)))
				end
			end
			progress[s] = k
		end
		pump(counters, by_sock, 0)
	end
	local deadline = socket.gettime() + 300
	local function done()
		for c, n in pairs(expected) do if c.count < n then return false end end
		return true
	end
	while not done() and socket.gettime() < deadline do pump(counters, by_sock, 0.5) end
	local wall = socket.gettime() - t0
	local cpu = cpu_seconds(srv.pid) - cpu0
	-- Anything late would be a duplicate: wait a moment and count again.
	local settle = socket.gettime() + 0.5
	while socket.gettime() < settle do pump(counters, by_sock, 0.1) end
	local delivered, lost, dup, want = 0, 0, 0, 0
	for c, n in pairs(expected) do
		want = want + n
		delivered = delivered + math.min(c.count, n)
		if c.count < n then lost = lost + (n - c.count) end
		if c.count > n then dup = dup + (c.count - n) end
	end
	local rss1 = rss_kib(srv.pid)
	srv:stop()
	Server.stop_all()
	return { cpu = cpu, wall = wall, delivered = delivered, lost = lost, dup = dup, want = want,
		rss_growth = rss1 - rss0, messages = total }
end

local function median(list)
	table.sort(list)
	return list[(#list + 1) // 2]
end

local function bench(shape)
	local results = {}
	for _, mode in ipairs(MODES) do results[mode] = {} end
	for i = 1, RUNS do
		for _, mode in ipairs(MODES) do
			local r = run_once(shape, mode)
			table.insert(results[mode], r)
			io.stderr:write(("  run %d %-15s cpu %.2fs wall %.2fs delivered %d/%d lost %d dup %d\n")
				:format(i, mode, r.cpu, r.wall, r.delivered, r.want, r.lost, r.dup))
		end
	end
	local out = {}
	for mode, rs in pairs(results) do
		local cpus, walls, rss, lost, dup = {}, {}, {}, 0, 0
		for _, r in ipairs(rs) do
			cpus[#cpus + 1] = r.cpu; walls[#walls + 1] = r.wall; rss[#rss + 1] = r.rss_growth
			lost = lost + r.lost; dup = dup + r.dup
		end
		out[mode] = { cpu = median(cpus), wall = median(walls), lost = lost, dup = dup,
			delivered = rs[1].delivered, messages = rs[1].messages, rss = median(rss) }
	end
	local p = out.plain
	print(("shape %s: %d messages, %d deliveries per run, medians of %d alternating runs"):format(
		shape, p.messages, p.delivered, RUNS))
	local line = "  %-15s server CPU %7.3f s (%6.3f ms/message)  wall %7.3f s  lost %d  duplicated %d"
		.. "  RSS growth over the messages %d KiB"
	local bad = 0
	for _, mode in ipairs(MODES) do
		local m = out[mode]
		print(line:format(mode, m.cpu, m.cpu * 1000 / m.messages, m.wall, m.lost, m.dup, m.rss))
		bad = bad + m.lost + m.dup
	end
	for _, mode in ipairs(MODES) do
		if mode ~= "plain" then
			local m = out[mode]
			print(("  ratio %s/plain: CPU %.2f  wall %.2f"):format(mode, m.cpu / p.cpu, m.wall / p.wall))
		end
	end
	return bad
end

local bad = 0
if shape_arg == "multi" or shape_arg == "both" then bad = bad + bench("multi") end
if shape_arg == "single" or shape_arg == "both" then bad = bad + bench("single") end
os.exit(bad == 0 and 0 or 1)
