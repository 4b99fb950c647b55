-- End-to-end benchmark: the same groupchat load on plain Prosody and on Prosody with
-- mod_minimix (without and with its MAM archive), side by side in one run, alternating,
-- reporting medians and ratios; and what the archive costs per stored copy next to what
-- mod_mam itself spends to archive a one-to-one chat message on the same storage.
--
--   lua5.4 spec/bench/e2e.lua [shapes] [runs] [messages] [modes] [storages]
--     shapes: comma-separated, or "both" (multi,single; the default) or "all"
--            multi  20 accounts x 3 sessions in one room (plus the sender's account)
--            single 60 accounts x 1 session in one room (the first account sends)
--            rooms  200 accounts x 1 session, 50 rooms of 20 accounts each
--            fed    the room on another server: 20 accounts x 3 sessions on the home server
--                   (plain or with the module), the room and the sender's account on a
--                   remote plain Prosody, over real s2s on loopback (see below)
--            chat   the floor: 20 accounts send one-to-one chat to 20 others, on plain
--                   Prosody with mod_mam (which stores each message twice, once in each
--                   account's archive) and without it; always modes mam,nomam
--     modes:    comma-separated, default plain,minimix,minimix+archive; base:<mode> runs
--               <mode> with the plugin in $BENCH_BASE_PLUGIN (another version, same run);
--               nostore:minimix+archive stubs the storage's append (stores nothing, one
--               fixed id): the module's own part of an archived copy, without the storage;
--               peraccount:minimix+archive stores one copy per account
--               (minimix_shared_archive = false) instead of one per room message and host
--     storages: comma-separated, default internal: where archives are stored
--               internal (Prosody's files) or sqlite (mod_storage_sql on SQLite3)
--
-- Server CPU is read from /proc/<pid>/stat (utime + stime) around the message phase only;
-- wall time runs from the first message sent until every session has every message.
-- Sessions are counted by scanning the raw stream for the benchmark's body marker, so the
-- client side stays cheap. The cost per archived copy is, per round, (CPU of
-- minimix+archive - CPU of minimix) / (messages x accounts in the room), the median over
-- the rounds; mod_mam's floor is (CPU with mod_mam - CPU without) / (2 x messages).
--
-- The fed shape (issue 13's measurement with the room on another server) runs two Prosody
-- processes joined by Server.federation: home (localhost: the accounts, configured per mode
-- as in multi) and remote (remote.localhost: plain Prosody with the same modules and
-- storage, the MUC conference.remote.localhost with mod_muc_mam, so the room puts its
-- stanza-id in every message as most public MUC services do, and the account "sender").
-- BENCH_FED_MUC_MAM=0 leaves mod_muc_mam out: no stanza-id from the room, and the sender
-- sends no origin-id, so the module matches each account's copy by sender and body.
-- The sender is on the remote server: in the issue's figures the module sends a third of
-- the s2s bytes, 20 account copies instead of 60 session copies (the sender's reflection
-- never crosses); a sender on home would make it 21/61 and add its own c2s work to home.
-- It reports home's CPU (the main figure: the accounts' server, where the module runs), the
-- remote's CPU, both per message and as ratios to plain, and the s2s bytes from remote to
-- home. Those bytes are the kernel's own per-socket TCP counters (tcp_info, read with
-- `ss -ti` before and after the message phase): bytes_acked of the remote's ends of the
-- s2s connections (found by the two servers' s2s listening ports, which no other socket
-- can use), checked against bytes_received of home's ends. That counts exactly the s2s
-- streams' payload (no c2s traffic, no log writes, unlike the process's write counters in
-- /proc/<pid>/io) and needs no proxy between the servers (which would add its own CPU and
-- latency on a 2-core machine). A round whose two counts differ by over 1 % or whose s2s
-- connections changed during the phase is reported and left out of the bytes.
--
-- BENCH_PERF=<mode> records the server with `perf record -g` during that mode's message
-- phase (perf-<shape>-<storage>-<mode>.data in the current directory), for profiling.
package.path = "./?.lua;./spec/?.lua;" .. package.path
local Server = require "spec.helpers.server"
local stream_count = require "spec.bench.stream_count"
local Client = require "spec.helpers.client"
local socket = require "socket"

local st = Client.stanza
local function list_arg(value, default)
	local out = {}
	for item in (value or default):gmatch("[^,]+") do out[#out + 1] = item end
	return out
end
local SHAPE_SETS = { both = "multi,single", all = "multi,single,rooms,fed,chat" }
local SHAPES = list_arg(SHAPE_SETS[arg[1] or "both"] or arg[1], "")
local RUNS = tonumber(arg[2]) or 3
local MESSAGES = tonumber(arg[3]) or 2000
local STORAGES = list_arg(arg[5], "internal")
local MUC = "conference.localhost"
local CLK_TCK = 100
-- What a typical production VirtualHost loads on top of the harness's base set (the
-- benchmark's clients do not enable carbons).
local TYPICAL_MODULES = { "mam", "carbons", "csi_simple", "vcard_legacy", "pep", "bookmarks", "blocklist" }
local WITHOUT_MAM = {}
for _, m in ipairs(TYPICAL_MODULES) do if m ~= "mam" then WITHOUT_MAM[#WITHOUT_MAM + 1] = m end end

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
local counter = stream_count.counter

local MARK = "<body>bmk"

local function pump(counters, by_sock, timeout)
	return stream_count.pump(counters, by_sock, timeout, MARK)
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
-- account's MAM archive (flow 16, on by default when mod_mam is loaded). The chat shape
-- has modes of its own: plain Prosody with (mam) and without mod_mam (nomam).
local MODES = list_arg(arg[4], "plain,minimix,minimix+archive")
local CHAT_MODES = { "nomam", "mam" }

-- Where archives go: the server's `storage` option (memberships stay in files).
local function storage_options(storage)
	if storage == "internal" then return { storage = "internal" } end
	assert(storage == "sqlite", "storage: internal or sqlite, not " .. tostring(storage))
	return { storage = { archive = "sql" }, sql = { driver = "SQLite3", database = "archive.sqlite" } }
end

local current_storage = "internal"

-- A mode named "base:<mode>" runs <mode> with the plugin in $BENCH_BASE_PLUGIN (a folder
-- holding mod_minimix/), to compare two versions of the module in the same run.
local function server_options(mode, names)
	local plugin_path
	mode = mode:gsub("^nostore:", "")
	local per_account = mode:match("^peraccount:") ~= nil
	mode = mode:gsub("^peraccount:", "")
	if mode:match("^base:") then
		plugin_path = assert(os.getenv("BENCH_BASE_PLUGIN"), "base: modes need BENCH_BASE_PLUGIN")
		mode = mode:sub(6)
	end
	local options = { minimix_archive = mode == "minimix+archive", minimix_shared_archive = not per_account }
	return {
		plugin_path = plugin_path,
		module = mode == "minimix" or mode == "minimix+archive", accounts = accounts_for(names), log_level = "warn",
		modules = mode == "nomam" and WITHOUT_MAM or TYPICAL_MODULES,
		options = options, global_options = storage_options(current_storage),
		muc_options = { muc_room_locking = false, max_history_messages = 20 },
	}
end

local function server_for(mode, names)
	return Server.start(server_options(mode, names))
end

-- The sender joins `room`, then 20 accounts x 3 sessions on `srv` (multi and fed): plain
-- MUC makes each session its own occupant (a nick per session); with the module they
-- share the account's nick and later sessions are served locally. Returns the sessions.
local function join_twenty_by_three(srv, sender, room, with_module)
	sender:send(Client.muc_join(room .. "/sender", { history = { maxstanzas = 0 } }))
	assert(sender:wait_for(function(el) return Client.muc_status(el)[110] end, 10))
	local sessions = {}
	for i = 1, 20 do
		for r = 1, 3 do
			local c = Client.connect{ port = srv.port, user = "user" .. i, resource = "r" .. r }
			local nick = with_module and ("user" .. i) or ("user" .. i .. "-" .. r)
			c:send(Client.muc_join(room .. "/" .. nick, { history = { maxstanzas = 0 } }))
			assert(c:wait_for(function(el) return Client.muc_status(el)[110] end, 20))
			sessions[#sessions + 1] = c
		end
	end
	return sessions
end

function shapes.multi(mode)
	local with_module = mode ~= "plain"
	local names = { "sender" }
	for i = 1, 20 do names[#names + 1] = "user" .. i end
	local srv = server_for(mode, names)
	local room = "bench@" .. MUC
	local sender = Client.connect{ port = srv.port, user = "sender", resource = "s" }
	return srv, { { client = sender, room = room, count = MESSAGES } },
		join_twenty_by_three(srv, sender, room, with_module), function() return MESSAGES end
end

-- The room on another server (issue 13's federated measurement): home (localhost) holds
-- the 20 accounts x 3 sessions, plain or with the module as in multi; remote
-- (remote.localhost) is plain Prosody with the MUC conference.remote.localhost (with
-- mod_muc_mam, as most public MUC services have: the room puts its stanza-id in every
-- message) and the sender's account. The two talk over real s2s on loopback.
local REMOTE, REMOTE_MUC = "remote.localhost", "conference.remote.localhost"
function shapes.fed(mode)
	local with_module = mode ~= "plain"
	local names = {}
	for i = 1, 20 do names[i] = "user" .. i end
	local srv, remote = Server.federation{
		home = server_options(mode, names),
		remote = {
			module = false, host = REMOTE, muc_host = REMOTE_MUC, accounts = accounts_for{ "sender" },
			log_level = "warn", modules = TYPICAL_MODULES, global_options = storage_options(current_storage),
			muc_options = { muc_room_locking = false, max_history_messages = 20 },
			muc_modules = os.getenv("BENCH_FED_MUC_MAM") ~= "0" and { "muc_mam" } or {},
		},
	}
	srv.peer = remote
	local room = "bench@" .. REMOTE_MUC
	local sender = Client.connect{ port = remote.port, host = REMOTE, user = "sender", resource = "s" }
	return srv, { { client = sender, room = room, count = MESSAGES } },
		join_twenty_by_three(srv, sender, room, with_module), function() return MESSAGES end
end

-- What went over s2s between home and remote (srv.peer), as the kernel counts it per TCP
-- socket (tcp_info, read with `ss -ti`): payload bytes the remote's ends of the s2s
-- connections (those to home's s2s port and those accepted on its own) sent and home
-- acknowledged (bytes_acked; bytes_sent also counts retransmissions, and a smoke run on
-- this loaded machine showed some on loopback too), and what home's ends received. Both
-- servers' s2s ports are their own listeners, so no other socket matches.
local function s2s_bytes(home, remote)
	local f = assert(io.popen(("ss -tinH state established '( sport = :%d or dport = :%d or sport = :%d or dport = :%d )'")
		:format(home.s2s_port, home.s2s_port, remote.s2s_port, remote.s2s_port)))
	local out = f:read("a")
	f:close()
	local sent, received, sockets, socket_ports = 0, 0, 0, nil
	for line in out:gmatch("[^\n]+") do
		local here, there = line:match("^%S+%s+%S+%s+%S+:(%d+)%s+%S+:(%d+)")
		if here then
			socket_ports = { tonumber(here), tonumber(there) }
		elseif socket_ports then
			local l, p = socket_ports[1], socket_ports[2]
			if l == remote.s2s_port or p == home.s2s_port then
				sent = sent + tonumber(line:match("bytes_acked:(%d+)") or 0)
			elseif l == home.s2s_port or p == remote.s2s_port then
				received = received + tonumber(line:match("bytes_received:(%d+)") or 0)
			end
			sockets = sockets + 1
			socket_ports = nil
		end
	end
	return { sent = sent, received = received, sockets = sockets }
end

-- One room: `accounts` accounts with one session each; the first one sends.
function shapes.single(mode)
	local with_module = mode ~= "plain"
	local names = {}
	for i = 1, 60 do names[i] = "user" .. i end
	local srv = server_for(mode, names)
	local room = "bench@" .. MUC
	local sessions = {}
	for i = 1, 60 do
		local c = Client.connect{ port = srv.port, user = "user" .. i, resource = "r" }
		local nick = with_module and ("user" .. i) or ("user" .. i .. "-r")
		c:send(Client.muc_join(room .. "/" .. nick, { history = { maxstanzas = 0 } }))
		assert(c:wait_for(function(el) return Client.muc_status(el)[110] end, 10))
		sessions[i] = c
	end
	return srv, { { client = sessions[1], room = room, count = MESSAGES } }, sessions, function() return MESSAGES end
end

function shapes.rooms(mode)
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

-- The floor: 20 accounts each send one-to-one chat to one other account (bare JID, one
-- session each); mod_mam, when loaded, stores each message in both accounts' archives.
function shapes.chat(mode)
	local _ = mode
	local names = {}
	for i = 1, 40 do names[i] = "user" .. i end
	local srv = server_for(mode, names)
	local sessions, senders = {}, {}
	for i = 1, 40 do sessions[i] = Client.connect{ port = srv.port, user = "user" .. i, resource = "r" } end
	local per_pair = MESSAGES // 20
	for i = 1, 20 do
		senders[i] = { client = sessions[i], to = "user" .. (i + 20) .. "@localhost", type = "chat", count = per_pair }
	end
	local receivers = {}
	for i = 21, 40 do receivers[#receivers + 1] = sessions[i] end
	return srv, senders, receivers, function() return per_pair end
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
		if s.room and not expected[by_client[s.client]] then expected[by_client[s.client]] = s.count end
	end

	local perf
	if os.getenv("BENCH_PERF") == mode then
		perf = io.popen(("perf record -g -q -o perf-%s-%s-%s.data -p %d 2>/dev/null & echo $!"):format(
			shape, current_storage, mode, srv.pid)):read("l")
		socket.sleep(0.5)
	end
	if mode:match("^nostore:") then
		-- The archive's append replaced by one that stores nothing and returns a fixed id
		-- (for every user of that storage driver on this server: only the module archives
		-- during the message phase). What is left is the module's own part of a copy.
		local res, out = srv:eval([[local s = prosody.hosts.localhost.modules.mam.module:open_store("archive", "archive"); ]]
			.. [[getmetatable(s).__index.append = function() return "nostore-id" end; return "stubbed"]])
		assert(res == "stubbed", "could not stub the archive's append: " .. out)
	end
	local peer = srv.peer
	local s2s0 = peer and s2s_bytes(srv, peer)
	local peer_cpu0 = peer and cpu_seconds(peer.pid)
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
					s.client.sock:send(tostring(st.message({ to = s.to or s.room, type = s.type or "groupchat",
						id = "b" .. sent }):text_tag("body", "bmk" .. sent)))
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
	local peer_cpu, s2s
	if peer then
		peer_cpu = cpu_seconds(peer.pid) - peer_cpu0
		local s2s1 = s2s_bytes(srv, peer)
		s2s = s2s1.sent - s2s0.sent
		-- A connection closed (or opened and closed) during the phase would make the
		-- counts wrong: the remote's ends must have sent what home's ends received.
		local received = s2s1.received - s2s0.received
		if s2s1.sockets ~= s2s0.sockets or math.abs(received - s2s) > 0.01 * s2s then
			io.stderr:write(("  s2s sockets %d -> %d, remote sent %d bytes, home received %d: not counted\n")
				:format(s2s0.sockets, s2s1.sockets, s2s, received))
			s2s = nil
		end
	end
	if perf then
		os.execute("kill -INT " .. perf)
		socket.sleep(2)
	end
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
		rss_growth = rss1 - rss0, messages = total, peer_cpu = peer_cpu, s2s = s2s }
end

local function median(list)
	table.sort(list)
	return list[(#list + 1) // 2]
end

-- Archived copies per message: one per account in the room (the sender's included).
local COPIES = { multi = 21, single = 60, rooms = 20, fed = 20 }

local summary = {}

local function bench(shape)
	local modes = shape == "chat" and CHAT_MODES or MODES
	local results = {}
	for _, mode in ipairs(modes) do results[mode] = {} end
	for i = 1, RUNS do
		for _, mode in ipairs(modes) do
			local r = run_once(shape, mode)
			table.insert(results[mode], r)
			io.stderr:write(("  %s %s run %d %-15s cpu %.2fs wall %.2fs delivered %d/%d lost %d dup %d\n")
				:format(current_storage, shape, i, mode, r.cpu, r.wall, r.delivered, r.want, r.lost, r.dup))
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
	local base = shape == "chat" and "nomam" or "plain"
	local p = out[base]
	print(("storage %s, shape %s: %d messages, %d deliveries per run, medians of %d alternating runs"):format(
		current_storage, shape, p.messages, p.delivered, RUNS))
	local line = "  %-15s server CPU %7.3f s (%6.3f ms/message)  wall %7.3f s  lost %d  duplicated %d"
		.. "  RSS growth over the messages %d KiB"
	local bad = 0
	for _, mode in ipairs(modes) do
		local m = out[mode]
		print(line:format(mode, m.cpu, m.cpu * 1000 / m.messages, m.wall, m.lost, m.dup, m.rss))
		bad = bad + m.lost + m.dup
	end
	local row = { storage = current_storage, shape = shape, ratios = {}, spread = {} }
	for _, mode in ipairs(modes) do
		if mode ~= base then
			local m = out[mode]
			-- The spread of the ratio over the rounds says how noisy the run was.
			local per_round = {}
			for i = 1, RUNS do per_round[i] = results[mode][i].cpu / results[base][i].cpu end
			table.sort(per_round)
			row.ratios[mode] = m.cpu / p.cpu
			row.spread[mode] = { per_round[1], per_round[#per_round] }
			print(("  ratio %s/%s: CPU %.2f (rounds %.2f to %.2f)  wall %.2f"):format(mode, base, m.cpu / p.cpu,
				per_round[1], per_round[#per_round], m.wall / p.wall))
		end
	end
	-- Per stored copy: the paired difference of each round, median over the rounds.
	local function per_copy(with, without, copies)
		local d = {}
		for i = 1, RUNS do d[i] = (results[with][i].cpu - results[without][i].cpu) / copies * 1e6 end
		table.sort(d)
		return median({ table.unpack(d) }), d[1], d[#d]
	end
	if shape == "chat" then
		local us, lo, hi = per_copy("mam", "nomam", 2 * p.messages)
		row.floor = { us, lo, hi }
		print(("  mod_mam per archived one-to-one message (the floor): %.1f µs of server CPU (rounds %.1f to %.1f)")
			:format(us, lo, hi))
	elseif COPIES[shape] then
		for _, prefix in ipairs{ "", "base:", "nostore:", "peraccount:" } do
			local with, without = prefix .. "minimix+archive", prefix .. "minimix"
			if not results[without] then without = "minimix" end
			if results[with] and results[without] then
				local us, lo, hi = per_copy(with, without, COPIES[shape] * p.messages)
				row[prefix .. "per_copy"] = { us, lo, hi }
				print(("  %s per archived copy: %.1f µs of server CPU (rounds %.1f to %.1f; %s - %s), %d copies per message")
					:format(prefix .. "minimix", us, lo, hi, with, without, COPIES[shape]))
			end
		end
	end
	-- The room on another server: the remote server's CPU and the s2s bytes to home, per
	-- message, medians and ratios to plain as for home's CPU.
	if results[base][1].peer_cpu then
		row.peer = {}
		local function values(mode, key)
			local v, n = {}, 0
			for i = 1, RUNS do
				v[i] = results[mode][i][key]
				if v[i] then n = n + 1 end
			end
			return n == RUNS and v or {}
		end
		print("  (server CPU above: the home server's, where the accounts and their sessions are)")
		for _, what in ipairs{ { "peer_cpu", "remote server CPU", 1000, "ms" }, { "s2s", "s2s remote->home", 1, "bytes" } } do
			local key, label, scale, unit = table.unpack(what)
			row.peer[key] = {}
			for _, mode in ipairs(modes) do
				local v = values(mode, key)
				if #v == RUNS then
					local per_message = median({ table.unpack(v) }) * scale / p.messages
					local text = ("  %-15s %s %9.3f %s/message"):format(mode, label, per_message, unit)
					local b = values(base, key)
					if mode ~= base and #b == RUNS then
						local per_round = {}
						for i = 1, RUNS do per_round[i] = v[i] / b[i] end
						table.sort(per_round)
						local ratio = median(v) / median(b)
						row.peer[key][mode] = { ratio, per_round[1], per_round[#per_round] }
						text = text .. ("  ratio to %s %.2f (rounds %.2f to %.2f)"):format(base, ratio, per_round[1],
							per_round[#per_round])
					end
					print(text)
				else
					print(("  %-15s %s: not counted in every round"):format(mode, label))
				end
			end
		end
	end
	summary[#summary + 1] = row
	return bad
end

local bad = 0
for _, storage in ipairs(STORAGES) do
	current_storage = storage
	for _, shape in ipairs(SHAPES) do
		assert(shapes[shape], "no shape " .. shape)
		bad = bad + bench(shape)
	end
end

-- One table for all: ratios to plain Prosody, and the archive's cost per copy next to
-- mod_mam's on the same storage.
print()
print("summary (server CPU; ratio to plain Prosody with the same modules and storage)")
local floors = {}
for _, row in ipairs(summary) do if row.floor then floors[row.storage] = row.floor[1] end end
for _, row in ipairs(summary) do
	if row.shape ~= "chat" then
		local parts = {}
		for _, mode in ipairs(MODES) do
			if row.ratios[mode] then
				parts[#parts + 1] = ("%s %.2f (%.2f-%.2f)"):format(mode, row.ratios[mode], row.spread[mode][1],
					row.spread[mode][2])
			end
		end
		local copy = ""
		for _, prefix in ipairs{ "", "base:", "nostore:", "peraccount:" } do
			local pc = row[prefix .. "per_copy"]
			if pc then
				copy = copy .. ("  %sper archived copy %.1f µs"):format(prefix, pc[1])
				if floors[row.storage] then
					copy = copy .. (" = %.2f x mod_mam's %.1f µs"):format(pc[1] / floors[row.storage], floors[row.storage])
				end
			end
		end
		print(("  %-8s %-6s %s%s"):format(row.storage, row.shape, table.concat(parts, "  "), copy))
		for _, what in ipairs{ { "peer_cpu", "remote server CPU" }, { "s2s", "s2s bytes remote->home" } } do
			local ratios = row.peer and row.peer[what[1]]
			if ratios then
				parts = {}
				for _, mode in ipairs(MODES) do
					local r = ratios[mode]
					if r then parts[#parts + 1] = ("%s %.2f (%.2f-%.2f)"):format(mode, r[1], r[2], r[3]) end
				end
				if #parts > 0 then print(("  %-15s %s: %s"):format("", what[2], table.concat(parts, "  "))) end
			end
		end
	else
		print(("  %-8s %-6s mod_mam per archived one-to-one message %.1f µs (rounds %.1f-%.1f)"):format(row.storage,
			row.shape, row.floor[1], row.floor[2], row.floor[3]))
	end
end
os.exit(bad == 0 and 0 or 1)
