-- The admin side of mod_minimix (issue 6) against real Prosody servers: the shell commands
-- minimix:memberships/room/leave, the metrics served by mod_http_openmetrics, and the
-- install paths (luarocks make into a tree listed in plugin_paths; prosodyctl install of a
-- packed rock). The install tests need luarocks (scripts/install-deps.sh installs it).
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local socket = require "socket"
local metrics = require "spec.helpers.metrics"
local st = Client.stanza

local MUC = "conference.localhost"

---------------------------------------------------------------------------
-- Helpers

local function sh_quote(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- Run a shell command; output (stdout+stderr) and whether it exited 0.
local function run(cmd)
	local f = assert(io.popen(cmd .. " 2>&1", "r"))
	local out = f:read("a")
	local ok = f:close()
	return out, ok == true
end

local function repo_root()
	local src = debug.getinfo(1, "S").source:gsub("^@", "")
	if src:sub(1, 1) ~= "/" then src = (run("pwd"):gsub("%s+$", "")) .. "/" .. src end
	return (run("readlink -f " .. sh_quote(src:match("^(.*)/[^/]*$") .. "/..")):gsub("%s+$", ""))
end

local function tempdir()
	local dir = run("mktemp -d /tmp/minimix-admin.XXXXXX"):gsub("%s+$", "")
	assert(dir:match("^/tmp/minimix%-admin%."), dir)
	return dir
end

local temp_dirs = {}
local function scratch()
	local dir = tempdir()
	temp_dirs[#temp_dirs + 1] = dir
	return dir
end

local function remove_scratch()
	if os.getenv("MINIMIX_KEEP_TMP") then return end
	for _, dir in ipairs(temp_dirs) do os.execute("rm -rf " .. sh_quote(dir)) end
	temp_dirs = {}
end

local open_clients = {}

local function connect(srv, user, resource)
	local c = Client.connect{ port = srv.port, user = user, resource = resource }
	open_clients[#open_clients + 1] = c
	return c
end

local function close_all()
	for _, c in ipairs(open_clients) do
		if not c.closed then pcall(c.close, c) end
	end
	open_clients = {}
end

local count = muc.count
local self_presence = muc.self_presence

local function settle(...)
	Client.collect_all({ ... })
end

--- Join `room` as `nick` from client `c` and wait for the self-presence.
local function join(c, room, nick)
	c:send(Client.muc_join(room .. "/" .. nick))
	assert(c:wait_for(self_presence(room, nil)), c.jid .. " did not get into " .. room)
end

--- The output lines of a shell command that mention `text` (plain).
local function lines_with(out, text)
	local found = {}
	for line in out:gmatch("[^\n]+") do
		if line:find(text, 1, true) then found[#found + 1] = line end
	end
	return found
end

local function shell_ok(srv, cmd)
	local out, ok = srv:shell(cmd)
	assert.is_true(ok, cmd .. " failed:\n" .. out)
	return out
end

local metric, scrape = metrics.metric, metrics.scrape

--- The file mod_minimix was loaded from on `srv`'s VirtualHost.
local function module_path(srv)
	local out = shell_ok(srv, ">require'prosody.core.modulemanager'.get_module('localhost','minimix').module.path")
	return out:match("Result: (%S+)")
end

local function has_luarocks()
	local _, ok = run("command -v luarocks")
	return ok
end

---------------------------------------------------------------------------

describe("admin shell", function()
	local srv
	local r1, r2 = "admin-one@" .. MUC, "admin-two@" .. MUC

	setup(function()
		srv = Server.start{ module = true, muc_options = { muc_room_locking = false } }
	end)

	teardown(function()
		close_all()
		Server.stop_all()
	end)

	it("minimix:memberships lists an account's rooms with nick and joined sessions", function()
		local phone, laptop = connect(srv, "alice", "phone"), connect(srv, "alice", "laptop")
		join(phone, r1, "Alice")
		join(laptop, r1, "Alice")
		join(phone, r2, "Al")
		settle(phone, laptop)

		local out = shell_ok(srv, 'minimix:memberships("alice@localhost")')
		local one, two = lines_with(out, r1), lines_with(out, r2)
		assert.equal(1, #one, out)
		assert.equal(1, #two, out)
		assert.matches("nick=Alice", one[1], 1, true)
		assert.matches("sessions: ", one[1], 1, true)
		assert.matches("phone", one[1], 1, true)
		assert.matches("laptop", one[1], 1, true)
		assert.matches("nick=Al\t", two[1], 1, true)
		assert.matches("phone", two[1], 1, true)
		assert.not_matches("laptop", two[1], 1, true)
		assert.matches("OK: 2 room(s)", out, 1, true)

		assert.matches("OK: 0 room(s)", shell_ok(srv, 'minimix:memberships("carol@localhost")'), 1, true)
	end)

	it("minimix:memberships refuses a JID that is not an account of a host with the module", function()
		local out, ok = srv:shell('minimix:memberships("alice@elsewhere.example")')
		assert.is_false(ok, out)
		assert.matches("Unknown host", out, 1, true)
		out, ok = srv:shell('minimix:memberships("localhost")')
		assert.is_false(ok, out)
		assert.matches("is not an account of localhost", out, 1, true)
	end)

	it("minimix:room lists the accounts in a room, also those with no session online", function()
		local bob = connect(srv, "bob", "desk")
		join(bob, r1, "Bob")
		local dave = connect(srv, "dave", "phone")
		join(dave, r1, "Dave")
		dave:close()
		-- dave's account stays in the room after its only session is gone (flow 11).
		local out
		for _ = 1, 50 do
			out = shell_ok(srv, ('minimix:room("%s")'):format(r1))
			if #lines_with(out, "no session joined") > 0 then break end
			socket.sleep(0.1)
		end
		assert.equal(1, #lines_with(out, "alice@localhost\tnick=Alice\tsessions: "), out)
		assert.equal(1, #lines_with(out, "bob@localhost\tnick=Bob\tsessions: desk"), out)
		assert.equal(1, #lines_with(out, "dave@localhost\tnick=Dave\tno session joined"), out)
		assert.equal(0, #lines_with(out, "carol@"), out)
		assert.matches("OK: 3 account(s) in " .. r1, out, 1, true)

		out = shell_ok(srv, ('minimix:room("%s")'):format(r2))
		assert.matches("OK: 1 account(s) in " .. r2, out, 1, true)
		assert.matches("OK: 0 account(s)", shell_ok(srv, 'minimix:room("nobody-here@' .. MUC .. '")'), 1, true)

		local bad, ok = srv:shell('minimix:room("not a jid")')
		assert.is_false(ok, bad)
		assert.matches("is not a room's JID", bad, 1, true)
	end)

	it("minimix:leave makes the account leave: its sessions and the room see it go", function()
		local phone, laptop = open_clients[1], open_clients[2]
		local bob = open_clients[3]
		settle(phone, laptop, bob)
		phone.log, laptop.log, bob.log = {}, {}, {}

		local out = shell_ok(srv, ('minimix:leave("alice@localhost", "%s")'):format(r1))
		assert.matches("alice@localhost leaves " .. r1, out, 1, true)
		assert(phone:wait_for(self_presence(r1, "unavailable")))
		assert(laptop:wait_for(self_presence(r1, "unavailable")))
		assert(bob:wait_for(function(el)
			return el.name == "presence" and el.attr.from == r1 .. "/Alice" and el.attr.type == "unavailable"
		end))
		settle(phone, laptop, bob)
		assert.equal(1, count(phone.log, self_presence(r1, "unavailable")))
		assert.equal(1, count(laptop.log, self_presence(r1, "unavailable")))

		out = shell_ok(srv, 'minimix:memberships("alice@localhost")')
		assert.equal(0, #lines_with(out, r1), out)
		assert.equal(1, #lines_with(out, r2), out)
		assert.equal(0, #lines_with(shell_ok(srv, ('minimix:room("%s")'):format(r1)), "alice@"))

		-- Still in r2: a message there reaches the phone.
		bob:send(Client.muc_join(r2 .. "/Bob"))
		assert(bob:wait_for(self_presence(r2, nil)))
		bob:send(Client.groupchat(r2, "still here"))
		assert(phone:wait_for(function(el) return Client.body(el) == "still here" end))

		local again, ok = srv:shell(('minimix:leave("alice@localhost", "%s")'):format(r1))
		assert.is_false(ok, again)
		assert.matches("alice@localhost is not in " .. r1, again, 1, true)
		assert.same({}, srv:tracebacks())
	end)

	it("the commands see the kept state after a module reload, and go with an unload", function()
		shell_ok(srv, 'module:reload("minimix", "localhost")')
		-- A fresh core would know no membership: the commands read the one module.restore put back.
		local out = shell_ok(srv, 'minimix:memberships("alice@localhost")')
		assert.equal(1, #lines_with(out, r2), out)
		out = shell_ok(srv, ('minimix:room("%s")'):format(r2))
		assert.equal(1, #lines_with(out, "alice@localhost\tnick=Al\tsessions: phone"), out)
		assert.equal(1, #lines_with(out, "bob@localhost\tnick=Bob\tsessions: desk"), out)

		shell_ok(srv, 'module:unload("minimix", "localhost")')
		local gone, ok = srv:shell('minimix:memberships("alice@localhost")')
		assert.is_false(ok, gone)
		assert.matches("mod_minimix is not loaded on localhost", gone, 1, true)
		gone, ok = srv:shell(('minimix:room("%s")'):format(r2))
		assert.is_false(ok, gone)
		assert.matches("mod_minimix is not loaded on any host", gone, 1, true)
		assert.same({}, srv:tracebacks())
	end)
end)

describe("metrics", function()
	local srv
	local room = "metered@" .. MUC

	setup(function()
		srv = Server.start{
			module = true,
			http = true,
			modules = { "http_openmetrics" },
			options = { minimix_test_faults = true },
			global_options = { statistics = "internal", statistics_interval = "manual" },
			muc_options = { muc_room_locking = false },
		}
	end)

	teardown(function()
		close_all()
		Server.stop_all()
	end)

	it("are served at /metrics and follow joins, forks, proxied IQs and errors", function()
		local text = scrape(srv)
		assert.equal(0, metric(text, "prosody_mod_minimix__memberships"), text)
		assert.equal(0, metric(text, "prosody_mod_minimix__joined_sessions"))
		assert.equal(0, metric(text, "prosody_mod_minimix__errors_total"))

		local phone, laptop = connect(srv, "alice", "phone"), connect(srv, "alice", "laptop")
		local bob = connect(srv, "bob", "desk")
		join(phone, room, "Alice")
		join(laptop, room, "Alice") -- served locally
		join(bob, room, "Bob")
		settle(phone, laptop, bob)

		local before = scrape(srv)
		assert.equal(2, metric(before, "prosody_mod_minimix__memberships"), before)
		assert.equal(3, metric(before, "prosody_mod_minimix__joined_sessions"))
		assert.equal(2, metric(before, "prosody_mod_minimix__accounts"))
		assert.equal(1, metric(before, "prosody_mod_minimix__joins_served_locally_total"))
		assert.equal(0, metric(before, "prosody_mod_minimix__iqs_proxied_total"))
		assert.is_true(metric(before, "prosody_mod_minimix__cached_presences") >= 2)
		assert.is_true(metric(before, "prosody_mod_minimix__kept_bytes") > 0)
		local forked = metric(before, "prosody_mod_minimix__stanzas_forked_total")

		-- One groupchat: the room sends it to alice (2 joined sessions) and bob (1).
		bob:send(Client.groupchat(room, "counted"))
		assert(phone:wait_for(function(el) return Client.body(el) == "counted" end))
		assert(laptop:wait_for(function(el) return Client.body(el) == "counted" end))
		settle(phone, laptop, bob)
		local after = scrape(srv)
		assert.equal(forked + 3, metric(after, "prosody_mod_minimix__stanzas_forked_total"), after)

		-- One IQ to the room from a joined session goes out from the account; its reply is
		-- handed on to that session.
		local info = st.iq({ type = "get", to = room, id = Client.new_id() })
			:tag("query", { xmlns = "http://jabber.org/protocol/disco#info" }):up()
		assert.equal("result", assert(phone:iq(info)).attr.type)
		after = scrape(srv)
		assert.equal(forked + 4, metric(after, "prosody_mod_minimix__stanzas_forked_total"), after)
		assert.equal(1, metric(after, "prosody_mod_minimix__iqs_proxied_total"))
		assert.equal(0, metric(after, "prosody_mod_minimix__pending_iqs"))
		assert.equal(0, metric(after, "prosody_mod_minimix__errors_total"))

		-- A failure inside the module (the test fault) is one error line, counted.
		phone:send(st.message({ to = room, type = "groupchat", id = Client.new_id() })
			:text_tag("body", "faulty")
			:tag("fault", { xmlns = "urn:xmpp:minimix:test-fault", kind = "lua-error" }):up())
		settle(phone, laptop, bob)
		local faulted = scrape(srv)
		assert.equal(1, metric(faulted, "prosody_mod_minimix__errors_total"), faulted)
		assert.truthy(srv:log_has("deliberate test fault", true))

		bob:send(Client.muc_leave(room .. "/Bob"))
		assert(bob:wait_for(self_presence(room, "unavailable")))
		local left = scrape(srv)
		assert.equal(1, metric(left, "prosody_mod_minimix__memberships"), left)
		assert.equal(2, metric(left, "prosody_mod_minimix__joined_sessions"))
	end)
end)

describe("installation", function()
	local root = repo_root()

	teardown(function()
		close_all()
		Server.stop_all()
		remove_scratch()
	end)

	--- `luarocks make` from the checkout into a fresh tree; returns the tree.
	local function rock_tree()
		local tree = scratch()
		local out, ok = run(("cd %s && luarocks --lua-version=5.4 make --tree %s mod_minimix-scm-1.rockspec")
			:format(sh_quote(root), sh_quote(tree)))
		assert.is_true(ok, out)
		return tree
	end

	--- A client session joins through the module and a second one is served locally.
	local function joins_through_module(srv)
		local room = "installed@" .. MUC
		local phone, laptop = connect(srv, "alice", "phone"), connect(srv, "alice", "laptop")
		join(phone, room, "Alice")
		join(laptop, room, "Alice")
		local out = shell_ok(srv, 'minimix:memberships("alice@localhost")')
		local line = lines_with(out, room)[1] or ""
		assert.matches("phone", line, 1, true)
		assert.matches("laptop", line, 1, true)
		phone:close()
		laptop:close()
	end

	it("luarocks make installs a tree that Prosody loads through plugin_paths", function()
		if not has_luarocks() then
			pending("luarocks is not installed (scripts/install-deps.sh installs it)")
			return
		end
		local tree = rock_tree()
		local dir = tree .. "/share/lua/5.4/mod_minimix/"
		for _, file in ipairs({ "mod_minimix.lua", "admin.lib.lua", "minimix.so" }) do
			assert.truthy(io.open(dir .. file), dir .. file .. " missing")
		end

		local srv = Server.start{ module = true, plugin_path = tree, muc_options = { muc_room_locking = false } }
		assert.equal(dir .. "mod_minimix.lua", module_path(srv))
		joins_through_module(srv)
		assert.same({}, srv:tracebacks())
		srv:destroy()
	end)

	it("prosodyctl install installs a packed rock that Prosody then loads", function()
		if not has_luarocks() then
			pending("luarocks is not installed (scripts/install-deps.sh installs it)")
			return
		end
		-- The binary rock `make rock` packs into build/, named for the platform.
		local out, ok = run(("make -C %s rock LUA=lua5.4"):format(sh_quote(root)))
		assert.is_true(ok, out)
		local arch = run("luarocks --lua-version=5.4 config arch"):match("[%w_-]+")
		local rock = root .. "/build/mod_minimix-scm-1." .. arch .. ".rock"
		assert.truthy(io.open(rock), out)

		local installer, empty = scratch(), scratch()
		local srv = Server.start{
			module = false,
			plugin_path = empty,
			global_options = { installer_plugin_path = installer },
			muc_options = { muc_room_locking = false },
		}
		out, ok = run(Server.prosody_shell_command("prosodyctl",
			("--config %s install %s"):format(sh_quote(srv.config), sh_quote(rock))))
		assert.is_true(ok, out)
		local dir = installer .. "/share/lua/5.4/mod_minimix/"
		assert.truthy(io.open(dir .. "minimix.so"), out)

		srv.opts.module = true
		srv:write_config()
		srv:restart()
		assert.equal(dir .. "mod_minimix.lua", module_path(srv))
		joins_through_module(srv)
		assert.same({}, srv:tracebacks())
		srv:destroy()
	end)
end)

describe("prosody versions", function()
	-- PROSODY_012: a Prosody 0.12 executable, e.g. Debian bookworm's package unpacked with
	-- `apt-get download prosody/bookworm && dpkg -x prosody_0.12*.deb DIR`, its bin/prosody
	-- and bin/prosodyctl edited so that CFG_SOURCEDIR and CFG_PLUGINDIR point into DIR.
	it("mod_minimix refuses to load on Prosody 0.12 with one clear log line", function()
		local p012 = os.getenv("PROSODY_012")
		if not p012 or p012 == "" then
			pending("set PROSODY_012 to a Prosody 0.12 executable to run this")
			return
		end
		local getenv = os.getenv
		finally(function() os.getenv = getenv end) -- luacheck: ignore 122
		os.getenv = function(name) -- luacheck: ignore 122
			if name == "PROSODY" then return p012 end
			return getenv(name)
		end
		local srv = Server.start{ module = true, muc_options = { muc_room_locking = false } }
		local version = srv:shell("server:version()")
		assert.matches("OK: 0%.12", version)
		-- The server runs on, as plain Prosody: a client joins a room the usual way.
		local c = connect(srv, "alice", "phone")
		join(c, "plain@" .. MUC, "Alice")
		local errors = srv:tracebacks()
		assert.equal(1, #errors, table.concat(errors, "\n"))
		assert.matches("mod_minimix needs Prosody 13 or trunk, not 0.12", errors[1], 1, true)
		srv:destroy()
	end)
end)
