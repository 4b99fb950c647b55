-- Reliability against a real Prosody with mod_minimix: a crash (kill -9) while accounts are
-- joined and a start on the same data; rooms that vanish under a membership (a MUC room
-- dropped silently, a MUC service that restarts and forgets); failures inside the module
-- that must leave its state as it was; and a reduced soak (spec/load/soak.lua: sessions,
-- rooms, messages and join / leave / disconnect churn, every delivery checked).
--
-- Memberships are read from the module's core through the admin shell.
-- MINIMIX_PLUGIN_PATH selects another build of the plugin.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local PLUGIN_PATH = os.getenv("MINIMIX_PLUGIN_PATH") ~= "" and os.getenv("MINIMIX_PLUGIN_PATH") or nil
local socket = require "socket"
local st = Client.stanza

local MUC = "conference.localhost"
local NS_MUC_OWNER = "http://jabber.org/protocol/muc#owner"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"
local NS_FAULT = "urn:xmpp:minimix:test-fault"

---------------------------------------------------------------------------
-- Helpers

local bare = muc.bare
local count = muc.count
local error_condition = muc.error_condition
local is_error = muc.is_error
local self_presence = muc.self_presence
local presence = muc.presence
local groupchat = muc.groupchat
local iq_reply = muc.iq_reply
local join = muc.join

local settle = muc.settle_all

local fresh = muc.fresh_all

local say = muc.say
local memberships = muc.memberships

--- Poll memberships() until it equals `want` (or `timeout` seconds pass); returns the last.
local function memberships_become(srv, users, want, timeout)
	local deadline = socket.gettime() + (timeout or 10)
	local got
	repeat
		got = memberships(srv, users)
		if got == want then return got end
		socket.sleep(0.2)
	until socket.gettime() > deadline
	return got
end

--- The room's occupants by real bare JID, sorted, comma-separated ("" when none or no room).
local function occupants(srv, room)
	return table.concat(muc.occupant_jids(srv, MUC, room), ",")
end

local function stats(srv)
	local result, out = srv:eval([[local mm = require "prosody.core.modulemanager".get_module("localhost", "minimix"); ]]
		.. [[local s = mm.module.save().core:stats(); return ("%d %d %d %d %d"):format(s.accounts, s.memberships, ]]
		.. [[s.joined_sessions, s.cached_presences, s.pending_iqs)]])
	return assert(result, "admin shell gave no result:\n" .. out)
end

local function start(opts)
	opts = opts or {}
	local muc_options = { muc_room_locking = false }
	for k, v in pairs(opts.muc_options or {}) do muc_options[k] = v end
	return Server.start{
		module = true,
		plugin_path = PLUGIN_PATH,
		options = opts.options,
		muc_options = muc_options,
		muc_modules = opts.muc_modules,
		components = opts.components,
	}
end

local function connect(srv, user, resource)
	return Client.connect{ port = srv.port, user = user, resource = resource }
end

local function drop_all(list)
	for _, c in ipairs(list) do
		if not c.closed then c:kill() end
	end
end

---------------------------------------------------------------------------

describe("a crash (kill -9) while accounts are joined", function()
	local R1, R2 = "crash1@" .. MUC, "crash2@" .. MUC
	local srv
	teardown(function() if srv then srv:destroy() end end)

	it("brings every membership back on the next start, once, with no history served twice", function()
		srv = start{ muc_options = { muc_room_default_persistent = true } }
		local phone, laptop = connect(srv, "alice", "phone"), connect(srv, "alice", "laptop")
		local bob, carol = connect(srv, "bob", "pc"), connect(srv, "carol", "pc")
		join(bob, R1 .. "/Bob")
		join(phone, R1 .. "/Alice")
		join(laptop, R1 .. "/Alice")
		join(phone, R2 .. "/Alice")
		join(carol, R2 .. "/Carol")
		for i = 1, 3 do say(bob, R1, "before " .. i, { phone, laptop }) end
		settle{ phone, laptop, bob, carol }
		assert.equal("alice[" .. R1 .. "/Alice=laptop,phone;" .. R2 .. "/Alice=phone] bob[" .. R1 .. "/Bob=pc] carol["
			.. R2 .. "/Carol=pc]", memberships(srv, { "alice", "bob", "carol" }))

		srv:kill9()
		drop_all{ phone, laptop, bob, carol }
		srv:relaunch()
		local want = "alice[" .. R1 .. "/Alice=;" .. R2 .. "/Alice=] bob[" .. R1 .. "/Bob=] carol[" .. R2 .. "/Carol=]"
		assert.equal(want, memberships_become(srv, { "alice", "bob", "carol" }, want))
		-- Each account is in its rooms once.
		local deadline = socket.gettime() + 10
		while occupants(srv, R1) ~= "alice@localhost,bob@localhost" and socket.gettime() < deadline do
			socket.sleep(0.2)
		end
		assert.equal("alice@localhost,bob@localhost", occupants(srv, R1))
		assert.equal("alice@localhost,carol@localhost", occupants(srv, R2))

		-- bob's new session is served locally and sees alice's account once, never leaving.
		bob = connect(srv, "bob", "pc")
		join(bob, R1 .. "/Bob", { history = { maxstanzas = 20 } })
		phone = connect(srv, "alice", "phone")
		join(phone, R1 .. "/Alice")
		for i = 1, 2 do say(bob, R1, "after " .. i, { phone }) end
		laptop = connect(srv, "alice", "laptop")
		join(laptop, R1 .. "/Alice", { history = { maxstanzas = 20 } })
		settle{ phone, laptop, bob }
		assert.equal(1, count(bob.log, presence(R1 .. "/Alice")))
		assert.equal(0, count(bob.log, presence(R1 .. "/Alice", "unavailable")))
		for _, c in ipairs{ phone, laptop, bob } do
			for i = 1, 3 do assert.is_true(count(c.log, groupchat("before " .. i)) <= 1) end
		end
		for i = 1, 2 do
			assert.equal(1, count(phone.log, groupchat("after " .. i)))
			assert.equal(1, count(laptop.log, groupchat("after " .. i)))
		end
		assert.equal(0, count(phone.log, is_error) + count(laptop.log, is_error) + count(bob.log, is_error))
		assert.same({}, srv:tracebacks())
		drop_all{ phone, laptop, bob }
	end)
end)

describe("a room lost in a crash, with Prosody's default room locking", function()
	local R = "lost@" .. MUC
	local srv
	teardown(function() if srv then srv:destroy() end end)

	it("is usable by every account again after the next start", function()
		srv = Server.start{ module = true, plugin_path = PLUGIN_PATH }
		local phone, bob = connect(srv, "alice", "phone"), connect(srv, "bob", "pc")
		local created = join(phone, R .. "/Alice")
		assert.is_true(Client.muc_status(created)[201])
		local form = st.iq({ type = "set", to = R, id = Client.new_id() }):tag("query", { xmlns = NS_MUC_OWNER })
			:tag("x", { xmlns = "jabber:x:data", type = "submit" })
		assert.equal("result", assert(phone:iq(form)).attr.type)
		join(bob, R .. "/Bob")
		srv:kill9()
		drop_all{ phone, bob }
		srv:relaunch()
		local deadline = socket.gettime() + 10
		while not srv:log_has("Rejoined %d+ stored memberships") and socket.gettime() < deadline do
			socket.sleep(0.1)
		end
		assert.is_true(srv:log_has("Rejoined %d+ stored memberships"), "memberships were not restored")
		socket.sleep(0.5)
		-- The clients join as clients do: a room they get back new (201) they configure.
		phone, bob = connect(srv, "alice", "phone"), connect(srv, "bob", "pc")
		for _, c in ipairs{ phone, bob } do
			local nick = c == phone and "Alice" or "Bob"
			c:send(Client.muc_join(R .. "/" .. nick))
			local answer = assert(c:wait_for(function(el)
				return el.name == "presence" and bare(el.attr.from) == R
					and (el.attr.type == "error" or Client.muc_status(el)[110] == true)
			end))
			assert.is_nil(answer.attr.type, tostring(answer))
			if Client.muc_status(answer)[201] then
				form = st.iq({ type = "set", to = R, id = Client.new_id() }):tag("query", { xmlns = NS_MUC_OWNER })
					:tag("x", { xmlns = "jabber:x:data", type = "submit" })
				assert.equal("result", assert(c:iq(form)).attr.type)
			end
		end
		say(bob, R, "back again", { phone, bob })
		settle{ phone, bob }
		assert.equal(0, count(phone.log, is_error) + count(bob.log, is_error))
		assert.equal("alice@localhost,bob@localhost", occupants(srv, R))
		drop_all{ phone, bob }
	end)
end)

describe("a room that vanishes under a membership", function()
	local srv
	teardown(function() if srv then srv:destroy() end end)

	it("(dropped silently by the MUC) is noticed by a self-ping; the rejoin works for real", function()
		local R = "gone@" .. MUC
		srv = start{ components = { { host = "fake.localhost", secret = "fake-secret" } } }
		local phone, laptop, bob = connect(srv, "alice", "phone"), connect(srv, "alice", "laptop"), connect(srv, "bob", "pc")
		local all = { phone, laptop, bob }
		join(bob, R .. "/Bob")
		join(phone, R .. "/Alice")
		join(laptop, R .. "/Alice")
		-- The room disappears without a word to its occupants (as after a crash of the
		-- MUC service, or an admin deleting it from storage and memory).
		local gone = srv:eval(([[local muc = prosody.hosts[%q].modules.muc; local room = muc.get_room_from_jid(%q); ]]
			.. [[muc.forget_room(room); muc.delete_room(room); return muc.get_room_from_jid(%q) == nil]])
			:format(MUC, R, R))
		assert.equal("true", gone)
		fresh(all)

		local ping = Client.ping(R .. "/Alice")
		local lost = assert(phone:iq(ping))
		assert.equal("error", lost.attr.type)
		assert.equal("item-not-found", error_condition(lost))
		assert.equal(phone.jid, lost.attr.to)
		assert.equal("alice[] bob[" .. R .. "/Bob=pc]", memberships(srv, { "alice", "bob" }))

		-- The client rejoins for real: the account joins (and so re-creates) the room.
		local own = join(phone, R .. "/Alice")
		assert.is_true(Client.muc_status(own)[201])
		-- laptop learns it is no longer joined and rejoins, served locally.
		local refused = assert(laptop:iq(Client.ping(R .. "/Alice")))
		assert.equal("not-acceptable", error_condition(refused))
		local again = join(laptop, R .. "/Alice")
		assert.is_nil(Client.muc_status(again)[201])
		-- bob's account is no occupant of the new room: its self-ping says so, and bob rejoins.
		local bob_lost = assert(bob:iq(Client.ping(R .. "/Bob")))
		assert.equal("not-acceptable", error_condition(bob_lost))
		assert.equal("alice[" .. R .. "/Alice=laptop,phone] bob[]", memberships(srv, { "alice", "bob" }))
		join(bob, R .. "/Bob")
		fresh(all)
		say(bob, R, "in the new room", { phone, laptop })
		settle(all)
		assert.equal(1, count(phone.log, groupchat("in the new room")))
		assert.equal(1, count(laptop.log, groupchat("in the new room")))
		assert.equal("alice@localhost,bob@localhost", occupants(srv, R))
		assert.equal("alice[" .. R .. "/Alice=laptop,phone] bob[" .. R .. "/Bob=pc]", memberships(srv, { "alice", "bob" }))
		assert.same({}, srv:tracebacks())
		drop_all(all)
	end)

	it("(a MUC service that restarts and forgets) is noticed by a self-ping; down is not gone", function()
		local R = "room@fake.localhost"
		local phone, laptop = connect(srv, "dave", "phone"), connect(srv, "dave", "laptop")
		local all = { phone, laptop }
		local fake = Client.connect_component{ port = srv.component_port, host = "fake.localhost", secret = "fake-secret" }
		-- The test plays the room: answers a join with the self-presence and the subject,
		-- a self-ping with a result while the account is an occupant.
		local occupant
		local function serve_join()
			local req = assert(fake:wait_for(function(el) return el.name == "presence" and el.attr.to == R .. "/Dave" end))
			occupant = req.attr.from
			fake:send(st.presence({ from = R .. "/Dave", to = occupant })
				:tag("x", { xmlns = NS_MUC_USER }):tag("item", { affiliation = "member", role = "participant" }):up()
				:tag("status", { code = "110" }):up():up())
			fake:send(st.message({ from = R, to = occupant, type = "groupchat" }):tag("subject"):up())
			return req
		end
		local function answer_ping(reply)
			local req = assert(fake:wait_for(function(el) return el.name == "iq" and el.attr.type == "get" end))
			fake:send(reply(req))
			return req
		end

		phone:send(Client.muc_join(R .. "/Dave"))
		local req = serve_join()
		assert.equal("dave@localhost", req.attr.from) -- the account joins, not the session
		assert(phone:wait_for(self_presence(R)))
		join(laptop, R .. "/Dave")
		settle(all)
		assert.equal(0, count(fake:collect(0.3), function(el) return el.name == "presence" end))

		local ping = Client.ping(R .. "/Dave")
		phone:send(ping)
		answer_ping(function(r) return st.reply(r) end)
		assert.equal("result", assert(phone:wait_for(iq_reply(ping.attr.id))).attr.type)

		-- The service goes down: Prosody answers for it; that says nothing about membership.
		fake:close()
		local down = assert(phone:iq(Client.ping(R .. "/Dave")))
		assert.equal("error", down.attr.type)
		assert.equal("remote-server-timeout", error_condition(down))
		assert.equal("dave[" .. R .. "/Dave=laptop,phone]", memberships(srv, { "dave" }))

		-- It comes back without the room: the account is no occupant any more.
		fake = Client.connect_component{ port = srv.component_port, host = "fake.localhost", secret = "fake-secret" }
		ping = Client.ping(R .. "/Dave")
		phone:send(ping)
		local asked = answer_ping(function(r)
			return st.error_reply(r, "cancel", "not-acceptable", "You are not currently connected to this chat")
		end)
		assert.equal("dave@localhost", asked.attr.from)
		local lost = assert(phone:wait_for(iq_reply(ping.attr.id)))
		assert.equal("not-acceptable", error_condition(lost))
		assert.equal(phone.jid, lost.attr.to)
		assert.equal("dave[]", memberships(srv, { "dave" }))
		-- laptop's self-ping now reaches the service from laptop itself, which is no occupant.
		ping = Client.ping(R .. "/Dave")
		laptop:send(ping)
		asked = answer_ping(function(r) return st.error_reply(r, "cancel", "not-acceptable") end)
		assert.equal(laptop.jid, asked.attr.from)
		assert.equal("not-acceptable", error_condition(assert(laptop:wait_for(iq_reply(ping.attr.id)))))

		-- The rejoin works for real.
		phone:send(Client.muc_join(R .. "/Dave"))
		assert.equal("dave@localhost", serve_join().attr.from)
		assert(phone:wait_for(self_presence(R)))
		join(laptop, R .. "/Dave")
		fresh(all)
		fake:send(st.message({ from = R .. "/Bob", to = occupant, type = "groupchat", id = "fk1" })
			:text_tag("body", "welcome back"))
		assert(phone:wait_for(groupchat("welcome back")))
		assert(laptop:wait_for(groupchat("welcome back")))
		settle(all)
		assert.equal(1, count(phone.log, groupchat("welcome back")))
		assert.equal(1, count(laptop.log, groupchat("welcome back")))
		assert.equal("dave[" .. R .. "/Dave=laptop,phone]", memberships(srv, { "dave" }))
		assert.same({}, srv:tracebacks())
		fake:close()
		drop_all(all)
	end)
end)

describe("a failure inside the module", function()
	local R = "faulty@" .. MUC
	local NEW = "newfaulty@" .. MUC
	local srv, phone, laptop, bob, all, before, before_stats
	local EXPECTED = { "mod_minimix failed on", "deliberate test fault" }

	setup(function()
		srv = start{ options = { minimix_test_faults = true } }
		phone, laptop, bob = connect(srv, "alice", "phone"), connect(srv, "alice", "laptop"), connect(srv, "bob", "pc")
		all = { phone, laptop, bob }
		join(bob, R .. "/Bob")
		join(phone, R .. "/Alice")
		settle(all)
		before = memberships(srv, { "alice", "bob" })
		before_stats = stats(srv)
		assert.equal("alice[" .. R .. "/Alice=phone] bob[" .. R .. "/Bob=pc]", before)
	end)

	teardown(function()
		drop_all(all or {})
		srv:destroy()
	end)

	for _, kind in ipairs{ "lua-error", "panic" } do
		it("(" .. kind .. ") in a join, a presence update, a leave and a message leaves the state as it was", function()
			local function faulty(stanza)
				return stanza:tag("fault", { xmlns = NS_FAULT, kind = kind }):up()
			end
			fresh(all)
			-- Each goes on untouched, from the session's full JID, and the room answers that.
			laptop:send(faulty(Client.muc_join(NEW .. "/Alice")))
			assert(laptop:wait_for(self_presence(NEW))) -- laptop itself joined: plain MUC
			phone:send(faulty(st.presence({ to = R .. "/Alice" }):text_tag("show", "dnd")))
			local update = assert(phone:wait_for(presence(R .. "/Alice", "error")))
			assert.equal("item-not-found", error_condition(update)) -- "not currently connected": plain MUC
			phone:send(faulty(Client.muc_leave(R .. "/Alice")))
			local message = faulty(Client.groupchat(R, "faulty " .. kind))
			phone:send(message)
			assert(phone:wait_for(function(el) return el.name == "message" and el.attr.id == message.attr.id end))
			settle(all)
			assert.equal(before, memberships(srv, { "alice", "bob" }))
			assert.equal(before_stats, stats(srv))
			assert.equal(0, count(bob.log, function(el) return bare(el.attr.from) == R end))

			-- laptop leaves the room it joined itself; the module was never part of that.
			laptop:send(Client.muc_leave(NEW .. "/Alice"))
			assert(laptop:wait_for(self_presence(NEW, "unavailable")))
			-- Everything still works: a self-ping, the fork, a join served locally.
			assert.equal("result", assert(phone:iq(Client.ping(R .. "/Alice"))).attr.type)
			fresh(all)
			say(bob, R, "after " .. kind, { phone })
			local own = join(laptop, R .. "/Alice")
			assert.is_nil(Client.muc_status(own)[201])
			laptop:send(Client.muc_leave(R .. "/Alice"))
			assert(laptop:wait_for(self_presence(R, "unavailable")))
			settle(all)
			assert.equal(1, count(phone.log, groupchat("after " .. kind)))
			assert.equal(0, count(bob.log, presence(R .. "/Alice", "unavailable")))
			assert.equal(before, memberships(srv, { "alice", "bob" }))
			assert.same({}, srv:tracebacks(EXPECTED))
			assert.truthy(srv:log_has("mod_minimix failed on", true))
		end)
	end
end)

describe("load, reduced (spec/load/soak.lua)", function()
	it("delivers to 30 churning sessions exactly the messages of the rooms they were in", function()
		local Soak = require "load.soak"
		local lines = {}
		local report = Soak.run(Soak.configs.reduced, function(line) lines[#lines + 1] = line end)
		local text = table.concat(lines, "\n")
		assert.equal(0, report.failed, text)
		assert.is_true(report.passed >= 30, text)
		assert.is_true(report.totals.must > 5000, text)
		assert.is_true(report.ops.join + report.ops.leave + report.ops.close + report.ops.drop >= 50, text)
		assert.is_true(report.seconds < 60, text)
	end)
end)
