-- The account's archive with the module (issue 13, README "Archive"), against real Prosody
-- with mod_mam: private-message history stays private (a MAM query by an occupant's full
-- JID answers as without the module), the groupchat the module stores answers MAM queries
-- as mod_mam's own messages, and the module's upkeep of the archive (expiry, quota,
-- "archive-message-added").
--
-- The comparison: one server, two VirtualHosts with mod_mam, "localhost" with the module and
-- "plain.localhost" without. alice@localhost (nick Alice) and alice@plain.localhost (nick
-- Palice) sit in the same room and get the same traffic from bob@plain.localhost: the
-- room's groupchat, private messages from Bob to each and from each to Bob. Every MAM query
-- is asked of both accounts, and the answers must have the same shape (bodies, types,
-- order, complete, count, first/last): the plain account's is what mod_mam answers when
-- the archive holds no groupchat. Done with internal storage, with SQL storage (SQLite),
-- and with the room on a second server over s2s.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local socket = require "socket"
local st = Client.stanza

local NS_SID = "urn:xmpp:sid:0"
local PLAIN = "plain.localhost"
local ROOM_OPTIONS = { muc_room_locking = false }

local clients = muc.clients()
local connect, close_all = clients.connect, clients.close_all
local join, say, settle = muc.join, muc.say, muc.settle
local no_tracebacks = muc.no_tracebacks

---------------------------------------------------------------------------
-- Querying

local mam = require "spec.helpers.mam".query

--- What two answers must share: bodies, types and senders (the account's own JID as "me")
--- in order, complete, count, and first/last as the bodies they name.
local function shape(answer, me)
	if answer.error then return { error = answer.error } end
	local out = { bodies = {}, types = {}, from = {}, complete = answer.complete, count = answer.count }
	local body_of = {}
	for i, r in ipairs(answer.results) do
		out.bodies[i] = Client.body(r.message) or "(none)"
		out.types[i] = r.message.attr.type or "normal"
		out.from[i] = (r.message.attr.from or ""):gsub("^[^/]*", function(b) return b == me and "me" or b end)
		body_of[r.id] = out.bodies[i]
	end
	out.first = answer.first and (body_of[answer.first] or "not in the page")
	out.last = answer.last and (body_of[answer.last] or "not in the page")
	return out
end

--- Every result of a query by `with`, paging forward two at a time; checks each page.
local function everything(c, with)
	local all, after = { results = {} }, nil
	for _ = 1, 20 do
		local page = mam(c, { with = with, max = 2, after = after })
		assert.is_nil(page.error, page.error)
		for _, r in ipairs(page.results) do all.results[#all.results + 1] = r end
		if page.complete then return all end
		after = page.last
	end
	error("more than 20 pages")
end

local function bodies(answer)
	local list = {}
	for i, r in ipairs(answer.results or {}) do list[i] = Client.body(r.message) end
	return list
end

---------------------------------------------------------------------------
-- The traffic

local PMS = { "pm 1", "pm 2", "pm 3", "pm 4", "pm 5" }

local function chat(body)
	return function(el) return el.name == "message" and el.attr.type == "chat" and Client.body(el) == body end
end

--- bob (plain) and the two alices join `room`; then groupchat and private messages both
--- ways, each waited for. Pauses of over a second keep pm 3 and pm 5 in seconds of their
--- own (SQL storage compares whole seconds). Returns what alice's module session received.
local function traffic(room, bob, alice, palice)
	join(bob, room .. "/Bob")
	join(alice, room .. "/Alice")
	join(palice, room .. "/Palice")
	settle(bob, alice, palice)
	alice.log = {}
	local function gc(from, body) say(from, room, body, { bob, alice, palice }) end
	local function pm_in(body)
		for _, nick in ipairs({ "Alice", "Palice" }) do
			bob:send(st.message({ to = room .. "/" .. nick, type = "chat", id = Client.new_id() }):text_tag("body", body))
		end
		assert(alice:wait_for(chat(body)))
		assert(palice:wait_for(chat(body)))
	end
	local function pm_out(body)
		for _, c in ipairs({ alice, palice }) do
			c:send(st.message({ to = room .. "/Bob", type = "chat", id = Client.new_id() }):text_tag("body", body))
			assert(bob:wait_for(chat(body)))
		end
	end
	gc(bob, "g1")
	pm_in("pm 1")
	gc(bob, "g2")
	pm_out("pm 2")
	socket.sleep(1.1)
	pm_in("pm 3")
	gc(bob, "g3")
	gc(bob, "g4")
	pm_out("pm 4")
	socket.sleep(1.1)
	pm_in("pm 5")
	gc(alice, "g5")
	settle(bob, alice, palice)
	return alice.log
end

--- The queries asked of both accounts, each from the account's own earlier answers: `all`
--- is its answer to the plain full-JID query, `foreign` an id the full-JID view must not
--- know (a groupchat line for alice@localhost, an id that never existed for the other).
local function battery(room_bob, all, foreign)
	local id = function(i) return all.results[i] and all.results[i].id end
	-- Bounds in whole seconds: a result's stamp is its time cut to microseconds, so as an
	-- `end` it may fall just before the message it came from, on either account. pm 3 and
	-- pm 5 each came over a second after what was before them (see `traffic`).
	local stamp = function(i)
		local r = all.results[i]
		return r and os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(require "util.datetime".parse(r.stamp)))
	end
	return {
		{ "max=1", { with = room_bob, max = 1 } },
		{ "max=2", { with = room_bob, max = 2 } },
		{ "max=2 after the 2nd", { with = room_bob, max = 2, after = id(2) } },
		{ "max=2 after the 4th", { with = room_bob, max = 2, after = id(4) } },
		{ "max=2 after the last", { with = room_bob, max = 2, after = id(5) } },
		{ "last page", { with = room_bob, max = 2, before = true } },
		{ "max=2 before the 4th", { with = room_bob, max = 2, before = id(4) } },
		{ "max=2 before the 1st", { with = room_bob, max = 2, before = id(1) } },
		{ "last page, flip-page", { with = room_bob, max = 2, before = true, flip = true } },
		{ "first page, flip-page", { with = room_bob, max = 2, flip = true } },
		{ "count only", { with = room_bob, max = 0 } },
		{ "max above the limit", { with = room_bob, max = 100 } },
		{ "ids", { with = room_bob, ids = { id(2), id(4) } } },
		{ "after-id, before-id", { with = room_bob, after_id = id(1), before_id = id(5) } },
		{ "start, end", { with = room_bob, start = stamp(3), end_ = stamp(5) } },
		{ "start, max=1", { with = room_bob, start = stamp(3), max = 1 } },
		{ "end, last page", { with = room_bob, end_ = stamp(5), max = 1, before = true } },
		{ "unknown after", { with = room_bob, max = 2, after = "no-such-id" } },
		{ "after an id not in the view", { with = room_bob, max = 2, after = foreign } },
		{ "before an id not in the view", { with = room_bob, max = 2, before = foreign } },
		{ "after-id not in the view", { with = room_bob, after_id = foreign } },
		{ "bad FORM_TYPE", { with = room_bob, form_type = "urn:example:other" } },
		{ "bad start", { with = room_bob, start = "yesterday" } },
	}
end

--- Runs the traffic in `room` and compares both accounts' answers. `limit`: the
--- max_archive_query_results both vhosts run with (nil: mod_mam's default, 50).
local function compare(srv, room, bob_srv, bob_host, limit)
	local bob = connect(bob_srv, "bob", "pc", { host = bob_host })
	local alice = connect(srv, "alice", "phone")
	local palice = connect(srv, "alice", "phone", { host = PLAIN })
	local received = traffic(room, bob, alice, palice)
	local room_bob = room .. "/Bob"
	local shown = math.min(5, limit or 50)

	-- The full-JID query: exactly the private messages, in order, for both.
	local mine, plain = mam(alice, { with = room_bob }), mam(palice, { with = room_bob })
	assert.same({ table.unpack(PMS, 1, shown) }, bodies(mine))
	assert.same(shape(plain, palice.bare), shape(mine, alice.bare))

	-- The room's bare JID: groupchat and private messages for the module's account.
	local whole = everything(alice, room)
	assert.same({ "g1", "pm 1", "g2", "pm 2", "pm 3", "g3", "g4", "pm 4", "pm 5", "g5" }, bodies(whole))
	assert.same(PMS, bodies(everything(palice, room)))
	assert.same(PMS, bodies(everything(alice, room_bob)))

	-- Every live copy alice's session got carries the id the archive gives that message.
	local archived = whole
	for _, r in ipairs(archived.results) do
		local body = Client.body(r.message)
		local got
		for _, el in ipairs(received) do
			if el.name == "message" and Client.body(el) == body and el.attr.type == r.message.attr.type then got = el end
		end
		if r.message.attr.from and r.message.attr.from:match("/Bob$") or r.message.attr.type == "groupchat" then
			assert.truthy(got, "no live copy of " .. body)
			local sid = got:get_child_with_attr("stanza-id", NS_SID, "by", alice.bare)
			assert.truthy(sid, body .. " has no stanza-id by " .. alice.bare)
			assert.equal(r.id, sid.attr.id, body)
		end
	end

	local mine_all = everything(alice, room_bob)
	local plain_all = everything(palice, room_bob)
	local groupchat_id = whole.results[1].id
	assert.equal("groupchat", whole.results[1].message.attr.type)
	for _, pair in ipairs({ { battery(room_bob, mine_all, groupchat_id), battery(room_bob, plain_all, "never-was") } }) do
		for i, q in ipairs(pair[1]) do
			local name = q[1]
			local a = shape(mam(alice, q[2]), alice.bare)
			local b = shape(mam(palice, pair[2][i][2]), palice.bare)
			assert.same(b, a, name)
		end
	end
	return alice, palice
end


local parse_stamp = require "util.datetime".parse

--- The module's groupchat answers MAM queries by the room's bare JID as the private
--- messages mod_mam stored beside it: by time, RSM pages, ids, after-id/before-id. `sql`:
--- SQL storage compares whole seconds.
local function groupchat_queries(alice, room, sql)
	local all = everything(alice, room)
	local names = bodies(all)
	assert.same({ "g1", "pm 1", "g2", "pm 2", "pm 3", "g3", "g4", "pm 4", "pm 5", "g5" }, names)
	local function id_of(body)
		for _, r in ipairs(all.results) do if Client.body(r.message) == body then return r.id, r.stamp end end
	end
	-- RSM: pages forward and back, flip-page.
	local page = mam(alice, { with = room, max = 3 })
	assert.same({ "g1", "pm 1", "g2" }, bodies(page))
	assert.is_false(page.complete)
	assert.equal(id_of("g1"), page.first)
	assert.equal(id_of("g2"), page.last)
	if sql then assert.equal(10, page.count) end
	assert.same({ "pm 2", "pm 3", "g3" }, bodies(mam(alice, { with = room, max = 3, after = page.last })))
	local last = mam(alice, { with = room, max = 3, before = true })
	assert.same({ "pm 4", "pm 5", "g5" }, bodies(last))
	assert.equal(id_of("pm 4"), last.first)
	assert.same({ "pm 3", "g3", "g4" }, bodies(mam(alice, { with = room, max = 3, before = last.first })))
	assert.same({ "g5", "pm 5", "pm 4" }, bodies(mam(alice, { with = room, max = 3, before = true, flip = true })))
	-- By id.
	local ids = { id_of("g4"), id_of("g2"), id_of("pm 3") }
	assert.same({ "g2", "pm 3", "g4" }, bodies(mam(alice, { with = room, ids = ids })))
	assert.same({ "pm 1", "g2", "pm 2", "pm 3" },
		bodies(mam(alice, { with = room, after_id = id_of("g1"), before_id = id_of("g3") })))
	assert.same({ "g3" }, bodies(mam(alice, { ids = { id_of("g3") } })))
	-- By time: pm 3 and pm 5 came in seconds of their own, so the whole seconds they came
	-- in bound what came from pm 3 up to pm 5 (left out), on any storage.
	local function second_of(body)
		local _, stamp = id_of(body)
		return os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(parse_stamp(stamp)))
	end
	assert.same({ "pm 3", "g3", "g4", "pm 4" }, bodies(mam(alice, { with = room, start = second_of("pm 3"),
		end_ = second_of("pm 5") })))
	assert.same({ "pm 3", "g3" }, bodies(mam(alice, { with = room, start = second_of("pm 3"), max = 2 })))
	if sql then
		-- (Internal storage in 13.0.1 starts a backward page at the first item past `end`.)
		assert.same({ "g4", "pm 4" }, bodies(mam(alice, { with = room, end_ = second_of("pm 5"), max = 2, before = true })))
	end
end

---------------------------------------------------------------------------

describe("private history:", function()
	after_each(close_all)

	describe("room on this server, internal storage,", function()
		local srv
		setup(function()
			srv = Server.start{
				module = true, modules = { "mam" }, muc_options = ROOM_OPTIONS,
				vhosts = { { host = PLAIN, modules = { "mam" } } },
			}
		end)
		teardown(function() srv:destroy() end)

		it("a query by an occupant's full JID answers as without the module", function()
			local alice = compare(srv, "pm@" .. srv.muc_host, srv, PLAIN)
			-- Spot checks of what the comparison covered.
			local page = mam(alice, { with = "pm@" .. srv.muc_host .. "/Bob", max = 2 })
			assert.same({ "pm 1", "pm 2" }, bodies(page))
			assert.is_false(page.complete)
			assert.is_nil(page.count) -- internal storage gives no count
			local last = mam(alice, { with = "pm@" .. srv.muc_host .. "/Bob", max = 2, before = true })
			assert.same({ "pm 4", "pm 5" }, bodies(last))
			groupchat_queries(alice, "pm@" .. srv.muc_host)
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("room on this server, SQL storage,", function()
		local srv
		setup(function()
			local limit = { max_archive_query_results = 4 }
			srv = Server.start{
				module = true, modules = { "mam" }, muc_options = ROOM_OPTIONS, options = limit,
				vhosts = { { host = PLAIN, modules = { "mam" }, options = limit } },
				global_options = {
					storage = { archive = "sql" },
					sql = { driver = "SQLite3", database = "archive.sqlite" },
				},
			}
		end)
		teardown(function() srv:destroy() end)

		it("a query by an occupant's full JID answers as without the module", function()
			local alice = compare(srv, "pm@" .. srv.muc_host, srv, PLAIN, 4)
			local room_bob = "pm@" .. srv.muc_host .. "/Bob"
			local page = mam(alice, { with = room_bob, max = 2 })
			assert.same({ "pm 1", "pm 2" }, bodies(page))
			assert.equal(5, page.count)
			assert.is_false(page.complete)
			local rest = mam(alice, { with = room_bob, max = 2, after = page.results[2].id })
			assert.same({ "pm 3", "pm 4" }, bodies(rest))
			assert.equal(5, rest.count)
			assert.same({ error = "item-not-found" }, mam(alice, { with = room_bob, after = "no-such-id" }))
			-- The room's own line is no id in this view.
			local whole = mam(alice, { with = "pm@" .. srv.muc_host, max = 1 })
			assert.equal("groupchat", whole.results[1].message.attr.type)
			assert.same({ error = "item-not-found" }, mam(alice, { with = room_bob, after = whole.results[1].id }))
			groupchat_queries(alice, "pm@" .. srv.muc_host, true)
		end)

		it("leaves no errors in the log", function() no_tracebacks(srv)() end)
	end)

	describe("room on another server over s2s,", function()
		local home, remote
		local REMOTE = "remote.localhost"
		setup(function()
			home, remote = Server.federation{
				home = { module = true, modules = { "mam" }, vhosts = { { host = PLAIN, modules = { "mam" } } } },
				remote = { module = false, host = REMOTE, muc_host = "conference." .. REMOTE, muc_options = ROOM_OPTIONS },
			}
		end)
		teardown(function()
			home:destroy()
			remote:destroy()
		end)

		it("a query by an occupant's full JID answers as without the module", function()
			compare(home, "pm@conference." .. REMOTE, remote, REMOTE)
		end)

		it("leaves no errors in the log", function()
			no_tracebacks(home)()
			no_tracebacks(remote)()
		end)
	end)
end)

---------------------------------------------------------------------------
-- Upkeep: expiry, a full archive, "archive-message-added".

--- Runs every periodic task of `host` now (mod_cron's, each in an async runner as mod_cron
--- runs them); returns how many ran.
local RUN_TASKS = [[local async = require "prosody.util.async"; local n = 0; ]]
	.. [[for _, t in ipairs(require "prosody.core.modulemanager".get_module(%q, "mam").module:get_host_items("task")) do ]]
	.. [[async.runner(function (task) task:run(os.time()) end):run(t); n = n + 1 end; return n]]

--- Records every "archive-message-added" on `host` as "user id body" lines.
local LISTEN = [[prosody.archive_events_test = {}; ]]
	.. [[prosody.hosts[%q].events.add_handler("archive-message-added", function (e) ]]
	.. [[local t = prosody.archive_events_test; ]]
	.. [[t[#t + 1] = e.for_user .. " " .. e.id .. " " .. (e.stanza:get_child_text("body") or "-") ]]
	.. [[.. " " .. tostring(e.origin and e.origin.type) end); return "listening"]]
local HEARD = [[return "<" .. table.concat(prosody.archive_events_test or {}, "|") .. ">"]]

local function groupchat_with_id(c, body)
	local got = assert(c:wait_for(muc.groupchat(body)))
	local sid = got:get_child_with_attr("stanza-id", NS_SID, "by", c.bare)
	return got, sid and sid.attr.id
end

for _, shared in ipairs({ true, false }) do
describe("archive upkeep, " .. (shared and "shared archive" or "one copy per account") .. ":", function()
	local srv
	local QUOTA, FULL = "quota.localhost", "full.localhost"
	setup(function()
		srv = Server.start{
			module = true, modules = { "mam" }, muc_options = ROOM_OPTIONS,
			options = { archive_expires_after = 2, minimix_shared_archive = shared },
			vhosts = {
				{ host = QUOTA, module = true, modules = { "mam" },
					options = { storage_archive_item_limit = 3, minimix_shared_archive = shared } },
				{ host = FULL, module = true, modules = { "mam" },
					options = { storage_archive_item_limit = 0, minimix_shared_archive = shared } },
			},
		}
	end)
	teardown(function() srv:destroy() end)
	after_each(close_all)

	it("expires groupchat after archive_expires_after for an account with no one-to-one chat", function()
		local room = "expiry@" .. srv.muc_host
		local bob = connect(srv, "bob", "pc", { host = QUOTA })
		local alice = connect(srv, "alice", "phone")
		join(bob, room .. "/Bob")
		join(alice, room .. "/Alice")
		say(bob, room, "old 1", { alice })
		say(bob, room, "old 2", { alice })
		assert.same({ "old 1", "old 2" }, bodies(mam(alice, { with = room })))
		-- The cut-off is in whole seconds (os.time() - archive_expires_after): over 3 s on.
		socket.sleep(3.2)
		say(bob, room, "new", { alice })
		-- mod_mam's task alone leaves alice's archive as it is: it never stored for her.
		local ran = srv:eval(RUN_TASKS:format(srv.host))
		assert.truthy(tonumber(ran), ran)
		local left
		for _ = 1, 50 do
			left = bodies(mam(alice, { with = room }))
			if #left == 1 then break end
			socket.sleep(0.1)
		end
		assert.same({ "new" }, left)
		-- The task logs once it has gone through every account (it yields between them).
		local logged
		for _ = 1, 50 do
			-- Shared: stored once for the host, in the room's log.
			logged = srv:log_has(shared and "Removed 2 expired messages from the logs of 1 rooms"
				or "Removed 2 expired messages from the archives of 1 accounts", true)
			if logged then break end
			socket.sleep(0.1)
		end
		assert.truthy(logged)
	end)

	it("fires archive-message-added for what it stores, with the archive's id", function()
		local room = "events@" .. srv.muc_host
		assert.equal("listening", (srv:eval(LISTEN:format(srv.host))))
		local bob = connect(srv, "bob", "pc", { host = QUOTA })
		local alice = connect(srv, "alice", "phone")
		join(bob, room .. "/Bob")
		join(alice, room .. "/Alice")
		bob:send(Client.groupchat(room, "heard"))
		local _, id = groupchat_with_id(alice, "heard")
		assert.truthy(id)
		alice:send(st.message({ to = room .. "/Bob", type = "chat", id = Client.new_id() }):text_tag("body", "told"))
		assert(bob:wait_for(chat("told")))
		settle(alice, bob)
		local heard = assert(srv:eval(HEARD)):match("^<(.*)>$")
		local lines = {}
		for line in heard:gmatch("[^|]+") do lines[#lines + 1] = line end
		assert.equal(2, #lines, heard)
		assert.equal("alice " .. id .. " heard local", lines[1])
		local told = mam(alice, { with = room .. "/Bob" })
		assert.same({ "told" }, bodies(told))
		assert.equal("alice " .. told.results[1].id .. " told c2s", lines[2])
	end)

	it("makes room in a full archive as mod_mam does, and forks what it cannot store", function()
		local room = "quota@" .. srv.muc_host
		local bob = connect(srv, "bob", "pc", { host = QUOTA })
		local alice = connect(srv, "alice", "phone", { host = QUOTA })
		local full = connect(srv, "alice", "phone", { host = FULL })
		join(bob, room .. "/Bob")
		join(alice, room .. "/Alice")
		join(full, room .. "/Full")
		local ids = {}
		for i = 1, 5 do
			bob:send(Client.groupchat(room, "q" .. i))
			local _, id = groupchat_with_id(alice, "q" .. i)
			ids[i] = id
			-- The archive that can hold nothing: forked all the same, with no stanza-id.
			local got, none = groupchat_with_id(full, "q" .. i)
			assert.truthy(got)
			assert.is_nil(none)
		end
		-- storage_archive_item_limit = 3: the oldest make room for the newest, as mod_mam
		-- truncates an archive at its quota (shared: the room's log on the host, which
		-- stores groupchat once per host; else alice's archive).
		local kept = mam(alice, { with = room })
		assert.same({ "q3", "q4", "q5" }, bodies(kept))
		for i, r in ipairs(kept.results) do assert.equal(ids[i + 2], r.id) end
		local what = shared and "room log of " .. room or "archive of alice"
		local note = "The " .. what .. " was full (storage_archive_item_limit = 3): removed its oldest messages"
		assert.truthy(srv:log_has(note, true))
		assert.truthy(srv:log_has("for alice: quota-limit: the " .. what .. " is full", true))
		assert.same({}, bodies(mam(full, { with = room })))
	end)

	it("leaves no other errors in the log", function()
		local found = srv:tracebacks({ "Could not archive a message from quota@" })
		assert.same({}, found)
	end)
end)
end

