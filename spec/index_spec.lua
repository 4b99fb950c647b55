-- The session index (`session_rooms`, the fifth value of minimix.new) against the core's
-- own decisions, without a server. The shim decides a session's messages and broadcast
-- presences from the index alone, without asking the core, by the rule in
-- lua/session_index.lib.lua, which this spec loads too: after every event of a long random
-- sequence, for every session and room, the core must decide such stanzas as that rule
-- does from the index, and a fork of what the room sends must go to exactly the sessions
-- the index has in the room (forks hand out lists the bridge keeps beside the index).
local Server = require "spec.helpers.server"

Server.use_prosody_libraries()
local st = require "util.stanza"

local NS_MUC = "http://jabber.org/protocol/muc"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"
local HOST = "localhost"

local USERS = { "alice", "bob" }
local RESOURCES = { "r1", "r2", "r3" }
local ROOMS = { "one@conference.localhost", "two@conference.localhost", "three@chat.localhost" }
local NICKS = { "Al", "Bo" }

local function load_minimix()
	local open = assert(package.loadlib("build/mod_minimix/minimix.so", "luaopen_minimix"))
	return open()
end

-- The shim's own rule, as it runs in the shim.
local decide = dofile("build/mod_minimix/session_index.lib.lua").decide
local FLAG_SEND_ORIGINAL = load_minimix().flags.send_original

local function new_host()
	local core, room_event, session_event, control, index =
		load_minimix().new(HOST, { history_length = 3, max_rooms = 2 }, st.stanza_mt)
	return { core = core, room_event = room_event, session_event = session_event,
		control = control, index = index }
end

-- What the core does with `stanza` from `user`/`resource`: "sends" it from the account,
-- "drops" it, "passes" it, or something else (none of these stanzas change its state).
local function core_decides(h, user, resource, stanza)
	local results = table.pack(h.session_event(user, resource, stanza))
	assert(results[1] ~= nil or results[2] == nil, "the core failed: " .. tostring(results[2]))
	if results.n == 0 then return "passes" end
	local handled, actions, recipients, flags = results[1], results[3], results[5], results[6]
	if handled and flags == FLAG_SEND_ORIGINAL then return "sends" end
	if handled and flags == 0 and not recipients and not (actions and actions[1]) then return "drops" end
	return "something else"
end

local function index_says(h, user, resource, room)
	local rooms = h.index[user .. "@" .. HOST .. "/" .. resource]
	return rooms ~= nil and rooms[room] == true
end

-- The full JIDs a fork of a room's groupchat (with no body: it changes nothing) goes to.
local function fork_of(h, user, room)
	local chat = st.message({ from = room .. "/Someone", to = user .. "@" .. HOST, type = "groupchat" })
		:tag("active", { xmlns = "http://jabber.org/protocol/chatstates" }):up()
	local results = table.pack(h.room_event(chat))
	assert(results[1] ~= nil or results[2] == nil, "the core failed: " .. tostring(results[2]))
	local recipients = results[5]
	local set = {}
	for _, full in ipairs(recipients or {}) do
		assert(not set[full], "a fork reaches " .. full .. " twice")
		set[full] = true
	end
	return set, recipients
end

local function set_text(set)
	local list = {}
	for k in pairs(set) do list[#list + 1] = k end
	table.sort(list)
	return "{" .. table.concat(list, ", ") .. "}"
end

-- Every session and room agree; no session is left in the index with no room.
local function check(h, what)
	for _, user in ipairs(USERS) do
		for _, room in ipairs(ROOMS) do
			local forked, indexed = fork_of(h, user, room), {}
			for full, rooms in pairs(h.index) do
				if rooms[room] and full:find(user .. "@", 1, true) == 1 then indexed[full] = true end
			end
			assert(set_text(forked) == set_text(indexed), ("after %s: a fork of %s for %s goes to %s, the index has %s")
				:format(what, room, user, set_text(forked), set_text(indexed)))
		end
		for _, resource in ipairs(RESOURCES) do
			-- What the shim's rule makes of `stanza` from this session, in the core's words
			-- ("core": the shim asks the core, which then decides whatever it decides).
			local SHIM_SAYS = { account = "sends", drop = "drops" }
			local function agree(stanza)
				local rule = decide(h.index[user .. "@" .. HOST .. "/" .. resource], stanza)
				if rule == "core" then return rule end
				local shim = rule and SHIM_SAYS[rule] or "passes"
				local core = core_decides(h, user, resource, stanza)
				assert(core == shim, ("after %s: %s/%s sends %s: the core %s, the shim (from the index) %s")
					:format(what, user, resource, stanza:top_tag(), core, shim))
				return shim
			end
			for _, room in ipairs(ROOMS) do
				-- The rule itself is checked against what the index says, so that a rule
				-- that left everything to the core (or passed everything) fails here.
				local in_room = index_says(h, user, resource, room)
				assert.equal(in_room and "sends" or "passes",
					agree(st.message({ to = room, type = "groupchat" }):text_tag("body", "probe")))
				assert.equal(in_room and "sends" or "passes",
					agree(st.message({ to = room .. "/Bo", type = "chat" }):text_tag("body", "hi")))
				assert.equal(in_room and "drops" or "passes", agree(st.message({ to = room, type = "error" })))
			end
			assert.equal("passes", agree(st.message({ to = "bob@" .. HOST, type = "chat" }):text_tag("body", "hi")))
			assert.equal("passes",
				agree(st.message({ to = "bob@" .. HOST .. "/pc", type = "chat" }):text_tag("body", "hi")))
			local in_any = h.index[user .. "@" .. HOST .. "/" .. resource] ~= nil
			assert.equal(in_any and "core" or "passes", agree(st.presence()))
			assert.equal(in_any and "core" or "passes", agree(st.presence({ type = "unavailable" })))
		end
	end
	for full, rooms in pairs(h.index) do
		assert(next(rooms) ~= nil, "after " .. what .. ": " .. full .. " is in the index with no room")
	end
end

local function pick(list) return list[math.random(#list)] end

local function self_presence(room, nick, user, type_, codes)
	local p = st.presence({ from = room .. "/" .. nick, to = user .. "@" .. HOST, type = type_ })
		:tag("x", { xmlns = NS_MUC_USER })
		:tag("item", { affiliation = "member", role = type_ and "none" or "participant" }):up()
	for _, code in ipairs(codes) do p:tag("status", { code = code }):up() end
	return p:up()
end

-- One random event, described.
local function random_event(h)
	local user, resource, room, nick = pick(USERS), pick(RESOURCES), pick(ROOMS), pick(NICKS)
	local kind = math.random(11)
	if kind <= 3 then
		h.session_event(user, resource, st.presence({ to = room .. "/" .. nick })
			:tag("x", { xmlns = NS_MUC }):up())
		return ("%s/%s joins %s as %s"):format(user, resource, room, nick)
	elseif kind == 4 then
		h.session_event(user, resource, st.presence({ to = room .. "/" .. nick, type = "unavailable" }))
		return ("%s/%s leaves %s"):format(user, resource, room)
	elseif kind == 5 then
		h.control("ended", user, resource)
		return ("%s/%s ends"):format(user, resource)
	elseif kind <= 7 then
		h.room_event(self_presence(room, nick, user, nil, { "110" }))
		return ("%s joined %s as %s (110)"):format(user, room, nick)
	elseif kind == 8 then
		local codes = pick({ { "110" }, { "110", "307" }, { "110", "301" } })
		h.room_event(self_presence(room, nick, user, "unavailable", codes))
		return ("%s unavailable in %s (%s)"):format(user, room, table.concat(codes, ","))
	elseif kind == 9 then
		h.room_event(st.error_reply(st.presence({ to = room .. "/" .. nick, from = user .. "@" .. HOST }),
			"cancel", "conflict"))
		return ("%s's join of %s answered with conflict"):format(user, room)
	elseif kind == 10 then
		h.control("leave", user, room, "test")
		return ("%s made to leave %s"):format(user, room)
	else
		local autojoin = math.random(2) == 1
		h.control("bookmark", user, room, nick, nil, autojoin)
		return ("%s's bookmark of %s, autojoin %s"):format(user, room, tostring(autojoin))
	end
end

describe("the session index", function()
	it("says what the core decides for every session and room after each of 3,000 random events", function()
		math.randomseed(20261127)
		local h = new_host()
		check(h, "the start")
		local took_part = 0
		for i = 1, 3000 do
			local what = random_event(h)
			check(h, ("event %d (%s)"):format(i, what))
			for _ in pairs(h.index) do took_part = took_part + 1 end
		end
		-- The sequence reached states with sessions in rooms, not only empty ones.
		assert.is_true(took_part > 1000)
	end)

	it("drops a session from the index when it leaves, ends or its account is removed", function()
		local h = new_host()
		local room = ROOMS[1]
		local function join(resource)
			h.session_event("alice", resource, st.presence({ to = room .. "/Al" }):tag("x", { xmlns = NS_MUC }):up())
		end
		join("r1")
		h.room_event(self_presence(room, "Al", "alice", nil, { "110" }))
		join("r2")
		join("r3")
		assert.is_true(index_says(h, "alice", "r1", room))
		assert.is_true(index_says(h, "alice", "r2", room))
		-- Forks hand out the same list until who takes part changes.
		local _, first = fork_of(h, "alice", room)
		local _, again = fork_of(h, "alice", room)
		assert.are.equal(3, #first)
		assert.is_true(rawequal(first, again))
		h.session_event("alice", "r2", st.presence({ to = room .. "/Al", type = "unavailable" }))
		assert.is_nil(h.index["alice@localhost/r2"])
		local _, after = fork_of(h, "alice", room)
		assert.are.same({ "alice@localhost/r1", "alice@localhost/r3" }, after)
		assert.are.same({ "alice@localhost/r1", "alice@localhost/r2", "alice@localhost/r3" }, first)
		h.control("ended", "alice", "r3")
		assert.is_nil(h.index["alice@localhost/r3"])
		assert.is_true(index_says(h, "alice", "r1", room))
		h.room_event(self_presence(room, "Al", "alice", "unavailable", { "110", "307" }))
		assert.is_nil(next(h.index))
		check(h, "the kick")
	end)
end)
