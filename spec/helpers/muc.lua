-- Helpers the specs share: predicates over received stanzas and a few MUC steps.
--
--   local muc = require "spec.helpers.muc"
--   assert.equal(1, muc.count(c.log, muc.groupchat("hello")))
local Client = require "spec.helpers.client"
local socket = require "socket"
local st = Client.stanza

local NS_MUC_OWNER = "http://jabber.org/protocol/muc#owner"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"
local NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

local function bare(jid)
	return jid and jid:match("^[^/]+")
end

local function count(list, pred)
	local n = 0
	for _, el in ipairs(list) do
		if pred(el) then n = n + 1 end
	end
	return n
end

--- The index of the first element of `list` that `pred` holds for.
local function index_of(list, pred)
	for i, el in ipairs(list) do
		if pred(el) then return i end
	end
end

--- The first element of `list` that `pred` holds for.
local function find(list, pred)
	local i = index_of(list, pred)
	return i and list[i]
end

local function from_room(room)
	return function(el) return bare(el.attr.from) == room end
end

local function presence(from, type)
	return function(el)
		return el.name == "presence" and el.attr.from == from and el.attr.type == type
	end
end

local function self_presence(room, type)
	return function(el)
		return el.name == "presence" and bare(el.attr.from) == room and el.attr.type == type
			and Client.muc_status(el)[110] == true
	end
end

local function groupchat(body)
	return function(el)
		return el.name == "message" and el.attr.type == "groupchat" and Client.body(el) == body
	end
end

local function subject_message(room)
	return function(el)
		return el.name == "message" and bare(el.attr.from) == room and el:get_child("subject") ~= nil
			and el:get_child("body") == nil
	end
end

local function iq_reply(id)
	return function(el)
		return el.name == "iq" and el.attr.id == id and (el.attr.type == "result" or el.attr.type == "error")
	end
end

local function is_iq(el) return el.name == "iq" end

local function is_error(el) return el.attr.type == "error" end

local function error_condition(el)
	local err = el:get_child("error")
	for child in (err and err:childtags(nil, NS_STANZAS) or function() end) do
		if child.name ~= "text" then return child.name end
	end
end

local function muc_item(el)
	local x = el:get_child("x", NS_MUC_USER)
	return x and x:get_child("item")
end

local function join(c, room_nick, opts)
	c:send(Client.muc_join(room_nick, opts))
	return assert(c:wait_for(self_presence(bare(room_nick))))
end

local function leave(c, room_nick)
	c:send(Client.muc_leave(room_nick))
	return assert(c:wait_for(self_presence(bare(room_nick), "unavailable")))
end

local function configure(c, room, fields)
	local form = st.iq({ type = "set", to = room, id = Client.new_id() })
		:tag("query", { xmlns = NS_MUC_OWNER })
		:tag("x", { xmlns = "jabber:x:data", type = "submit" })
		:tag("field", { var = "FORM_TYPE" }):text_tag("value", "http://jabber.org/protocol/muc#roomconfig"):up()
	for var, value in pairs(fields or {}) do
		form:tag("field", { var = var }):text_tag("value", value):up()
	end
	return assert(c:iq(form))
end

local function log_count(srv, text)
	local n, pos, log = 0, 1, srv:log()
	while true do
		local s, e = log:find(text, pos, true)
		if not s then return n end
		n, pos = n + 1, e + 1
	end
end

--- Wait until `text` occurs in the server log more than `before` times.
local function wait_log(srv, text, before, timeout)
	local deadline = socket.gettime() + (timeout or 10)
	while log_count(srv, text) <= before do
		assert(socket.gettime() <= deadline, "timed out waiting for the log line: " .. text)
		socket.sleep(0.05)
	end
end

--- Send a groupchat message and wait until each of `recipients` has it.
local function say(sender, room, body, recipients)
	sender:send(Client.groupchat(room, body))
	for _, c in ipairs(recipients or {}) do
		assert(c:wait_for(groupchat(body)))
	end
end

-- Every given account's memberships as the module's core on `srv.host` holds them, one
-- line: "alice[room/nick=res1,res2;...] bob[...]" (rooms sorted, sessions sorted).
local MEMBERSHIPS = [[local mm = require "prosody.core.modulemanager".get_module(%q, "minimix"); ]]
	.. [[local core = mm.module.save().core; local out = {}; ]]
	.. [[for _, user in ipairs{ %s } do local rows = {}; ]]
	.. [[for _, r in ipairs(core:memberships(user)) do local s = {}; ]]
	.. [[for _, x in ipairs(r.sessions) do s[#s + 1] = x end; table.sort(s); ]]
	.. [[rows[#rows + 1] = r.room .. "/" .. r.nick .. "=" .. table.concat(s, ",") end; ]]
	.. [[out[#out + 1] = user .. "[" .. table.concat(rows, ";") .. "]" end; return table.concat(out, " ")]]

local function memberships(srv, users)
	local quoted = {}
	for i, u in ipairs(users) do quoted[i] = ("%q"):format(u) end
	local result, out = srv:eval(MEMBERSHIPS:format(srv.host, table.concat(quoted, ", ")))
	return assert(result, "admin shell gave no result:\n" .. out)
end

--- The real bare JIDs of the occupants of `room` on the MUC host `muc_host`, sorted (none
--- when there is no such room).
local function occupant_jids(srv, muc_host, room)
	local result, out = srv:eval(([[local r = prosody.hosts[%q].modules.muc.get_room_from_jid(%q); local s = {}; ]]
		.. [[if r then for _, o in r:each_occupant() do s[#s + 1] = o.bare_jid end end; table.sort(s); ]]
		.. [[return "<" .. table.concat(s, ",") .. ">"]]):format(muc_host, room))
	local list = assert(result and result:match("^<(.*)>$"), "admin shell gave no result:\n" .. out)
	local jids = {}
	for jid in list:gmatch("[^,]+") do jids[#jids + 1] = jid end
	return jids
end

--- A test that fails when the server's log holds errors or tracebacks. (Plain Lua here:
--- busted's assert is not seen from a required module.)
local function no_tracebacks(srv)
	return function()
		local found = srv:tracebacks()
		if #found > 0 then error("errors in the server log:\n" .. table.concat(found, "\n"), 2) end
	end
end


local NS_MAM = "urn:xmpp:mam:2"
local NS_FORWARD = "urn:xmpp:forward:0"

--- Query `c`'s own MAM archive (urn:xmpp:mam:2) for messages with `with` (a bare JID,
--- e.g. a room); returns a list of { id =, message = } in archive order, and the final iq.
local function mam_query(c, with)
	local queryid = Client.new_id()
	local iq = st.iq({ type = "set", to = c.bare, id = Client.new_id() })
		:tag("query", { xmlns = NS_MAM, queryid = queryid })
		:tag("x", { xmlns = "jabber:x:data", type = "submit" })
		:tag("field", { var = "FORM_TYPE", type = "hidden" }):text_tag("value", NS_MAM):up()
		:tag("field", { var = "with" }):text_tag("value", with):up()
	local fin = assert(c:iq(iq))
	local results = {}
	-- The results come before the final iq: they are in the inbox (wait_for keeps the rest).
	while true do
		local el = c:wait_for(function(m)
			local r = m.name == "message" and m:get_child("result", NS_MAM)
			return r and r.attr.queryid == queryid
		end, 0.01)
		if not el then break end
		local r = el:get_child("result", NS_MAM)
		results[#results + 1] = {
			id = r.attr.id,
			message = r:find("{" .. NS_FORWARD .. "}forwarded/{jabber:client}message"),
		}
	end
	return results, fin
end

--- How many messages with `body` `c`'s own archive holds for `with`. (Plain Lua: busted's
--- assert is not seen from a required module.)
local function archived(c, with, body)
	local results, fin = mam_query(c, with)
	if fin.attr.type ~= "result" then error("MAM query for " .. with .. " failed: " .. tostring(fin), 2) end
	local n = 0
	for _, r in ipairs(results) do
		if r.message and Client.body(r.message) == body then n = n + 1 end
	end
	return n
end

--- Wait until every given client is quiet (nothing for 0.3 s), emptying their inboxes.
local function settle(...)
	Client.collect_all({ ... })
end

--- settle(), then forget what the clients received so far: counts start from here.
local function fresh(...)
	settle(...)
	for _, c in ipairs({ ... }) do c.log = {} end
end

--- settle() and fresh() for a list of clients.
local function settle_all(list) Client.collect_all(list) end

local function fresh_all(list) fresh(table.unpack(list)) end

--- Clients that a spec connects and closes together: `local clients = muc.clients()`,
--- `clients.connect(srv, user, resource[, { sm = true, host = "other.localhost" }])` (host:
--- default srv.host), `clients.bob_and_alice(srv)`,
--- `clients.close_all()`.
local function clients()
	local open = {}
	local t = {}
	function t.connect(srv, user, resource, opts)
		local c = Client.connect{ port = srv.port, host = opts and opts.host or srv.host, user = user,
			resource = resource, sm = opts and opts.sm }
		open[#open + 1] = c
		return c
	end
	--- bob (pc) and alice's phone, laptop and tablet, connected, in that order.
	function t.bob_and_alice(srv)
		return t.connect(srv, "bob", "pc"), t.connect(srv, "alice", "phone"),
			t.connect(srv, "alice", "laptop"), t.connect(srv, "alice", "tablet")
	end
	function t.close_all()
		for _, c in ipairs(open) do
			if not c.closed then pcall(c.close, c) end
		end
		open = {}
	end
	return t
end

return {
	settle = settle,
	fresh = fresh,
	settle_all = settle_all,
	fresh_all = fresh_all,
	clients = clients,
	bare = bare,
	count = count,
	find = find,
	index_of = index_of,
	from_room = from_room,
	presence = presence,
	self_presence = self_presence,
	groupchat = groupchat,
	subject_message = subject_message,
	iq_reply = iq_reply,
	is_iq = is_iq,
	is_error = is_error,
	error_condition = error_condition,
	muc_item = muc_item,
	join = join,
	leave = leave,
	configure = configure,
	log_count = log_count,
	wait_log = wait_log,
	say = say,
	memberships = memberships,
	occupant_jids = occupant_jids,
	mam_query = mam_query,
	archived = archived,
	no_tracebacks = no_tracebacks,
}
