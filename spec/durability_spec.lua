-- Durability of the account's archive (flow 16) against a real Prosody with mod_mam, on
-- Prosody's file storage (internal) and on SQL storage (SQLite3), with the room on the same
-- server and on a second one over s2s: what a session was forked is in the archive, also
-- after the server is killed with SIGKILL and started again, each message once and under
-- the stanza-id the sessions saw; each account on a host sees only its own archive's
-- stanza-id although the room hands them all the same stanza; a stanza-id that claims to
-- be the account's archive's is neither stored nor forked.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local st = Client.stanza

local MUC = "conference.localhost"
local ALICE, CAROL = "alice@localhost", "carol@localhost"
local NS_SID = "urn:xmpp:sid:0"

local clients = muc.clients()
local connect, close_all = clients.connect, clients.close_all
local count, groupchat, join, say = muc.count, muc.groupchat, muc.join, muc.say
local mam_query, settle, no_tracebacks = muc.mam_query, muc.settle, muc.no_tracebacks

local STORAGES = {
	internal = { storage = "internal" },
	sqlite = { storage = { archive = "sql" }, sql = { driver = "SQLite3", database = "archive.sqlite" } },
}

local REMOTE, RMUC = "remote.localhost", "conference.remote.localhost"

--- The server with the module (mod_mam loaded, archives on `storage`), and where the room
--- and bob are: the same server, or (`remote`) a second one reached over s2s.
local function start(storage, remote, options)
	local home = {
		module = true,
		modules = { "mam" },
		options = options,
		global_options = STORAGES[storage],
		muc_options = { muc_room_locking = false },
	}
	if not remote then
		local srv = Server.start(home)
		return srv, srv, MUC
	end
	local srv, other = Server.federation{
		home = home,
		remote = { module = false, host = REMOTE, muc_host = RMUC, muc_options = { muc_room_locking = false } },
	}
	return srv, other, RMUC
end

--- Where the room's groupchat was stored: the room logs' files of the internal storage
--- (the shared archive), or the SQLite database.
local function archive_files(srv)
	local function exists(path)
		local f = io.open(path)
		if f then f:close() end
		return f ~= nil
	end
	local ls = io.popen("ls " .. srv.dir .. "/data/localhost/minimix_rooms 2>/dev/null")
	local files = ls:read("a")
	ls:close()
	return files:find("%.list") ~= nil, exists(srv.dir .. "/data/archive.sqlite")
end

local find = muc.find

--- The <stanza-id/> children of `el` by `by`.
local function stanza_ids(el, by)
	local ids = {}
	for tag in el:childtags("stanza-id", NS_SID) do
		if tag.attr.by == by then ids[#ids + 1] = tag.attr.id end
	end
	return ids
end

--- The one stanza-id by `by` on the message with `body` that `c` got (fails on none, on
--- more than one, and on a message received more than once).
local function seen_id(c, body, by)
	assert.equal(1, count(c.log, groupchat(body)), body .. " to " .. c.jid)
	local ids = stanza_ids(find(c.log, groupchat(body)), by)
	assert.equal(1, #ids, body .. " to " .. c.jid .. ": stanza-ids by " .. by)
	return ids[1]
end

--- `c`'s archive for `room`, as { [body] = { ids } } and the number of groupchat results.
local function archive_of(c, room)
	local results, fin = mam_query(c, room)
	assert.equal("result", fin.attr.type)
	local by_body, n = {}, 0
	for _, r in ipairs(results) do
		if r.message and r.message.attr.type == "groupchat" then
			n = n + 1
			local body = Client.body(r.message)
			by_body[body] = by_body[body] or {}
			table.insert(by_body[body], r)
		end
	end
	return by_body, n
end

for _, case in ipairs{
	{ "internal" }, { "sqlite" }, { "internal", "the room on another server over s2s" },
	{ "sqlite", "the room on another server over s2s" },
} do
	local storage, remote = case[1], case[2]
	describe("the archive on " .. storage .. " storage" .. (remote and ", " .. remote or ""), function()
		local srv, other
		teardown(function()
			close_all()
			if srv then srv:destroy() end
			if other and other ~= srv then other:destroy() end
		end)

		it("holds every message forked to a session after kill -9 and a start, once, under the id the sessions saw",
			function()
				local muc_host
				srv, other, muc_host = start(storage, remote)
				local ROOM = "crash@" .. muc_host
				local bob = connect(other, "bob", "pc")
				local phone, laptop = connect(srv, "alice", "phone"), connect(srv, "alice", "laptop")
				join(bob, ROOM .. "/Bob")
				join(phone, ROOM .. "/Alice")
				join(laptop, ROOM .. "/Alice")
				settle(bob, phone, laptop)
				local bodies = {}
				for i = 1, 15 do bodies[#bodies + 1] = "from bob " .. i end
				for i = 1, 5 do bodies[#bodies + 1] = "from phone " .. i end
				for i = 1, 15 do bob:send(Client.groupchat(ROOM, bodies[i])) end
				for i = 16, 20 do phone:send(Client.groupchat(ROOM, bodies[i])) end
				-- Killed as soon as both sessions have every message: nothing has had time to
				-- be written later.
				for _, c in ipairs{ phone, laptop } do
					for _, body in ipairs(bodies) do assert(c:wait_for(groupchat(body)), body .. " to " .. c.jid) end
				end
				srv:kill9()
				local ids = {}
				for _, body in ipairs(bodies) do
					for _, c in ipairs{ phone, laptop } do
						local id = seen_id(c, body, ALICE)
						if ids[body] then assert.equal(ids[body], id, body) end
						ids[body] = id
					end
				end
				close_all()
				srv:relaunch()
				if remote then
					-- The account rejoins the room on its own (asking for the history since the
					-- last message it got, read back from the archive); the archive is read
					-- once that join is answered. (The remote room never saw the account go, so
					-- it takes the join for a presence update and replays nothing; replays
					-- after a crash are spec/catchup_spec.lua's.)
					muc.wait_log(srv, "alice caught up in " .. ROOM .. ":", 0, 20)
				end

				local tablet = connect(srv, "alice", "tablet")
				local archived, n = archive_of(tablet, ROOM)
				local missing = {}
				for _, body in ipairs(bodies) do
					if not archived[body] then missing[#missing + 1] = body end
				end
				assert.equal(#bodies, n, "missing: " .. table.concat(missing, ", "))
				for _, body in ipairs(bodies) do
					local found = archived[body] or {}
					assert.equal(1, #found, body)
					assert.equal(ids[body], found[1].id, body)
					-- Stored as the room sent it to the account, with no stanza-id in its name.
					assert.equal(ALICE, found[1].message.attr.to)
					assert.equal(0, #stanza_ids(found[1].message, ALICE), body)
				end
				close_all()
				-- The archive is where the storage option says.
				local in_file, in_sqlite = archive_files(srv)
				assert.same({ storage == "internal", storage == "sqlite" }, { in_file, in_sqlite })
				no_tracebacks(srv)()
			end)
	end)
end

for _, shared in ipairs({ true, false }) do
describe("the archive with two accounts of one host in a room, "
	.. (shared and "shared archive" or "one copy per account"), function()
	local srv
	setup(function() srv = start("internal", nil, { minimix_shared_archive = shared }) end)
	teardown(function()
		close_all()
		srv:destroy()
	end)

	it("gives each account's sessions and archive that account's stanza-id only", function()
		local ROOM = "shared@" .. MUC
		local bob = connect(srv, "bob", "pc")
		local phone, laptop = connect(srv, "alice", "phone"), connect(srv, "alice", "laptop")
		local carol = connect(srv, "carol", "pc")
		join(bob, ROOM .. "/Bob")
		join(phone, ROOM .. "/Alice")
		join(laptop, ROOM .. "/Alice")
		join(carol, ROOM .. "/Carol")
		settle(bob, phone, laptop, carol)
		say(bob, ROOM, "to everyone", { phone, laptop, carol })
		say(phone, ROOM, "alice to everyone", { bob, phone, laptop, carol })
		settle(bob, phone, laptop, carol)
		for _, body in ipairs{ "to everyone", "alice to everyone" } do
			local alice_id = seen_id(phone, body, ALICE)
			assert.equal(alice_id, seen_id(laptop, body, ALICE))
			local carol_id = seen_id(carol, body, CAROL)
			if shared then
				-- One stored copy for the host, each account's stanza-id in its own name.
				assert.equal(alice_id, carol_id)
			else
				assert.are_not.equal(alice_id, carol_id)
			end
			for _, c in ipairs{ phone, laptop } do
				assert.equal(0, #stanza_ids(find(c.log, groupchat(body)), CAROL), body .. " to " .. c.jid)
			end
			assert.equal(0, #stanza_ids(find(carol.log, groupchat(body)), ALICE), body .. " to carol")
			-- bob (no module on his side of it: his account is no member of the module's
			-- making) sees no stanza-id of either.
			local to_bob = find(bob.log, groupchat(body))
			if to_bob then
				assert.equal(0, #stanza_ids(to_bob, ALICE) + #stanza_ids(to_bob, CAROL), body .. " to bob")
			end
			for _, pair in ipairs{ { phone, alice_id, CAROL }, { carol, carol_id, ALICE } } do
				local archived = archive_of(pair[1], ROOM)
				local found = assert(archived[body] and archived[body][1], body)
				assert.equal(1, #archived[body])
				assert.equal(pair[2], found.id)
				assert.equal(0, #stanza_ids(found.message, pair[3]), body)
			end
		end
		no_tracebacks(srv)()
	end)

	it("neither stores nor forks a stanza-id that claims to be the account's archive's", function()
		local ROOM = "claims@" .. MUC
		local bob = connect(srv, "bob", "pc")
		local phone = connect(srv, "alice", "phone")
		join(bob, ROOM .. "/Bob")
		join(phone, ROOM .. "/Alice")
		settle(bob, phone)
		-- The room passes what an occupant puts in a message on to every occupant.
		for _, by in ipairs{ ALICE, "Alice@LOCALHOST" } do
			local body = "claims " .. by
			bob:send(st.message({ to = ROOM, type = "groupchat", id = Client.new_id() }):text_tag("body", body)
				:tag("stanza-id", { xmlns = NS_SID, by = by, id = "made-up" }):up())
			assert(phone:wait_for(groupchat(body)))
		end
		settle(bob, phone)
		local archived = archive_of(phone, ROOM)
		for _, by in ipairs{ ALICE, "Alice@LOCALHOST" } do
			local body = "claims " .. by
			local got = find(phone.log, groupchat(body))
			local ids = {}
			for tag in got:childtags("stanza-id", NS_SID) do ids[#ids + 1] = tag.attr.id end
			local found = assert(archived[body] and archived[body][1], body)
			assert.same({ found.id }, ids)
			assert.equal(0, count(found.message.tags, function(t) return t.name == "stanza-id" end), body)
		end
		no_tracebacks(srv)()
	end)
end)
end
