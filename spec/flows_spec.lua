-- The behaviour contract (/work/shared/SPEC.md), flow by flow, against a real Prosody with
-- mod_minimix loaded and real client connections. alice has the sessions phone, laptop and
-- tablet; bob and carol are plain MUC users. Every "exactly once" and "nothing for ..." is
-- counted in the clients' logs after settle(), which waits until all of them are quiet.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local quiet_presence = require "spec.helpers.quiet"
local st = Client.stanza

local MUC = "conference.localhost"
local ALICE = "alice@localhost"
local NS_MUC_OWNER = "http://jabber.org/protocol/muc#owner"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"
local NS_DELAY = "urn:xmpp:delay"

---------------------------------------------------------------------------
-- Helpers

local clients = muc.clients()
local connect, close_all = clients.connect, clients.close_all

local function start(opts)
	opts = opts or {}
	local muc_options = { muc_room_locking = false }
	for k, v in pairs(opts.muc_options or {}) do muc_options[k] = v end
	return Server.start{ module = true, muc_options = muc_options, options = opts.options }
end

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
local configure = muc.configure
local log_count = muc.log_count
local no_tracebacks = muc.no_tracebacks

local index_of = muc.index_of

local settle = muc.settle
local fresh = muc.fresh

--- bob (pc) and alice's phone, laptop and tablet, connected; bob joins `room` as Bob, then
--- each session of alice named in `...` joins as Alice, in that order.
local function bob_and_alice(srv, room, ...)
	local c = {}
	c.bob, c.phone, c.laptop, c.tablet = clients.bob_and_alice(srv)
	join(c.bob, room .. "/Bob")
	for _, name in ipairs{ ... } do join(c[name], room .. "/Alice") end
	return c.bob, c.phone, c.laptop, c.tablet
end

-- Predicates over received stanzas.

local function chat(body)
	return function(el)
		return el.name == "message" and el.attr.type == "chat" and Client.body(el) == body
	end
end

-- Actions.

--- Join and wait for the error presence; returns it.
local function join_error(c, room_nick, opts)
	c:send(Client.muc_join(room_nick, opts))
	return assert(c:wait_for(presence(room_nick, "error")))
end

local say = muc.say

--- Answer the next iq get in namespace `ns` that `c` receives; `fill` may add to the reply.
local function answer_iq(c, ns, fill)
	local req = assert(c:wait_for(function(el)
		return el.name == "iq" and el.attr.type == "get" and el.tags[1] ~= nil and el.tags[1].attr.xmlns == ns
	end))
	local reply = st.reply(req)
	if fill then fill(reply) end
	c:send(reply)
	return req
end

local wait_log = muc.wait_log

---------------------------------------------------------------------------

describe("mod_minimix", function()
	after_each(close_all)
	teardown(Server.stop_all)

	describe("room creation through the account", function()
		local srv
		local ROOM = "fresh@" .. MUC
		setup(function() srv = Server.start{ module = true } end) -- room locking on, as shipped
		teardown(function() srv:destroy() end)

		it("creates (201) and configures the room from alice's session as in plain MUC", function()
			local bob, phone, laptop, tablet = clients.bob_and_alice(srv)
			fresh(bob, phone, laptop, tablet)

			local created = join(phone, ROOM .. "/Alice")
			assert.is_true(Client.muc_status(created)[201])
			assert.equal(phone.jid, created.attr.to)

			-- Locked until configured: bob cannot get in yet.
			local locked = join_error(bob, ROOM .. "/Bob")
			assert.equal("item-not-found", error_condition(locked))

			-- The owner form, fetched and submitted by the session, answered to it.
			local get = st.iq({ type = "get", to = ROOM, id = Client.new_id() }):tag("query", { xmlns = NS_MUC_OWNER })
			local form = assert(phone:iq(get))
			assert.equal("result", form.attr.type)
			assert.equal(phone.jid, form.attr.to)
			assert.truthy(form:find("{" .. NS_MUC_OWNER .. "}query/{jabber:x:data}x"))
			local submitted = configure(phone, ROOM, { ["muc#roomconfig_roomname"] = "Alice's room" })
			assert.equal("result", submitted.attr.type)
			assert.equal(phone.jid, submitted.attr.to)

			join(bob, ROOM .. "/Bob")
			local info = assert(bob:iq(st.iq({ type = "get", to = ROOM, id = Client.new_id() })
				:tag("query", { xmlns = "http://jabber.org/protocol/disco#info" })))
			local identity = info:find("{http://jabber.org/protocol/disco#info}query/identity")
			assert.equal("Alice's room", identity and identity.attr.name)

			-- A later session of the account is served without the 201.
			local own = join(laptop, ROOM .. "/Alice")
			assert.is_nil(Client.muc_status(own)[201])

			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(phone.log, self_presence(ROOM)))
			assert.equal(2, count(phone.log, iq_reply(form.attr.id)) + count(phone.log, iq_reply(submitted.attr.id)))
			assert.equal(1, count(bob.log, presence(ROOM .. "/Alice")))
			assert.equal(0, count(laptop.log, is_iq))
			assert.equal(0, count(tablet.log, from_room(ROOM)))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 1: first join", function()
		local srv
		local ROOM = "one@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("joins the account once and gives the joining session its self-presence", function()
			local bob, phone, laptop, tablet = bob_and_alice(srv, ROOM)
			fresh(bob, phone, laptop, tablet)

			local own = join(phone, ROOM .. "/Alice")
			assert.equal(phone.jid, own.attr.to)
			assert(phone:wait_for(subject_message(ROOM)))
			settle(bob, phone, laptop, tablet)

			assert.equal(1, count(phone.log, self_presence(ROOM)))
			assert.equal(1, count(phone.log, presence(ROOM .. "/Bob")))
			assert.equal(1, count(phone.log, subject_message(ROOM)))
			-- The room sees one occupant for alice: the account.
			assert.equal(1, count(bob.log, presence(ROOM .. "/Alice")))
			local item = muc_item(bob.log[index_of(bob.log, presence(ROOM .. "/Alice"))])
			if item and item.attr.jid then assert.equal(ALICE, item.attr.jid) end
			assert.equal(0, count(bob.log, presence(ROOM .. "/Alice", "unavailable")))
			-- Sessions that did not join get nothing.
			assert.equal(0, count(laptop.log, from_room(ROOM)))
			assert.equal(0, count(tablet.log, from_room(ROOM)))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 2: join error", function()
		local srv
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("relays 401, 407 and 409 to the joining session only; a later join starts afresh", function()
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			local laptop = connect(srv, "alice", "laptop")

			-- 401: password-protected room.
			local secret = "secret@" .. MUC
			join(bob, secret .. "/Bob")
			assert.equal("result", configure(bob, secret, { ["muc#roomconfig_roomsecret"] = "s3cret" }).attr.type)
			fresh(bob, phone, laptop)
			local err = join_error(phone, secret .. "/Alice", { password = "wrong" })
			assert.equal("not-authorized", error_condition(err))
			assert.equal(phone.jid, err.attr.to)
			settle(bob, phone, laptop)
			assert.equal(1, count(phone.log, is_error))
			assert.equal(0, count(laptop.log, from_room(secret)))
			assert.equal(0, count(bob.log, presence(secret .. "/Alice")))

			fresh(bob, phone, laptop)
			join(phone, secret .. "/Alice", { password = "s3cret" })
			assert(bob:wait_for(presence(secret .. "/Alice")))
			settle(bob, phone, laptop)
			assert.equal(1, count(phone.log, self_presence(secret)))
			assert.equal(0, count(phone.log, is_error))
			assert.equal(1, count(bob.log, presence(secret .. "/Alice")))
			assert.equal(0, count(laptop.log, from_room(secret)))

			-- 407: members-only room.
			local members = "members@" .. MUC
			join(bob, members .. "/Bob")
			assert.equal("result", configure(bob, members, { ["muc#roomconfig_membersonly"] = "1" }).attr.type)
			fresh(bob, phone, laptop)
			err = join_error(phone, members .. "/Alice")
			assert.equal("registration-required", error_condition(err))
			settle(bob, phone, laptop)
			assert.equal(1, count(phone.log, presence(members .. "/Alice", "error")))
			assert.equal(0, count(laptop.log, from_room(members)))
			assert.equal(0, count(bob.log, presence(members .. "/Alice")))

			-- 409: bob holds the nick.
			local open = "open@" .. MUC
			join(bob, open .. "/Bob")
			fresh(bob, phone, laptop)
			err = join_error(phone, open .. "/Bob")
			assert.equal("conflict", error_condition(err))
			settle(bob, phone, laptop)
			assert.equal(1, count(phone.log, presence(open .. "/Bob", "error")))
			assert.equal(0, count(laptop.log, from_room(open)))
			assert.equal(0, count(bob.log, from_room(open)))

			-- The failed join left nothing behind: the next one goes to the room.
			fresh(bob, phone, laptop)
			local own = join(phone, open .. "/Alice")
			assert.equal(open .. "/Alice", own.attr.from)
			assert(bob:wait_for(presence(open .. "/Alice")))
			settle(bob, phone, laptop)
			assert.equal(1, count(bob.log, presence(open .. "/Alice")))
			assert.equal(0, count(laptop.log, from_room(open)))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 3: later join, served locally", function()
		local srv
		local ROOM = "three@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("serves occupants, self-presence, history and subject without asking the room", function()
			local bob, phone, laptop, tablet = clients.bob_and_alice(srv)
			local desk = connect(srv, "alice", "desk")
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			for i = 1, 5 do say(bob, ROOM, "m" .. i, { phone }) end
			bob:send(st.message({ to = ROOM, type = "groupchat", id = Client.new_id() }):text_tag("subject", "Topic"))
			assert(phone:wait_for(subject_message(ROOM)))
			fresh(bob, phone, laptop, tablet, desk)

			-- History honouring maxstanzas: the last 2 of 5.
			join(laptop, ROOM .. "/Alice", { history = { maxstanzas = 2 } })
			assert(laptop:wait_for(subject_message(ROOM)))
			settle(bob, phone, laptop, tablet, desk)
			local log = laptop.log
			assert.equal(1, count(log, presence(ROOM .. "/Bob")))
			assert.equal(1, count(log, self_presence(ROOM)))
			assert.equal(1, count(log, subject_message(ROOM)))
			for i = 1, 3 do assert.equal(0, count(log, groupchat("m" .. i))) end
			assert.equal(1, count(log, groupchat("m4")))
			assert.equal(1, count(log, groupchat("m5")))
			assert.equal(5, #log)
			for _, body in ipairs({ "m4", "m5" }) do
				local msg = log[index_of(log, groupchat(body))]
				local delay = msg:get_child("delay", NS_DELAY)
				assert.truthy(delay, body .. " has no delay stamp")
				assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d", delay.attr.stamp)
				assert.equal(laptop.jid, msg.attr.to)
			end
			-- XEP-0045 order: occupants, self-presence, history, subject.
			local order = {
				index_of(log, presence(ROOM .. "/Bob")), index_of(log, self_presence(ROOM)),
				index_of(log, groupchat("m4")), index_of(log, groupchat("m5")), index_of(log, subject_message(ROOM)),
			}
			assert.same({ 1, 2, 3, 4, 5 }, order)
			assert.equal("Topic", log[5]:get_child_text("subject"))
			-- Nothing went to the room, nothing to the others.
			assert.equal(0, count(bob.log, from_room(ROOM)))
			assert.equal(0, count(phone.log, from_room(ROOM)))
			assert.equal(0, count(tablet.log, from_room(ROOM)))

			-- maxstanzas='0': no history, still the subject.
			fresh(bob, phone, laptop, tablet, desk)
			join(tablet, ROOM .. "/Alice", { history = { maxstanzas = 0 } })
			assert(tablet:wait_for(subject_message(ROOM)))
			settle(bob, phone, laptop, tablet, desk)
			assert.equal(0, count(tablet.log, function(el) return Client.body(el) ~= nil end))
			assert.equal(1, count(tablet.log, self_presence(ROOM)))
			assert.equal(1, count(tablet.log, subject_message(ROOM)))
			assert.equal(0, count(bob.log, from_room(ROOM)))

			-- Another nick asked: the account's nick, with 210.
			fresh(bob, phone, laptop, tablet, desk)
			local own = join(desk, ROOM .. "/Ally", { history = { maxstanzas = 0 } })
			assert.equal(ROOM .. "/Alice", own.attr.from)
			assert.is_true(Client.muc_status(own)[210])
			settle(bob, phone, laptop, tablet, desk)
			assert.equal(0, count(bob.log, from_room(ROOM)))
			assert.equal(0, count(phone.log, from_room(ROOM)))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 4: fork", function()
		local srv
		local ROOM = "four@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("forks room traffic to each joined session exactly once, to no other", function()
			local bob, phone, laptop, tablet = bob_and_alice(srv, ROOM, "phone", "laptop")
			fresh(bob, phone, laptop, tablet)

			say(bob, ROOM, "hello alice", { phone, laptop, bob })
			bob:send(st.message({ to = ROOM .. "/Alice", type = "chat", id = Client.new_id() })
				:text_tag("body", "psst"))
			assert(phone:wait_for(chat("psst")))
			assert(laptop:wait_for(chat("psst")))
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, groupchat("hello alice")))
				assert.equal(1, count(c.log, chat("psst")))
				for _, el in ipairs(c.log) do assert.equal(c.jid, el.attr.to) end
			end
			assert.equal(ROOM .. "/Bob", phone.log[index_of(phone.log, chat("psst"))].attr.from)
			assert.equal(0, count(tablet.log, from_room(ROOM)))
			assert.equal(0, count(bob.log, is_error))

			-- A room alice has not joined: its invitation passes on untouched.
			local other = "other@" .. MUC
			join(bob, other .. "/Bob")
			fresh(bob, phone, laptop, tablet)
			bob:send(st.message({ to = other, id = Client.new_id() })
				:tag("x", { xmlns = NS_MUC_USER }):tag("invite", { to = ALICE }))
			local function invite(el)
				return el.name == "message" and el.attr.from == other and el:find("{" .. NS_MUC_USER .. "}x/invite")
			end
			for _, c in ipairs({ phone, laptop, tablet }) do assert(c:wait_for(invite)) end
			settle(bob, phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop, tablet }) do assert.equal(1, count(c.log, invite)) end
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 5: no session online", function()
		local srv
		local ROOM = "five@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("keeps the account joined, never bounces, and serves what came as history", function()
			local bob, phone, laptop, tablet = bob_and_alice(srv, ROOM, "phone", "laptop")
			fresh(bob)

			phone:close()
			laptop:close()
			tablet:close()
			for i = 1, 3 do say(bob, ROOM, "while away " .. i, { bob }) end
			settle(bob)
			assert.equal(0, count(bob.log, is_error))
			assert.equal(0, count(bob.log, presence(ROOM .. "/Alice", "unavailable")))

			-- Still an occupant: carol, joining now, sees alice.
			local carol = connect(srv, "carol", "pc")
			join(carol, ROOM .. "/Carol")
			settle(carol)
			assert.equal(1, count(carol.log, presence(ROOM .. "/Alice")))

			-- alice comes back and joins: served locally, with the messages as history.
			phone = connect(srv, "alice", "phone")
			fresh(bob, carol)
			join(phone, ROOM .. "/Alice")
			assert(phone:wait_for(subject_message(ROOM)))
			settle(bob, carol, phone)
			for i = 1, 3 do
				local pred = groupchat("while away " .. i)
				assert.equal(1, count(phone.log, pred))
				assert.truthy(phone.log[index_of(phone.log, pred)]:get_child("delay", NS_DELAY))
			end
			assert.equal(1, count(phone.log, presence(ROOM .. "/Bob")))
			assert.equal(1, count(phone.log, presence(ROOM .. "/Carol")))
			assert.equal(0, count(bob.log, from_room(ROOM)))
			assert.equal(0, count(carol.log, from_room(ROOM)))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 6: sending", function()
		local srv
		local ROOM = "six@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("sends as the account and routes each reply to the asking session", function()
			local bob, phone, laptop, tablet = bob_and_alice(srv, ROOM, "phone", "laptop")
			fresh(bob, phone, laptop, tablet)

			-- Groupchat: the room sees Alice; both joined sessions get the reflection once.
			local msg = Client.groupchat(ROOM, "from laptop")
			laptop:send(msg)
			for _, c in ipairs({ bob, phone, laptop }) do assert(c:wait_for(groupchat("from laptop"))) end
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(bob.log, groupchat("from laptop")))
			assert.equal(ROOM .. "/Alice", bob.log[index_of(bob.log, groupchat("from laptop"))].attr.from)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, groupchat("from laptop")))
				assert.equal(msg.attr.id, c.log[index_of(c.log, groupchat("from laptop"))].attr.id)
			end
			assert.equal(0, count(tablet.log, from_room(ROOM)))
			assert.equal(0, count(laptop.log, is_error))

			-- Ping to an occupant, answered by bob's client.
			fresh(bob, phone, laptop, tablet)
			local ping = Client.ping(ROOM .. "/Bob")
			phone:send(ping)
			local req = answer_iq(bob, "urn:xmpp:ping")
			assert.equal(ROOM .. "/Alice", req.attr.from)
			local pong = assert(phone:wait_for(iq_reply(ping.attr.id)))
			assert.equal("result", pong.attr.type)
			assert.equal(phone.jid, pong.attr.to)
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(phone.log, is_iq))
			assert.equal(0, count(laptop.log, is_iq))
			assert.equal(0, count(tablet.log, is_iq))

			-- disco#info to the room.
			fresh(bob, phone, laptop, tablet)
			local info = assert(laptop:iq(st.iq({ type = "get", to = ROOM, id = Client.new_id() })
				:tag("query", { xmlns = "http://jabber.org/protocol/disco#info" })))
			assert.equal("result", info.attr.type)
			assert.equal(laptop.jid, info.attr.to)
			assert.equal(ROOM, info.attr.from)
			assert.equal("conference", info:find("{http://jabber.org/protocol/disco#info}query/identity@category"))
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(laptop.log, is_iq))
			assert.equal(0, count(phone.log, is_iq))
			assert.equal(0, count(tablet.log, is_iq))

			-- Software version of an occupant.
			fresh(bob, phone, laptop, tablet)
			local version = st.iq({ type = "get", to = ROOM .. "/Bob", id = Client.new_id() })
				:tag("query", { xmlns = "jabber:iq:version" })
			laptop:send(version)
			answer_iq(bob, "jabber:iq:version", function(reply)
				reply:tag("query", { xmlns = "jabber:iq:version" }):text_tag("name", "BobClient"):up()
			end)
			local answer = assert(laptop:wait_for(iq_reply(version.attr.id)))
			assert.equal("result", answer.attr.type)
			assert.equal(ROOM .. "/Bob", answer.attr.from)
			assert.equal("BobClient", answer:find("{jabber:iq:version}query/name#"))
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(laptop.log, is_iq))
			assert.equal(0, count(phone.log, is_iq))
			assert.equal(0, count(tablet.log, is_iq))

			-- Private message from alice's session.
			fresh(bob, phone, laptop, tablet)
			phone:send(st.message({ to = ROOM .. "/Bob", type = "chat", id = Client.new_id() })
				:text_tag("body", "hi bob"))
			local pm = assert(bob:wait_for(chat("hi bob")))
			assert.equal(ROOM .. "/Alice", pm.attr.from)
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(bob.log, chat("hi bob")))
			assert.equal(0, count(phone.log, is_error))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 6: a reply later than minimix_iq_timeout", function()
		local srv
		local ROOM = "late@" .. MUC
		setup(function() srv = start{ options = { minimix_iq_timeout = 1 } } end)
		teardown(function() srv:destroy() end)

		local function expired()
			local result, out = srv:eval([[return require "prosody.core.modulemanager"]]
				.. [[.get_module("localhost", "minimix").module.save().core:stats().iqs_expired]])
			return assert(tonumber(result), out)
		end

		it("reaches no session; one in time still does", function()
			local bob, phone = bob_and_alice(srv, ROOM, "phone")
			fresh(bob, phone)
			local function ask()
				local version = st.iq({ type = "get", to = ROOM .. "/Bob", id = Client.new_id() })
					:tag("query", { xmlns = "jabber:iq:version" })
				phone:send(version)
				return version, assert(bob:wait_for(function(el)
					return el.name == "iq" and el.attr.type == "get" and el.attr.from == ROOM .. "/Alice"
				end))
			end
			-- In time: routed back to phone.
			local version, req = ask()
			bob:send(st.reply(req):tag("query", { xmlns = "jabber:iq:version" }):text_tag("name", "Bob"))
			assert(phone:wait_for(iq_reply(version.attr.id)))
			assert.equal(0, expired())
			-- Too late: the core's timer forgot the IQ (within a second or two of its
			-- deadline); bob's reply then reaches the room and the account, but no session.
			fresh(bob, phone)
			version, req = ask()
			local deadline = require "socket".gettime() + 5
			while expired() == 0 do
				assert(require "socket".gettime() < deadline, "the IQ never expired")
				require "socket".sleep(0.2)
			end
			bob:send(st.reply(req):tag("query", { xmlns = "jabber:iq:version" }):text_tag("name", "Bob"))
			settle(bob, phone)
			assert.equal(0, count(phone.log, iq_reply(version.attr.id)))
			assert.equal(0, count(phone.log, is_iq))
			assert.equal(1, expired())
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 7: self-ping", function()
		local srv
		local ROOM = "seven@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("answers a joined session as an occupant and a non-joined one with not-acceptable", function()
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			local tablet = connect(srv, "alice", "tablet")
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			fresh(bob, phone, tablet)

			local ping = Client.ping(ROOM .. "/Alice")
			local reply = assert(phone:iq(ping))
			assert.equal("result", reply.attr.type)
			assert.equal(phone.jid, reply.attr.to)

			local refused = assert(tablet:iq(Client.ping(ROOM .. "/Alice")))
			assert.equal("error", refused.attr.type)
			assert.equal("not-acceptable", error_condition(refused))
			assert.equal(tablet.jid, refused.attr.to)

			settle(bob, phone, tablet)
			assert.equal(1, count(phone.log, is_iq))
			assert.equal(1, count(tablet.log, is_iq))
			assert.equal(0, count(bob.log, from_room(ROOM)))
			-- The refusal did not cost phone its membership.
			say(bob, ROOM, "still here?", { phone })
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 8: quiet presence", function()
		local srv
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("other occupants hear nothing of alice's clients coming and going; each visible change once", function()
			quiet_presence{
				home = srv, rooms = srv, room = "quiet@" .. MUC, connect = connect,
				check = function(want, got, what) assert.equal(want, got, what) end,
				truthy = function(v, what) assert.truthy(v, what) end,
			}
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 9: leave, one of several", function()
		local srv
		local ROOM = "nine@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("answers the leaver locally; the room and the other session see nothing", function()
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			local laptop = connect(srv, "alice", "laptop")
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			fresh(bob, phone, laptop)

			local gone = leave(phone, ROOM .. "/Alice")
			assert.equal(ROOM .. "/Alice", gone.attr.from)
			assert.equal(phone.jid, gone.attr.to)
			settle(bob, phone, laptop)
			assert.equal(1, count(phone.log, self_presence(ROOM, "unavailable")))
			assert.equal(0, count(bob.log, from_room(ROOM)))
			assert.equal(0, count(laptop.log, from_room(ROOM)))

			fresh(bob, phone, laptop)
			say(bob, ROOM, "after phone left", { laptop })
			settle(bob, phone, laptop)
			assert.equal(1, count(laptop.log, groupchat("after phone left")))
			assert.equal(0, count(phone.log, from_room(ROOM)))

			-- What phone sends to the room now goes out as its own again: the room refuses
			-- a non-occupant and nobody sees it.
			fresh(bob, phone, laptop)
			phone:send(Client.groupchat(ROOM, "from a leaver"))
			local refused = assert(phone:wait_for(function(el)
				return el.name == "message" and is_error(el)
			end))
			assert.equal("not-acceptable", error_condition(refused))
			settle(bob, phone, laptop)
			assert.equal(0, count(bob.log, groupchat("from a leaver")))
			assert.equal(0, count(laptop.log, groupchat("from a leaver")))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 10: leave, the last", function()
		local srv
		local ROOM = "ten@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("makes the account leave once, and a rejoin starts afresh", function()
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			local laptop = connect(srv, "alice", "laptop")
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			leave(phone, ROOM .. "/Alice")
			fresh(bob, phone, laptop)

			local gone = leave(laptop, ROOM .. "/Alice")
			assert.equal(laptop.jid, gone.attr.to)
			assert(bob:wait_for(presence(ROOM .. "/Alice", "unavailable")))
			settle(bob, phone, laptop)
			assert.equal(1, count(bob.log, presence(ROOM .. "/Alice", "unavailable")))
			assert.equal(1, count(laptop.log, self_presence(ROOM, "unavailable")))
			assert.equal(0, count(phone.log, from_room(ROOM)))

			-- Rejoin: a real join of the account again.
			fresh(bob, phone, laptop)
			join(phone, ROOM .. "/Alice")
			assert(bob:wait_for(presence(ROOM .. "/Alice")))
			settle(bob, phone, laptop)
			assert.equal(1, count(bob.log, presence(ROOM .. "/Alice")))
			assert.equal(1, count(phone.log, self_presence(ROOM)))
			assert.equal(1, count(phone.log, presence(ROOM .. "/Bob")))
			assert.equal(0, count(laptop.log, from_room(ROOM)))
			say(bob, ROOM, "welcome back", { phone })
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 11: session ends without leaving", function()
		local srv
		local ROOM = "eleven@" .. MUC
		setup(function() srv = start{ options = { smacks_hibernation_time = 3 } } end)
		teardown(function() srv:destroy() end)

		it("keeps the account joined; a resumed session gets what was queued, once", function()
			local bob = connect(srv, "bob", "pc")
			local phone = connect(srv, "alice", "phone")
			local laptop = connect(srv, "alice", "laptop")
			local tablet = connect(srv, "alice", "tablet", { sm = true })
			join(bob, ROOM .. "/Bob")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			join(tablet, ROOM .. "/Alice")
			fresh(bob, phone, tablet)

			-- laptop's connection dies (no stream management): the session ends.
			local disconnects = log_count(srv, "Client disconnected")
			laptop:kill()
			wait_log(srv, "Client disconnected", disconnects)
			say(bob, ROOM, "after laptop died", { phone, tablet })
			settle(bob, phone, tablet)
			assert.equal(1, count(phone.log, groupchat("after laptop died")))
			assert.equal(0, count(bob.log, presence(ROOM .. "/Alice", "unavailable")))

			-- tablet hibernates and resumes: what came meanwhile arrives exactly once.
			local hibernations = log_count(srv, "Session going into hibernation")
			tablet:kill()
			wait_log(srv, "Session going into hibernation", hibernations)
			say(bob, ROOM, "while tablet sleeps", { phone })
			assert.is_true(tablet:resume())
			assert(tablet:wait_for(groupchat("while tablet sleeps")))
			say(bob, ROOM, "after resume", { phone, tablet })
			settle(bob, phone, tablet)
			assert.equal(1, count(tablet.log, groupchat("after laptop died")))
			assert.equal(1, count(tablet.log, groupchat("while tablet sleeps")))
			assert.equal(1, count(tablet.log, groupchat("after resume")))

			-- tablet hibernates until it expires: still no leave.
			local expiries = log_count(srv, "Destroying session for hibernating too long")
			tablet:kill()
			wait_log(srv, "Destroying session for hibernating too long", expiries)
			say(bob, ROOM, "after expiry", { phone })
			settle(bob, phone)
			assert.equal(0, count(bob.log, function(el) return el.attr.from == ROOM .. "/Alice" end))

			-- New sessions on the old resources are not joined; the account still is.
			laptop = connect(srv, "alice", "laptop")
			tablet = connect(srv, "alice", "tablet")
			fresh(bob, phone, laptop, tablet)
			say(bob, ROOM, "who is here", { phone })
			settle(bob, phone, laptop, tablet)
			assert.equal(1, count(phone.log, groupchat("who is here")))
			assert.equal(0, count(laptop.log, from_room(ROOM)))
			assert.equal(0, count(tablet.log, from_room(ROOM)))
			assert.equal("result", assert(phone:iq(Client.ping(ROOM .. "/Alice"))).attr.type)

			-- What a new session on an old resource sends to the room is its own: the room
			-- refuses a non-occupant; what phone sends goes out from the account.
			fresh(bob, phone, laptop, tablet)
			laptop:send(Client.groupchat(ROOM, "from a new laptop"))
			local refused = assert(laptop:wait_for(function(el)
				return el.name == "message" and is_error(el)
			end))
			assert.equal("not-acceptable", error_condition(refused))
			say(phone, ROOM, "from phone", { bob, phone })
			settle(bob, phone, laptop, tablet)
			assert.equal(0, count(bob.log, groupchat("from a new laptop")))
			assert.equal(1, count(bob.log, groupchat("from phone")))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("flow 12: others leave", function()
		local srv
		local ROOM = "twelve@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("forks another occupant's leave once and forgets that occupant", function()
			local bob = connect(srv, "bob", "pc")
			local carol = connect(srv, "carol", "pc")
			local phone = connect(srv, "alice", "phone")
			local laptop = connect(srv, "alice", "laptop")
			local tablet = connect(srv, "alice", "tablet")
			join(bob, ROOM .. "/Bob")
			join(carol, ROOM .. "/Carol")
			join(phone, ROOM .. "/Alice")
			join(laptop, ROOM .. "/Alice")
			fresh(phone, laptop, tablet)

			leave(bob, ROOM .. "/Bob")
			for _, c in ipairs({ phone, laptop }) do assert(c:wait_for(presence(ROOM .. "/Bob", "unavailable"))) end
			settle(phone, laptop, tablet)
			for _, c in ipairs({ phone, laptop }) do
				assert.equal(1, count(c.log, presence(ROOM .. "/Bob", "unavailable")))
				assert.equal(1, #c.log)
			end
			assert.equal(0, count(tablet.log, from_room(ROOM)))

			fresh(phone, laptop, tablet)
			join(tablet, ROOM .. "/Alice")
			assert(tablet:wait_for(subject_message(ROOM)))
			settle(phone, laptop, tablet)
			assert.equal(1, count(tablet.log, presence(ROOM .. "/Carol")))
			assert.equal(0, count(tablet.log, function(el) return el.attr.from == ROOM .. "/Bob" end))
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("only MUC traffic is the module's", function()
		local srv
		local ROOM = "traffic@" .. MUC
		local PLAIN = "nox@" .. MUC
		setup(function() srv = start() end)
		teardown(function() srv:destroy() end)

		it("takes a presence without <x/> to the local MUC as MUC traffic, showing each session its own JID", function()
			local bob, phone, laptop, tablet = bob_and_alice(srv, PLAIN)
			fresh(bob, phone, laptop, tablet)
			-- Prosody's MUC refuses a join without <x/> ("possibly desynced"): the account
			-- tries for the session, the session gets the room's error as it would without
			-- the module, and nothing stays.
			local tries = log_count(srv, "alice joins " .. PLAIN .. " as Alice")
			local refused = log_count(srv, "alice could not join " .. PLAIN .. ": item-not-found")
			tablet:send(st.presence({ to = PLAIN .. "/Alice" }))
			local err = assert(tablet:wait_for(presence(PLAIN .. "/Alice", "error")))
			assert.equal("item-not-found", error_condition(err))
			settle(bob, phone, laptop, tablet)
			assert.equal(tries + 1, log_count(srv, "alice joins " .. PLAIN .. " as Alice"))
			assert.equal(refused + 1, log_count(srv, "alice could not join " .. PLAIN .. ": item-not-found"))
			assert.equal(0, count(bob.log, from_room(PLAIN)))
			assert.same({ "bob@localhost" }, muc.occupant_jids(srv, MUC, PLAIN))

			-- The account joined: the room names the account, the session sees itself as
			-- without the module.
			fresh(bob, phone, laptop, tablet)
			local own = join(phone, PLAIN .. "/Alice")
			assert.equal(phone.jid, muc_item(own).attr.jid)
			assert(phone:wait_for(subject_message(PLAIN)))
			settle(bob, phone, laptop, tablet)
			assert.same({ ALICE, "bob@localhost" }, muc.occupant_jids(srv, MUC, PLAIN))
			local item = muc_item(bob.log[index_of(bob.log, presence(PLAIN .. "/Alice"))])
			if item and item.attr.jid then assert.equal(ALICE, item.attr.jid) end
			-- A presence without <x/> from another session is then a later join, served
			-- locally, naming that session.
			fresh(bob, phone, laptop, tablet)
			laptop:send(st.presence({ to = PLAIN .. "/Alice" }))
			own = assert(laptop:wait_for(self_presence(PLAIN)))
			assert(laptop:wait_for(subject_message(PLAIN)))
			settle(bob, phone, laptop, tablet)
			assert.equal(laptop.jid, muc_item(own).attr.jid)
			assert.equal(0, count(bob.log, from_room(PLAIN)))
			assert.equal(1, count(laptop.log, self_presence(PLAIN)))
		end)

		it("passes directed presence, chat and IQs to a contact untouched from a session in a room", function()
			local bob, phone = bob_and_alice(srv, ROOM, "phone")
			fresh(bob, phone)
			local joins = log_count(srv, "alice joins")
			phone:send(st.presence({ to = bob.jid }):text_tag("status", "around"))
			local got = assert(bob:wait_for(function(el)
				return el.name == "presence" and el.attr.from == phone.jid
			end))
			assert.equal("around", got:get_child_text("status"))
			assert.is_nil(got:get_child("x", "http://jabber.org/protocol/muc"))
			for _, to in ipairs({ bob.jid, "bob@localhost" }) do
				phone:send(st.message({ to = to, type = "chat", id = Client.new_id() }):text_tag("body", "to " .. to))
				got = assert(bob:wait_for(chat("to " .. to)))
				assert.equal(phone.jid, got.attr.from)
			end
			local version = st.iq({ to = bob.jid, type = "get", id = Client.new_id() })
				:tag("query", { xmlns = "jabber:iq:version" })
			phone:send(version)
			got = assert(bob:wait_for(function(el) return el.name == "iq" and el.attr.id == version.attr.id end))
			assert.equal(phone.jid, got.attr.from)
			bob:send(st.reply(got):tag("query", { xmlns = "jabber:iq:version" }):text_tag("name", "bob's client"))
			assert(phone:wait_for(iq_reply(version.attr.id)))
			settle(bob, phone)
			assert.equal(joins, log_count(srv, "alice joins"))
			local line = muc.memberships(srv, { "alice" })
			assert.truthy(line:find(ROOM .. "/Alice=phone", 1, true), line)
			assert.falsy(line:find("bob@localhost", 1, true), line)
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)
end)
