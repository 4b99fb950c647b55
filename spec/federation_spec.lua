-- The MUC flows of /work/shared/SPEC.md with the room on another server, over real s2s on
-- loopback (issue 10). Two Prosody processes: "home" (localhost) with mod_minimix and
-- mod_mam, where alice has the sessions phone, laptop and tablet; "remote"
-- (remote.localhost), plain Prosody with the MUC components conference.remote.localhost
-- and rooms.remote.localhost (both non-anonymous: occupants see real JIDs), where bob and
-- carol are plain MUC users. s2s is pinned to the two servers' ports by
-- spec/modules/mod_test_s2s_pin.lua (no DNS). Every "exactly once" and "nothing" is counted
-- in the clients' logs after settle(), which waits until all of them are quiet.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local quiet_presence = require "spec.helpers.quiet"
local st = Client.stanza

local HOME, REMOTE = "localhost", "remote.localhost"
local RMUC = "conference.remote.localhost"
local RACE_MUC = "rooms.remote.localhost" -- no s2s to it until the race test: the latest answers
local ALICE = "alice@" .. HOME
local NS_MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
local NS_MUC_OWNER = "http://jabber.org/protocol/muc#owner"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"
local NS_DELAY = "urn:xmpp:delay"

local clients = muc.clients()
local connect, close_all = clients.connect, clients.close_all

local count = muc.count
local from_room = muc.from_room
local presence = muc.presence
local self_presence = muc.self_presence
local groupchat = muc.groupchat
local subject_message = muc.subject_message
local iq_reply = muc.iq_reply
local is_iq = muc.is_iq
local is_error = muc.is_error
local error_condition = muc.error_condition
local muc_item = muc.muc_item
local join = muc.join
local leave = muc.leave
local say = muc.say
local log_count = muc.log_count
local wait_log = muc.wait_log
local settle = muc.settle
local fresh = muc.fresh
local no_tracebacks = muc.no_tracebacks

local ROOM_OPTIONS = { muc_room_locking = false, muc_room_default_public_jids = true }

--- home (alice, with the module and MAM) and remote (bob and carol, the rooms).
local function start_pair()
	return Server.federation{
		home = { module = true, modules = { "mam" } },
		remote = {
			module = false, host = REMOTE, muc_host = RMUC, muc_options = ROOM_OPTIONS,
			components = { { host = RACE_MUC, plugin = "muc", options = ROOM_OPTIONS } },
		},
	}
end

local find = muc.find

local index_of = muc.index_of

local function chat(body)
	return function(el)
		return el.name == "message" and el.attr.type == "chat" and Client.body(el) == body
	end
end

--- Presence from `from` carrying MUC status `code`.
local function with_status(from, code)
	return function(el)
		return el.name == "presence" and el.attr.from == from and Client.muc_status(el)[code] == true
	end
end

--- The real JID in a presence's <x xmlns=muc#user><item jid/>.
local function item_jid(el)
	local item = el and muc_item(el)
	return item and item.attr.jid
end

--- Every self-presence (status 110) `c` got from `room` names c's own full JID as the
--- occupant's real JID (SPEC: "A session sees itself as it would without the module").
local function assert_self_item_jids(c, room)
	local n = 0
	for _, el in ipairs(c.log) do
		if el.name == "presence" and muc.bare(el.attr.from) == room and Client.muc_status(el)[110] then
			n = n + 1
			assert.equal(c.jid, item_jid(el), "item jid in a self-presence to " .. c.jid .. ": " .. tostring(el))
		end
	end
	assert.is_true(n > 0, "no self-presence from " .. room .. " to " .. c.jid)
end

local function admin(c, room, item)
	return assert(c:iq(st.iq({ type = "set", to = room, id = Client.new_id() })
		:tag("query", { xmlns = NS_MUC_ADMIN }):tag("item", item):text_tag("reason", "test"):up():up()))
end

--- The sessions of alice joined to `room` as the module's core holds them ("laptop,phone";
--- "" when the account is joined with no session), or nil when alice has no such membership.
local function sessions_in(srv, room)
	local line = muc.memberships(srv, { "alice" })
	for entry in assert(line:match("^alice%[(.*)%]$"), line):gmatch("[^;]+") do
		local r, sessions = entry:match("^(.-)/[^=]*=(.*)$")
		if r == room then return sessions end
	end
end

--- Any presence from the occupant JID `from`, whatever its type.
local function any_presence(from)
	return function(el) return el.name == "presence" and el.attr.from == from end
end

local archived = muc.archived

---------------------------------------------------------------------------

describe("federation", function()
	after_each(close_all)
	teardown(Server.stop_all)

	describe("plain s2s between two test servers", function()
		local home, remote
		setup(function()
			home, remote = Server.federation{
				home = { module = false },
				remote = { module = false, host = REMOTE, muc_host = RMUC },
			}
		end)
		teardown(function()
			home:destroy()
			remote:destroy()
		end)

		it("carries chat both ways and refuses a domain that is not pinned", function()
			local a = connect(home, "alice", "phone")
			local b = connect(remote, "bob", "desk")
			settle(a, b)
			a:send(st.message({ to = "bob@" .. REMOTE .. "/desk", type = "chat", id = Client.new_id() })
				:text_tag("body", "hello remote"))
			local got = assert(b:wait_for(chat("hello remote")))
			assert.equal(a.jid, got.attr.from)
			b:send(st.message({ to = a.jid, type = "chat", id = Client.new_id() }):text_tag("body", "hello home"))
			got = assert(a:wait_for(chat("hello home")))
			assert.equal(b.jid, got.attr.from)

			a:send(st.message({ to = "bob@nowhere.example", type = "chat", id = Client.new_id() })
				:text_tag("body", "lost"))
			local bounce = assert(a:wait_for(function(el) return el.name == "message" and is_error(el) end))
			assert.equal("remote-server-not-found", error_condition(bounce))
			assert.is_true(home:log_has("s2s to nowhere.example refused: not a test domain", true))
			assert.is_true(home:log_has("s2s to " .. REMOTE .. " pinned to 127.0.0.1:" .. remote.s2s_port, true))
			assert.is_true(remote:log_has("s2s to " .. HOME .. " pinned to 127.0.0.1:" .. home.s2s_port, true))
		end)

		it("leaves no errors in the logs", function()
			no_tracebacks(home)()
			no_tracebacks(remote)()
		end)
	end)

	describe("MUC flows with the room on the remote server", function()
		local home, remote
		setup(function() home, remote = start_pair() end)
		teardown(function()
			home:destroy()
			remote:destroy()
		end)

		--- bob (remote) and alice's phone, laptop and tablet (home), connected.
		local function bob_and_alice()
			return connect(remote, "bob", "pc"), connect(home, "alice", "phone"), connect(home, "alice", "laptop"),
				connect(home, "alice", "tablet")
		end

		-- Runs first: the first stanza to RACE_MUC opens a new s2s connection (dialback and
		-- all), so the room's answer to the account's join comes well after the join went
		-- out, while the other sessions' joins are being handled.
		it("join race: sessions joining while the account's join is in flight get everything once", function()
			local ROOM = "race@" .. RACE_MUC
			local bob, phone, laptop, tablet = bob_and_alice()
			join(bob, ROOM .. "/Bob")
			say(bob, ROOM, "before the race", { bob })
			fresh(bob, phone, laptop, tablet)

			local before = log_count(home, "alice joins " .. ROOM)
			phone:send(Client.muc_join(ROOM .. "/Alice"))
			laptop:send(Client.muc_join(ROOM .. "/Alice"))
			tablet:send(Client.muc_join(ROOM .. "/Alice"))
			for _, c in ipairs({ phone, laptop, tablet }) do
				assert(c:wait_for(self_presence(ROOM)))
				assert(c:wait_for(subject_message(ROOM)))
			end
			assert(bob:wait_for(presence(ROOM .. "/Alice")))
			settle(bob, phone, laptop, tablet)

			assert.equal(before + 1, log_count(home, "alice joins " .. ROOM))
			-- The race did happen: the other two joins reached the module between the
			-- account's join going out and the room's self-presence coming back.
			local log = home:log()
			local sent_at = assert(log:find("alice joins " .. ROOM, 1, true))
			local answered_at = assert(log:find("alice joined " .. ROOM, sent_at, true))
			local in_flight = 0
			for line in log:sub(sent_at, answered_at):gmatch("[^\n]+") do
				if line:find("Received[c2s]: <presence", 1, true) and line:find(ROOM .. "/Alice", 1, true) then
					in_flight = in_flight + 1
				end
			end
			assert.equal(2, in_flight, "joins received while the account's join was in flight")
			assert.equal(1, count(bob.log, presence(ROOM .. "/Alice")))
			assert.equal(1, count(bob.log, from_room(ROOM)))
			for _, c in ipairs({ phone, laptop, tablet }) do
				assert.equal(1, count(c.log, self_presence(ROOM)), c.jid)
				assert.equal(1, count(c.log, presence(ROOM .. "/Bob")), c.jid)
				assert.equal(1, count(c.log, subject_message(ROOM)), c.jid)
				assert.equal(0, count(c.log, is_error), c.jid)
				for _, el in ipairs(c.log) do assert.equal(c.jid, el.attr.to) end
			end
			for _, c in ipairs({ phone, laptop, tablet }) do
				assert.equal(1, count(c.log, groupchat("before the race")), c.jid)
			end

			fresh(bob, phone, laptop, tablet)
			say(bob, ROOM, "after the race", { phone, laptop, tablet })
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop, tablet }) do
				assert.equal(1, count(c.log, groupchat("after the race")), c.jid)
				assert.equal(1, #c.log, c.jid)
			end
			assert.equal(1, archived(phone, ROOM, "after the race"))
		end)

		it("first join: the account is the occupant; the joining session gets its self-presence", function()
			local ROOM = "one@" .. RMUC
			local bob, phone, laptop, tablet = bob_and_alice()
			join(bob, ROOM .. "/Bob")
			fresh(bob, phone, laptop, tablet)

			local own = join(phone, ROOM .. "/Alice")
			assert.equal(phone.jid, own.attr.to)
			assert.equal(ROOM .. "/Alice", own.attr.from)
			assert(phone:wait_for(subject_message(ROOM)))
			assert(bob:wait_for(presence(ROOM .. "/Alice")))
			settle(bob, phone, laptop, tablet)

			assert.equal(1, count(phone.log, self_presence(ROOM)))
			assert.equal(1, count(phone.log, presence(ROOM .. "/Bob")))
			assert.equal(1, count(phone.log, subject_message(ROOM)))
			assert.equal(3, #phone.log)
			-- The remote room has one occupant for alice, the account's bare JID.
			assert.same({ ALICE, "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, ROOM))
			assert.equal(1, count(bob.log, presence(ROOM .. "/Alice")))
			assert.equal(ALICE, item_jid(find(bob.log, presence(ROOM .. "/Alice"))))
			assert.equal(1, #bob.log)
			assert.equal(0, count(laptop.log, from_room(ROOM)))
			assert.equal(0, count(tablet.log, from_room(ROOM)))
			assert.equal("phone", sessions_in(home, ROOM))
			-- The session sees itself with its own full JID.
			assert_self_item_jids(phone, ROOM)
		end)

		it("later join: served locally, nothing reaches the remote room", function()
			local ROOM = "three@" .. RMUC
			local bob, phone, laptop, tablet = bob_and_alice()
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			for i = 1, 3 do say(bob, ROOM, "m" .. i, { phone }) end
			bob:send(st.message({ to = ROOM, type = "groupchat", id = Client.new_id() }):text_tag("subject", "Topic"))
			assert(phone:wait_for(function(el)
				return subject_message(ROOM)(el) and el:get_child_text("subject") == "Topic"
			end))
			fresh(bob, phone, laptop, tablet)
			local s2s_presences = log_count(remote, "Received[s2sin]: <presence")

			join(laptop, ROOM .. "/Alice", { history = { maxstanzas = 2 } })
			assert(laptop:wait_for(subject_message(ROOM)))
			settle(bob, phone, laptop, tablet)
			local log = laptop.log
			assert.equal(1, count(log, presence(ROOM .. "/Bob")))
			assert.equal(1, count(log, self_presence(ROOM)))
			assert.equal(0, count(log, groupchat("m1")))
			assert.equal(1, count(log, groupchat("m2")))
			assert.equal(1, count(log, groupchat("m3")))
			assert.equal(1, count(log, subject_message(ROOM)))
			assert.equal(5, #log)
			assert.same({ 1, 2, 3, 4, 5 }, {
				index_of(log, presence(ROOM .. "/Bob")), index_of(log, self_presence(ROOM)),
				index_of(log, groupchat("m2")), index_of(log, groupchat("m3")), index_of(log, subject_message(ROOM)),
			})
			assert.equal("Topic", log[5]:get_child_text("subject"))
			for _, body in ipairs({ "m2", "m3" }) do
				assert.truthy(find(log, groupchat(body)):get_child("delay", NS_DELAY), body .. " has no delay stamp")
			end
			for _, el in ipairs(log) do assert.equal(laptop.jid, el.attr.to) end
			-- Nothing went to the room: bob saw nothing, the remote server got no presence.
			assert.equal(0, #bob.log)
			assert.equal(s2s_presences, log_count(remote, "Received[s2sin]: <presence"))
			assert.equal(0, count(phone.log, from_room(ROOM)))
			assert.equal(0, count(tablet.log, from_room(ROOM)))
			assert.equal("laptop,phone", sessions_in(home, ROOM))
			-- The later session, too, sees itself with its own full JID; bob sees the account.
			assert_self_item_jids(laptop, ROOM)
			assert.same({ ALICE, "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, ROOM))
		end)

		it("fork, own message, private messages both ways, self-ping, archive", function()
			local ROOM = "four@" .. RMUC
			local bob, phone, laptop, tablet = bob_and_alice()
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			fresh(bob, phone, laptop, tablet)

			-- A remote occupant's message: once to each joined session, to none other.
			say(bob, ROOM, "hello alice", { phone, laptop, bob })
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, groupchat("hello alice")), c.jid)
				assert.equal(1, #c.log, c.jid)
				assert.equal(c.jid, c.log[1].attr.to)
				assert.equal(ROOM .. "/Bob", c.log[1].attr.from)
			end
			assert.equal(0, #tablet.log)

			-- Own message: the room sees Alice once; both joined sessions get the reflection.
			fresh(bob, phone, laptop, tablet)
			local msg = Client.groupchat(ROOM, "from laptop")
			laptop:send(msg)
			for _, c in ipairs({ bob, phone, laptop }) do assert(c:wait_for(groupchat("from laptop"))) end
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(bob.log, groupchat("from laptop")))
			assert.equal(ROOM .. "/Alice", find(bob.log, groupchat("from laptop")).attr.from)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, groupchat("from laptop")), c.jid)
				assert.equal(1, #c.log, c.jid)
				assert.equal(msg.attr.id, c.log[1].attr.id)
			end
			assert.equal(0, #tablet.log)

			-- Private message session -> occupant: leaves from the account.
			fresh(bob, phone, laptop, tablet)
			phone:send(st.message({ to = ROOM .. "/Bob", type = "chat", id = Client.new_id() }):text_tag("body", "hi bob"))
			local pm = assert(bob:wait_for(chat("hi bob")))
			assert.equal(ROOM .. "/Alice", pm.attr.from)
			-- Occupant -> account: every joined session, once.
			bob:send(st.message({ to = ROOM .. "/Alice", type = "chat", id = Client.new_id() }):text_tag("body", "psst"))
			assert(phone:wait_for(chat("psst")))
			assert(laptop:wait_for(chat("psst")))
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(bob.log, chat("hi bob")))
			assert.equal(0, count(bob.log, is_error))
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, chat("psst")), c.jid)
				assert.equal(ROOM .. "/Bob", find(c.log, chat("psst")).attr.from)
				assert.equal(0, count(c.log, is_error), c.jid)
			end
			assert.equal(0, #tablet.log)

			-- Self-ping: answered for a joined session, not-acceptable for one that is not.
			fresh(bob, phone, laptop, tablet)
			local pong = assert(phone:iq(Client.ping(ROOM .. "/Alice")))
			assert.equal("result", pong.attr.type)
			assert.equal(phone.jid, pong.attr.to)
			local refused = assert(tablet:iq(Client.ping(ROOM .. "/Alice")))
			assert.equal("error", refused.attr.type)
			assert.equal("not-acceptable", error_condition(refused))
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(phone.log, is_iq))
			assert.equal(0, count(laptop.log, is_iq))
			assert.equal(1, count(tablet.log, is_iq))
			assert.equal(0, #bob.log)

			-- An IQ to an occupant (software version), answered by bob's client, back to laptop only.
			fresh(bob, phone, laptop, tablet)
			local version = st.iq({ type = "get", to = ROOM .. "/Bob", id = Client.new_id() })
				:tag("query", { xmlns = "jabber:iq:version" })
			laptop:send(version)
			local req = assert(bob:wait_for(function(el) return el.name == "iq" and el.attr.type == "get" end))
			assert.equal(ROOM .. "/Alice", req.attr.from)
			bob:send(st.reply(req):tag("query", { xmlns = "jabber:iq:version" }):text_tag("name", "BobClient"))
			local answer = assert(laptop:wait_for(iq_reply(version.attr.id)))
			assert.equal("result", answer.attr.type)
			assert.equal("BobClient", answer:find("{jabber:iq:version}query/name#"))
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(laptop.log, is_iq))
			assert.equal(0, count(phone.log, is_iq))
			assert.equal(0, count(tablet.log, is_iq))

			-- The account's archive holds each groupchat message once.
			assert.equal(1, archived(tablet, ROOM, "hello alice"))
			assert.equal(1, archived(tablet, ROOM, "from laptop"))
		end)

		it("leave one of two, then the last", function()
			local ROOM = "nine@" .. RMUC
			local bob, phone, laptop, tablet = bob_and_alice()
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			fresh(bob, phone, laptop, tablet)

			local gone = leave(phone, ROOM .. "/Alice")
			assert.equal(ROOM .. "/Alice", gone.attr.from)
			assert.equal(phone.jid, gone.attr.to)
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(phone.log, self_presence(ROOM, "unavailable")))
			assert.equal(1, #phone.log)
			assert.equal(0, #bob.log)
			assert.equal(0, #laptop.log)
			assert.same({ ALICE, "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, ROOM))

			fresh(bob, phone, laptop, tablet)
			say(bob, ROOM, "after phone left", { laptop })
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(laptop.log, groupchat("after phone left")))
			assert.equal(0, #phone.log)

			-- The last one: the account leaves the remote room, once.
			fresh(bob, phone, laptop, tablet)
			gone = leave(laptop, ROOM .. "/Alice")
			assert.equal(laptop.jid, gone.attr.to)
			assert(bob:wait_for(presence(ROOM .. "/Alice", "unavailable")))
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(bob.log, presence(ROOM .. "/Alice", "unavailable")))
			assert.equal(1, #bob.log)
			assert.equal(1, count(laptop.log, self_presence(ROOM, "unavailable")))
			assert.equal(1, #laptop.log)
			assert.equal(0, #phone.log)
			assert.equal(0, #tablet.log)
			assert.same({ "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, ROOM))
			assert.is_nil(sessions_in(home, ROOM))
		end)

		it("disconnect of a session keeps the account in the room", function()
			local ROOM = "eleven@" .. RMUC
			local bob, phone, laptop, tablet = bob_and_alice()
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			fresh(bob, phone, tablet)

			local disconnects = log_count(home, "Client disconnected")
			laptop:kill()
			wait_log(home, "Client disconnected", disconnects)
			say(bob, ROOM, "after laptop died", { phone })
			settle(bob, phone, tablet)
			assert.equal(1, count(phone.log, groupchat("after laptop died")))
			assert.equal(0, count(bob.log, presence(ROOM .. "/Alice", "unavailable")))
			assert.equal(0, count(bob.log, any_presence(ROOM .. "/Alice")))
			assert.equal(0, count(tablet.log, from_room(ROOM)))
			assert.same({ ALICE, "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, ROOM))
			assert.equal("phone", sessions_in(home, ROOM))
			leave(phone, ROOM .. "/Alice")
		end)

		it("nick change: the 303 and the new presence reach every joined session", function()
			local ROOM = "nicks@" .. RMUC
			local bob, phone, laptop, tablet = bob_and_alice()
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			fresh(bob, phone, laptop, tablet)

			phone:send(st.presence({ to = ROOM .. "/Ally" }))
			for _, c in ipairs({ phone, laptop, bob }) do assert(c:wait_for(presence(ROOM .. "/Ally"))) end
			settle(bob, phone, laptop, tablet)
			local changed = with_status(ROOM .. "/Alice", 303)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, changed), c.jid)
				local notice = find(c.log, changed)
				assert.equal("unavailable", notice.attr.type)
				assert.is_true(Client.muc_status(notice)[110])
				assert.equal("Ally", muc_item(notice).attr.nick)
				assert.equal(1, count(c.log, presence(ROOM .. "/Ally")), c.jid)
				assert.is_true(Client.muc_status(find(c.log, presence(ROOM .. "/Ally")))[110])
				assert.equal(2, #c.log, c.jid)
				for _, el in ipairs(c.log) do assert.equal(c.jid, el.attr.to) end
				assert_self_item_jids(c, ROOM)
			end
			assert.equal(1, count(bob.log, changed))
			assert.equal(1, count(bob.log, presence(ROOM .. "/Ally")))
			assert.equal(ALICE, item_jid(find(bob.log, presence(ROOM .. "/Ally"))))
			assert.equal(2, #bob.log)
			assert.equal(0, #tablet.log)

			-- Still joined under the new nick.
			fresh(bob, phone, laptop, tablet)
			assert.equal("result", assert(laptop:iq(Client.ping(ROOM .. "/Ally"))).attr.type)
			say(bob, ROOM, "still Ally?", { phone, laptop })
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do assert.equal(1, count(c.log, groupchat("still Ally?"))) end
			assert.equal(0, #tablet.log)
			leave(phone, ROOM .. "/Ally")
			leave(laptop, ROOM .. "/Ally")
		end)

		it("kick (307): every joined session once, the membership is gone", function()
			local ROOM = "kick@" .. RMUC
			local bob, phone, laptop, tablet = bob_and_alice()
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			fresh(bob, phone, laptop, tablet)

			assert.equal("result", admin(bob, ROOM, { nick = "Alice", role = "none" }).attr.type)
			for _, c in ipairs({ phone, laptop }) do assert(c:wait_for(with_status(ROOM .. "/Alice", 307))) end
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, with_status(ROOM .. "/Alice", 307)), c.jid)
				assert.equal(1, count(c.log, self_presence(ROOM, "unavailable")), c.jid)
				assert.equal(1, #c.log, c.jid)
				assert.equal(c.jid, c.log[1].attr.to)
				assert_self_item_jids(c, ROOM)
			end
			assert.equal(0, #tablet.log)
			assert.equal(1, count(bob.log, with_status(ROOM .. "/Alice", 307)))
			assert.is_nil(sessions_in(home, ROOM))

			-- The room answers phone's self-ping itself: not an occupant.
			local ping = assert(phone:iq(Client.ping(ROOM .. "/Alice")))
			assert.equal("not-acceptable", error_condition(ping))
		end)

		it("destroy: every joined session once, the membership is gone", function()
			local ROOM = "doomed@" .. RMUC
			local bob, phone, laptop, tablet = bob_and_alice()
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			fresh(bob, phone, laptop, tablet)

			local destroyed = assert(bob:iq(st.iq({ type = "set", to = ROOM, id = Client.new_id() })
				:tag("query", { xmlns = NS_MUC_OWNER })
				:tag("destroy", { jid = "elsewhere@" .. RMUC }):text_tag("reason", "closing")))
			assert.equal("result", destroyed.attr.type)
			local function destroy_notice(el)
				return el.name == "presence" and el.attr.from == ROOM .. "/Alice" and el.attr.type == "unavailable"
					and el:find("{" .. NS_MUC_USER .. "}x/destroy") ~= nil
			end
			for _, c in ipairs({ phone, laptop }) do assert(c:wait_for(destroy_notice)) end
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, destroy_notice), c.jid)
				assert.equal(1, #c.log, c.jid)
			end
			assert.equal(0, #tablet.log)
			assert.is_nil(sessions_in(home, ROOM))

			-- A join now creates the room anew, for real.
			local own = join(tablet, ROOM .. "/Alice")
			assert.is_true(Client.muc_status(own)[201])
			leave(tablet, ROOM .. "/Alice")
		end)

		-- Last: restarts the home server.
		it("quiet presence: the remote room hears nothing of alice's clients coming and going", function()
			quiet_presence{
				home = home, rooms = remote, room = "quiet@" .. RMUC, connect = connect,
				check = function(want, got, what) assert.equal(want, got, what) end,
				truthy = function(v, what) assert.truthy(v, what) end,
			}
		end)

		it("home-server restart: the membership is kept and the account rejoins the remote room", function()
			local ROOM = "restart@" .. RMUC
			local bob, phone = connect(remote, "bob", "pc"), connect(home, "alice", "phone")
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			say(bob, ROOM, "before restart", { phone })
			close_all()
			bob = connect(remote, "bob", "pc") -- watches the room from outside meanwhile
			join(bob, ROOM .. "/Bob")
			fresh(bob)

			local note = "alice rejoins after a restart: " .. ROOM .. " as Alice"
			local rejoins, rejoined = log_count(home, note), log_count(home, "Rejoined")
			home:restart()
			wait_log(home, "Rejoined", rejoined)
			assert.equal(rejoins + 1, log_count(home, note))
			-- The room still (or again) has the account as its occupant, and no error kick.
			local deadline = os.time() + 10
			while #muc.occupant_jids(remote, RMUC, ROOM) < 2 and os.time() < deadline do settle(bob) end
			assert.same({ ALICE, "bob@" .. REMOTE }, muc.occupant_jids(remote, RMUC, ROOM))
			settle(bob)
			assert.equal(0, count(bob.log, presence(ROOM .. "/Alice", "unavailable")))
			assert.equal(0, count(bob.log, with_status(ROOM .. "/Alice", 333)))

			-- A new session joins: served, live traffic both ways.
			phone = connect(home, "alice", "phone")
			local laptop = connect(home, "alice", "laptop")
			fresh(bob, phone, laptop)
			join(phone, ROOM .. "/Alice", { history = { maxstanzas = 0 } })
			assert(phone:wait_for(subject_message(ROOM)))
			say(bob, ROOM, "after restart", { phone })
			say(phone, ROOM, "phone after restart", { bob, phone })
			assert.equal("result", assert(phone:iq(Client.ping(ROOM .. "/Alice"))).attr.type)
			settle(bob, phone, laptop)
			assert.equal(1, count(phone.log, self_presence(ROOM)))
			assert.equal(1, count(phone.log, presence(ROOM .. "/Bob")))
			assert.equal(1, count(phone.log, groupchat("after restart")))
			assert.equal(1, count(phone.log, groupchat("phone after restart")))
			assert.equal(1, count(bob.log, groupchat("phone after restart")))
			assert.equal(0, #laptop.log)
			assert_self_item_jids(phone, ROOM)

			-- Archived once each: nothing twice because of the rejoin.
			assert.equal(1, archived(laptop, ROOM, "before restart"))
			assert.equal(1, archived(laptop, ROOM, "after restart"))
			assert.equal(1, archived(laptop, ROOM, "phone after restart"))
		end)

		it("leaves no errors in the logs", function()
			no_tracebacks(home)()
			no_tracebacks(remote)()
		end)
	end)
end)
