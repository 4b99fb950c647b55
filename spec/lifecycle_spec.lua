-- The room lifecycle around mod_minimix (flows 8 and 13-17 of /work/shared/SPEC.md) against
-- a real Prosody with mod_pep, mod_bookmarks, mod_mam and mod_carbons on the VirtualHost:
-- presence aggregation, removal from the room, nick changes, XEP-0402 bookmarks, the
-- account's archive, server restarts and module reloads. alice has the sessions phone,
-- laptop and tablet; bob watches the room. Every "exactly once" and "nothing" is counted
-- in the clients' logs after settle(), which waits until all of them are quiet.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local st = Client.stanza

local MUC = "conference.localhost"
local ALICE = "alice@localhost"
local NS_MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
local NS_MUC_OWNER = "http://jabber.org/protocol/muc#owner"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"
local NS_PUBSUB = "http://jabber.org/protocol/pubsub"
local NS_BOOKMARKS = "urn:xmpp:bookmarks:1"
local NS_FORWARD = "urn:xmpp:forward:0"
local NS_CARBONS = "urn:xmpp:carbons:2"
local NS_SID = "urn:xmpp:sid:0"
local NS_DELAY = "urn:xmpp:delay"

---------------------------------------------------------------------------
-- Helpers

local clients = muc.clients()
local connect, close_all = clients.connect, clients.close_all

--- A server with the module, PEP, bookmarks, MAM and carbons; rooms unlocked on creation.
local function start(options)
	return Server.start{
		module = true,
		modules = { "pep", "bookmarks", "mam", "carbons" },
		options = options,
		muc_options = { muc_room_locking = false },
	}
end

local bare = muc.bare
local count = muc.count
local from_room = muc.from_room
local presence = muc.presence
local self_presence = muc.self_presence
local groupchat = muc.groupchat
local subject_message = muc.subject_message
local is_iq = muc.is_iq
local error_condition = muc.error_condition
local muc_item = muc.muc_item
local join = muc.join
local leave = muc.leave
local configure = muc.configure
local log_count = muc.log_count
local no_tracebacks = muc.no_tracebacks

local find = muc.find

local settle = muc.settle
local fresh = muc.fresh

-- Predicates over received stanzas.

--- Any presence from `from`, whatever its type.
local function any_presence(from)
	return function(el) return el.name == "presence" and el.attr.from == from end
end

--- Presence from `from` carrying MUC status `code`.
local function with_status(from, code)
	return function(el)
		return el.name == "presence" and el.attr.from == from and Client.muc_status(el)[code] == true
	end
end

--- A carbon copy (received or sent) of a message with this body.
local function carbon_of(body)
	return function(el)
		if el.name ~= "message" then return false end
		for _, kind in ipairs({ "received", "sent" }) do
			local fwd = el:get_child(kind, NS_CARBONS)
			local inner = fwd and fwd:find("{" .. NS_FORWARD .. "}forwarded/{jabber:client}message")
			if inner and Client.body(inner) == body then return true end
		end
		return false
	end
end

-- Actions.

--- A muc#admin item change (kick: { nick =, role = "none" }; ban: { jid =, affiliation = "outcast" }).
local function admin(c, room, item)
	return assert(c:iq(st.iq({ type = "set", to = room, id = Client.new_id() })
		:tag("query", { xmlns = NS_MUC_ADMIN }):tag("item", item):text_tag("reason", "test"):up():up()))
end

local say = muc.say

-- The line the module logs when it is loaded (at start and on each reload).
local LOADED = "\tinfo\tmod_minimix "

local wait_log = muc.wait_log

--- Publish a XEP-0402 bookmark for `room` with the options XEP-0402 asks for.
local function publish_bookmark(c, room, attrs, nick)
	local conference = st.stanza("conference", { xmlns = NS_BOOKMARKS, autojoin = attrs.autojoin, name = attrs.name })
	if nick then conference:text_tag("nick", nick) end
	local iq = st.iq({ type = "set", id = Client.new_id() })
		:tag("pubsub", { xmlns = NS_PUBSUB })
		:tag("publish", { node = NS_BOOKMARKS }):tag("item", { id = room }):add_child(conference):up():up()
		:tag("publish-options"):tag("x", { xmlns = "jabber:x:data", type = "submit" })
		:tag("field", { var = "FORM_TYPE", type = "hidden" })
		:text_tag("value", "http://jabber.org/protocol/pubsub#publish-options"):up()
		:tag("field", { var = "pubsub#persist_items" }):text_tag("value", "true"):up()
		:tag("field", { var = "pubsub#access_model" }):text_tag("value", "whitelist"):up()
	return assert(c:iq(iq))
end

local function retract_bookmark(c, room)
	return assert(c:iq(st.iq({ type = "set", id = Client.new_id() })
		:tag("pubsub", { xmlns = NS_PUBSUB })
		:tag("retract", { node = NS_BOOKMARKS, notify = "true" }):tag("item", { id = room })))
end

local function mam_query(c, with)
	local results, fin = muc.mam_query(c, with)
	assert.equal("result", fin.attr.type)
	return results, fin
end

local function enable_carbons(c)
	local reply = assert(c:iq(st.iq({ type = "set", id = Client.new_id() }):tag("enable", { xmlns = NS_CARBONS })))
	assert.equal("result", reply.attr.type)
end

---------------------------------------------------------------------------

describe("mod_minimix lifecycle", function()
	after_each(close_all)
	teardown(Server.stop_all)

	describe("flow 8: presence aggregation", function()
		local srv
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		-- `mode` is how alice's sessions set their status: a presence directed to the room
		-- (to=room/nick) or their broadcast presence (no `to`).
		local function aggregate(mode)
			local ROOM = "agg-" .. mode .. "@" .. MUC
			local ALICE_NICK = ROOM .. "/Alice"
			local function set_status(c, show)
				local p = st.presence(mode == "directed" and { to = ALICE_NICK } or {})
				if show then p:text_tag("show", show) end
				c:send(p)
			end

			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			local laptop = connect(srv, "alice", "laptop")
			join(bob, ROOM .. "/Bob")
			join(phone, ALICE_NICK)
			join(laptop, ALICE_NICK)
			fresh(bob, phone, laptop)

			-- phone away, laptop still available: the room still shows alice available.
			set_status(phone, "away")
			settle(bob, phone, laptop)
			assert.equal(0, count(bob.log, any_presence(ALICE_NICK)))

			-- laptop dnd: phone's away is now the most available.
			fresh(bob, phone, laptop)
			set_status(laptop, "dnd")
			assert(bob:wait_for(presence(ALICE_NICK)))
			settle(bob, phone, laptop)
			assert.equal(1, count(bob.log, any_presence(ALICE_NICK)))
			local shown = find(bob.log, presence(ALICE_NICK))
			assert.equal("away", shown:get_child_text("show"))
			-- Both sessions still get the room's presences (the update reflected).
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, presence(ALICE_NICK)))
			end

			-- laptop leaves: phone (away) stays the aggregate, nothing changes.
			fresh(bob, phone, laptop)
			leave(laptop, ALICE_NICK)
			settle(bob, phone, laptop)
			assert.equal(0, count(bob.log, any_presence(ALICE_NICK)))
			assert.equal(0, count(phone.log, from_room(ROOM)))

			-- phone available again: one update without <show/>.
			fresh(bob, phone, laptop)
			set_status(phone, nil)
			assert(bob:wait_for(presence(ALICE_NICK)))
			settle(bob, phone, laptop)
			assert.equal(1, count(bob.log, any_presence(ALICE_NICK)))
			assert.is_nil(find(bob.log, presence(ALICE_NICK)):get_child("show"))
			assert.equal(0, count(laptop.log, from_room(ROOM)))
		end

		it("shows the most available session, with presences directed to the room", function()
			aggregate("directed")
		end)

		it("shows the most available session, with broadcast presences", function()
			aggregate("broadcast")
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 13: removed from the room", function()
		local srv
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		--- bob creates `room` (owner), then phone and laptop join as Alice.
		local function joined_room(room, bob, phone, laptop)
			join(bob, room .. "/Bob")
			join(phone, room .. "/Alice")
			join(laptop, room .. "/Alice")
		end

		it("forks a kick (307) to every joined session once and forgets the membership", function()
			local ROOM = "kick@" .. MUC
			local bob, phone, laptop, tablet = clients.bob_and_alice(srv)
			joined_room(ROOM, bob, phone, laptop)
			fresh(bob, phone, laptop, tablet)

			assert.equal("result", admin(bob, ROOM, { nick = "Alice", role = "none" }).attr.type)
			for _, c in ipairs({ phone, laptop }) do
				assert(c:wait_for(with_status(ROOM .. "/Alice", 307)))
			end
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, with_status(ROOM .. "/Alice", 307)))
				assert.equal(1, count(c.log, self_presence(ROOM, "unavailable")))
				assert.equal(1, count(c.log, from_room(ROOM)))
				assert.equal(c.jid, c.log[1].attr.to)
			end
			assert.equal(0, count(tablet.log, from_room(ROOM)))
			assert.equal(1, count(bob.log, with_status(ROOM .. "/Alice", 307)))

			-- The membership is gone: the room answers phone's self-ping itself (not an
			-- occupant), and tablet's join goes to the room for real.
			local ping = assert(phone:iq(Client.ping(ROOM .. "/Alice")))
			assert.equal("error", ping.attr.type)
			assert.equal("not-acceptable", error_condition(ping))
			fresh(bob, phone, laptop, tablet)
			join(tablet, ROOM .. "/Alice")
			assert(bob:wait_for(presence(ROOM .. "/Alice")))
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(bob.log, presence(ROOM .. "/Alice")))
			assert.equal(1, count(tablet.log, self_presence(ROOM)))
			assert.equal(1, count(tablet.log, presence(ROOM .. "/Bob")))
			assert.equal(0, count(phone.log, from_room(ROOM)))
			assert.equal(0, count(laptop.log, from_room(ROOM)))
		end)

		it("forks a ban (301) to every joined session once; a later join is refused by the room", function()
			local ROOM = "ban@" .. MUC
			local bob, phone, laptop, tablet = clients.bob_and_alice(srv)
			joined_room(ROOM, bob, phone, laptop)
			fresh(bob, phone, laptop, tablet)

			assert.equal("result", admin(bob, ROOM, { jid = ALICE, affiliation = "outcast" }).attr.type)
			for _, c in ipairs({ phone, laptop }) do
				assert(c:wait_for(with_status(ROOM .. "/Alice", 301)))
			end
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, with_status(ROOM .. "/Alice", 301)))
				assert.equal(1, count(c.log, from_room(ROOM)))
			end
			assert.equal(0, count(tablet.log, from_room(ROOM)))
			assert.equal(1, count(bob.log, with_status(ROOM .. "/Alice", 301)))

			fresh(bob, phone, laptop, tablet)
			tablet:send(Client.muc_join(ROOM .. "/Alice"))
			local refused = assert(tablet:wait_for(presence(ROOM .. "/Alice", "error")))
			assert.equal("forbidden", error_condition(refused))
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(tablet.log, from_room(ROOM)))
			assert.equal(0, count(bob.log, from_room(ROOM)))
			assert.equal(0, count(phone.log, from_room(ROOM)))
			assert.equal(0, count(laptop.log, from_room(ROOM)))
		end)

		it("forks the room's destruction to every joined session once", function()
			local ROOM = "doomed@" .. MUC
			local bob, phone, laptop, tablet = clients.bob_and_alice(srv)
			joined_room(ROOM, bob, phone, laptop)
			fresh(bob, phone, laptop, tablet)

			local destroyed = assert(bob:iq(st.iq({ type = "set", to = ROOM, id = Client.new_id() })
				:tag("query", { xmlns = NS_MUC_OWNER })
				:tag("destroy", { jid = "elsewhere@" .. MUC }):text_tag("reason", "closing")))
			assert.equal("result", destroyed.attr.type)
			local function destroy_notice(el)
				return el.name == "presence" and el.attr.from == ROOM .. "/Alice" and el.attr.type == "unavailable"
					and el:find("{" .. NS_MUC_USER .. "}x/destroy") ~= nil
			end
			for _, c in ipairs({ phone, laptop }) do assert(c:wait_for(destroy_notice)) end
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, destroy_notice))
				assert.equal(1, count(c.log, from_room(ROOM)))
				local notice = find(c.log, destroy_notice)
				assert.equal("elsewhere@" .. MUC, notice:find("{" .. NS_MUC_USER .. "}x/destroy@jid"))
			end
			assert.equal(0, count(tablet.log, from_room(ROOM)))

			-- The room is gone and so is the membership: a join creates the room anew.
			fresh(phone, laptop, tablet)
			local own = join(tablet, ROOM .. "/Alice")
			assert.is_true(Client.muc_status(own)[201])
			settle(phone, laptop, tablet)
			assert.equal(0, count(phone.log, from_room(ROOM)))
			assert.equal(0, count(laptop.log, from_room(ROOM)))
			leave(tablet, ROOM .. "/Alice")
		end)

		it("does not rejoin a room the account was kicked from after a restart", function()
			local KICKED, KEPT = "kicked@" .. MUC, "kept@" .. MUC
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			local laptop = connect(srv, "alice", "laptop")
			for _, room in ipairs({ KICKED, KEPT }) do
				joined_room(room, bob, phone, laptop)
				assert.equal("result", configure(bob, room, { ["muc#roomconfig_persistentroom"] = "1" }).attr.type)
			end
			assert.equal("result", admin(bob, KICKED, { nick = "Alice", role = "none" }).attr.type)
			assert(phone:wait_for(with_status(KICKED .. "/Alice", 307)))
			assert(laptop:wait_for(with_status(KICKED .. "/Alice", 307)))
			close_all()

			local rejoined = log_count(srv, "Rejoined")
			srv:restart()
			wait_log(srv, "Rejoined", rejoined)
			assert.equal(0, log_count(srv, "alice rejoins after a restart: " .. KICKED))
			assert.equal(1, log_count(srv, "alice rejoins after a restart: " .. KEPT))

			-- bob's account is back in both rooms too; his new session sees who is there.
			bob = connect(srv, "bob", "pc")
			phone = connect(srv, "alice", "phone")
			join(bob, KICKED .. "/Bob")
			join(bob, KEPT .. "/Bob")
			settle(bob, phone)
			assert.equal(0, count(bob.log, any_presence(KICKED .. "/Alice")))
			assert.equal(1, count(bob.log, presence(KEPT .. "/Alice")))
			local ping = assert(phone:iq(Client.ping(KICKED .. "/Alice")))
			assert.equal("not-acceptable", error_condition(ping))
			settle(bob, phone)
			assert.equal(0, count(bob.log, any_presence(KICKED .. "/Alice")))
			assert.equal(1, count(phone.log, from_room(KICKED)))
			assert.equal(1, count(phone.log, is_iq))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 14: nick change", function()
		local srv
		local ROOM = "nicks@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("gives every joined session the 303 and the new presence, and a 409 to the asker only", function()
			local bob, phone, laptop, tablet = clients.bob_and_alice(srv)
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			fresh(bob, phone, laptop, tablet)

			phone:send(st.presence({ to = ROOM .. "/Ally" }))
			for _, c in ipairs({ phone, laptop, bob }) do assert(c:wait_for(presence(ROOM .. "/Ally"))) end
			settle(bob, phone, laptop, tablet)
			local changed = with_status(ROOM .. "/Alice", 303)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, changed))
				local notice = find(c.log, changed)
				assert.equal("unavailable", notice.attr.type)
				assert.is_true(Client.muc_status(notice)[110])
				assert.equal("Ally", muc_item(notice).attr.nick)
				assert.equal(1, count(c.log, presence(ROOM .. "/Ally")))
				assert.is_true(Client.muc_status(find(c.log, presence(ROOM .. "/Ally")))[110])
				assert.equal(2, count(c.log, from_room(ROOM)))
				for _, el in ipairs(c.log) do assert.equal(c.jid, el.attr.to) end
			end
			assert.equal(1, count(bob.log, changed))
			assert.equal("Ally", muc_item(find(bob.log, changed)).attr.nick)
			assert.equal(1, count(bob.log, presence(ROOM .. "/Ally")))
			assert.equal(2, count(bob.log, from_room(ROOM)))
			assert.equal(0, count(tablet.log, from_room(ROOM)))

			-- laptop asks for bob's nick: the conflict goes to laptop alone.
			fresh(bob, phone, laptop, tablet)
			laptop:send(st.presence({ to = ROOM .. "/Bob" }))
			local conflict = assert(laptop:wait_for(presence(ROOM .. "/Bob", "error")))
			assert.equal("conflict", error_condition(conflict))
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(laptop.log, from_room(ROOM)))
			assert.equal(0, count(phone.log, from_room(ROOM)))
			assert.equal(0, count(tablet.log, from_room(ROOM)))
			assert.equal(0, count(bob.log, from_room(ROOM)))

			-- Both sessions are still joined under the new nick.
			fresh(bob, phone, laptop, tablet)
			assert.equal("result", assert(laptop:iq(Client.ping(ROOM .. "/Ally"))).attr.type)
			say(bob, ROOM, "still Ally?", { phone, laptop })
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do assert.equal(1, count(c.log, groupchat("still Ally?"))) end
			assert.equal(0, count(tablet.log, from_room(ROOM)))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 15: bookmarks", function()
		local srv
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		-- `how` ends the bookmark: "retract" (pubsub retract) or "autojoin-false" (republished
		-- with autojoin='false').
		local function bookmark(how)
			local ROOM = "marked-" .. how .. "@" .. MUC
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			local laptop = connect(srv, "alice", "laptop")
			join(bob, ROOM .. "/Bob")
			fresh(bob, phone, laptop)

			-- No session of alice joins: the bookmark alone makes the account join as Al.
			local published = publish_bookmark(laptop, ROOM, { autojoin = "true", name = "Marked" }, "Al")
			assert.equal("result", published.attr.type)
			local seen = assert(bob:wait_for(presence(ROOM .. "/Al")))
			local item = muc_item(seen)
			if item and item.attr.jid then assert.equal(ALICE, bare(item.attr.jid)) end
			settle(bob, phone, laptop)
			assert.equal(1, count(bob.log, any_presence(ROOM .. "/Al")))
			assert.equal(0, count(phone.log, from_room(ROOM)))
			assert.equal(0, count(laptop.log, from_room(ROOM)))

			-- phone joins: served locally, under the bookmark's nick.
			fresh(bob, phone, laptop)
			local own = join(phone, ROOM .. "/Al")
			assert.equal(ROOM .. "/Al", own.attr.from)
			assert(phone:wait_for(subject_message(ROOM)))
			settle(bob, phone, laptop)
			assert.equal(0, count(bob.log, from_room(ROOM)))
			assert.equal(1, count(phone.log, self_presence(ROOM)))
			assert.equal(1, count(phone.log, presence(ROOM .. "/Bob")))
			assert.equal(0, count(laptop.log, from_room(ROOM)))

			-- The bookmark ends: the account leaves once, phone gets its unavailable self-presence.
			fresh(bob, phone, laptop)
			local ended
			if how == "retract" then
				ended = retract_bookmark(laptop, ROOM)
			else
				ended = publish_bookmark(laptop, ROOM, { autojoin = "false", name = "Marked" }, "Al")
			end
			assert.equal("result", ended.attr.type)
			assert(bob:wait_for(presence(ROOM .. "/Al", "unavailable")))
			assert(phone:wait_for(self_presence(ROOM, "unavailable")))
			settle(bob, phone, laptop)
			assert.equal(1, count(bob.log, presence(ROOM .. "/Al", "unavailable")))
			assert.equal(1, count(bob.log, from_room(ROOM)))
			assert.equal(1, count(phone.log, self_presence(ROOM, "unavailable")))
			assert.equal(1, count(phone.log, from_room(ROOM)))
			assert.equal(0, count(laptop.log, from_room(ROOM)))

			-- Nothing is left: phone's self-ping is answered by the room, not an occupant.
			local ping = assert(phone:iq(Client.ping(ROOM .. "/Al")))
			assert.equal("not-acceptable", error_condition(ping))
			settle(bob, phone, laptop)
			assert.equal(0, count(bob.log, presence(ROOM .. "/Al")))
		end

		it("joins from an autojoin bookmark and leaves when it is retracted", function()
			bookmark("retract")
		end)

		it("joins from an autojoin bookmark and leaves when it says autojoin='false'", function()
			bookmark("autojoin-false")
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 16: archive", function()
		local srv
		local ROOM, LIVE = "archived@" .. MUC, "live@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("stores what comes while no session is online once in the account's archive", function()
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			phone:close()
			fresh(bob)

			for i = 1, 3 do say(bob, ROOM, "offline " .. i, { bob }) end
			settle(bob)
			assert.equal(0, count(bob.log, any_presence(ROOM .. "/Alice")))

			local laptop = connect(srv, "alice", "laptop")
			local results = mam_query(laptop, ROOM)
			assert.equal(3, #results)
			for i = 1, 3 do
				local msg = results[i].message
				assert.equal("groupchat", msg.attr.type)
				assert.equal(ROOM .. "/Bob", msg.attr.from)
				assert.equal("offline " .. i, Client.body(msg))
				assert.truthy(results[i].id)
			end
			settle(laptop)
			assert.equal(0, count(laptop.log, from_room(ROOM)))
		end)

		it("stores what a session sends to an occupant or the room once, as mod_mam would", function()
			local SENT = "sent@" .. MUC
			local bob, phone, laptop = clients.bob_and_alice(srv)
			join(bob, SENT .. "/Bob")
			join(phone, SENT .. "/Alice")
			join(laptop, SENT .. "/Alice")
			fresh(bob, phone, laptop)
			-- A private message goes out from the account (the room sees its occupant), yet
			-- it is the session's own: mod_mam would have stored it, so the module does.
			phone:send(st.message({ to = SENT .. "/Bob", type = "chat", id = Client.new_id() })
				:text_tag("body", "private to bob"))
			local got = assert(bob:wait_for(function(el) return Client.body(el) == "private to bob" end))
			assert.equal(SENT .. "/Alice", got.attr.from)
			laptop:send(st.message({ to = SENT .. "/Bob", type = "chat", id = Client.new_id() })
				:tag("active", { xmlns = "http://jabber.org/protocol/chatstates" }):up())
			say(phone, SENT, "group from phone", { bob, phone, laptop })
			settle(bob, phone, laptop)
			local results = mam_query(laptop, SENT)
			local bodies = {}
			for _, r in ipairs(results) do bodies[#bodies + 1] = Client.body(r.message) or "(none)" end
			-- Each once, in order: the chat state alone is not archived (mod_mam's rules).
			assert.same({ "private to bob", "group from phone" }, bodies)
			local stored = results[1].message
			assert.equal(phone.jid, stored.attr.from)
			assert.equal(SENT .. "/Bob", stored.attr.to)
		end)

		it("gives live copies the archive's stanza-id, and carbons copy no groupchat", function()
			local bob, phone, laptop, tablet = clients.bob_and_alice(srv)
			for _, c in ipairs({ phone, laptop, tablet }) do enable_carbons(c) end
			join(bob, LIVE .. "/Bob")
			join(phone, LIVE .. "/Alice")
			join(laptop, LIVE .. "/Alice")
			fresh(bob, phone, laptop, tablet)

			say(bob, LIVE, "live from bob", { phone, laptop })
			say(phone, LIVE, "live from phone", { bob, phone, laptop })
			bob:send(st.message({ to = LIVE .. "/Alice", type = "chat", id = Client.new_id() })
				:text_tag("body", "private from bob"))
			local function pm(el) return el.name == "message" and Client.body(el) == "private from bob" end
			assert(phone:wait_for(pm))
			assert(laptop:wait_for(pm))
			settle(bob, phone, laptop, tablet)

			local ids = {}
			for _, body in ipairs({ "live from bob", "live from phone" }) do
				for _, c in ipairs({ phone, laptop }) do
					assert.equal(1, count(c.log, groupchat(body)), body .. " to " .. c.jid)
					assert.equal(0, count(c.log, carbon_of(body)), "carbon of " .. body .. " to " .. c.jid)
					local sid = find(c.log, groupchat(body)):get_child_with_attr("stanza-id", NS_SID, "by", ALICE)
					assert.truthy(sid, body .. " to " .. c.jid .. " has no stanza-id by " .. ALICE)
					if ids[body] then assert.equal(ids[body], sid.attr.id) end
					ids[body] = sid.attr.id
				end
				assert.equal(0, count(tablet.log, groupchat(body)))
				assert.equal(0, count(tablet.log, carbon_of(body)))
			end
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, pm))
				assert.equal(0, count(c.log, carbon_of("private from bob")))
			end
			assert.equal(0, count(tablet.log, pm))
			assert.equal(0, count(tablet.log, carbon_of("private from bob")))
			assert.equal(0, count(tablet.log, from_room(LIVE)))
			assert.equal(ids["live from bob"] ~= ids["live from phone"], true)

			-- The archive holds each message once, under the id the live copies carried.
			local archived = {}
			for _, r in ipairs(mam_query(tablet, LIVE)) do
				if r.message.attr.type == "groupchat" then
					local body = Client.body(r.message)
					archived[#archived + 1] = body
					assert.equal(ids[body], r.id, body)
				end
			end
			assert.same({ "live from bob", "live from phone" }, archived)
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 17: restart and reload", function()
		local srv
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		--- bob makes `room` persistent; phone joins as Alice; bob says `before`; bob leaves
		--- (his account is then no occupant: after the restart he joins for real).
		local function before_restart(room, before)
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			join(bob, room .. "/Bob")
			assert.equal("result", configure(bob, room, { ["muc#roomconfig_persistentroom"] = "1" }).attr.type)
			join(phone, room .. "/Alice")
			for _, body in ipairs(before) do say(bob, room, body, { phone }) end
			leave(bob, room .. "/Bob")
			close_all()
		end

		--- After the server is back: alice's account rejoined `room` once; bob joins and sees
		--- Alice once; messages come while no alice session is online; phone joins asking for
		--- `maxstanzas` and is served locally, with just that much history.
		local function after_restart(room, before, rejoins_before, maxstanzas)
			local note = "alice rejoins after a restart: " .. room .. " as Alice"
			assert.equal(rejoins_before + 1, log_count(srv, note))

			local bob = connect(srv, "bob", "pc")
			join(bob, room .. "/Bob")
			local after = { "after 1", "after 2", "after 3" }
			for _, body in ipairs(after) do say(bob, room, body, { bob }) end
			settle(bob)
			assert.equal(1, count(bob.log, presence(room .. "/Alice")))
			assert.equal(1, count(bob.log, any_presence(room .. "/Alice")))

			local phone = connect(srv, "alice", "phone")
			fresh(bob, phone)
			join(phone, room .. "/Alice", { history = { maxstanzas = maxstanzas } })
			assert(phone:wait_for(subject_message(room)))
			settle(bob, phone)
			assert.equal(0, count(bob.log, from_room(room)))
			assert.equal(1, count(phone.log, self_presence(room)))
			assert.equal(1, count(phone.log, presence(room .. "/Bob")))
			for _, body in ipairs(before) do assert.equal(0, count(phone.log, groupchat(body)), body) end
			for i, body in ipairs(after) do
				local expected = i > #after - maxstanzas and 1 or 0
				assert.equal(expected, count(phone.log, groupchat(body)), body)
				local msg = find(phone.log, groupchat(body))
				if msg then assert.truthy(msg:get_child("delay", NS_DELAY), body .. " has no delay stamp") end
			end

			-- Still joined for real: live traffic both ways, a self-ping answered by the room.
			fresh(bob, phone)
			say(bob, room, "live after restart", { phone })
			say(phone, room, "phone after restart", { bob, phone })
			assert.equal("result", assert(phone:iq(Client.ping(room .. "/Alice"))).attr.type)
			settle(bob, phone)
			assert.equal(1, count(phone.log, groupchat("live after restart")))
			assert.equal(1, count(phone.log, groupchat("phone after restart")))
			assert.equal(1, count(bob.log, groupchat("phone after restart")))
			assert.equal(0, count(bob.log, any_presence(room .. "/Alice")))
		end

		it("rejoins the account once after a graceful restart", function()
			local ROOM = "restart@" .. MUC
			before_restart(ROOM, { "before 1", "before 2" })
			local note = "alice rejoins after a restart: " .. ROOM .. " as Alice"
			local rejoins, rejoined = log_count(srv, note), log_count(srv, "Rejoined")
			srv:restart()
			wait_log(srv, "Rejoined", rejoined)
			after_restart(ROOM, { "before 1", "before 2" }, rejoins, 2)
		end)

		it("rejoins the account once after a crash (kill -9) and a start", function()
			local ROOM = "crash@" .. MUC
			before_restart(ROOM, { "before crash" })
			local note = "alice rejoins after a restart: " .. ROOM .. " as Alice"
			local rejoins, rejoined = log_count(srv, note), log_count(srv, "Rejoined")
			srv:kill9()
			srv:restart() -- stop() is a no-op on a dead server; then the same launch
			wait_log(srv, "Rejoined", rejoined)
			after_restart(ROOM, { "before crash" }, rejoins, 0)
		end)

		it("drops stored memberships no room confirmed and on no MUC service, with one line each", function()
			-- What an older version stored for a directed presence to a contact's full JID
			-- (bob@localhost/desk: "joins bob@localhost as desk"), beside a membership it
			-- stored before memberships were marked as confirmed, on a real room.
			local LEGACY = "legacy@" .. MUC
			local bob = connect(srv, "bob", "desk")
			join(bob, LEGACY .. "/Bob")
			assert.equal("result", configure(bob, LEGACY, { ["muc#roomconfig_persistentroom"] = "1" }).attr.type)
			close_all()
			srv:stop()
			local file = srv.dir .. "/data/localhost/minimix/alice.dat"
			os.execute("mkdir -p " .. srv.dir .. "/data/localhost/minimix")
			local f = assert(io.open(file, "w"))
			f:write(('return { ["bob@localhost"] = { nick = "desk" }; [%q] = { nick = "Alice" } };\n'):format(LEGACY))
			f:close()
			local dropped = log_count(srv, "Dropping the stored membership of alice in bob@localhost")
			local rejoined = log_count(srv, "alice rejoins after a restart: " .. LEGACY .. " as Alice")
			srv:relaunch()
			wait_log(srv, "alice rejoins after a restart: " .. LEGACY .. " as Alice", rejoined)
			wait_log(srv, "Dropping the stored membership of alice in bob@localhost", dropped)
			assert.equal(dropped + 1, log_count(srv, "Dropping the stored membership of alice in bob@localhost"))
			assert.equal(0, log_count(srv, "alice rejoins after a restart: bob@localhost"))
			-- bob's client gets no MUC join from alice's account; the room has the account.
			bob = connect(srv, "bob", "desk")
			join(bob, LEGACY .. "/Bob")
			settle(bob)
			assert.equal(0, count(bob.log, function(el) return el.name == "presence" and el.attr.from == ALICE end))
			assert.equal(1, count(bob.log, presence(LEGACY .. "/Alice")))
			-- What is stored once the room confirmed the rejoin: the room, marked confirmed;
			-- no trace of the contact.
			local data
			for _ = 1, 100 do
				data = assert(loadfile(file))()
				if data[LEGACY] and data[LEGACY].joined then break end
				require "socket".sleep(0.05)
			end
			assert.same({ [LEGACY] = { nick = "Alice", joined = true } }, data)
		end)

		it("sends nothing to the room on a module reload and keeps every session joined", function()
			local ROOM = "reload@" .. MUC
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			local laptop = connect(srv, "alice", "laptop")
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			say(bob, ROOM, "before reload", { phone })
			fresh(bob, phone, laptop)

			local loaded, rejoined = log_count(srv, LOADED), log_count(srv, "Rejoined")
			local out, ok = srv:shell("module:reload('minimix', 'localhost')")
			assert.is_true(ok, out)
			assert.matches("Module reloaded on 1 host", out, 1, true)
			assert.equal(loaded + 1, log_count(srv, LOADED))
			settle(bob, phone, laptop)
			assert.equal(0, count(bob.log, any_presence(ROOM .. "/Alice")))
			assert.equal(0, count(bob.log, from_room(ROOM)))
			assert.equal(0, count(phone.log, from_room(ROOM)))
			assert.equal(rejoined, log_count(srv, "Rejoined"))

			say(bob, ROOM, "after reload", { phone })
			assert.equal("result", assert(phone:iq(Client.ping(ROOM .. "/Alice"))).attr.type)
			say(phone, ROOM, "phone after reload", { bob, phone })
			settle(bob, phone, laptop)
			assert.equal(1, count(phone.log, groupchat("after reload")))
			assert.equal(1, count(phone.log, groupchat("phone after reload")))
			assert.equal(1, count(bob.log, groupchat("phone after reload")))
			assert.equal(0, count(laptop.log, from_room(ROOM)))
			assert.equal(0, count(bob.log, any_presence(ROOM .. "/Alice")))

			-- The caches survived too: laptop is served locally, history included.
			fresh(bob, phone, laptop)
			join(laptop, ROOM .. "/Alice", { history = { maxstanzas = 3 } })
			assert(laptop:wait_for(subject_message(ROOM)))
			settle(bob, phone, laptop)
			assert.equal(0, count(bob.log, from_room(ROOM)))
			for _, body in ipairs({ "before reload", "after reload", "phone after reload" }) do
				assert.equal(1, count(laptop.log, groupchat(body)), body)
			end

			-- Bookmarks still work after the reload: a new one makes the account join, once.
			local MARKED = "reload-marked@" .. MUC
			join(bob, MARKED .. "/Bob")
			fresh(bob, phone, laptop)
			assert.equal("result", publish_bookmark(laptop, MARKED, { autojoin = "true" }, "Al").attr.type)
			assert(bob:wait_for(presence(MARKED .. "/Al")))
			settle(bob, phone, laptop)
			assert.equal(1, count(bob.log, any_presence(MARKED .. "/Al")))
			assert.equal(1, log_count(srv, "alice joins from a bookmark: " .. MARKED))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)
end)
