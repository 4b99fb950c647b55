-- A failure inside mod_minimix (a Lua error in the shim, a Rust panic in the core) is
-- contained: it is logged, the stanza goes on as if the module were not loaded, and the
-- server and the module keep working. The faults are triggered on purpose through the
-- `minimix_test_faults` setting, which makes the module fail on stanzas that carry
-- <fault xmlns='urn:xmpp:minimix:test-fault' kind='panic|lua-error|memory'/> (memory: Lua
-- refuses every allocation while the core's reply to that stanza is made).
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"

local st = Client.stanza
local ROOM = "faults@conference.localhost"
local NS_FAULT = "urn:xmpp:minimix:test-fault"

local groupchat_with = muc.groupchat
local count = muc.count

describe("a failure inside the module", function()
	local srv, alice, bob

	setup(function()
		srv = Server.start{
			module = true,
			options = { minimix_test_faults = true },
			muc_options = { muc_room_locking = false },
		}
		alice = Client.connect{ port = srv.port, user = "alice", resource = "phone" }
		bob = Client.connect{ port = srv.port, user = "bob", resource = "desk" }
		alice:send(Client.muc_join(ROOM .. "/Alice"))
		assert(alice:wait_for(function(el) return Client.muc_status(el)[110] end))
		bob:send(Client.muc_join(ROOM .. "/Bob"))
		assert(bob:wait_for(function(el) return Client.muc_status(el)[110] end))
		alice:collect(0.3); bob:collect(0.3)
	end)

	teardown(function()
		Server.stop_all()
	end)

	for _, kind in ipairs{ "panic", "lua-error" } do
		it("(" .. kind .. ") is logged, the stanza goes on untouched and the module keeps working", function()
			local body = "faulty " .. kind
			local faulty = st.message({ to = ROOM, type = "groupchat", id = Client.new_id() })
				:text_tag("body", body)
				:tag("fault", { xmlns = NS_FAULT, kind = kind }):up()
			alice:send(faulty)
			-- Untouched, the stanza reaches the room from the session's own full JID, which
			-- is not an occupant: the room answers the session as plain MUC would.
			local err = assert(alice:wait_for(function(el)
				return el.name == "message" and el.attr.type == "error" and el.attr.id == faulty.attr.id
			end))
			assert.equal(ROOM, err.attr.from)
			assert.equal("not-acceptable", select(2, err:get_error()))
			assert.equal(0, count(bob:collect(0.3), groupchat_with(body)))
			assert.truthy(srv:log_has("mod_minimix failed on <message", true))
			if kind == "panic" then
				assert.truthy(srv:log_has("mod_minimix core panicked: deliberate test fault", true))
			end

			-- The server and the module still work: the next message goes through the
			-- account and reaches bob once.
			alice:send(Client.groupchat(ROOM, "after " .. kind))
			assert(bob:wait_for(groupchat_with("after " .. kind)))
			assert(alice:wait_for(groupchat_with("after " .. kind)))
			assert.equal(0, count(bob:collect(0.3), groupchat_with("after " .. kind)))
			local pong = assert(alice:iq(Client.ping(ROOM .. "/Alice")))
			assert.equal("result", pong.attr.type)
		end)
	end

	-- A Lua memory error while the reply is made (tables, strings, registry references, the
	-- session index) fails that event only: no Rust frame holding the core's state is
	-- skipped, so the core is not left borrowed ("core re-entered" on every later event).
	it("(memory error) is logged, the join goes on untouched and the next stanza is handled", function()
		local carol = Client.connect{ port = srv.port, user = "carol", resource = "phone" }
		local join = Client.muc_join(ROOM .. "/Carol")
		join:tag("fault", { xmlns = NS_FAULT, kind = "memory" }):up()
		carol:send(join)
		-- Untouched, the join reaches the room from the session's own full JID, and the room
		-- answers that session as plain MUC would: its self-presence names the full JID.
		local self_presence = assert(carol:wait_for(function(el)
			return el.name == "presence" and Client.muc_status(el)[110]
		end))
		local item = self_presence:get_child("x", "http://jabber.org/protocol/muc#user"):get_child("item")
		assert.equal("carol@localhost/phone", item.attr.jid)
		assert.truthy(srv:log_has("mod_minimix failed on <presence", true))
		assert.truthy(srv:log_has("could not make its reply: not enough memory", true))

		-- The next stanzas through the core work: the room's groupchat reaches alice's
		-- session (forked by the core) and bob, once each.
		alice:send(Client.groupchat(ROOM, "after memory"))
		assert(bob:wait_for(groupchat_with("after memory")))
		assert(alice:wait_for(groupchat_with("after memory")))
		assert.equal(0, count(bob:collect(0.3), groupchat_with("after memory")))
		local pong = assert(alice:iq(Client.ping(ROOM .. "/Alice")))
		assert.equal("result", pong.attr.type)
		assert.falsy(srv:log_has("re-entered", true))
		carol:close()
	end)

	it("leaves no error in the log but the deliberate ones", function()
		local left = srv:tracebacks{ "mod_minimix failed on", "deliberate test fault" }
		assert.same({}, left)
	end)
end)
