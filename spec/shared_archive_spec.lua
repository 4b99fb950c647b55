-- The shared archive (issue 13, `minimix_shared_archive`): each groupchat message of a room
-- stored once per host (store `minimix_rooms`), each account's archive made of its own
-- personal archive and the room's log during its membership periods, answering MAM queries
-- exactly as the per-account copies of `minimix_shared_archive = false` do.
--
-- One server, two VirtualHosts with mod_mam and the module: per.localhost with
-- `minimix_shared_archive = false` (a copy per account, mod_mam answers) and
-- shared.localhost with the default (the shared archive). Each has alice (phone and laptop,
-- nick PAlice / SAlice), carol (PCarol / SCarol) and erin (PErin / SErin), all in the SAME
-- room, with bob (a plain account) and dave, a contact on localhost or, with the room on
-- another server, on that one (plain). Every step of
-- the traffic is done by the per.localhost account and then by its shared.localhost twin
-- with nothing said in the room in between, so both accounts of a pair get the same room
-- messages, private messages and chats, and their archives must answer every MAM query
-- alike: the same (type, from, to, body) in the same order, the same <fin complete>, count
-- and RSM first/last (as positions in the account's whole archive), the same metadata, each
-- account paging with its own ids. Alice leaves the room (both sessions) while the others
-- talk and comes back later; erin joins late. Done on internal storage and on SQLite, with
-- the room on this server and on a second one over s2s.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local mam = require "spec.helpers.mam"
local socket = require "socket"
local st = Client.stanza

local PER, SHARED = "per.localhost", "shared.localhost"
local HOSTS = { PER, SHARED }
local PREFIX = { [PER] = "P", [SHARED] = "S" }
local REMOTE, RMUC = "remote.localhost", "conference.remote.localhost"
-- dave, the accounts' contact: on this server's third VirtualHost, or (the room on another
-- server) on that server, over s2s. Set by start().
local CONTACT
local ACCOUNTS = { "alice", "carol", "erin" }
local NS_SID = "urn:xmpp:sid:0"
local ROOM_OPTIONS = { muc_room_locking = false }
local parse_stamp = require "util.datetime".parse
local pretty = require "pl.pretty"
local util = require "luassert.util"

local clients = muc.clients()
local connect, close_all = clients.connect, clients.close_all
local settle_all, no_tracebacks = muc.settle_all, muc.no_tracebacks

--- The server with both VirtualHosts (archives on `storage`, at most `limit` results per
--- query), and the one with the room and bob: the same, or (`federated`) a second server.
local function start(storage, federated, limit)
	local function vhost(host, options)
		options.max_archive_query_results = limit
		return { host = host, module = true, modules = { "mam" }, options = options,
			accounts = { alice = "pass", carol = "pass", erin = "pass" } }
	end
	local home = {
		module = false,
		accounts = { bob = "pass", dave = "pass" },
		vhosts = { vhost(PER, { minimix_shared_archive = false }), vhost(SHARED, {}) },
		global_options = mam.storages[storage],
		muc_options = ROOM_OPTIONS,
	}
	if not federated then
		CONTACT = "dave@localhost"
		local srv = Server.start(home)
		return srv, srv, srv.muc_host, srv.host
	end
	CONTACT = "dave@" .. REMOTE
	home.accounts = { bob = "pass" }
	local srv, other = Server.federation{
		home = home,
		remote = { module = false, host = REMOTE, muc_host = RMUC, muc_options = ROOM_OPTIONS,
			accounts = { bob = "pass", dave = "pass" } },
	}
	return srv, other, RMUC, REMOTE
end

---------------------------------------------------------------------------
-- The traffic

local function chat(body)
	return function(el) return el.name == "message" and el.attr.type == "chat" and Client.body(el) == body end
end

local function groupchat_from(from, body)
	return function(el)
		return el.name == "message" and el.attr.type == "groupchat" and el.attr.from == from
			and Client.body(el) == body
	end
end

--- Connects everyone and plays the traffic in `room`. Returns the clients: bob, dave, and
--- per host { phone, laptop, carol, erin }, and the number of groupchat messages said.
local function traffic(home, bob_srv, bob_host, room)
	local t = {
		bob = connect(bob_srv, "bob", "pc", { host = bob_host }),
		dave = connect(bob_srv, "dave", "pc", { host = bob_host }),
		said = 0,
	}
	for _, h in ipairs(HOSTS) do
		t[h] = {
			phone = connect(home, "alice", "phone", { host = h }),
			laptop = connect(home, "alice", "laptop", { host = h }),
			carol = connect(home, "carol", "pc", { host = h }),
			erin = connect(home, "erin", "pc", { host = h }),
		}
	end
	local everyone = { t.bob, t.dave }
	for _, h in ipairs(HOSTS) do
		for _, c in pairs(t[h]) do everyone[#everyone + 1] = c end
	end
	local function settle() settle_all(everyone) end

	-- Who is in the room (every session that gets its groupchat), and the nick of each.
	local inside, nick_of = { t.bob }, { [t.bob] = "Bob" }
	muc.join(t.bob, room .. "/Bob")
	local function join(h, c, name)
		nick_of[c] = PREFIX[h] .. name
		muc.join(c, room .. "/" .. nick_of[c])
		inside[#inside + 1] = c
		settle() -- the history the room sends a join is in the logs, out of the inboxes
	end
	local function say(c, body)
		c:send(Client.groupchat(room, body))
		for _, r in ipairs(inside) do
			assert(r:wait_for(groupchat_from(room .. "/" .. nick_of[c], body)), body .. " to " .. r.jid)
		end
		t.said = t.said + 1
	end
	-- bob to the `name` of each host, privately.
	local function pm_in(name, body, to)
		for _, h in ipairs(HOSTS) do
			t.bob:send(st.message({ to = room .. "/" .. PREFIX[h] .. name, type = "chat", id = Client.new_id() })
				:text_tag("body", body))
			assert(t[h][to]:wait_for(chat(body)), body .. " to " .. t[h][to].jid)
		end
	end
	local function pm_out(from, body)
		for _, h in ipairs(HOSTS) do
			t[h][from]:send(st.message({ to = room .. "/Bob", type = "chat", id = Client.new_id() })
				:text_tag("body", body))
			assert(t.bob:wait_for(chat(body)), body .. " to bob")
		end
	end
	local function from_dave(user, body, to)
		for _, h in ipairs(HOSTS) do
			t.dave:send(st.message({ to = user .. "@" .. h, type = "chat", id = Client.new_id() }):text_tag("body", body))
			assert(t[h][to]:wait_for(chat(body)), body .. " to " .. t[h][to].jid)
		end
	end
	local function to_dave(from, body)
		for _, h in ipairs(HOSTS) do
			t[h][from]:send(st.message({ to = CONTACT, type = "chat", id = Client.new_id() }):text_tag("body", body))
			assert(t.dave:wait_for(chat(body)), body .. " to dave")
		end
	end
	-- A chat from dave to every account, over a second after anything before it: the
	-- whole second it is stored in holds nothing older on any storage (SQL compares
	-- whole seconds), so it bounds queries by time.
	local function mark(body)
		settle()
		socket.sleep(1.1)
		from_dave("alice", body, "phone")
		from_dave("carol", body, "carol")
		from_dave("erin", body, "erin")
	end
	-- Each of both hosts, one after the other.
	local function both(f)
		for _, h in ipairs(HOSTS) do f(h, t[h]) end
	end

	both(function(h, c)
		join(h, c.phone, "Alice")
		join(h, c.laptop, "Alice")
		join(h, c.carol, "Carol")
	end)
	say(t.bob, "hello")
	both(function(_, c) say(c.phone, "ok") end)
	say(t.bob, "ok")
	say(t.bob, "ok")
	pm_in("Alice", "pm 1", "phone")
	pm_out("laptop", "pm 2")
	from_dave("alice", "chat 1", "phone")
	to_dave("phone", "chat 2")
	pm_in("Carol", "pm c1", "carol")
	mark("mark A")
	say(t.bob, "g2")
	both(function(_, c) say(c.carol, "carol says") end)
	-- Alice leaves with both sessions: the account is out of the room.
	both(function(h, c)
		for _, s in ipairs({ c.phone, c.laptop }) do
			muc.leave(s, room .. "/" .. nick_of[s])
			for i = #inside, 1, -1 do if inside[i] == s then table.remove(inside, i) end end
		end
		assert(t.bob:wait_for(muc.presence(room .. "/" .. PREFIX[h] .. "Alice", "unavailable")))
	end)
	mark("mark B")
	say(t.bob, "while out")
	both(function(_, c) say(c.carol, "ok") end)
	pm_in("Carol", "pm c2", "carol")
	from_dave("alice", "chat 3", "phone")
	say(t.bob, "ok")
	-- Erin joins late.
	both(function(h, c) join(h, c.erin, "Erin") end)
	say(t.bob, "welcome erin")
	both(function(_, c) say(c.erin, "hi all") end)
	mark("mark C")
	-- Alice comes back, with one session.
	both(function(h, c) join(h, c.phone, "Alice") end)
	say(t.bob, "back")
	both(function(_, c) say(c.phone, "ok") end)
	pm_in("Alice", "pm 3", "phone")
	pm_out("phone", "pm 4")
	both(function(_, c) say(c.carol, "bye") end)
	mark("mark D")
	to_dave("phone", "chat 4")
	say(t.bob, "last")
	settle()
	return t
end

---------------------------------------------------------------------------
-- Comparing

-- A JID with the account's own bare JID as "me" (the twins' JIDs differ only there).
local function rel(jid, me)
	if not jid then return "-" end
	local bare, rest = jid:match("^([^/]*)(.*)$")
	return bare == me and "me" .. rest or jid
end

--- One result as the twins must share it: type, from, to, body, the stanza-ids it carries
--- (by whom), and its position in the account's whole archive (`pos`, id -> index).
local function item_shape(r, me, pos)
	local m = r.message
	local sids = {}
	for tag in m:childtags("stanza-id", NS_SID) do sids[#sids + 1] = rel(tag.attr.by, me) end
	table.sort(sids)
	return ("%s | %s -> %s | %s | sid %s | #%s"):format(m.attr.type or "normal", rel(m.attr.from, me),
		rel(m.attr.to, me), Client.body(m) or "(none)", table.concat(sids, ","), pos[r.id] or "?")
end

local function shape(answer, me, pos)
	if answer.error then return { error = answer.error } end
	local items = {}
	for i, r in ipairs(answer.results) do items[i] = item_shape(r, me, pos) end
	local function at(id) return id and (pos[id] or "not in the archive") end
	return { items = items, complete = answer.complete, count = answer.count, first = at(answer.first),
		last = at(answer.last) }
end

local function bodies(results)
	local list = {}
	for i, r in ipairs(results) do list[i] = Client.body(r.message) or "(none)" end
	return list
end

--- Every result for `o` (a query without RSM), paging forward two at a time (`backward`:
--- from the end, with before), each page with the last's ids. Returns the results in
--- archive order and the pages' answers.
local function page_through(c, o, backward)
	local results, pages, edge = {}, {}, nil
	for _ = 1, 40 do
		local q = {}
		for k, v in pairs(o) do q[k] = v end
		q.max = 2
		if backward then q.before = edge or true else q.after = edge end
		local page = mam.query(c, q)
		assert.is_nil(page.error, page.error)
		pages[#pages + 1] = page
		if backward then
			for i = #page.results, 1, -1 do table.insert(results, 1, page.results[i]) end
			edge = page.first
		else
			for _, r in ipairs(page.results) do results[#results + 1] = r end
			edge = page.last
		end
		if page.complete then return results, pages end
	end
	error("more than 40 pages")
end

--- The whole archive of `c` (forward), with id -> position.
local function whole(c)
	local all = page_through(c, {})
	local pos = {}
	for i, r in ipairs(all) do pos[r.id] = i end
	return all, pos
end

local function second_of(r)
	return os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(parse_stamp(r.stamp)))
end

local function find_body(results, body, nth)
	local n = 0
	for _, r in ipairs(results) do
		if Client.body(r.message) == body then
			n = n + 1
			if n == (nth or 1) then return r end
		end
	end
end

--- The queries asked of an account, each from its own archive: `all` its whole archive,
--- `in_room` its results for `with` = the room, `foreign` an id of its host that is no
--- message of its archive (another account's, or the room's from outside its periods).
--- Each is { name, query, group }: group "outside" pages from an id of the archive that
--- the query's `with` leaves out, "edges" bounds by time at or past the archive's ends.
local function battery(room, bob_nick, all, in_room, foreign)
	local id = function(list, i) return list[math.min(i, #list)].id end
	local mark = function(body) return second_of(assert(find_body(all, body), body)) end
	local a_chat = find_body(all, "mark A").id
	local q = {
		{ "no RSM", {} },
		{ "count only", { max = 0 } },
		{ "max=1", { max = 1 } },
		{ "last page", { max = 3, before = true } },
		{ "max=3 after the 4th", { max = 3, after = id(all, 4) } },
		{ "max=3 before the 6th", { max = 3, before = id(all, 6) } },
		{ "first page, flip-page", { max = 3, flip = true } },
		{ "last page, flip-page", { max = 3, before = true, flip = true } },
		{ "after the 5th, flip-page", { max = 3, after = id(all, 5), flip = true } },
		{ "before the 7th, flip-page", { max = 3, before = id(all, 7), flip = true } },
		{ "room: no RSM", { with = room } },
		{ "room: count only", { with = room, max = 0 } },
		{ "room: max=3", { with = room, max = 3 } },
		{ "room: last page", { with = room, max = 3, before = true } },
		{ "room: after the 2nd", { with = room, max = 3, after = id(in_room, 2) } },
		{ "room: before the last", { with = room, max = 3, before = id(in_room, #in_room) } },
		{ "room: last page, flip-page", { with = room, max = 2, before = true, flip = true } },
		{ "room: after a chat with the contact", { with = room, max = 2, after = a_chat }, "outside" },
		{ "room: before a chat with the contact", { with = room, max = 2, before = a_chat }, "outside" },
		{ "room: ids of a chat and of the room", { with = room, ids = { a_chat, id(in_room, 3) } } },
		{ "contact: after a message of the room", { with = CONTACT, max = 2, after = id(in_room, 1) }, "outside" },
		{ "contact: before a message of the room", { with = CONTACT, max = 2, before = id(in_room, #in_room) }, "outside" },
		{ "occupant: everything", { with = room .. "/" .. bob_nick } },
		{ "occupant: max=1", { with = room .. "/" .. bob_nick, max = 1 } },
		{ "occupant: last page", { with = room .. "/" .. bob_nick, max = 1, before = true } },
		{ "occupant: after a message of the room", { with = room .. "/" .. bob_nick, after = id(in_room, 1) } },
		{ "contact: everything", { with = CONTACT } },
		{ "contact: last page", { with = CONTACT, max = 2, before = true } },
		{ "another room", { with = "elsewhere@" .. room:match("@(.*)$") } },
		{ "start, end", { start = mark("mark A"), end_ = mark("mark C") } },
		{ "start, end, max=3", { start = mark("mark A"), end_ = mark("mark C"), max = 3 } },
		{ "start, end, last page", { start = mark("mark A"), end_ = mark("mark C"), max = 3, before = true }, "edges" },
		{ "room: start, end", { with = room, start = mark("mark B"), end_ = mark("mark D") } },
		{ "room: start", { with = room, start = mark("mark C") } },
		{ "room: end", { with = room, end_ = mark("mark B") } },
		{ "end, last page", { end_ = mark("mark C"), max = 2, before = true }, "edges" },
		{ "start after everything", { start = "2999-01-01T00:00:00Z" }, "edges" },
		{ "after-id, before-id", { after_id = id(all, 2), before_id = id(all, 9) } },
		{ "room: after-id", { with = room, after_id = id(in_room, 3) } },
		{ "ids", { ids = { id(all, 8), id(all, 3), id(all, #all) } } },
		{ "ids with one not in the archive", { ids = { foreign, id(all, 1) } } },
		{ "after an unknown id", { max = 2, after = "no-such-id" } },
		{ "after an id not in the archive", { max = 2, after = foreign } },
		{ "before an id not in the archive", { max = 2, before = foreign } },
		{ "room: after an id not in the archive", { with = room, max = 2, after = foreign } },
		{ "after-id not in the archive", { after_id = foreign } },
		{ "bad FORM_TYPE", { form_type = "urn:example:other" } },
		{ "bad start", { start = "yesterday" } },
	}
	return q
end

--- The whole archives of the twins (`user` on each host, `v` as archives() makes it) are
--- alike: every message, paged forward and backward with and without `with`, the query
--- form and <metadata/>.
local function same_archives(v, room, user)
	local a, b = v[PER][user], v[SHARED][user]
	local function both(f) return f(a), f(b) end
	local want, got = both(function(x)
		local out = {}
		for i, r in ipairs(x.all) do out[i] = item_shape(r, x.me, x.pos) end
		return out
	end)
	assert.same(want, got, user .. ": the whole archive")
	assert.truthy(#want > 10, user .. ": the whole archive holds " .. #want)
	-- The same moments: each message stored within a second of its twin.
	for i = 1, #a.all do
		local d = math.abs(parse_stamp(a.all[i].stamp) - parse_stamp(b.all[i].stamp))
		assert.truthy(d < 1, ("%s: #%d stored %s and %s"):format(user, i, a.all[i].stamp, b.all[i].stamp))
	end
	for _, o in ipairs({ {}, { with = room }, { with = CONTACT } }) do
		for _, backward in ipairs({ false, true }) do
			local pw, pg = both(function(x)
				local results, pages = page_through(x.c, o, backward)
				local out = { items = shape({ results = results }, x.me, x.pos).items, pages = {} }
				for i, page in ipairs(pages) do out.pages[i] = shape(page, x.me, x.pos) end
				return out
			end)
			assert.same(pw, pg, ("%s: paging %s with %s"):format(user, backward and "backward" or "forward",
				o.with or "nothing"))
		end
	end
	assert.same(mam.form_fields(a.c), mam.form_fields(b.c), user .. ": the query form")
	local mw, mg = both(function(x)
		local m = mam.metadata(x.c)
		if m.error then return m end
		return { start = m.start and (x.pos[m.start.id] or "?"), ["end"] = m["end"] and (x.pos[m["end"].id] or "?") }
	end)
	assert.same(mw, mg, user .. ": metadata")
	assert.same({ start = 1, ["end"] = #a.all }, mw, user .. ": metadata")
end

-- Per account, a message of another archive of its host that is none of its own.
local FOREIGN = { alice = { "carol", "while out" }, carol = { "alice", "chat 1" }, erin = { "carol", "hello" } }

--- Asks the battery's queries of `group` of the twins (`user`); adds each pair of answers
--- that differ to `mismatches` (so that one run lists them all).
local function ask_battery(v, room, user, group, mismatches)
	local queries = {}
	for _, h in ipairs(HOSTS) do
		local x = v[h][user]
		local pick = FOREIGN[user]
		local foreign = assert(find_body(v[h][pick[1]].all, pick[2]), pick[2]).id
		queries[h] = battery(room, "Bob", x.all, x.in_room, foreign)
	end
	local a, b = v[PER][user], v[SHARED][user]
	for i, q in ipairs(queries[PER]) do
		if q[3] == group then
			local qb = queries[SHARED][i][2]
			local sa = shape(mam.query(a.c, q[2]), a.me, a.pos)
			local sb = shape(mam.query(b.c, qb), b.me, b.pos)
			if not util.deepcompare(sa, sb) then
				mismatches[#mismatches + 1] = ("%s: %s\n  %s: %s\n    %s\n  %s: %s\n    %s"):format(user, q[1],
					PER, pretty.write(q[2], ""), pretty.write(sa, ""), SHARED, pretty.write(qb, ""),
					pretty.write(sb, ""))
			end
		end
	end
end

---------------------------------------------------------------------------

local GROUPCHAT_SEEN = {
	-- with = the room, groupchat and private messages, as each account has them.
	alice = { "hello", "ok", "ok", "ok", "ok", "pm 1", "pm 2", "g2", "carol says", "carol says",
		"back", "ok", "ok", "pm 3", "pm 4", "bye", "bye", "last" },
	carol = { "hello", "ok", "ok", "ok", "ok", "pm c1", "g2", "carol says", "carol says", "while out", "ok",
		"ok", "pm c2", "ok", "welcome erin", "hi all", "hi all", "back", "ok", "ok", "bye", "bye", "last" },
	erin = { "welcome erin", "hi all", "hi all", "back", "ok", "ok", "bye", "bye", "last" },
}

local function sid_by(el, by)
	local tag = el and el:get_child_with_attr("stanza-id", NS_SID, "by", by)
	return tag and tag.attr.id
end

for _, case in ipairs{
	{ "internal" }, { "sqlite", nil, 7 },
	{ "internal", "the room on another server over s2s" },
	{ "sqlite", "the room on another server over s2s", 7 },
} do
	local storage, federated, limit = case[1], case[2], case[3]
	describe("the shared archive on " .. storage .. " storage" .. (federated and ", " .. federated or ""), function()
		local srv, other, room, t, views
		setup(function()
			local muc_host, bob_host
			srv, other, muc_host, bob_host = start(storage, federated, limit)
			room = "lounge@" .. muc_host
			t = traffic(srv, other, bob_host, room)
		end)
		teardown(function()
			close_all()
			if srv then srv:destroy() end
			if other and other ~= srv then other:destroy() end
		end)

		-- Per host, the archives of its three accounts (for ids across accounts).
		local function archives()
			if views then return views end
			views = {}
			for _, h in ipairs(HOSTS) do
				views[h] = {}
				for _, user in ipairs(ACCOUNTS) do
					local c = t[h][user == "alice" and "phone" or user]
					local all, pos = whole(c)
					views[h][user] = { c = c, me = c.bare, all = all, pos = pos,
						in_room = page_through(c, { with = room }) }
				end
			end
			return views
		end

		local function battery_alike(group)
			return function()
				local v = archives()
				local mismatches = {}
				for _, user in ipairs(ACCOUNTS) do
					if not group then same_archives(v, room, user) end
					ask_battery(v, room, user, group, mismatches)
				end
				assert(#mismatches == 0, #mismatches .. " answers differ:\n" .. table.concat(mismatches, "\n"))
			end
		end

		it("answers every MAM query of each account as its copy-per-account twin", battery_alike(nil))

		it("answers alike when paging from an id of the archive that the query's `with` leaves out",
			battery_alike("outside"))

		it("answers alike when a time bound is at or past an end of the archive", battery_alike("edges"))

		it("keeps each account's archive to its time in the room", function()
			local v = archives()
			for _, h in ipairs(HOSTS) do
				for _, user in ipairs(ACCOUNTS) do
					assert.same(GROUPCHAT_SEEN[user], bodies(v[h][user].in_room), user .. "@" .. h)
				end
			end
		end)

		it("gives every account of the host one stanza-id for a room message, the one in its archive", function()
			local v = archives()
			for _, body in ipairs({ "hello", "g2", "welcome erin", "back", "last" }) do
				local from = room .. "/Bob"
				local ids = {}
				for _, h in ipairs(HOSTS) do
					ids[h] = {}
					for _, user in ipairs(ACCOUNTS) do
						local r = find_body(v[h][user].in_room, body)
						if r then
							for _, c in ipairs(user == "alice" and { t[h].phone, t[h].laptop } or { t[h][user] }) do
								local live = muc.find(c.log, groupchat_from(from, body))
								if live then
									assert.equal(r.id, sid_by(live, c.bare), ("%s to %s"):format(body, c.jid))
								end
							end
							ids[h][#ids[h] + 1] = r.id
						end
					end
					assert.truthy(#ids[h] >= 2, body .. " archived for fewer than two accounts of " .. h)
				end
				-- Copies per account: an id each.
				for i = 2, #ids[PER] do assert.are_not.equal(ids[PER][1], ids[PER][i], body .. " on " .. PER) end
				-- One copy: one id.
				for i = 2, #ids[SHARED] do assert.equal(ids[SHARED][1], ids[SHARED][i], body .. " on " .. SHARED) end
			end
		end)

		it("stores a room message once per host, in the storage of the accounts' archives", function()
			local v = archives()
			local where = storage == "internal" and "internal" or "sql"
			local elsewhere = storage == "internal" and "sql" or "internal"
			local function groupchat(items)
				local n = 0
				for _, item in ipairs(items or {}) do
					if item.type == "groupchat" then n = n + 1 end
				end
				return n
			end
			-- Copies per account: each account's archive holds what it got from the room.
			for _, user in ipairs(ACCOUNTS) do
				local per_account = mam.stored(srv, PER, "archive", user)
				local got = 0
				for _, r in ipairs(v[PER][user].in_room) do
					if r.message.attr.type == "groupchat" then got = got + 1 end
				end
				assert.equal(got, groupchat(per_account[where]), user .. "@" .. PER)
				assert.is_nil(per_account[elsewhere], user .. "@" .. PER)
				-- The shared host: no groupchat in the personal archives.
				local personal = mam.stored(srv, SHARED, "archive", user)
				assert.truthy(personal[where], user .. "@" .. SHARED .. " has no personal archive")
				assert.equal(0, groupchat(personal[where]), user .. "@" .. SHARED)
			end
			-- The room's log: every message said in the room once (someone of the host was
			-- always in it), none on the host that stores a copy per account.
			local log = mam.stored(srv, SHARED, "minimix_rooms", room)
			assert.equal(t.said, groupchat(log[where]), "minimix_rooms of " .. SHARED)
			assert.equal(t.said, #log[where])
			assert.is_nil(log[elsewhere])
			assert.same({}, mam.stored(srv, PER, "minimix_rooms", room))
		end)

		it("leaves no errors in the logs", function()
			no_tracebacks(srv)()
			if other ~= srv then no_tracebacks(other)() end
		end)
	end)
end
