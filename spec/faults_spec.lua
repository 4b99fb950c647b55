-- A failure inside mod_minimix (a Lua error in the shim, a Rust panic in the core) is
-- contained: it is logged, the stanza goes on as if the module were not loaded, and the
-- server and the module keep working. The faults are triggered on purpose through the
-- `minimix_test_faults` setting, which makes the module fail on stanzas that carry
-- <fault xmlns='urn:xmpp:minimix:test-fault' kind='panic|lua-error'/>.
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

	it("leaves no error in the log but the deliberate ones", function()
		local left = srv:tracebacks{ "mod_minimix failed on", "deliberate test fault" }
		assert.same({}, left)
	end)
end)
