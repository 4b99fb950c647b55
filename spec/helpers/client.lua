-- A small synchronous XMPP client for integration tests.
--
--   local Client = require "spec.helpers.client"
--   local c = Client.connect{ port = srv.port, user = "alice", resource = "phone", sm = true }
--   c:send(Client.groupchat("room@conference.localhost", "hi"))
--   local msg = c:wait_for(function(s) return s.name == "message" end)
--
-- How it works: one blocking luasocket TCP connection to 127.0.0.1. Incoming bytes are fed
-- to Prosody's own util.xmppstream parser (loaded from Server.prosody_lib_dir()), which
-- hands back util.stanza objects. Nothing is read in the background: bytes are only read
-- while the test calls receive/wait_for/collect/iq. Every element read goes to `inbox`
-- (a FIFO); message/presence/iq stanzas received after login are also appended to `log`,
-- which is never drained, so tests can count everything the session got.
--
-- Stream management (XEP-0198, `sm = true`): <r/> is answered with <a h=.../> as soon as
-- it is read, <a/> drops acknowledged stanzas from our resend queue; neither reaches inbox
-- or log. kill() drops the TCP connection without closing the stream (a phone losing
-- network), resume() reconnects, authenticates, sends <resume previd h/> and resends what
-- the server has not acknowledged.

local socket = require "socket"
local Server = require "spec.helpers.server"

Server.use_prosody_libraries()

local st = require "util.stanza"
local xmppstream = require "util.xmppstream"
local base64 = require "util.encodings".base64

local NS_STREAMS = "http://etherx.jabber.org/streams"
local NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
local NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
local NS_SM = "urn:xmpp:sm:3"
local NS_MUC = "http://jabber.org/protocol/muc"
local NS_MUC_USER = "http://jabber.org/protocol/muc#user"

local Client = { stanza = st, default_timeout = 5 }
Client.__index = Client

local id_counter = 0
local function new_id()
	id_counter = id_counter + 1
	return "t" .. id_counter
end

Client.new_id = new_id -- e.g. Client.stanza.iq{ type = "get", id = Client.new_id() } (13 requires an id)

local STANZA_NAMES = { message = true, presence = true, iq = true }

local function is_stanza(el)
	return STANZA_NAMES[el.name] and (el.attr.xmlns == nil or el.attr.xmlns == "jabber:client")
end

local function describe(list)
	local parts = {}
	for i, el in ipairs(list) do parts[i] = "  " .. tostring(el):sub(1, 400) end
	return #parts > 0 and table.concat(parts, "\n") or "  (nothing)"
end

---------------------------------------------------------------------------
-- Transport

function Client:_write(data)
	assert(self.sock, "not connected")
	self.sock:settimeout(5)
	local i = 1
	while i <= #data do
		local sent, err, last = self.sock:send(data, i)
		if not sent then
			if err == "closed" then self.closed = true end
			error("send failed: " .. tostring(err), 2)
		end
		i = (sent or last) + 1
	end
end

function Client:_handle(el)
	if el.attr.xmlns == NS_SM then
		if el.name == "r" then
			pcall(self._write, self, tostring(st.stanza("a", { xmlns = NS_SM, h = tostring(self.h) })))
			return
		elseif el.name == "a" then
			self:_acked(tonumber(el.attr.h))
			return
		elseif el.name == "enabled" then
			self.sm_enabled, self.sm_id, self.h = true, el.attr.id, 0
			self.sm_resumable = el.attr.resume == "true" or el.attr.resume == "1"
		end
	end
	if is_stanza(el) then
		if self.sm_enabled then self.h = self.h + 1 end
		if self.logging then self.log[#self.log + 1] = el end
	end
	self.inbox[#self.inbox + 1] = el
end

function Client:_new_parser()
	local session = { notopen = true }
	self.session = session
	self.parser = xmppstream.new(session, {
		default_ns = self.default_ns or "jabber:client",
		streamopened = function(s, attr) s.notopen = nil; self.stream_id = attr.id end,
		streamclosed = function() self.closed = true end,
		handlestanza = function(_, el) self:_handle(el) end,
		error = function(_, err, data)
			if err == "stream-error" then
				self.stream_error = data
				self.closed = true
			else
				self.parse_error = err
			end
		end,
	})
end

function Client:_restart_stream()
	self.parser:reset()
	self.session.notopen = true
	self:_write(("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='%s' to='%s' version='1.0'>")
		:format(NS_STREAMS, self.host))
end

-- Read whatever arrives within `timeout` seconds; true if any bytes were read.
function Client:_pump(timeout)
	local sock = self.sock
	if not sock or self.closed then return false end
	if not sock:dirty() then
		local readable = socket.select({ sock }, nil, math.max(timeout, 0))
		if not readable[1] then return false end
	end
	local got = false
	repeat
		sock:settimeout(0)
		local data, err, partial = sock:receive(8192)
		data = data or partial
		if data and #data > 0 then
			got = true
			local ok, perr = self.parser:feed(data)
			if not ok then self.parse_error = perr end
		end
		if err == "closed" then self.closed = true end
	until err or not sock:dirty()
	return got
end

---------------------------------------------------------------------------
-- Receiving

--- Next element from the inbox, waiting up to `timeout` (default 1) seconds; nil on timeout.
function Client:receive(timeout)
	local deadline = socket.gettime() + (timeout or 1)
	while #self.inbox == 0 do
		local left = deadline - socket.gettime()
		if left <= 0 or self.closed then break end
		self:_pump(left)
	end
	return table.remove(self.inbox, 1)
end

--- First element matching `pred` (a function, or a stanza name), removed from the inbox;
--- everything else stays. nil + a message listing the inbox on timeout (default 5 s).
function Client:wait_for(pred, timeout)
	if type(pred) == "string" then
		local name = pred
		pred = function(el) return el.name == name end
	end
	local deadline = socket.gettime() + (timeout or Client.default_timeout)
	local checked = 0
	while true do
		for i = checked + 1, #self.inbox do
			if pred(self.inbox[i]) then return table.remove(self.inbox, i) end
		end
		checked = #self.inbox
		local left = deadline - socket.gettime()
		if left <= 0 or self.closed then break end
		self:_pump(left)
	end
	return nil, ("%s: timed out waiting for a matching stanza%s; inbox holds:\n%s"):format(self.jid or self.user,
		self.stream_error and (" (stream error: " .. tostring(self.stream_error) .. ")")
		or (self.closed and " (stream closed)" or ""), describe(self.inbox))
end

--- Drain and return every element until nothing arrives for `quiet` (default 0.3) seconds.
function Client:collect(quiet)
	local out = {}
	repeat
		for _, el in ipairs(self.inbox) do out[#out + 1] = el end
		self.inbox = {}
	until not self:_pump(quiet or 0.3)
	for _, el in ipairs(self.inbox) do out[#out + 1] = el end
	self.inbox = {}
	return out
end

--- collect() for several clients at once: drain every inbox until none of `clients`
--- receives anything for `quiet` (default 0.3) seconds. Returns one list per client.
function Client.collect_all(clients, quiet)
	while true do
		local got = false
		for _, c in ipairs(clients) do
			if c:_pump(0) then got = true end
		end
		if not got then
			local socks = {}
			for _, c in ipairs(clients) do
				if c.sock and not c.closed then socks[#socks + 1] = c.sock end
			end
			if #socks == 0 or not socket.select(socks, nil, quiet or 0.3)[1] then break end
		end
	end
	local out = {}
	for i, c in ipairs(clients) do
		out[i], c.inbox = c.inbox, {}
	end
	return out
end

--- Send an iq (a util.stanza) with a fresh id and return the result/error reply.
function Client:iq(stanza, timeout)
	stanza.attr.id = new_id()
	local id = stanza.attr.id
	self:send(stanza)
	return self:wait_for(function(el)
		return el.name == "iq" and el.attr.id == id and (el.attr.type == "result" or el.attr.type == "error")
	end, timeout)
end

---------------------------------------------------------------------------
-- Sending and stream management

function Client:_acked(h)
	if not h then return end
	local keep = {}
	for _, item in ipairs(self.unacked) do
		if item.n > h then keep[#keep + 1] = item end
	end
	self.unacked = keep
end

--- Send a util.stanza object or a string of XML.
function Client:send(stanza)
	local data = tostring(stanza)
	local name = type(stanza) == "table" and stanza.name or data:match("^%s*<([%w_]+)")
	if self.sm_enabled and STANZA_NAMES[name] then
		self.out_count = self.out_count + 1
		self.unacked[#self.unacked + 1] = { n = self.out_count, data = data }
	end
	self:_write(data)
	return self
end

---------------------------------------------------------------------------
-- Connecting

function Client:_expect(pred, what, timeout)
	local el, err = self:wait_for(pred, timeout)
	if not el then
		error(("XMPP login of %s@%s failed waiting for %s\n%s"):format(self.user, self.host, what, err), 3)
	end
	return el
end

function Client:_fail(what, el)
	error(("XMPP login of %s@%s failed: %s\n  %s"):format(self.user, self.host, what, tostring(el)), 3)
end

-- TCP connect, stream open, SASL PLAIN, stream restart; returns the post-auth features.
function Client:_login()
	local sock = socket.tcp()
	sock:settimeout(5)
	local ok, err = sock:connect(self.address, self.port)
	if not ok then
		error(("cannot connect to %s:%s: %s"):format(self.address, self.port, err), 3)
	end
	sock:setoption("tcp-nodelay", true)
	self.sock, self.closed, self.stream_error, self.inbox = sock, false, nil, {}
	self:_new_parser()
	self:_restart_stream()

	local features = self:_expect(function(el) return el.name == "features" end, "stream features")
	local mechs = features:get_child("mechanisms", NS_SASL)
	local has_plain = false
	for mech in (mechs and mechs:childtags("mechanism") or function() end) do
		if mech:get_text() == "PLAIN" then has_plain = true end
	end
	if not has_plain then self:_fail("server does not offer SASL PLAIN", features) end

	local creds = base64.encode("\0" .. self.user .. "\0" .. self.password)
	self:_write(tostring(st.stanza("auth", { xmlns = NS_SASL, mechanism = "PLAIN" }):text(creds)))
	local res = self:_expect(function(el)
		return el.attr.xmlns == NS_SASL and (el.name == "success" or el.name == "failure")
	end, "SASL result")
	if res.name ~= "success" then self:_fail("SASL authentication rejected", res) end

	self:_restart_stream()
	return self:_expect(function(el) return el.name == "features" end, "post-auth stream features")
end

--- Connect, authenticate, bind, optionally enable SM and send initial presence.
--- opts: port (required), host ("localhost"), address ("127.0.0.1"), user ("alice"),
--- password ("pass"), resource ("phone"), sm (false), presence (true).
function Client.connect(opts)
	assert(opts and opts.port, "Client.connect needs a port")
	local self = setmetatable({
		port = opts.port,
		host = opts.host or "localhost",
		address = opts.address or "127.0.0.1",
		user = opts.user or "alice",
		password = opts.password or "pass",
		resource = opts.resource or "phone",
		inbox = {}, log = {}, logging = false,
		h = 0, out_count = 0, unacked = {}, sm_enabled = false,
	}, Client)
	self.bare = self.user .. "@" .. self.host

	local features = self:_login()
	if not features:get_child("bind", NS_BIND) then self:_fail("no resource binding offered", features) end
	local bind_id = new_id()
	self:_write(tostring(st.iq({ type = "set", id = bind_id })
		:tag("bind", { xmlns = NS_BIND }):text_tag("resource", self.resource)))
	local bound = self:_expect(function(el) return el.name == "iq" and el.attr.id == bind_id end, "bind result")
	local jid = bound:find("{" .. NS_BIND .. "}bind/jid#")
	if bound.attr.type ~= "result" or not jid then self:_fail("resource binding failed", bound) end
	self.jid = jid

	if opts.sm then
		if not features:get_child("sm", NS_SM) then self:_fail("server does not offer XEP-0198", features) end
		self:_write(tostring(st.stanza("enable", { xmlns = NS_SM, resume = "true" })))
		local res = self:_expect(function(el)
			return el.attr.xmlns == NS_SM and (el.name == "enabled" or el.name == "failed")
		end, "<enabled/>")
		if res.name ~= "enabled" then self:_fail("stream management not enabled", res) end
	end

	self.logging = true
	if opts.presence ~= false then self:send(st.presence()) end
	return self
end

--- Connect as an external component (XEP-0114) to srv.component_port.
--- opts: port (required), host (the component's domain), secret, address ("127.0.0.1").
--- Stanzas it sends carry whatever `from` the test gives them (in the component's domain,
--- or the server closes the stream with invalid-from).
function Client.connect_component(opts)
	assert(opts and opts.port and opts.host and opts.secret, "connect_component needs port, host and secret")
	local self = setmetatable({
		port = opts.port, host = opts.host, address = opts.address or "127.0.0.1", user = opts.host,
		default_ns = "jabber:component:accept",
		inbox = {}, log = {}, logging = false,
		h = 0, out_count = 0, unacked = {}, sm_enabled = false,
	}, Client)
	local sock = socket.tcp()
	sock:settimeout(5)
	local ok, err = sock:connect(self.address, self.port)
	if not ok then error(("cannot connect to %s:%s: %s"):format(self.address, self.port, err), 2) end
	self.sock, self.closed = sock, false
	self:_new_parser()
	self:_write(("<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' xmlns:stream='%s' to='%s'>")
		:format(NS_STREAMS, self.host))
	local deadline = socket.gettime() + 5
	while not self.stream_id and not self.closed and socket.gettime() < deadline do
		self:_pump(deadline - socket.gettime())
	end
	if not self.stream_id then error("component " .. self.host .. ": no stream header from the server", 2) end
	local sha1 = require "util.hashes".sha1
	self:_write(tostring(st.stanza("handshake"):text(sha1(self.stream_id .. opts.secret, true))))
	local res = self:wait_for("handshake")
	if not res then
		error(("component %s: handshake refused%s"):format(self.host,
			self.stream_error and (" (" .. tostring(self.stream_error) .. ")") or ""), 2)
	end
	self.jid, self.logging = self.host, true
	return self
end

--- Close the stream cleanly (</stream:stream>) and the socket.
function Client:close()
	if self.sock then
		pcall(self._write, self, "</stream:stream>")
		local deadline = socket.gettime() + 1
		while not self.closed and socket.gettime() < deadline do self:_pump(deadline - socket.gettime()) end
		self.sock:close()
	end
	self.sock, self.closed, self.sm_enabled = nil, true, false
end

--- Drop the TCP connection without closing the stream (the server may hibernate it).
function Client:kill()
	if self.sock then self.sock:close() end
	self.sock, self.closed = nil, true
end

--- Reconnect and resume the XEP-0198 session. true on <resumed/>; false + the reply otherwise.
function Client:resume()
	assert(self.sm_id, "resume() needs a session connected with sm = true")
	if self.sock then self:kill() end
	local features = self:_login()
	if not features:get_child("sm", NS_SM) then self:_fail("server does not offer XEP-0198", features) end
	self:_write(tostring(st.stanza("resume", { xmlns = NS_SM, previd = self.sm_id, h = tostring(self.h) })))
	local res = self:_expect(function(el)
		return el.attr.xmlns == NS_SM and (el.name == "resumed" or el.name == "failed")
	end, "<resumed/>")
	if res.name ~= "resumed" then
		self.sm_enabled = false
		return false, res
	end
	self.sm_enabled = true
	self:_acked(tonumber(res.attr.h))
	for _, item in ipairs(self.unacked) do self:_write(item.data) end
	return true
end

---------------------------------------------------------------------------
-- Stanza builders and inspectors

--- Join presence for "room@service/nick". opts: password, history = { maxstanzas=, maxchars=,
--- seconds=, since= }, and any extra presence attributes in opts.attr.
function Client.muc_join(room_nick, opts)
	opts = opts or {}
	local attr = { to = room_nick }
	for k, v in pairs(opts.attr or {}) do attr[k] = v end
	local p = st.presence(attr):tag("x", { xmlns = NS_MUC })
	if opts.password then p:text_tag("password", opts.password) end
	if opts.history then
		local h = {}
		for k, v in pairs(opts.history) do h[k] = tostring(v) end
		p:tag("history", h):up()
	end
	return p:up()
end

--- Unavailable presence leaving "room@service/nick".
function Client.muc_leave(room_nick)
	return st.presence({ to = room_nick, type = "unavailable" })
end

--- Groupchat message with a body (and an id, fresh unless given).
function Client.groupchat(room, body, id)
	return st.message({ to = room, type = "groupchat", id = id or new_id() }):text_tag("body", body)
end

--- XEP-0199 ping iq.
function Client.ping(to)
	return st.iq({ type = "get", to = to, id = new_id() }):tag("ping", { xmlns = "urn:xmpp:ping" }):up()
end

--- Set of MUC status codes in a stanza's <x xmlns=muc#user/>: { [110] = true, ... }.
function Client.muc_status(stanza)
	local codes = {}
	local x = stanza:get_child("x", NS_MUC_USER)
	for status in (x and x:childtags("status") or function() end) do
		local code = tonumber(status.attr.code)
		if code then codes[code] = true end
	end
	return codes
end

--- Body text of a message, or nil.
function Client.body(stanza)
	return stanza:get_child_text("body")
end

return Client
