-- Transparency: an account with a single session must see exactly what plain Prosody MUC
-- gives it. Every scenario runs twice with the same fixed sequence of actions, once on a
-- server without mod_minimix and once on a server with it; everything each client receives
-- (c.log) is normalised and the two sequences are compared stanza by stanza.
--
-- Determinism: Prosody handles one c2s stanza completely (room broadcast included) before it
-- reads the next, and every step waits for the stanzas it causes before the next action, so
-- each client's log order is fixed by the action sequence. Nothing sleeps; a final ping
-- round trip per client makes sure nothing is still in flight.
--
-- TRANSPARENCY_DUMP=/some/dir writes the normalised sequences there, one file per scenario,
-- user and run, for diff(1). TRANSPARENCY_CONTROL=1 runs the second server without the
-- module too: a check that the normalisation hides every difference between two plain runs.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"

local st = Client.stanza

local MUC_HOST = "conference.localhost"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"
local NS_MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
local NS_MUC_OWNER = "http://jabber.org/protocol/muc#owner"
local NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
local NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
local NS_DATA = "jabber:x:data"
local NS_DELAY = "urn:xmpp:delay"
local NS_LEGACY_DELAY = "jabber:x:delay"
local NS_OCCUPANT_ID = "urn:xmpp:occupant-id:0"
local NS_SID = "urn:xmpp:sid:0"
local NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

local USERS = { "alice", "bob", "carol" }
local RESOURCES = { alice = "phone", bob = "laptop", carol = "desk" }
local WAIT = 3 -- seconds for one expected stanza
local CONTROL = os.getenv("TRANSPARENCY_CONTROL") ~= nil

---------------------------------------------------------------------------
-- Normalisation

local function sorted_keys(t)
	local keys = {}
	for k in pairs(t) do keys[#keys + 1] = k end
	table.sort(keys)
	return keys
end

local function xml_escape(s)
	return (s:gsub("[&<>'\"]", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ["'"] = "&apos;", ['"'] = "&quot;" }))
end

-- Canonical text of a stanza: attributes in sorted order (their order is not significant).
local function canon(el)
	if type(el) == "string" then return xml_escape(el) end
	local parts = { "<", el.name }
	for _, k in ipairs(sorted_keys(el.attr)) do
		parts[#parts + 1] = (" %s='%s'"):format(k, xml_escape(el.attr[k]))
	end
	if #el == 0 then
		parts[#parts + 1] = "/>"
	else
		parts[#parts + 1] = ">"
		for _, child in ipairs(el) do parts[#parts + 1] = canon(child) end
		parts[#parts + 1] = "</" .. el.name .. ">"
	end
	return table.concat(parts)
end

local function walk(el, fn)
	fn(el)
	for _, child in ipairs(el) do
		if type(child) == "table" then walk(child, fn) end
	end
end

-- Pass 1, per stanza: mask what legitimately differs between two servers and runs.
-- Values that only need to be consistent within a run (ids, hashes) become "?kind" here and
-- get numbered in order of appearance by pass 3.
local function mask(stanza, own_id)
	local s = st.clone(stanza)
	local ids = {} -- { element, attribute, kind } to number in pass 3
	if s.attr.id and not own_id(s.attr.id) then
		-- Ids the test sent come back unchanged on both servers; other ids are generated.
		ids[#ids + 1] = { s, "id", "gen" }
	end
	-- A session sees itself as without the module: in its own self-presences (110) the
	-- item names its full JID on both servers, so those are compared as they are.
	local own = s.name == "presence" and Client.muc_status(s)[110] == true
	walk(s, function(el)
		local ns = el.attr.xmlns
		if (el.name == "item" or el.name == "actor") and el.attr.jid and (ns == NS_MUC_USER or ns == NS_MUC_ADMIN)
			and not (own and el.name == "item") then
			-- THE ONE INTENDED DIFFERENCE: with mod_minimix the room's occupant is the account,
			-- so what others see as an occupant's real JID is alice@localhost, not
			-- alice@localhost/phone. Real JIDs in <item jid/> (and, for the same reason, in
			-- <actor jid/>, the real JID of the moderator who acted) are reduced to their
			-- bare form in both runs, except in the recipient's own self-presences.
			el.attr.jid = el.attr.jid:gsub("/.*$", "")
		elseif (el.name == "delay" and ns == NS_DELAY) or (el.name == "x" and ns == NS_LEGACY_DELAY) then
			el.attr.stamp = "STAMP" -- timestamps
		elseif el.name == "occupant-id" and ns == NS_OCCUPANT_ID then
			ids[#ids + 1] = { el, "id", "occupant" } -- hashes with a per-room random salt
		elseif el.name == "stanza-id" and ns == NS_SID then
			ids[#ids + 1] = { el, "id", "sid" }
		end
	end)
	for _, ref in ipairs(ids) do
		ref.original = ref[1].attr[ref[2]]
		ref[1].attr[ref[2]] = "?" .. ref[3]
	end
	return s, ids
end

local function is_self_presence(el)
	return el.name == "presence" and Client.muc_status(el)[110] == true
end

local function is_available_self_presence(el)
	return is_self_presence(el) and el.attr.type == nil
end

-- The available presences of distinct other occupants right before (dir -1) or after
-- (dir 1) the self-presence at index k, sorted in place.
local function sort_occupant_list(entries, k, dir)
	local seen, n = { [entries[k].s.attr.from] = true }, k
	while entries[n + dir] do
		local p = entries[n + dir].s
		if p.name ~= "presence" or p.attr.type or is_self_presence(p) or seen[p.attr.from] then break end
		seen[p.attr.from] = true
		n = n + dir
	end
	local first, last = math.min(k + dir, n), math.max(k + dir, n)
	if n == k then return end
	local run = {}
	for i = first, last do run[#run + 1] = entries[i] end
	table.sort(run, function(a, b) return a.key < b.key end)
	for i = first, last do entries[i] = run[i - first + 1] end
end

-- Pass 2: put what Prosody emits in hash-table order into a canonical order.
--  * Occupant lists come from iterating the room's occupant table: the one sent on a join
--    (right before the self-presence, 110) and the one re-sent after a role change (right
--    after it, e.g. when bob becomes a moderator and may now see real JIDs). Only such a run
--    of available presences of distinct other occupants next to an available self-presence
--    is sorted; a presence on the wrong side of the self-presence, a repeated occupant or
--    any other reordering still counts as a difference.
--  * <item/> lists in disco#items and muc#admin results; <identity/>, <feature/> and the
--    muc#roominfo form's <field/>s in disco#info results; <value/>s of list-multi fields;
--    <status/> codes in a muc#user <x/> (e.g. 104 and 172 on a configuration change).
local function sort_children(parent, names)
	local slots, kids = {}, {}
	for i, child in ipairs(parent) do
		if type(child) == "table" and names[child.name] then
			slots[#slots + 1], kids[#kids + 1] = i, child
		end
	end
	table.sort(kids, function(a, b) return canon(a) < canon(b) end)
	for k, i in ipairs(slots) do parent[i] = kids[k] end
	parent.tags = {}
	for _, child in ipairs(parent) do
		if type(child) == "table" then parent.tags[#parent.tags + 1] = child end
	end
end

local function sort_items(stanza)
	walk(stanza, function(el)
		if el.name == "field" and el.attr.type == "list-multi" and el.attr.xmlns == NS_DATA then
			sort_children(el, { value = true })
		elseif el.name == "x" and el.attr.xmlns == NS_MUC_USER then
			sort_children(el, { status = true })
		end
	end)
	for _, q in ipairs(stanza.tags) do
		if q.name == "query" and (q.attr.xmlns == NS_DISCO_ITEMS or q.attr.xmlns == NS_MUC_ADMIN) then
			sort_children(q, { item = true })
		elseif q.name == "query" and q.attr.xmlns == NS_DISCO_INFO then
			sort_children(q, { identity = true, feature = true })
			for _, form in ipairs(q.tags) do
				if form.name == "x" and form.attr.xmlns == NS_DATA then sort_children(form, { field = true }) end
			end
		end
	end
end

local function normalise(log, own_id)
	local entries = {}
	for i, raw in ipairs(log) do
		local s, ids = mask(raw, own_id)
		sort_items(s)
		entries[i] = { s = s, ids = ids, key = canon(s) }
	end
	-- Pass 2 (see sort_occupant_list)
	for k, e in ipairs(entries) do
		if is_available_self_presence(e.s) then
			sort_occupant_list(entries, k, -1)
			sort_occupant_list(entries, k, 1)
		end
	end
	-- Pass 3: number generated values by first appearance (equal values stay equal).
	local numbering, counts, out = {}, {}, {}
	for n, e in ipairs(entries) do
		for _, ref in ipairs(e.ids) do
			local el, attr, kind, original = ref[1], ref[2], ref[3], ref.original
			numbering[kind] = numbering[kind] or {}
			local num = numbering[kind][original]
			if not num then
				counts[kind] = (counts[kind] or 0) + 1
				num = counts[kind]
				numbering[kind][original] = num
			end
			el.attr[attr] = kind .. num
		end
		out[n] = canon(e.s)
	end
	return out
end

---------------------------------------------------------------------------
-- Comparison

local function show(seq)
	local lines = {}
	for i, s in ipairs(seq) do
		lines[i] = ("  %3d %s"):format(i, #s > 300 and s:sub(1, 300) .. " [...]" or s)
	end
	return #lines > 0 and table.concat(lines, "\n") or "  (nothing)"
end

-- nil when equal, else a readable report of both sequences and the first divergence.
local function diff(who, plain, minimix)
	local n = math.max(#plain, #minimix)
	for i = 1, n do
		if plain[i] ~= minimix[i] then
			return ("%s: sequences diverge at stanza %d\n  plain:    %s\n  minimix:  %s\n"
				.. "--- plain Prosody (%d stanzas):\n%s\n--- with mod_minimix (%d stanzas):\n%s"):format(who, i,
				plain[i] or "(nothing)", minimix[i] or "(nothing)", #plain, show(plain), #minimix, show(minimix))
		end
	end
	return nil
end

---------------------------------------------------------------------------
-- One run of a scenario on one server

local Run = {}
Run.__index = Run

function Run.new(srv, label)
	local self = setmetatable({ srv = srv, label = label, c = {}, misses = {}, seq = 0 }, Run)
	for _, user in ipairs(USERS) do
		self.c[user] = Client.connect{ port = srv.port, user = user, resource = RESOURCES[user] }
	end
	-- Each client's own initial presence comes back to it; wait so it is not mixed into step 1.
	for _, user in ipairs(USERS) do
		self:expect(user, function(el) return el.name == "presence" and el.attr.from == self.c[user].jid end,
			"own initial presence")
	end
	return self
end

-- Ids sent by the test: the same in both runs.
function Run:id()
	self.seq = self.seq + 1
	return "tr" .. self.seq
end

local function own_id(id) return id:match("^tr%d+$") ~= nil end

function Run:send(who, stanza)
	self.c[who]:send(stanza)
end

-- Wait for a stanza; a miss is recorded (not raised) so the comparison can still show it.
function Run:expect(who, pred, what)
	local el, err = self.c[who]:wait_for(pred, WAIT)
	if not el then
		self.misses[#self.misses + 1] = ("%s: %s\n%s"):format(who, what, err)
	end
	return el
end

-- Send an iq with a test id and wait for its reply.
function Run:iq(who, stanza, what)
	local id = self:id()
	stanza.attr.id = id
	self:send(who, stanza)
	return self:expect(who, function(el)
		return el.name == "iq" and el.attr.id == id and (el.attr.type == "result" or el.attr.type == "error")
	end, what or "iq reply")
end

-- Barrier: Prosody answers a ping to the server only after it has written out everything
-- the earlier actions caused, so once the reply is in, the log is complete. The reply itself
-- is taken out of the log again.
function Run:barrier(who)
	local c = self.c[who]
	local ping = Client.ping(c.host)
	ping.attr.id = "barrier"
	c:send(ping)
	local pong, err = c:wait_for(function(el) return el.name == "iq" and el.attr.id == "barrier" end, WAIT)
	assert(pong, err)
	for i = #c.log, 1, -1 do
		if c.log[i] == pong then table.remove(c.log, i) break end
	end
	c:collect(0) -- whatever arrived with it is already logged
end

-- Wait until nothing is in flight, close the clients, return the normalised logs.
function Run:finish()
	local out = {}
	for _, user in ipairs(USERS) do
		self:barrier(user)
		local c = self.c[user]
		out[user] = normalise(c.log, own_id)
		c:close()
	end
	return out
end

function Run:close()
	for _, c in pairs(self.c) do
		if not c.closed then pcall(c.close, c) end
	end
end

---------------------------------------------------------------------------
-- Predicates and stanza builders

local function pres(from, opts)
	opts = opts or {}
	return function(el)
		if el.name ~= "presence" or el.attr.from ~= from or el.attr.type ~= opts.type then return false end
		local codes = Client.muc_status(el)
		for _, code in ipairs(opts.codes or {}) do
			if not codes[code] then return false end
		end
		return true
	end
end

local function msg(from, opts)
	return function(el)
		if el.name ~= "message" or el.attr.from ~= from or el.attr.type ~= opts.type then return false end
		if opts.body and Client.body(el) ~= opts.body then return false end
		if opts.subject and el:get_child_text("subject") ~= opts.subject then return false end
		return true
	end
end

-- An iq; Run:iq() gives it the test's id.
local function iq(type, to)
	return st.iq({ type = type, to = to, id = "unset" })
end

local function admin_set(room, item)
	return iq("set", room)
		:tag("query", { xmlns = NS_MUC_ADMIN }):tag("item", item):up():up()
end

local function admin_set_reason(room, item, reason)
	return iq("set", room)
		:tag("query", { xmlns = NS_MUC_ADMIN }):tag("item", item):text_tag("reason", reason):up():up()
end

local function config_form(room, fields)
	local form = iq("set", room)
		:tag("query", { xmlns = NS_MUC_OWNER })
		:tag("x", { xmlns = NS_DATA, type = "submit" })
		:tag("field", { var = "FORM_TYPE" }):text_tag("value", "http://jabber.org/protocol/muc#roomconfig"):up()
	for _, f in ipairs(fields) do
		form:tag("field", { var = f[1] }):text_tag("value", f[2]):up()
	end
	return form:up():up()
end

-- Everyone in `members` (user -> nick) gets the presence of `nick`, the joiner itself with
-- status 110.
local function expect_presence_of(r, room, members, nick, opts)
	for user, n in pairs(members) do
		local o = { type = opts and opts.type, codes = {} }
		for _, code in ipairs(opts and opts.codes or {}) do o.codes[#o.codes + 1] = code end
		if n == nick and not (opts and opts.others_only) then o.codes[#o.codes + 1] = 110 end
		r:expect(user, pres(room .. "/" .. nick, o), ("presence of %s (%s)"):format(nick, opts and opts.what or ""))
	end
end

local function expect_groupchat(r, room, members, nick, opts)
	for user in pairs(members) do
		r:expect(user, msg(room .. "/" .. nick, { type = "groupchat", body = opts.body, subject = opts.subject }),
			("groupchat from %s: %s"):format(nick, opts.body or opts.subject))
	end
end

-- Alice creates the room (201) and configures it through the muc#owner form.
local function create_room(r, room, fields)
	r:send("alice", Client.muc_join(room .. "/Alice"))
	r:expect("alice", pres(room .. "/Alice", { codes = { 110, 201 } }), "room created")
	r:iq("alice", iq("get", room):tag("query", { xmlns = NS_MUC_OWNER }):up(), "owner form")
	r:iq("alice", config_form(room, fields or {}), "owner form submitted")
end

-- `who` joins as `nick`; `members` (user -> nick) are already in and see the new presence.
local function join(r, room, members, who, nick, history)
	r:send(who, Client.muc_join(room .. "/" .. nick, { history = history }))
	members[who] = nick
	expect_presence_of(r, room, members, nick, { what = "join" })
end

local function leave(r, room, members, who)
	local nick = members[who]
	r:send(who, Client.muc_leave(room .. "/" .. nick))
	expect_presence_of(r, room, members, nick, { type = "unavailable", what = "leave" })
	members[who] = nil
end

local function leave_all(r, room, members)
	for _, who in ipairs({ "carol", "bob", "alice" }) do
		if members[who] then leave(r, room, members, who) end
	end
end

---------------------------------------------------------------------------
-- Scenarios: function(r, room) with a fixed sequence of actions.

local scenarios = {}

-- a) join & discovery
function scenarios.a(r, room)
	local m = { alice = "Alice" }
	create_room(r, room, {
		{ "muc#roomconfig_roomname", "Transparency A" },
		{ "muc#roomconfig_roomdesc", "join and discovery" },
		{ "muc#roomconfig_whois", "anyone" },
	})
	join(r, room, m, "bob", "Bob")
	join(r, room, m, "carol", "Carol")

	r:iq("alice", iq("get", room):tag("query", { xmlns = NS_DISCO_INFO }):up(), "disco#info")
	r:iq("bob", iq("get", room):tag("query", { xmlns = NS_DISCO_ITEMS }):up(), "disco#items")
	-- disco#info on an occupant: the room passes it on to the occupant's client (alice's
	-- session, which answers) and the answer back to carol.
	local id = r:id()
	local ask = iq("get", room .. "/Alice"):tag("query", { xmlns = NS_DISCO_INFO }):up()
	ask.attr.id = id
	r:send("carol", ask)
	local asked = r:expect("alice", function(el)
		return el.name == "iq" and el.attr.type == "get" and el.attr.from == room .. "/Carol"
	end, "disco#info on an occupant, passed on by the room")
	if asked then
		r:send("alice", st.reply(asked):tag("query", { xmlns = NS_DISCO_INFO })
			:tag("identity", { category = "client", type = "phone", name = "test" }):up():up())
	end
	r:expect("carol", function(el)
		return el.name == "iq" and el.attr.id == id and el.attr.type == "result"
	end, "answer of the occupant's client")

	-- XEP-0410 self-ping: the room answers it for its occupant.
	r:iq("bob", Client.ping(room .. "/Bob"), "self-ping")

	r:send("alice", Client.groupchat(room, "hello from alice", r:id()))
	expect_groupchat(r, room, m, "Alice", { body = "hello from alice" })
	r:send("bob", Client.groupchat(room, "hello from bob", r:id()))
	expect_groupchat(r, room, m, "Bob", { body = "hello from bob" })

	r:send("alice", st.message({ to = room, type = "groupchat", id = r:id() }):text_tag("subject", "Topic A"))
	expect_groupchat(r, room, m, "Alice", { subject = "Topic A" })

	r:send("bob", st.message({ to = room .. "/Carol", type = "chat", id = r:id() }):text_tag("body", "psst carol")
		:tag("x", { xmlns = NS_MUC_USER }):up())
	r:expect("carol", msg(room .. "/Bob", { type = "chat", body = "psst carol" }), "PM from Bob")
	r:send("carol", st.message({ to = room .. "/Bob", type = "chat", id = r:id() }):text_tag("body", "hi bob")
		:tag("x", { xmlns = NS_MUC_USER }):up())
	r:expect("bob", msg(room .. "/Carol", { type = "chat", body = "hi bob" }), "PM from Carol")

	leave_all(r, room, m)
end

-- b) roles and affiliations
function scenarios.b(r, room)
	local m = { alice = "Alice" }
	create_room(r, room)
	join(r, room, m, "bob", "Bob")
	join(r, room, m, "carol", "Carol")

	r:iq("alice", admin_set(room, { jid = "bob@localhost", affiliation = "member" }), "bob -> member")
	expect_presence_of(r, room, m, "Bob", { others_only = true, what = "member" })
	r:iq("alice", admin_set(room, { jid = "bob@localhost", affiliation = "admin" }), "bob -> admin")
	expect_presence_of(r, room, m, "Bob", { others_only = true, what = "admin" })

	r:iq("alice", admin_set_reason(room, { nick = "Carol", role = "visitor" }, "quiet please"), "carol -> visitor")
	expect_presence_of(r, room, m, "Carol", { others_only = true, what = "visitor" })

	r:send("carol", Client.groupchat(room, "can I speak?", r:id()))
	r:expect("carol", function(el) return el.name == "message" and el.attr.type == "error" end,
		"error for a visitor's groupchat")

	r:iq("alice", admin_set(room, { nick = "Carol", role = "participant" }), "carol -> participant")
	expect_presence_of(r, room, m, "Carol", { others_only = true, what = "participant" })
	r:send("carol", Client.groupchat(room, "thanks", r:id()))
	expect_groupchat(r, room, m, "Carol", { body = "thanks" })

	for _, affiliation in ipairs({ "member", "admin", "owner" }) do
		r:iq("alice", iq("get", room):tag("query", { xmlns = NS_MUC_ADMIN })
			:tag("item", { affiliation = affiliation }):up():up(), affiliation .. " list")
	end
	r:iq("bob", iq("get", room):tag("query", { xmlns = NS_MUC_ADMIN })
		:tag("item", { role = "moderator" }):up():up(), "moderator list asked by the admin")

	leave_all(r, room, m)
end

-- c) kick and ban
function scenarios.c(r, room)
	local m = { alice = "Alice" }
	create_room(r, room)
	join(r, room, m, "bob", "Bob")
	join(r, room, m, "carol", "Carol")

	r:iq("alice", admin_set_reason(room, { nick = "Carol", role = "none" }, "out"), "kick")
	expect_presence_of(r, room, m, "Carol", { type = "unavailable", codes = { 307 }, what = "kicked" })
	m.carol = nil

	join(r, room, m, "carol", "Carol")

	r:iq("alice", admin_set_reason(room, { jid = "carol@localhost", affiliation = "outcast" }, "gone"), "ban")
	expect_presence_of(r, room, m, "Carol", { type = "unavailable", codes = { 301 }, what = "banned" })
	m.carol = nil

	r:send("carol", Client.muc_join(room .. "/Carol"))
	r:expect("carol", function(el)
		return el.name == "presence" and el.attr.type == "error" and el.attr.from == room .. "/Carol"
			and el:get_child("error") and el:get_child("error"):get_child("forbidden", NS_STANZAS) ~= nil
	end, "403 (forbidden) on rejoin when banned")

	leave_all(r, room, m)
end

-- d) nick change
function scenarios.d(r, room)
	local m = { alice = "Alice" }
	create_room(r, room)
	join(r, room, m, "bob", "Bob")
	join(r, room, m, "carol", "Carol")

	r:send("bob", st.presence({ to = room .. "/Robert" }))
	expect_presence_of(r, room, m, "Bob", { type = "unavailable", codes = { 303 }, what = "nick change" })
	m.bob = "Robert"
	expect_presence_of(r, room, m, "Robert", { what = "new nick" })

	r:send("bob", st.presence({ to = room .. "/Carol" }))
	r:expect("bob", function(el)
		return el.name == "presence" and el.attr.type == "error" and el.attr.from == room .. "/Carol"
	end, "409 nick conflict")

	r:send("bob", Client.groupchat(room, "still Robert", r:id()))
	expect_groupchat(r, room, m, "Robert", { body = "still Robert" })

	leave_all(r, room, m)
end

-- e) leave and rejoin with history
function scenarios.e(r, room)
	local m = { alice = "Alice" }
	create_room(r, room)
	join(r, room, m, "bob", "Bob")
	join(r, room, m, "carol", "Carol")
	r:send("alice", st.message({ to = room, type = "groupchat", id = r:id() }):text_tag("subject", "Topic E"))
	expect_groupchat(r, room, m, "Alice", { subject = "Topic E" })

	leave(r, room, m, "bob")
	for i, who in ipairs({ "alice", "carol", "alice" }) do
		local body = "history " .. i
		r:send(who, Client.groupchat(room, body, r:id()))
		expect_groupchat(r, room, m, m[who], { body = body })
	end

	join(r, room, m, "bob", "Bob", { maxstanzas = 2 })
	r:expect("bob", msg(room .. "/Alice", { type = "groupchat", subject = "Topic E" }), "subject after history")

	leave_all(r, room, m)
end

---------------------------------------------------------------------------

describe("single-session accounts see plain Prosody MUC", function()
	local plain, minimix

	setup(function()
		plain = Server.start{ module = false }
		minimix = Server.start{ module = not CONTROL }
	end)

	teardown(function()
		Server.stop_all()
	end)

	local function run_on(srv, label, name)
		local r = Run.new(srv, label)
		local ok, err = pcall(scenarios[name], r, ("transparency-%s@%s"):format(name, MUC_HOST))
		if not ok then
			r:close()
			error(("%s run of scenario %s failed: %s"):format(label, name, err), 0)
		end
		return r:finish(), r.misses
	end

	local function dump(name, label, logs)
		local dir = os.getenv("TRANSPARENCY_DUMP")
		if not dir then return end
		for user, seq in pairs(logs) do
			local f = assert(io.open(("%s/%s-%s-%s.txt"):format(dir, name, user, label), "w"))
			f:write(table.concat(seq, "\n"), "\n")
			f:close()
		end
	end

	local function compare(name)
		local want, plain_misses = run_on(plain, "plain", name)
		dump(name, "plain", want)
		-- Missing stanzas on plain Prosody mean the scenario's expectations are wrong.
		assert(#plain_misses == 0, "plain Prosody did not do what the scenario expects:\n"
			.. table.concat(plain_misses, "\n"))
		local got, misses = run_on(minimix, "minimix", name)
		if not CONTROL then
			-- Proof that the module was at work: the account, not the session, joined.
			assert.truthy(minimix:log_has(("alice joins transparency-%s@%s as"):format(name, MUC_HOST), true),
				"mod_minimix did not join alice's account")
		end
		dump(name, "minimix", got)
		local report = {}
		for _, user in ipairs(USERS) do
			report[#report + 1] = diff(user, want[user], got[user])
		end
		if #misses > 0 then
			report[#report + 1] = "stanzas the module run waited for in vain:\n" .. table.concat(misses, "\n")
		end
		assert(#report == 0, "scenario " .. name .. " differs with mod_minimix:\n" .. table.concat(report, "\n\n"))
	end

	it("a) join and discovery", function() compare("a") end)
	it("b) roles and affiliations", function() compare("b") end)
	it("c) kick and ban", function() compare("c") end)
	it("d) nick change", function() compare("d") end)
	it("e) leave and rejoin with history", function() compare("e") end)

	it("leaves no Lua errors in either server's log", function()
		assert.same({}, plain:tracebacks())
		assert.same({}, minimix:tracebacks())
	end)
end)
