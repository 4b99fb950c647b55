-- Outages end no membership (SPEC flow 18; flow 13 for 332/333; issue 14), over real s2s:
-- "home" (localhost) with mod_minimix, mod_mam and OpenMetrics, where alice lives;
-- "remote" (remote.localhost), plain Prosody with the MUC conference.remote.localhost
-- (rooms persistent by default, real JIDs shown), where bob is a plain MUC user. alice's
-- account self-pings every PING seconds the rooms no session of hers is joined to.
--
-- Each case ends with a client of alice's logging in and reading her MAM archive: what
-- the room said after the account came back is there exactly once.
--
-- Two checks are about messages posted while the account was out of the room: they reach
-- the archive only because the rejoin asks the room for the history since the last
-- message the account got.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local socket = require "socket"
local metrics = require "spec.helpers.metrics"
local st = Client.stanza

local HOME, REMOTE = "localhost", "remote.localhost"
local RMUC = "conference.remote.localhost"
local ALICE = "alice@" .. HOME
local NS_MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
local PING = 8 -- minimix_self_ping_interval in these servers, seconds

local clients = muc.clients()
local connect, close_all = clients.connect, clients.close_all
local count, presence, groupchat = muc.count, muc.presence, muc.groupchat
local join, say, settle, fresh = muc.join, muc.say, muc.settle, muc.fresh
local log_count, wait_log, archived = muc.log_count, muc.wait_log, muc.archived

--- Presence from `from` carrying MUC status `code`.
local function with_status(from, code)
	return function(el)
		return el.name == "presence" and el.attr.from == from and Client.muc_status(el)[code] == true
	end
end

local index_of = muc.index_of

--- Wait until the log of `srv` has `text` more than `before` times (seconds: `timeout`).
local function wait_line(srv, text, before, timeout)
	wait_log(srv, text, before, timeout)
end

--- Let `seconds` pass (the clients' inboxes are emptied meanwhile).
local function pass(seconds, ...)
	local deadline = socket.gettime() + seconds
	while socket.gettime() < deadline do
		settle(...)
		socket.sleep(0.2)
	end
end

local metric, scrape = metrics.metric, metrics.scrape

--- alice's phone joins `room` (bob is in it), `before` is said, and the phone goes
--- offline: the account stays in the room with no session.
local function joined_then_offline(home, remote, room, before)
	local bob, phone = connect(remote, "bob", "pc"), connect(home, "alice", "phone")
	join(bob, room .. "/Bob")
	join(phone, room .. "/Alice")
	say(bob, room, before, { phone })
	local disconnects = log_count(home, "Client disconnected")
	phone:close()
	wait_log(home, "Client disconnected", disconnects)
	assert.same({ ALICE, "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, room))
	fresh(bob)
	return bob
end

--- The room error-kicks the account as when a message to it bounced: exactly what
--- mod_s2s does when the connection to the account's server fails (bounce_sendq), an
--- error reply from the account's bare JID, made here on the room's server.
local BOUNCE = [[local st = require "prosody.util.stanza"; ]]
	.. [[local m = st.message({ from = %q, to = %q, type = "groupchat", id = "lost" }):text_tag("body", "lost"); ]]
	.. [[local e = st.error_reply(m, "cancel", "remote-server-not-found", "Server-to-server connection failed"); ]]
	.. [[prosody.core_process_stanza({ type = "s2sin", dummy = true, send = function() end, ]]
	.. [[close = function() end }, e); return "bounced"]]

describe("outages", function()
	local home, remote
	setup(function()
		home, remote = Server.federation{
			home = {
				module = true, modules = { "mam", "http_openmetrics" }, http = true,
				options = { minimix_self_ping_interval = PING, minimix_iq_timeout = 10 },
				global_options = { statistics = "internal", statistics_interval = "manual" },
			},
			remote = {
				module = false, host = REMOTE, muc_host = RMUC,
				muc_options = {
					muc_room_locking = false, muc_room_default_public_jids = true,
					muc_room_default_persistent = true,
				},
			},
		}
	end)
	after_each(close_all)
	teardown(function()
		home:destroy()
		remote:destroy()
	end)

	local KICKED = "kicked@" .. RMUC

	it("an error kick (333) while no session is online: the account rejoins", function()
		local bob = joined_then_offline(home, remote, KICKED, "before the kick")
		local rejoins = log_count(home, "alice rejoins " .. KICKED .. " as Alice (attempt 1)")
		local out = log_count(home, "alice is out of " .. KICKED .. " (error kick, status 333): rejoining")
		local joined = log_count(home, "alice joined " .. KICKED .. " as Alice")

		assert.equal("bounced", remote:eval(BOUNCE:format(KICKED .. "/Bob", ALICE)))
		assert(bob:wait_for(with_status(KICKED .. "/Alice", 333)))
		assert.same({ "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, KICKED))
		wait_line(home, "alice is out of " .. KICKED .. " (error kick, status 333): rejoining", out)
		-- Said while the account is out of the room (the first rejoin waits 5 s or a little more).
		say(bob, KICKED, "while out", { bob })

		-- The account comes back on its own, once.
		assert(bob:wait_for(presence(KICKED .. "/Alice"), 15))
		wait_line(home, "alice joined " .. KICKED .. " as Alice", joined)
		assert.equal(rejoins + 1, log_count(home, "alice rejoins " .. KICKED .. " as Alice (attempt 1)"))
		assert.same({ ALICE, "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, KICKED))
		assert.is_true(index_of(bob.log, groupchat("while out")) < index_of(bob.log, presence(KICKED .. "/Alice")),
			"'while out' was said before the account was back")
		say(bob, KICKED, "after the rejoin", { bob })
		settle(bob)
		assert.equal(1, count(bob.log, presence(KICKED .. "/Alice")))

		-- A client logs in: the archive has what was said before the kick and after the
		-- rejoin, once each; the session got nothing of the room, not having joined it.
		local laptop = connect(home, "alice", "laptop")
		settle(laptop)
		assert.equal(0, count(laptop.log, muc.from_room(KICKED)))
		assert.equal(1, archived(laptop, KICKED, "before the kick"))
		assert.equal(1, archived(laptop, KICKED, "after the rejoin"))
	end)

	it("an error kick: what was said while the account was out is archived once", function()
		local laptop = connect(home, "alice", "laptop")
		assert.equal(1, archived(laptop, KICKED, "while out"))
	end)

	it("a kick (307) while no session is online stays final", function()
		local ROOM = "kick307@" .. RMUC
		local bob = joined_then_offline(home, remote, ROOM, "before the kick")
		local rejoins = log_count(home, "alice rejoins " .. ROOM)
		local removed = log_count(home, "alice was removed from " .. ROOM)
		local admin = st.iq({ type = "set", to = ROOM, id = Client.new_id() })
			:tag("query", { xmlns = NS_MUC_ADMIN }):tag("item", { nick = "Alice", role = "none" })
			:text_tag("reason", "test"):up():up()
		assert.equal("result", assert(bob:iq(admin)).attr.type)
		assert(bob:wait_for(with_status(ROOM .. "/Alice", 307)))
		wait_line(home, "alice was removed from " .. ROOM, removed)
		-- Longer than the first rejoin after an error kick, and a self-ping period: nothing.
		pass(PING + 2, bob)
		assert.equal(rejoins, log_count(home, "alice rejoins " .. ROOM))
		assert.equal(0, count(bob.log, presence(ROOM .. "/Alice")))
		assert.same({ "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, ROOM))
		assert.is_nil(muc.memberships(home, { "alice" }):find(ROOM, 1, true))
	end)

	local FORGOTTEN = "forgotten@" .. RMUC

	-- Last: restarts the remote server. A crash, not a clean stop: on a clean stop Prosody's
	-- MUC saves every live room with its occupants (mod_muc, server-stopping) and the room
	-- still knows the account when it is back; after a crash it does not.
	it("the room's server restarts while no session is online: a self-ping finds out, the account rejoins", function()
		local _ = joined_then_offline(home, remote, FORGOTTEN, "before the restart")
		local failed = log_count(home, "alice could not self-ping " .. FORGOTTEN .. " (remote-server-not-found)")
		local gone = log_count(home, "alice is out of " .. FORGOTTEN .. " (its self-ping was answered with")
		local joined = log_count(home, "alice joined " .. FORGOTTEN .. " as Alice")

		-- Down: the account's self-ping cannot reach the room; it is tried again later and
		-- nothing else changes.
		remote:kill9()
		wait_line(home, "alice could not self-ping " .. FORGOTTEN .. " (remote-server-not-found)", failed, PING + 5)
		-- Up again, right after that ping (the next one is due a period later): the room
		-- is back (or made anew) with no occupant, and bob speaks in it.
		remote:relaunch()
		local bob = connect(remote, "bob", "pc")
		join(bob, FORGOTTEN .. "/Bob")
		say(bob, FORGOTTEN, "while forgotten", { bob })
		assert.same({ "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, FORGOTTEN))

		-- The next self-ping: not-acceptable (not an occupant; item-not-found had the room
		-- not come back yet); the account rejoins.
		wait_line(home, "alice is out of " .. FORGOTTEN .. " (its self-ping was answered with", gone, PING + 5)
		wait_line(home, "alice joined " .. FORGOTTEN .. " as Alice", joined)
		assert(bob:wait_for(presence(FORGOTTEN .. "/Alice")))
		assert.is_true(index_of(bob.log, groupchat("while forgotten")) < index_of(bob.log, presence(FORGOTTEN .. "/Alice")),
			"'while forgotten' was said before the account was back")
		assert.same({ ALICE, "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, FORGOTTEN))
		say(bob, FORGOTTEN, "after the rejoin", { bob })
		settle(bob)

		local laptop = connect(home, "alice", "laptop")
		settle(laptop)
		assert.equal(0, count(laptop.log, muc.from_room(FORGOTTEN)))
		assert.equal(1, archived(laptop, FORGOTTEN, "before the restart"))
		assert.equal(1, archived(laptop, FORGOTTEN, "after the rejoin"))

		-- The metrics count the rejoins and the self-pings with their outcomes.
		local text = scrape(home)
		assert.is_true(metric(text, "prosody_mod_minimix__rejoins_total") >= 2, text)
		assert.is_true(metric(text, "prosody_mod_minimix__self_pings_total") >= 2)
		assert.is_true(metric(text, "prosody_mod_minimix__self_pings_gone_total") >= 1)
		assert.is_true(metric(text, "prosody_mod_minimix__self_pings_failed_total") >= 1)
		assert.equal(0, metric(text, "prosody_mod_minimix__rejoins_given_up_total"))
	end)

	it("the room's server restarted: what was said before the rejoin is archived once", function()
		local laptop = connect(home, "alice", "laptop")
		assert.equal(1, archived(laptop, FORGOTTEN, "while forgotten"))
	end)

	it("leaves no errors in the logs", function()
		muc.no_tracebacks(home)()
		muc.no_tracebacks(remote)()
	end)
end)
