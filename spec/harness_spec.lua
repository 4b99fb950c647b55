-- Proves the test harness itself against a real Prosody without mod_minimix loaded.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"

local ROOM = "test@conference.localhost"

local count = muc.count
local groupchat_with = muc.groupchat

local function self_presence_from(room_nick)
	return function(el)
		return el.name == "presence" and el.attr.from == room_nick and Client.muc_status(el)[110]
	end
end

-- What server:version() must say for the Prosody under test, as a pattern: Prosody reads
-- prosody.version from its library folder (Debian's 13.0.1 package has one); without it
-- (a source tree, as unpacked from a tarball) it says "unknown", or "hg:<id>" in a
-- Mercurial checkout.
local function expected_version()
	local info = Server.prosody_command("prosody")
	local f = io.open(info.libdir .. "/prosody.version")
	if f then
		local v = f:read("a"):gsub("%s+$", "")
		f:close()
		if #v == 12 and v:match("^%x+$") then v = "hg:" .. v end
		if info.kind == "installed" and info.libdir == "/usr/lib/prosody" then
			assert.matches("^13%.", v) -- the Debian package make test installs
		end
		return "OK: " .. v:gsub("%p", "%%%0") .. "\n"
	end
	local hg = io.open(info.libdir .. "/.hg/dirstate")
	if hg then
		hg:close()
		return "OK: hg:%x+\n"
	end
	return "OK: unknown\n"
end

describe("test harness", function()
	local srv

	setup(function()
		srv = Server.start{ module = false, options = { smacks_hibernation_time = 30 } }
	end)

	teardown(function()
		Server.stop_all()
	end)

	it("starts prosody with a c2s port and an admin shell", function()
		assert.is_number(srv.port)
		assert.equal("localhost", srv.host)
		assert.equal("conference.localhost", srv.muc_host)
		assert.truthy(srv:log_has("Activated service 'c2s'", true))
		local out, ok = srv:shell("server:version()")
		assert.is_true(ok, out)
		assert.matches(expected_version(), out)
	end)

	it("rejects a wrong password with a clear error", function()
		assert.has_error(function()
			Client.connect{ port = srv.port, user = "alice", password = "wrong" }
		end)
	end)

	it("answers an iq ping from the server", function()
		local c = Client.connect{ port = srv.port, user = "carol" }
		finally(function() c:close() end)
		assert.equal("carol@localhost/phone", c.jid)
		assert.equal("carol@localhost", c.bare)
		local reply = assert(c:iq(Client.ping("localhost")))
		assert.equal("result", reply.attr.type)
	end)

	it("creates a room, joins two users and delivers a groupchat once to each", function()
		local alice = Client.connect{ port = srv.port, user = "alice" }
		local bob = Client.connect{ port = srv.port, user = "bob", resource = "laptop" }
		finally(function() alice:close(); bob:close() end)

		alice:send(Client.muc_join(ROOM .. "/Alice"))
		local created = assert(alice:wait_for(self_presence_from(ROOM .. "/Alice")))
		assert.is_true(Client.muc_status(created)[201])
		-- A new room is locked until configured; accept the default (instant room).
		local form = Client.stanza.iq({ type = "set", to = ROOM, id = Client.new_id() })
			:tag("query", { xmlns = "http://jabber.org/protocol/muc#owner" })
			:tag("x", { xmlns = "jabber:x:data", type = "submit" })
		assert.equal("result", assert(alice:iq(form)).attr.type)

		bob:send(Client.muc_join(ROOM .. "/Bob"))
		assert(bob:wait_for(self_presence_from(ROOM .. "/Bob")))
		assert(alice:wait_for(function(el)
			return el.name == "presence" and el.attr.from == ROOM .. "/Bob"
		end))

		alice:send(Client.groupchat(ROOM, "hello room"))
		assert(alice:wait_for(groupchat_with("hello room")))
		assert(bob:wait_for(groupchat_with("hello room")))
		alice:collect()
		bob:collect()
		assert.equal(1, count(alice.log, groupchat_with("hello room")))
		assert.equal(1, count(bob.log, groupchat_with("hello room")))
	end)

	it("resumes a killed stream-management session and gets what it missed", function()
		local dave = Client.connect{ port = srv.port, user = "dave", sm = true }
		local carol = Client.connect{ port = srv.port, user = "carol", resource = "desk" }
		finally(function() dave:close(); carol:close() end)
		assert.truthy(dave.sm_id)

		dave:kill()
		-- Wait until Prosody has noticed and put the session into hibernation.
		local deadline = os.time() + 5
		while not srv:log_has("Session going into hibernation", true) and os.time() <= deadline do
			require "socket".sleep(0.05)
		end
		assert.truthy(srv:log_has("Session going into hibernation", true))

		carol:send(Client.stanza.message({ to = dave.jid, type = "chat" }):text_tag("body", "while you were away"))
		assert.is_true(dave:resume())
		assert(dave:wait_for(function(el)
			return el.name == "message" and Client.body(el) == "while you were away"
		end))
		local reply = assert(dave:iq(Client.ping("localhost")))
		assert.equal("result", reply.attr.type)
		dave:collect()
		assert.equal(1, count(dave.log, function(el) return Client.body(el) == "while you were away" end))
		for _, el in ipairs(dave.log) do
			assert.is_nil(el.attr.xmlns == "urn:xmpp:sm:3" and el or nil)
		end
	end)

	it("restarts on the same port and data dir", function()
		local port = srv.port
		srv:restart()
		assert.equal(port, srv.port)
		local c = Client.connect{ port = srv.port, user = "bob" }
		c:close()
	end)

	it("leaves no Lua errors in the server log", function()
		assert.same({}, srv:tracebacks())
	end)
end)
