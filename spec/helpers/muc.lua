-- Helpers the specs share: predicates over received stanzas and a few MUC steps.
--
--   local muc = require "spec.helpers.muc"
--   assert.equal(1, muc.count(c.log, muc.groupchat("hello")))
local Client = require "spec.helpers.client"
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

--- A test that fails when the server's log holds errors or tracebacks. (Plain Lua here:
--- busted's assert is not seen from a required module.)
local function no_tracebacks(srv)
	return function()
		local found = srv:tracebacks()
		if #found > 0 then error("errors in the server log:\n" .. table.concat(found, "\n"), 2) end
	end
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
--- `clients.connect(srv, user, resource[, { sm = true }])`, `clients.close_all()`.
local function clients()
	local open = {}
	local t = {}
	function t.connect(srv, user, resource, opts)
		local c = Client.connect{ port = srv.port, user = user, resource = resource, sm = opts and opts.sm }
		open[#open + 1] = c
		return c
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
	no_tracebacks = no_tracebacks,
}
