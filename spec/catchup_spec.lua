-- Outages leave no gap (SPEC flow 18, issue 14), across a restart of the user's own
-- server: messages posted in a remote room while alice's server is down reach her archive
-- once, and a session joined while the account rejoins gets each once. Two Prosody
-- processes over real s2s on loopback: "home" (localhost) with mod_minimix and mod_mam,
-- where alice has her sessions; "remote" (remote.localhost) with two MUC services, one
-- that archives its rooms (mod_muc_mam: its messages carry the room's stanza-id) and one
-- that does not (its replays are recognised by sender, body and time). bob is a plain MUC
-- user on remote. Every count is taken after settle(), when the clients are quiet.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local socket = require "socket"

local REMOTE = "remote.localhost"
local MAM_MUC = "conference.remote.localhost" -- with mod_muc_mam
local PLAIN_MUC = "rooms.remote.localhost" -- without
local NS_SID = "urn:xmpp:sid:0"

local clients = muc.clients()
local connect, close_all = clients.connect, clients.close_all
local count, groupchat, join, say = muc.count, muc.groupchat, muc.join, muc.say
local settle, fresh, archived = muc.settle, muc.fresh, muc.archived
local log_count, wait_log, self_presence = muc.log_count, muc.wait_log, muc.self_presence

local ROOM_OPTIONS = { muc_room_locking = false, muc_room_default_public_jids = true }

local function start_pair()
	return Server.federation{
		home = { module = true, modules = { "mam" } },
		remote = {
			module = false, host = REMOTE, muc_host = MAM_MUC, muc_options = ROOM_OPTIONS,
			muc_modules = { "muc_mam" },
			components = { { host = PLAIN_MUC, plugin = "muc", options = ROOM_OPTIONS } },
		},
	}
end

local function signal(srv, sig)
	assert(os.execute(("kill -%s %d"):format(sig, srv.pid)))
end

--- bob and alice's phone join `rooms`; bob says each of `bodies` in each room; alice's
--- sessions go away (the account stays); bob stays, on a fresh connection, watching.
local function before_outage(remote, home, rooms, bodies)
	local bob, phone = connect(remote, "bob", "pc"), connect(home, "alice", "phone")
	for _, room in ipairs(rooms) do
		join(bob, room .. "/Bob")
		join(phone, room .. "/Alice")
		for _, body in ipairs(bodies) do say(bob, room, body .. " in " .. room, { phone }) end
	end
	close_all()
	bob = connect(remote, "bob", "pc")
	for _, room in ipairs(rooms) do join(bob, room .. "/Bob") end
	fresh(bob)
	return bob
end

local function say_in(bob, rooms, bodies)
	for _, room in ipairs(rooms) do
		for _, body in ipairs(bodies) do say(bob, room, body .. " in " .. room, { bob }) end
	end
end

--- Each of `bodies` is in alice's archive exactly once for each room (read by a client
--- that logs in now).
local function each_archived_once(home, rooms, bodies)
	local reader = connect(home, "alice", "reader")
	for _, room in ipairs(rooms) do
		for _, body in ipairs(bodies) do
			assert.equal(1, archived(reader, room, body .. " in " .. room), body .. " in " .. room)
		end
	end
	reader:close()
end

--- A counter of the module's core on `srv` (its stats), as a number.
local function stat(srv, name)
	local value = srv:eval(([[return prosody.hosts["localhost"].modules.minimix.module.save().core:stats().%s]])
		:format(name))
	return tonumber(value)
end

--- Wait (up to 10 s) until alice's archive holds `body` for `room`; true if it came.
local function wait_archived(home, room, body)
	local reader = connect(home, "alice", "poller")
	local deadline = socket.gettime() + 10
	local found
	repeat
		found = archived(reader, room, body) > 0
		if not found then socket.sleep(0.2) end
	until found or socket.gettime() > deadline
	reader:close()
	return found
end

local function concat(...)
	local all = {}
	for _, list in ipairs({ ... }) do
		for _, v in ipairs(list) do all[#all + 1] = v end
	end
	return all
end

describe("catching up after a restart of the user's own server", function()
	local home, remote
	setup(function() home, remote = start_pair() end)
	teardown(Server.stop_all)
	after_each(close_all)

	it("archives what the room said meanwhile once, and what came before it not again", function()
		local rooms = { "down@" .. MAM_MUC, "down@" .. PLAIN_MUC }
		local before, meanwhile, after = { "before 1", "before 2" }, { "down 1", "down 2", "down 3" }, { "after 1" }
		local bob = before_outage(remote, home, rooms, before)

		-- The room with mod_muc_mam gives its messages a stanza-id of its own (kept in the archive).
		local reader = connect(home, "alice", "reader")
		local results = muc.mam_query(reader, rooms[1])
		local stored = results[1] and results[1].message
		assert.truthy(stored and stored:get_child("stanza-id", NS_SID), "no room stanza-id: " .. tostring(stored))
		reader:close()

		home:stop()
		say_in(bob, rooms, meanwhile)
		home:relaunch()
		for _, room in ipairs(rooms) do wait_archived(home, room, meanwhile[#meanwhile] .. " in " .. room) end
		say_in(bob, rooms, after)
		settle(bob)

		each_archived_once(home, rooms, concat(before, meanwhile, after))
		for _, room in ipairs(rooms) do
			-- Three new; the two from before came again (the margin) and were recognised.
			assert.equal(1, log_count(home, "alice caught up in " .. room .. ": 3 new message(s), 2 already got"),
				room)
		end
		assert.equal(2, stat(home, "rejoins"))
		assert.equal(6, stat(home, "replayed_new"))
		assert.equal(4, stat(home, "replayed_known"))
	end)

	it("after a crash too: what was got since it was last stored is read back from the archive", function()
		local rooms = { "crash@" .. MAM_MUC, "crash@" .. PLAIN_MUC }
		local before, meanwhile = { "stored 1", "stored 2" }, { "lost 1", "lost 2" }
		local bob = before_outage(remote, home, rooms, before)
		-- Killed before it stored what the account got (minimix_save_interval is 300 s).
		home:kill9()
		say_in(bob, rooms, meanwhile)
		local unclean = log_count(home, "The last stop was not clean")
		home:relaunch()
		for _, room in ipairs(rooms) do wait_archived(home, room, meanwhile[#meanwhile] .. " in " .. room) end
		settle(bob)
		each_archived_once(home, rooms, concat(before, meanwhile))
		assert.equal(unclean + 1, log_count(home, "The last stop was not clean"))
		for _, room in ipairs(rooms) do
			assert.equal(1, log_count(home, "alice caught up in " .. room .. ": 2 new message(s), 2 already got"),
				room)
		end
	end)

	it("gives a session that joins while the account rejoins each missed message once", function()
		local rooms = { "joined@" .. MAM_MUC, "joined@" .. PLAIN_MUC }
		local before, meanwhile = { "early" }, { "missed 1", "missed 2" }
		local bob = before_outage(remote, home, rooms, before)
		home:stop()
		say_in(bob, rooms, meanwhile)
		-- The rooms' server stops answering for a while, so that alice's phone is online
		-- and joined before the account's rejoin reaches the rooms.
		local phone
		signal(remote, "STOP")
		local ok, err = pcall(function()
			local rejoined = log_count(home, "Rejoined")
			home:relaunch()
			wait_log(home, "Rejoined", rejoined)
			phone = connect(home, "alice", "phone")
			for _, room in ipairs(rooms) do
				phone:send(Client.muc_join(room .. "/Alice", { history = { maxstanzas = 20 } }))
			end
			settle(phone)
			assert.equal(0, count(phone.log, function(el) return el.name == "message" end))
		end)
		signal(remote, "CONT")
		assert(ok, err)
		for _, room in ipairs(rooms) do
			assert(phone:wait_for(muc.subject_message(room), 30))
		end
		-- The phone's joins waited for the account's: none was served from what it knew.
		assert.equal(0, stat(home, "joins_served_locally"))
		say_in(bob, rooms, { "live" })
		settle(bob, phone)
		for _, room in ipairs(rooms) do
			assert.equal(1, count(phone.log, self_presence(room)), room)
			-- What came before the outage too: the phone asked for history and had none.
			for _, body in ipairs(concat(before, meanwhile, { "live" })) do
				assert.equal(1, count(phone.log, groupchat(body .. " in " .. room)), body .. " in " .. room)
			end
		end
		each_archived_once(home, rooms, concat(before, meanwhile, { "live" }))
	end)

	it("two accounts of the host catching up one replay: each message once in each archive, once in the room's log",
		function()
			local rooms = { "both@" .. MAM_MUC, "both@" .. PLAIN_MUC }
			local bob = connect(remote, "bob", "pc")
			local phone, carol = connect(home, "alice", "phone"), connect(home, "carol", "pc")
			for _, room in ipairs(rooms) do
				join(bob, room .. "/Bob")
				join(phone, room .. "/Alice")
				join(carol, room .. "/Carol")
				say(bob, room, "ours in " .. room, { phone, carol })
			end
			close_all()
			bob = connect(remote, "bob", "pc")
			for _, room in ipairs(rooms) do join(bob, room .. "/Bob") end
			fresh(bob)
			home:stop()
			-- "again" twice: the room without stanza-ids tells them apart by order only.
			say_in(bob, rooms, { "while 1", "again", "again" })
			home:relaunch()
			for _, room in ipairs(rooms) do wait_archived(home, room, "again in " .. room) end
			settle(bob)
			-- Both accounts rejoined and got the replay; wait until carol's has come too.
			for _, room in ipairs(rooms) do
				wait_log(home, "carol caught up in " .. room .. ":", 0, 20)
			end
			local LOG_SIZE = [[local n = 0; for _ in require "prosody.core.storagemanager".open("localhost", ]]
				.. [["minimix_rooms", "archive"):find(%q) do n = n + 1 end; return n]]
			for _, user in ipairs{ "alice", "carol" } do
				local reader = connect(home, user, "reader")
				for _, room in ipairs(rooms) do
					for body, n in pairs{ ours = 1, ["while 1"] = 1, again = 2 } do
						assert.equal(n, archived(reader, room, body .. " in " .. room), user .. ": " .. body .. " in " .. room)
					end
				end
				reader:close()
			end
			for _, room in ipairs(rooms) do
				assert.equal("4", (home:eval(LOG_SIZE:format(room))), room)
			end
		end)

	it("leaves no errors in the logs", function()
		muc.no_tracebacks(home)()
		muc.no_tracebacks(remote)()
	end)
end)
