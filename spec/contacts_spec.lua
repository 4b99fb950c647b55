-- One-to-one traffic is not the module's (SPEC, "Rules that always hold"; issue 10): while
-- alice's session is joined to a room, what it sends to a contact (a directed presence
-- without <x/>, chat to the bare and to the full JID, an IQ) reaches the contact untouched,
-- from the session's full JID, and the chat is archived by mod_mam once. No MUC join is made,
-- logged or stored for the contact, and a restart of alice's server sends the contact no
-- MUC join. Two contacts: bob@remote.localhost on another server (real s2s on loopback,
-- pinned by spec/modules/mod_test_s2s_pin.lua) and bob@other.localhost on a second
-- VirtualHost of alice's server. alice's phone is joined to a room on the remote server's
-- MUC and to one on her own server's MUC.
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local st = Client.stanza

local HOME, OTHER, REMOTE = "localhost", "other.localhost", "remote.localhost"
local RMUC = "conference.remote.localhost"
local ALICE = "alice@" .. HOME
local NS_MUC = "http://jabber.org/protocol/muc"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"

local clients = muc.clients()
local connect, close_all = clients.connect, clients.close_all

local count = muc.count
local join = muc.join
local log_count = muc.log_count
local wait_log = muc.wait_log
local settle = muc.settle
local fresh = muc.fresh
local no_tracebacks = muc.no_tracebacks

local ROOM_OPTIONS = { muc_room_locking = false, muc_room_default_public_jids = true }

local function chat(body)
	return function(el)
		return el.name == "message" and el.attr.type == "chat" and Client.body(el) == body
	end
end

--- A presence carrying MUC payload (a join, or a room's presence).
local function muc_presence(el)
	return el.name == "presence" and (el:get_child("x", NS_MUC) ~= nil or el:get_child("x", NS_MUC_USER) ~= nil)
end

local archived = muc.archived

describe("one-to-one traffic of a session joined to rooms", function()
	local home, remote
	setup(function()
		home, remote = Server.federation{
			home = {
				module = true, modules = { "mam" }, muc_options = ROOM_OPTIONS,
				vhosts = { { host = OTHER } },
			},
			remote = { module = false, host = REMOTE, muc_host = RMUC, muc_options = ROOM_OPTIONS },
		}
	end)
	teardown(function()
		close_all()
		Server.stop_all()
	end)

	--- alice's phone joined to a room on each MUC; carol (remote) in the remote room.
	local function joined_phone()
		local carol = connect(remote, "carol", "pc")
		local phone = connect(home, "alice", "phone")
		join(carol, "lobby@" .. RMUC .. "/Carol")
		join(phone, "lobby@" .. RMUC .. "/Alice")
		join(phone, "lobby@" .. home.muc_host .. "/Alice")
		return phone, carol
	end

	-- The checks for one contact (`contact`: a connected client with resource "desk").
	local function one_to_one(phone, contact)
		local bare, full = contact.bare, contact.jid
		local joins_before = log_count(home, "alice joins ")
		fresh(phone, contact)

		-- Directed presence, no <x/>: a plain presence from phone's full JID.
		phone:send(st.presence({ to = full, id = Client.new_id() }):text_tag("status", "hello " .. bare))
		local got = assert(contact:wait_for(function(el)
			return el.name == "presence" and el:get_child_text("status") == "hello " .. bare
		end))
		assert.equal(phone.jid, got.attr.from)
		assert.is_nil(got.attr.type)
		assert.is_nil(got:get_child("x", NS_MUC))

		-- Chat to the bare and to the full JID.
		phone:send(st.message({ to = bare, type = "chat", id = Client.new_id() }):text_tag("body", "to bare " .. bare))
		phone:send(st.message({ to = full, type = "chat", id = Client.new_id() }):text_tag("body", "to full " .. full))
		for _, body in ipairs({ "to bare " .. bare, "to full " .. full }) do
			got = assert(contact:wait_for(chat(body)))
			assert.equal(phone.jid, got.attr.from)
		end

		-- An IQ to the contact's full JID, answered by the contact's client.
		local version = st.iq({ type = "get", to = full, id = Client.new_id() }):tag("query", { xmlns = "jabber:iq:version" })
		phone:send(version)
		local req = assert(contact:wait_for(function(el) return el.name == "iq" and el.attr.type == "get" end))
		assert.equal(phone.jid, req.attr.from)
		assert.equal(version.attr.id, req.attr.id)
		contact:send(st.reply(req):tag("query", { xmlns = "jabber:iq:version" }):text_tag("name", "DeskClient"))
		local answer = assert(phone:wait_for(muc.iq_reply(version.attr.id)))
		assert.equal("result", answer.attr.type)
		assert.equal(full, answer.attr.from)
		assert.equal("DeskClient", answer:find("{jabber:iq:version}query/name#"))

		-- The contact answers in chat: back to phone.
		contact:send(st.message({ to = phone.jid, type = "chat", id = Client.new_id() }):text_tag("body", "reply " .. bare))
		assert(phone:wait_for(chat("reply " .. bare)))

		settle(phone, contact)
		-- Each arrived once, untouched; nothing else reached the contact from alice.
		assert.equal(1, count(contact.log, function(el) return el.name == "presence" end))
		assert.equal(1, count(contact.log, chat("to bare " .. bare)))
		assert.equal(1, count(contact.log, chat("to full " .. full)))
		assert.equal(1, count(contact.log, function(el) return el.name == "iq" end))
		assert.equal(0, count(contact.log, muc_presence))
		assert.equal(0, count(contact.log, function(el) return el.attr.from == ALICE end))
		for _, el in ipairs(contact.log) do assert.equal(phone.jid, el.attr.from) end
		assert.equal(0, count(phone.log, muc.is_error))
		assert.equal(1, count(phone.log, chat("reply " .. bare)))
		assert.equal(1, count(phone.log, muc.is_iq))
		-- No join made, logged or stored for the contact.
		assert.equal(joins_before, log_count(home, "alice joins "))
		assert.equal(0, log_count(home, "alice joins " .. bare))
		assert.is_nil(muc.memberships(home, { "alice" }):find(bare, 1, true))

		-- mod_mam archived the chat once each way.
		for _, body in ipairs({ "to bare " .. bare, "to full " .. full, "reply " .. bare }) do
			assert.equal(1, archived(phone, bare, body), body)
		end
	end

	it("to a contact on the remote server: untouched, from the full JID, archived once", function()
		local phone, carol = joined_phone()
		local desk = connect(remote, "bob", "desk")
		fresh(carol)
		one_to_one(phone, desk)
		-- The rooms did not notice.
		settle(carol)
		assert.equal(0, count(carol.log, function(el) return el.attr.from == "lobby@" .. RMUC .. "/Alice" end))
		close_all()
	end)

	it("to a contact on another VirtualHost of the same server: the same", function()
		local phone = joined_phone()
		local desk = connect(home, "bob", "desk", { host = OTHER })
		one_to_one(phone, desk)
		close_all()
	end)

	it("a restart of alice's server sends the contacts no MUC join", function()
		local phone = joined_phone()
		local remote_desk = connect(remote, "bob", "desk")
		local other_desk = connect(home, "bob", "desk", { host = OTHER })
		local arrived = {}
		for _, desk in ipairs({ remote_desk, other_desk }) do
			phone:send(st.presence({ to = desk.jid }):text_tag("status", "before restart"))
			arrived[desk.jid] = desk:wait_for(function(el)
				return el.name == "presence" and el:get_child_text("status") == "before restart"
			end, 2)
		end
		settle(phone, remote_desk, other_desk)
		phone:close()
		other_desk:close() -- on the restarting server; reconnects below
		fresh(remote_desk)

		local rejoined = log_count(home, "Rejoined")
		home:restart()
		wait_log(home, "Rejoined", rejoined)
		other_desk = connect(home, "bob", "desk", { host = OTHER })
		phone = connect(home, "alice", "phone")
		settle(remote_desk, other_desk, phone)
		for _, desk in ipairs({ remote_desk, other_desk }) do
			assert.equal(0, count(desk.log, muc_presence), desk.jid)
			assert.equal(0, count(desk.log, function(el) return el.attr.from == ALICE end), desk.jid)
		end
		assert.equal(0, log_count(home, "alice rejoins after a restart: bob@"))
		assert.is_nil(muc.memberships(home, { "alice" }):find("bob@", 1, true))
		-- The rooms are rejoined (the module still does its job).
		assert.equal(1, log_count(home, "alice rejoins after a restart: lobby@" .. RMUC))
		-- (Checked last, so that the restart is tested whatever happened before it.)
		for _, desk in ipairs({ remote_desk, other_desk }) do
			local got = arrived[desk.jid]
			assert.truthy(got, "the directed presence never reached " .. desk.jid)
			assert.equal(phone.jid, got.attr.from)
		end
	end)

	it("leaves no errors in the logs", function()
		no_tracebacks(home)()
		no_tracebacks(remote)()
	end)
end)

-- Which remote services are MUCs is learned from their disco#info (SPEC, "Rules that always
-- hold"): a presence without <x/> to a service not known yet leaves untouched while the
-- module asks; from the answer on, presences there are the account's. The same answer
-- drops what an older version stored for a directed presence to a remote contact.
describe("remote services learned by disco#info", function()
	local home, remote
	setup(function()
		home, remote = Server.federation{
			home = { module = true, modules = { "mam" }, muc_options = ROOM_OPTIONS },
			remote = { module = false, host = REMOTE, muc_host = RMUC, muc_options = ROOM_OPTIONS },
		}
	end)
	teardown(function()
		close_all()
		Server.stop_all()
	end)

	local function refused(c, room_nick)
		local err = assert(c:wait_for(function(el)
			return el.name == "presence" and el.attr.type == "error" and el.attr.from == room_nick
		end))
		return muc.error_condition(err)
	end

	it("takes presences without <x/> to a remote MUC for the account once disco#info said so", function()
		local phone = connect(home, "alice", "phone")
		local learned = log_count(home, RMUC .. " is a MUC service (disco#info)")
		-- Unknown service: untouched, from phone's own JID; Prosody's MUC refuses a join
		-- without <x/> and answers phone itself.
		phone:send(st.presence({ to = "first@" .. RMUC .. "/Alice" }))
		assert.equal("item-not-found", refused(phone, "first@" .. RMUC .. "/Alice"))
		wait_log(home, RMUC .. " is a MUC service (disco#info)", learned)
		assert.equal(0, log_count(home, "alice joins first@"))
		-- Known now: the account tries (and the room answers the account, which relays
		-- the refusal to phone), as it would for a local MUC.
		phone:send(st.presence({ to = "second@" .. RMUC .. "/Alice" }))
		assert.equal("item-not-found", refused(phone, "second@" .. RMUC .. "/Alice"))
		assert.equal(1, log_count(home, "alice joins second@" .. RMUC .. " as Alice"))
		assert.equal(1, log_count(home, "alice could not join second@" .. RMUC .. ": item-not-found"))
		-- Asked once: the remote MUC got one disco#info from alice's server.
		assert.equal(learned + 1, log_count(home, RMUC .. " is a MUC service (disco#info)"))
		settle(phone)
		assert.equal(1, count(phone.log, function(el)
			return el.attr.type == "error" and el.attr.from == "second@" .. RMUC .. "/Alice"
		end))
		assert.equal("alice[]", muc.memberships(home, { "alice" }))
		close_all()
	end)

	it("drops a stored membership in a remote contact's JID: disco#info shows no MUC", function()
		local desk = connect(remote, "bob", "desk")
		home:stop()
		local dir = home.dir .. "/data/localhost/minimix"
		os.execute("mkdir -p " .. dir)
		local f = assert(io.open(dir .. "/alice.dat", "w"))
		f:write('return { ["bob@remote.localhost"] = { nick = "desk" } };\n')
		f:close()
		local line = "Dropping the stored membership of alice in bob@remote.localhost"
		local dropped = log_count(home, line)
		home:relaunch()
		wait_log(home, line, dropped)
		settle(desk)
		assert.equal(0, count(desk.log, muc_presence))
		assert.equal(0, count(desk.log, function(el) return el.attr.from == ALICE end))
		assert.equal(0, log_count(home, "alice rejoins after a restart: bob@"))
		assert.equal(1, log_count(home, REMOTE .. " is not a MUC service (disco#info)"))
		local stored = io.open(dir .. "/alice.dat")
		if stored then
			local data = assert(load(stored:read("a")))()
			stored:close()
			assert.is_nil(data and data["bob@remote.localhost"])
		end
		close_all()
	end)

	it("leaves no errors in the logs", function()
		no_tracebacks(home)()
		no_tracebacks(remote)()
	end)
end)
