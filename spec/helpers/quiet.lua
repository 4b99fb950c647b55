-- Quiet presence (SPEC flow 8, issue 14 item 5), as one scenario for flows_spec (the room
-- on alice's server) and federation_spec (the room on another server, over s2s). Other
-- occupants (bob, carol) count the presences they get from alice's nick while her other
-- clients, each with its own entity capabilities, join, change caps, leave and disconnect:
-- none. Then the most available session changes what they see (show, status, avatar hash):
-- each change exactly once, carrying that session's presence (its caps too).
--
-- busted's assert is not seen from a required module: the spec hands in `check(want, got,
-- what)` and `truthy(v, what)`.
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local st = Client.stanza

local NS_CAPS = "http://jabber.org/protocol/caps"
local NS_VCARD_UPDATE = "vcard-temp:x:update"

--- `p` with a client's XEP-0115 caps (each client has its own node and ver).
local function with_caps(p, client)
	return p:tag("c", { xmlns = NS_CAPS, hash = "sha-1", node = "https://" .. client .. ".example",
		ver = client .. "=" }):up()
end

local function any_presence(from)
	return function(el) return el.name == "presence" and el.attr.from == from end
end

local find = muc.find

local function caps_node(el)
	local c = el and el:get_child("c", NS_CAPS)
	return c and c.attr.node
end

--- o: home (alice's server), rooms (bob's and carol's server, with the MUC), room (JID),
--- connect(srv, user, resource), check(want, got, what), truthy(v, what).
return function(o)
	local room, check, truthy = o.room, o.check, o.truthy
	local nick = room .. "/Alice"
	local bob = o.connect(o.rooms, "bob", "pc")
	local carol = o.connect(o.rooms, "carol", "pc")
	local phone = o.connect(o.home, "alice", "phone")
	local laptop = o.connect(o.home, "alice", "laptop")
	local tablet = o.connect(o.home, "alice", "tablet")
	local all = { bob, carol, phone, laptop, tablet }
	-- Each client's initial presence carries its caps, as real clients' do.
	for _, c in ipairs({ phone, laptop, tablet }) do c:send(with_caps(st.presence(), c.resource)) end
	muc.join(bob, room .. "/Bob")
	muc.join(carol, room .. "/Carol")
	phone:send(with_caps(Client.muc_join(nick), "phone"))
	assert(phone:wait_for(muc.self_presence(room)))
	for _, c in ipairs({ bob, carol }) do assert(c:wait_for(any_presence(nick))) end

	--- What bob and carol got from alice's nick since the last fresh(), once `c` said
	--- `marker` in the room and both have it (so anything sent before has arrived).
	local function seen_by_others(c, marker)
		muc.say(c, room, marker, { bob, carol })
		muc.settle(table.unpack(all))
		return muc.count(bob.log, any_presence(nick)), muc.count(carol.log, any_presence(nick))
	end

	-- laptop and tablet join (each the latest on a tie: the aggregate in turn), tablet's
	-- caps change, laptop leaves, tablet disconnects, laptop rejoins less available.
	muc.fresh(table.unpack(all))
	laptop:send(with_caps(Client.muc_join(nick), "laptop"))
	assert(laptop:wait_for(muc.self_presence(room)))
	tablet:send(with_caps(Client.muc_join(nick), "tablet"))
	assert(tablet:wait_for(muc.self_presence(room)))
	tablet:send(with_caps(st.presence(), "tablet-upgraded"))
	muc.leave(laptop, nick)
	tablet:close()
	all[5] = nil
	-- The module has seen tablet go before phone speaks.
	local deadline = os.time() + 10
	while muc.memberships(o.home, { "alice" }):find("tablet", 1, true) do
		truthy(os.time() <= deadline, "tablet's session end reached the module")
		require "socket".sleep(0.05)
	end
	laptop:send(with_caps(Client.muc_join(nick), "laptop"):text_tag("show", "xa"))
	assert(laptop:wait_for(muc.self_presence(room)))
	local b, c = seen_by_others(phone, "after the comings and goings")
	check(0, b, "presences bob got from alice while her other clients came and went")
	check(0, c, "presences carol got from alice while her other clients came and went")
	check(0, muc.count(phone.log, any_presence(nick)), "presences phone got from its own nick")

	-- phone (the most available) changes what occupants see: each change once.
	local photo = function(p, hash)
		return p:tag("x", { xmlns = NS_VCARD_UPDATE }):text_tag("photo", hash):up()
	end
	local changes = {
		{ "show", function() return st.presence({ to = nick }):text_tag("show", "away") end },
		{ "status", function() return st.presence({ to = nick }):text_tag("show", "away"):text_tag("status", "lunch") end },
		{ "avatar", function()
			return photo(st.presence({ to = nick }):text_tag("show", "away"):text_tag("status", "lunch"), "1f2e3d")
		end },
	}
	for _, change in ipairs(changes) do
		muc.fresh(table.unpack(all))
		phone:send(with_caps(change[2](), "phone"))
		b, c = seen_by_others(phone, "after the " .. change[1])
		check(1, b, "presences bob got for phone's " .. change[1] .. " change")
		check(1, c, "presences carol got for phone's " .. change[1] .. " change")
		local got = find(bob.log, any_presence(nick))
		truthy(got and got.attr.type == nil, "bob got an available presence")
		check("https://phone.example", caps_node(got), "the update carries phone's own caps")
		check("away", got:get_child_text("show"), "bob sees away")
	end
	local got = find(bob.log, any_presence(nick))
	check("lunch", got:get_child_text("status"), "bob sees the status")
	check("1f2e3d", got:get_child("x", NS_VCARD_UPDATE):get_child_text("photo"), "bob sees the avatar hash")

	-- The same again with new caps and a priority: nothing.
	muc.fresh(table.unpack(all))
	phone:send(photo(with_caps(st.presence({ to = nick }):text_tag("show", "away"):text_tag("status", "lunch")
		:text_tag("priority", "7"), "phone-upgraded"), "1f2e3d"))
	b, c = seen_by_others(phone, "after phone's new caps")
	check(0, b, "presences bob got for phone's caps and priority")
	check(0, c, "presences carol got for phone's caps and priority")
end
