-- Hostile input against a real Prosody with mod_minimix loaded: malformed room JIDs, joins
-- without a nick, nicks past Prosody's 1023-byte resourceprep limit, unknown and error
-- presence types, IQs with duplicate ids, joins past minimix_max_rooms and thousands of such
-- stanzas in a burst; then stanzas that claim to come from rooms the account never joined
-- (a second MUC component, an external component, another local account). Each case gets
-- the error a room or the server would give, and afterwards every session still works,
-- every account's memberships (read from the module's core through the admin shell) are
-- what they were, the fork is still exact and the log holds no error.
--
-- MINIMIX_PLUGIN_PATH selects another build of the plugin.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local PLUGIN_PATH = os.getenv("MINIMIX_PLUGIN_PATH") ~= "" and os.getenv("MINIMIX_PLUGIN_PATH") or nil
local socket = require "socket"
local st = Client.stanza

local MUC = "conference.localhost"
local ROOM = "hostile@" .. MUC
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"
local NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
local NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
local NS_VERSION = "jabber:iq:version"

---------------------------------------------------------------------------
-- Helpers

local bare = muc.bare
local count = muc.count
local error_condition = muc.error_condition
local is_error = muc.is_error
local self_presence = muc.self_presence
local groupchat = muc.groupchat
local iq_reply = muc.iq_reply
local from_room = muc.from_room
local join = muc.join
local leave = muc.leave

local function error_presence_from(from)
	return function(el)
		return el.name == "presence" and el.attr.type == "error" and el.attr.from == from
	end
end

local settle = muc.settle_all

local fresh = muc.fresh_all

local function disco_info(to, id)
	return st.iq({ type = "get", to = to, id = id }):tag("query", { xmlns = NS_DISCO_INFO }):up()
end

-- Every account's memberships as the module's core holds them, one line (alice, bob and
-- carol unless `users` says otherwise).
local function memberships(srv, users)
	return muc.memberships(srv, users or { "alice", "bob", "carol" })
end

-- How many occupants the room has (0 when there is no such room).
local function occupants(srv, room)
	return #muc.occupant_jids(srv, MUC, room)
end

local function start(opts)
	opts = opts or {}
	local muc_options = { muc_room_locking = false }
	return Server.start{
		module = true,
		plugin_path = PLUGIN_PATH,
		options = opts.options,
		muc_options = muc_options,
		components = opts.components,
		log_level = opts.log_level,
	}
end

---------------------------------------------------------------------------

describe("hostile input", function()
	local srv, phone, laptop, tablet, bob, carol, all
	local before -- memberships of alice, bob and carol after setup

	setup(function()
		srv = start{ options = { minimix_max_rooms = 3 } }
		local function connect(user, resource)
			return Client.connect{ port = srv.port, user = user, resource = resource }
		end
		phone, laptop, tablet = connect("alice", "phone"), connect("alice", "laptop"), connect("alice", "tablet")
		bob, carol = connect("bob", "pc"), connect("carol", "pc")
		all = { phone, laptop, tablet, bob, carol }
		join(bob, ROOM .. "/Bob")
		join(phone, ROOM .. "/Alice")
		join(laptop, ROOM .. "/Alice")
		join(carol, "calm@" .. MUC .. "/Carol")
		settle(all)
		before = memberships(srv)
		assert.equal("alice[" .. ROOM .. "/Alice=laptop,phone] bob[" .. ROOM .. "/Bob=pc] carol[calm@"
			.. MUC .. "/Carol=pc]", before)
	end)

	teardown(function()
		for _, c in ipairs(all or {}) do pcall(c.close, c) end
		srv:destroy()
	end)

	-- What must hold after every case: every session is connected and answered, the
	-- memberships are those of setup, the fork is exact and the log is clean.
	local function unharmed()
		for _, c in ipairs(all) do
			local pong = assert(c:iq(Client.ping(srv.host)))
			assert.equal("result", pong.attr.type)
		end
		assert.equal(before, memberships(srv))
		fresh(all)
		local body = "still fine " .. Client.new_id()
		bob:send(Client.groupchat(ROOM, body))
		assert(phone:wait_for(groupchat(body)))
		assert(laptop:wait_for(groupchat(body)))
		settle(all)
		assert.equal(1, count(phone.log, groupchat(body)))
		assert.equal(1, count(laptop.log, groupchat(body)))
		assert.equal(1, count(bob.log, groupchat(body)))
		assert.equal(0, count(tablet.log, groupchat(body)))
		assert.equal(0, count(carol.log, groupchat(body)))
		assert.same({}, srv:tracebacks())
	end

	it("answers joins to malformed room JIDs with the error the server or room gives", function()
		local cases = {
			{ "ro om@" .. MUC .. "/Alice", "jid-malformed" },              -- space in the room name
			{ "a@b@" .. MUC .. "/Alice", "jid-malformed" },                -- two @
			{ "@" .. MUC .. "/Alice", "jid-malformed" },                   -- empty room name
			{ ROOM .. "/", "jid-malformed" },                              -- empty nick
			{ ("n"):rep(1024) .. "@" .. MUC .. "/Alice", "jid-malformed" }, -- room name past 1023 bytes
			{ "odd@" .. MUC .. "/\u{202E}Alice", "jid-malformed" },       -- fails the room's strict nickprep
			{ "odd@" .. MUC .. "/  ", "not-allowed" },                     -- invisible nick
		}
		for _, sender in ipairs{ phone, tablet } do
			fresh(all)
			for _, case in ipairs(cases) do
				local target, condition = case[1], case[2]
				sender:send(Client.muc_join(target))
				local err = assert(sender:wait_for(error_presence_from(target)))
				assert.equal(condition, error_condition(err), target)
				assert.equal(sender.jid, err.attr.to)
			end
			settle(all)
			assert.equal(#cases, count(sender.log, is_error))
			for _, other in ipairs(all) do
				if other ~= sender then assert.equal(0, count(other.log, is_error)) end
			end
		end
		assert.equal(0, occupants(srv, "odd@" .. MUC))
		unharmed()
	end)

	it("answers a join without a nick with jid-malformed (XEP-0045 7.2.1)", function()
		fresh(all)
		for _, room in ipairs{ ROOM, "nonick@" .. MUC } do
			tablet:send(Client.muc_join(room))
			local err = assert(tablet:wait_for(error_presence_from(room)))
			assert.equal("jid-malformed", error_condition(err))
		end
		settle(all)
		assert.equal(2, count(tablet.log, is_error))
		assert.equal(0, occupants(srv, "nonick@" .. MUC))
		unharmed()
	end)

	it("answers nicks past Prosody's 1023-byte limit with jid-malformed; 1023 bytes still join", function()
		local long = "long@" .. MUC
		fresh(all)
		for _, nick in ipairs{ ("x"):rep(1024), ("é"):rep(512), ("x"):rep(5000) } do
			local target = long .. "/" .. nick
			tablet:send(Client.muc_join(target))
			local err = assert(tablet:wait_for(error_presence_from(target)))
			assert.equal("jid-malformed", error_condition(err))
		end
		assert.equal(0, occupants(srv, long))

		local nick = ("x"):rep(1022) .. "y"
		local own = join(tablet, long .. "/" .. nick)
		assert.equal(long .. "/" .. nick, own.attr.from)
		assert.truthy(memberships(srv, { "alice" }):find(long .. "/" .. nick .. "=tablet", 1, true))
		leave(tablet, long .. "/" .. nick)
		settle(all)
		assert.equal(3, count(tablet.log, is_error))
		assert.equal(0, count(phone.log, from_room(long)) + count(laptop.log, from_room(long)))
		unharmed()
	end)

	it("passes unknown presence types to the room (bad-request); error presences never leave from the account",
		function()
			fresh(all)
			for _, sender in ipairs{ phone, tablet } do
				sender:send(st.presence({ to = ROOM .. "/Alice", type = "bogus" }))
				local err = assert(sender:wait_for(function(el)
					return el.name == "presence" and el.attr.type == "error"
				end))
				assert.equal("bad-request", error_condition(err))
			end
			-- A joined session's error presence would make the room kick the account (and with
			-- it every session); it is dropped. From a session that did not join it reaches the
			-- room from the session's full JID, which is no occupant.
			for _, sender in ipairs{ phone, laptop, tablet } do
				sender:send(st.presence({ to = ROOM .. "/Alice", type = "error" })
					:tag("error", { type = "cancel" }):tag("service-unavailable", { xmlns = NS_STANZAS }):up():up())
				sender:send(st.presence({ to = ROOM .. "/Alice", type = "error" }))
			end
			settle(all)
			assert.equal(1, count(phone.log, is_error))
			assert.equal(1, count(tablet.log, is_error))
			assert.equal(0, count(laptop.log, is_error))
			-- The room kicked nobody: no unavailable presence for Alice anywhere.
			for _, c in ipairs(all) do
				assert.equal(0, count(c.log, function(el)
					return el.name == "presence" and el.attr.from == ROOM .. "/Alice" and el.attr.type == "unavailable"
				end))
			end
			unharmed()
		end)

	it("answers a presence probe from a joined session to an occupant as the room does", function()
		fresh(all)
		phone:send(st.presence({ to = ROOM .. "/Bob", type = "probe" }))
		local got = assert(phone:wait_for(function(el) return el.name == "presence" end))
		assert.equal(ROOM .. "/Bob", got.attr.from)
		assert.is_nil(got.attr.type)
		settle(all)
		assert.equal(0, count(phone.log, is_error))
		assert.equal(0, count(laptop.log, from_room(ROOM)))
		unharmed()
	end)

	it("takes a presence update a joined session sends to the bare room JID as its presence in the room",
		function()
			fresh(all)
			phone:send(st.presence({ to = ROOM }):text_tag("show", "xa"))
			laptop:send(st.presence({ to = ROOM }):text_tag("show", "xa"))
			local seen = assert(bob:wait_for(function(el)
				return el.name == "presence" and el.attr.from == ROOM .. "/Alice" and el:get_child_text("show") == "xa"
			end))
			assert.is_nil(seen.attr.type)
			phone:send(st.presence({ to = ROOM .. "/Alice" }))
			laptop:send(st.presence({ to = ROOM .. "/Alice" }))
			assert(bob:wait_for(function(el)
				return el.name == "presence" and el.attr.from == ROOM .. "/Alice" and el:get_child("show") == nil
			end))
			settle(all)
			assert.equal(0, count(phone.log, is_error))
			assert.equal(0, count(laptop.log, is_error))
			unharmed()
		end)

	it("routes IQ replies by session even when ids repeat, across sessions and within one", function()
		fresh(all)
		local function self_ping(id)
			local ping = Client.ping(ROOM .. "/Alice")
			ping.attr.id = id
			return ping
		end
		local function version(id)
			return st.iq({ type = "get", to = ROOM .. "/Bob", id = id }):tag("query", { xmlns = NS_VERSION }):up()
		end
		-- Two sessions, one id: to the room, as a self-ping, and to another occupant.
		phone:send(disco_info(ROOM, "dup")); laptop:send(disco_info(ROOM, "dup"))
		phone:send(self_ping("dup-ping")); laptop:send(self_ping("dup-ping"))
		phone:send(version("dup-v")); laptop:send(version("dup-v"))
		-- One session, one id, twice.
		phone:send(disco_info(ROOM, "twice")); phone:send(disco_info(ROOM, "twice"))
		-- bob gets both version requests from the account's nick and answers each differently.
		for i = 1, 2 do
			local req = assert(bob:wait_for(function(el)
				return el.name == "iq" and el.attr.type == "get" and el:get_child("query", NS_VERSION) ~= nil
			end))
			assert.equal(ROOM .. "/Alice", req.attr.from)
			bob:send(st.reply(req):tag("query", { xmlns = NS_VERSION }):text_tag("name", "answer" .. i))
		end
		-- A session that did not join, with an id the others use.
		tablet:send(self_ping("dup-ping"))
		local refused = assert(tablet:wait_for(iq_reply("dup-ping")))
		assert.equal("not-acceptable", error_condition(refused))
		settle(all)

		local function results(c, id)
			return count(c.log, function(el)
				return iq_reply(id)(el) and el.attr.type == "result" and el.attr.to == c.jid
			end)
		end
		for _, c in ipairs{ phone, laptop } do
			assert.equal(1, results(c, "dup"))
			assert.equal(1, results(c, "dup-ping"))
			assert.equal(1, results(c, "dup-v"))
		end
		assert.equal(2, results(phone, "twice"))
		assert.equal(0, results(laptop, "twice"))
		assert.equal(5, count(phone.log, function(el) return el.name == "iq" end))
		assert.equal(3, count(laptop.log, function(el) return el.name == "iq" end))
		assert.equal(1, count(tablet.log, function(el) return el.name == "iq" end))
		local names = {}
		for _, c in ipairs{ phone, laptop } do
			for _, el in ipairs(c.log) do
				if iq_reply("dup-v")(el) then names[#names + 1] = el:get_child("query", NS_VERSION):get_child_text("name") end
			end
		end
		table.sort(names)
		assert.same({ "answer1", "answer2" }, names)
		assert.equal(0, count(bob.log, is_error))
		unharmed()
	end)

	it("refuses a join past minimix_max_rooms (3) with resource-constraint, to the joining session only", function()
		local function cap(i) return "cap" .. i .. "@" .. MUC end
		join(phone, cap(1) .. "/Alice")
		join(phone, cap(2) .. "/Alice")
		fresh(all)
		for _, sender in ipairs{ tablet, phone } do
			local target = cap(3) .. "/Alice"
			sender:send(Client.muc_join(target))
			local err = assert(sender:wait_for(error_presence_from(target)))
			assert.equal("resource-constraint", error_condition(err))
			assert.equal("wait", err:get_child("error").attr.type)
			assert.equal(sender.jid, err.attr.to)
		end
		assert.equal(0, occupants(srv, cap(3)))
		-- A room the account is in is still served; a leave makes room for another.
		join(laptop, cap(1) .. "/Alice")
		leave(phone, cap(2) .. "/Alice")
		join(tablet, cap(3) .. "/Alice")
		settle(all)
		assert.equal(1, count(tablet.log, is_error))
		assert.equal(1, count(phone.log, is_error))
		for _, c in ipairs{ laptop, bob, carol } do assert.equal(0, count(c.log, is_error)) end
		leave(phone, cap(1) .. "/Alice")
		leave(laptop, cap(1) .. "/Alice")
		leave(tablet, cap(3) .. "/Alice")
		unharmed()
	end)

	it("answers each of 5,000 hostile stanzas sent in one burst by one session", function()
		-- At the room limit first, so joins to new rooms are refused by the module itself.
		join(phone, "cap1@" .. MUC .. "/Alice")
		join(phone, "cap2@" .. MUC .. "/Alice")
		fresh(all)
		local N = 1000
		local kinds = {
			function(i) return Client.muc_join("burst" .. i .. "@" .. MUC .. "/Alice") end,
			function(i) return Client.muc_join("burst " .. i .. "@" .. MUC .. "/Alice") end,
			function() return st.presence({ to = ROOM .. "/Alice", type = "bogus" }) end,
			function()
				return st.presence({ to = ROOM .. "/Alice", type = "error" })
					:tag("error", { type = "cancel" }):tag("gone", { xmlns = NS_STANZAS }):up():up()
			end,
			function() return disco_info(ROOM, "burst") end,
		}
		local tally = {}
		local function take(list)
			for _, el in ipairs(list) do
				local key = el.name .. ":" .. (el.attr.type or "") .. ":" .. (error_condition(el) or el.attr.id or "")
				tally[key] = (tally[key] or 0) + 1
			end
		end
		for i = 1, N do
			for _, make in ipairs(kinds) do phone:send(make(i)) end
			if i % 50 == 0 then take(phone:collect(0)) end
		end
		local want = {
			["presence:error:resource-constraint"] = N, -- past minimix_max_rooms
			["presence:error:jid-malformed"] = N,       -- space in the room name
			["presence:error:bad-request"] = N,         -- unknown presence type
			["iq:result:burst"] = N,                    -- one id, N times
		}
		local function done()
			for k, n in pairs(want) do
				if (tally[k] or 0) < n then return false end
			end
			return true
		end
		local deadline = socket.gettime() + 60
		while not done() and socket.gettime() < deadline do take(phone:collect(0.2)) end
		take(phone:collect(0.5))
		assert.same(want, tally)
		settle(all)
		for _, c in ipairs{ laptop, tablet, bob, carol } do assert.equal(0, count(c.log, is_error)) end
		assert.equal(0, count(laptop.log, iq_reply("burst")))
		for i = 1, N, 333 do assert.equal(0, occupants(srv, "burst" .. i .. "@" .. MUC)) end
		leave(phone, "cap1@" .. MUC .. "/Alice")
		leave(phone, "cap2@" .. MUC .. "/Alice")
		unharmed()
	end)
end)

describe("stanzas claiming to come from rooms the account never joined", function()
	local SAME = "same@" .. MUC
	local OTHER = "same@other.localhost"   -- the same room name on a second MUC service
	local EVIL = "same@evil.localhost"     -- made up by an external component
	local srv, phone, laptop, tablet, bob, bob2, carol, all
	local before

	setup(function()
		srv = start{ components = {
			{ host = "other.localhost", plugin = "muc", options = { muc_room_locking = false } },
			{ host = "evil.localhost", secret = "evil-secret" },
		} }
		local function connect(user, resource)
			return Client.connect{ port = srv.port, user = user, resource = resource }
		end
		phone, laptop, tablet = connect("alice", "phone"), connect("alice", "laptop"), connect("alice", "tablet")
		bob, bob2, carol = connect("bob", "pc"), connect("bob", "tablet"), connect("carol", "pc")
		all = { phone, laptop, tablet, bob, bob2, carol }
		join(bob, SAME .. "/Bob")
		join(bob, OTHER .. "/Bob")
		join(phone, SAME .. "/Alice")
		join(laptop, SAME .. "/Alice")
		settle(all)
		before = memberships(srv)
		assert.equal("alice[" .. SAME .. "/Alice=laptop,phone] bob[" .. SAME .. "/Bob=pc;" .. OTHER .. "/Bob=pc]"
			.. " carol[]", before)
	end)

	teardown(function()
		for _, c in ipairs(all or {}) do pcall(c.close, c) end
		srv:destroy()
	end)

	-- Delivered by Prosody as to any account (addressed to the bare JID, to every session
	-- including the one that joined nothing), not forked (which would address each joined
	-- session and skip tablet).
	local function passed_untouched(pred)
		for _, c in ipairs{ phone, laptop, tablet } do
			assert.equal(1, count(c.log, pred), c.jid)
			for _, el in ipairs(c.log) do
				if pred(el) then assert.equal("alice@localhost", el.attr.to) end
			end
		end
	end

	local function nothing_for_alice(pred)
		for _, c in ipairs{ phone, laptop, tablet } do assert.equal(0, count(c.log, pred), c.jid) end
	end

	local function still_joined()
		assert.equal(before, memberships(srv))
		fresh(all)
		local body = "still joined " .. Client.new_id()
		bob:send(Client.groupchat(SAME, body))
		assert(phone:wait_for(groupchat(body)))
		assert(laptop:wait_for(groupchat(body)))
		settle(all)
		assert.equal(1, count(phone.log, groupchat(body)))
		assert.equal(1, count(laptop.log, groupchat(body)))
		assert.equal(0, count(tablet.log, groupchat(body)))
		assert.same({}, srv:tracebacks())
	end

	it("keeps a room of the same name on another MUC service apart", function()
		fresh(all)
		bob:send(Client.groupchat(OTHER, "elsewhere"))
		assert(bob:wait_for(groupchat("elsewhere")))
		-- A mediated invitation from the other service reaches alice as any message would.
		bob:send(st.message({ to = OTHER, id = "invite1" })
			:tag("x", { xmlns = NS_MUC_USER }):tag("invite", { to = "alice@localhost" }):up():up())
		for _, c in ipairs{ phone, laptop, tablet } do
			assert(c:wait_for(function(el) return el.name == "message" and el.attr.from == OTHER end))
		end
		settle(all)
		nothing_for_alice(groupchat("elsewhere"))
		passed_untouched(function(el) return el.name == "message" and el.attr.from == OTHER end)

		-- Joined there too, the two memberships stay apart.
		join(tablet, OTHER .. "/Alice")
		fresh(all)
		bob:send(Client.groupchat(OTHER, "on other"))
		bob:send(Client.groupchat(SAME, "on conference"))
		assert(tablet:wait_for(groupchat("on other")))
		assert(laptop:wait_for(groupchat("on conference")))
		settle(all)
		assert.equal(1, count(tablet.log, groupchat("on other")))
		assert.equal(0, count(tablet.log, groupchat("on conference")))
		for _, c in ipairs{ phone, laptop } do
			assert.equal(1, count(c.log, groupchat("on conference")))
			assert.equal(0, count(c.log, groupchat("on other")))
		end
		assert.truthy(memberships(srv, { "alice" }):find(OTHER .. "/Alice=tablet", 1, true))
		leave(tablet, OTHER .. "/Alice")
		still_joined()
	end)

	it("ignores what an external component makes up as a room, and Prosody refuses it another domain", function()
		local evil = Client.connect_component{ port = srv.component_port, host = "evil.localhost", secret = "evil-secret" }
		-- A request of phone's that waits for bob's answer: forged replies must not take it.
		phone:send(st.iq({ type = "get", to = SAME .. "/Bob", id = "wait-for-bob" }):tag("query", { xmlns = NS_VERSION }))
		local req = assert(bob:wait_for(function(el) return el.name == "iq" and el.attr.type == "get" end))
		fresh(all)

		-- A self-presence (110) and a kick (307) from a room alice never joined.
		evil:send(st.presence({ from = EVIL .. "/Alice", to = "alice@localhost" })
			:tag("x", { xmlns = NS_MUC_USER }):tag("item", { affiliation = "owner", role = "moderator" }):up()
			:tag("status", { code = "110" }):up():up())
		evil:send(st.presence({ from = EVIL .. "/Alice", to = "alice@localhost", type = "unavailable" })
			:tag("x", { xmlns = NS_MUC_USER }):tag("item", { affiliation = "none", role = "none" }):up()
			:tag("status", { code = "307" }):up():tag("status", { code = "110" }):up():up())
		-- Groupchat from it, to the account: bounced to the component as by plain Prosody.
		evil:send(st.message({ from = EVIL, to = "alice@localhost", type = "groupchat", id = "evil-gc" })
			:text_tag("body", "made up"))
		local bounced = assert(evil:wait_for(function(el) return el.attr.id == "evil-gc" end))
		assert.equal("error", bounced.attr.type)
		-- Replies with every id the module could have given, and a request to the account.
		for i = 1, 500 do
			evil:send(st.iq({ from = EVIL .. "/Bob", to = "alice@localhost", type = "result", id = "mmx" .. i })
				:tag("query", { xmlns = NS_VERSION }):text_tag("name", "forged"):up())
		end
		evil:send(st.iq({ from = EVIL .. "/Bob", to = "alice@localhost", type = "get", id = "evil-get" })
			:tag("query", { xmlns = NS_VERSION }))
		assert(evil:wait_for(function(el) return el.attr.id == "evil-get" end))
		-- bob's real answer still reaches phone, once.
		bob:send(st.reply(req):tag("query", { xmlns = NS_VERSION }):text_tag("name", "real"))
		local answer = assert(phone:wait_for(iq_reply("wait-for-bob")))
		assert.equal("real", answer:get_child("query", NS_VERSION):get_child_text("name"))
		settle(all)
		passed_untouched(function(el)
			return el.name == "presence" and el.attr.from == EVIL .. "/Alice" and not el.attr.type
		end)
		passed_untouched(function(el)
			return el.name == "presence" and el.attr.from == EVIL .. "/Alice" and el.attr.type == "unavailable"
		end)
		nothing_for_alice(function(el) return bare(el.attr.from) == EVIL and el.name ~= "presence" end)
		assert.equal(1, count(phone.log, iq_reply("wait-for-bob")))
		assert.equal(0, count(laptop.log, iq_reply("wait-for-bob")))

		-- Claiming alice's real room from the component's stream: Prosody closes it.
		fresh(all)
		evil:send(st.presence({ from = SAME .. "/Alice", to = "alice@localhost", type = "unavailable" })
			:tag("x", { xmlns = NS_MUC_USER }):tag("status", { code = "307" }):up():tag("status", { code = "110" }):up():up())
		evil:collect(0.5)
		assert.is_true(evil.closed)
		assert.truthy(tostring(evil.stream_error):find("invalid-from", 1, true))
		settle(all)
		nothing_for_alice(from_room(SAME))
		still_joined()
	end)

	it("lets another local account neither change nor learn alice's memberships", function()
		fresh(all)
		-- To alice's bare JID: bob's from is stamped by his session, so it is no room.
		bob:send(st.presence({ to = "alice@localhost" }):tag("x", { xmlns = NS_MUC_USER })
			:tag("status", { code = "110" }):up():up())
		bob:send(st.presence({ to = "alice@localhost", type = "unavailable" }):tag("x", { xmlns = NS_MUC_USER })
			:tag("status", { code = "307" }):up():tag("status", { code = "110" }):up():up())
		bob:send(st.message({ to = "alice@localhost", type = "groupchat", id = "bob-gc" }):text_tag("body", "not a room"))
		assert(bob:wait_for(function(el) return el.attr.id == "bob-gc" and el.attr.type == "error" end))
		for i = 1, 200 do
			bob:send(st.iq({ to = "alice@localhost", type = "result", id = "mmx" .. i }))
		end
		-- Through the room: bob's other session is no occupant; the room answers it, not alice.
		local refused = assert(bob2:iq(Client.ping(SAME .. "/Alice")))
		assert.equal("not-acceptable", error_condition(refused))
		bob2:send(Client.muc_leave(SAME .. "/Alice"))
		-- carol asking for alice's nick gets a conflict from the room.
		carol:send(Client.muc_join(SAME .. "/Alice"))
		local conflict = assert(carol:wait_for(error_presence_from(SAME .. "/Alice")))
		assert.equal("conflict", error_condition(conflict))
		settle(all)
		passed_untouched(function(el)
			return el.name == "presence" and bare(el.attr.from) == "bob@localhost" and not el.attr.type
		end)
		passed_untouched(function(el)
			return el.name == "presence" and bare(el.attr.from) == "bob@localhost" and el.attr.type == "unavailable"
		end)
		nothing_for_alice(function(el) return el.name ~= "presence" and bare(el.attr.from) == "bob@localhost" end)
		nothing_for_alice(from_room(SAME))
		still_joined()

		-- A later join from alice's other session behaves as before: served locally, the room
		-- (and bob) see nothing.
		fresh(all)
		local own = join(tablet, SAME .. "/Alice")
		assert.is_nil(Client.muc_status(own)[201])
		settle(all)
		assert.equal(0, count(bob.log, from_room(SAME)))
		assert.equal(1, count(tablet.log, self_presence(SAME)))
		leave(tablet, SAME .. "/Alice")
		still_joined()
	end)
end)

describe("a stanza nested deeper than the module reads", function()
	local DEEP = "deep@conference.localhost"
	local srv
	teardown(function() if srv then srv:destroy() end end)

	it("is forked but not kept, and later joins are still served locally, whole", function()
		srv = Server.start{ module = true, plugin_path = os.getenv("MINIMIX_PLUGIN_PATH"),
			muc_options = { muc_room_locking = false } }
		local bob = Client.connect{ port = srv.port, user = "bob", resource = "pc" }
		bob:send(Client.muc_join(DEEP .. "/Bob"))
		local phone = Client.connect{ port = srv.port, user = "alice", resource = "phone" }
		phone:send(Client.muc_join(DEEP .. "/Alice"))
		Client.collect_all{ bob, phone }
		bob:send(Client.groupchat(DEEP, "plain", "plain"))
		local deep = st.message({ to = DEEP, type = "groupchat", id = "deep" }):text_tag("body", "deep")
		deep:tag("a", { xmlns = "urn:example:nest" })
		for _ = 1, 70 do deep:tag("a") end
		bob:send(deep)
		Client.collect_all{ bob, phone }
		local function has_body(body)
			return function(el) return el.name == "message" and Client.body(el) == body end
		end
		assert.equal(1, count(phone.log, has_body("deep")))
		bob.log = {}
		local laptop = Client.connect{ port = srv.port, user = "alice", resource = "laptop" }
		laptop:send(Client.muc_join(DEEP .. "/Alice"))
		Client.collect_all{ bob, phone, laptop }
		-- Served locally: the room heard nothing, the laptop got its join in full.
		assert.equal(0, count(bob.log, function(el) return el.name == "presence" end))
		assert.equal(1, count(laptop.log, has_body("plain")))
		assert.equal(0, count(laptop.log, has_body("deep")))
		assert.equal(1, count(laptop.log, function(el) return Client.muc_status(el)[110] end))
		assert.equal(1, count(laptop.log, function(el) return el:get_child("subject") ~= nil end))
		assert.same({}, srv:tracebacks())
	end)
end)
