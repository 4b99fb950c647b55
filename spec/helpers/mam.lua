-- MAM (XEP-0313, urn:xmpp:mam:2) queries of a client's own archive, for the specs that
-- compare answers (archive_spec, shared_archive_spec).
--
--   local mam = require "spec.helpers.mam"
--   local answer = mam.query(c, { with = room, max = 2, after = id })
--   local meta = mam.metadata(c)        -- { start = { id, timestamp }, ["end"] = ... }
--   local vars = mam.form_fields(c)     -- the query form's fields, sorted
--
-- (Plain Lua: busted's assert is not seen from a required module.)
local Server = require "spec.helpers.server"
local Client = require "spec.helpers.client"
local muc = require "spec.helpers.muc"
local st = Client.stanza

local NS_MAM = "urn:xmpp:mam:2"
local NS_RSM = "http://jabber.org/protocol/rsm"
local NS_FORWARD = "urn:xmpp:forward:0"
local NS_DELAY = "urn:xmpp:delay"

local M = { NS = NS_MAM }

--- The <iq type=set/> of a MAM query of the account `bare`'s own archive, and its queryid.
--- `o` as for M.query.
function M.query_iq(bare, o)
	local queryid = Client.new_id()
	local form = st.stanza("x", { xmlns = "jabber:x:data", type = "submit" })
		:tag("field", { var = "FORM_TYPE", type = "hidden" }):text_tag("value", o.form_type or NS_MAM):up()
	local function field(var, value)
		if value then form:tag("field", { var = var }):text_tag("value", value):up() end
	end
	field("with", o.with)
	field("start", o.start)
	field("end", o.end_)
	field("before-id", o.before_id)
	field("after-id", o.after_id)
	if o.ids then
		form:tag("field", { var = "ids" })
		for _, id in ipairs(o.ids) do form:text_tag("value", id) end
		form:up()
	end
	local query = st.stanza("query", { xmlns = NS_MAM, queryid = queryid }):add_child(form)
	if o.max or o.after or o.before then
		local set = st.stanza("set", { xmlns = NS_RSM })
		if o.max then set:text_tag("max", tostring(o.max)) end
		if o.after then set:text_tag("after", o.after) end
		if o.before == true then set:tag("before"):up() elseif o.before then set:text_tag("before", o.before) end
		query:add_child(set)
	end
	if o.flip then query:tag("flip-page"):up() end
	return st.iq({ type = "set", to = bare, id = Client.new_id() }):add_child(query), queryid
end

--- A MAM query of `c`'s own archive. `o`: with, max, after, before (a string, or true for
--- an empty <before/>), flip (flip-page), start/end_ (timestamps), before_id, after_id, ids
--- (a list), form_type. Returns { error = condition } or { results = { { id, message,
--- stamp } }, complete, count, first, last }.
function M.query(c, o)
	local iq, queryid = M.query_iq(c.bare, o)
	local fin = assert(c:iq(iq))
	if fin.attr.type == "error" then
		return { error = muc.error_condition(fin) }
	end
	local answer = { results = {} }
	-- The results come before the final iq: they are in the inbox (wait_for keeps the rest).
	while true do
		local el = c:wait_for(function(m)
			local r = m.name == "message" and m:get_child("result", NS_MAM)
			return r and r.attr.queryid == queryid
		end, 0.01)
		if not el then break end
		local r = el:get_child("result", NS_MAM)
		local fwd = r:get_child("forwarded", NS_FORWARD)
		answer.results[#answer.results + 1] = {
			id = r.attr.id,
			message = fwd:get_child("message", "jabber:client"),
			stamp = fwd:get_child("delay", NS_DELAY).attr.stamp,
		}
	end
	local fin_el = assert(fin:get_child("fin", NS_MAM), tostring(fin))
	local set = fin_el:get_child("set", NS_RSM)
	answer.complete = fin_el.attr.complete == "true"
	answer.count = set and tonumber(set:get_child_text("count"))
	answer.first = set and set:get_child_text("first")
	answer.last = set and set:get_child_text("last")
	return answer
end

--- The <iq type=get/> asking the account `bare`'s archive for its <metadata/>.
function M.metadata_iq(bare)
	return st.iq({ type = "get", to = bare, id = Client.new_id() }):tag("metadata", { xmlns = NS_MAM }):up()
end

--- The archive's <metadata/> (urn:xmpp:mam:2): { start = { id =, timestamp = } or nil,
--- ["end"] = the same } or { error = condition }.
function M.metadata(c)
	local reply = assert(c:iq(M.metadata_iq(c.bare)))
	if reply.attr.type == "error" then return { error = muc.error_condition(reply) } end
	local meta = assert(reply:get_child("metadata", NS_MAM), tostring(reply))
	local out = {}
	for _, name in ipairs({ "start", "end" }) do
		local el = meta:get_child(name)
		if el then out[name] = { id = el.attr.id, timestamp = el.attr.timestamp } end
	end
	return out
end

--- The fields (var) of the query form the archive serves, sorted.
function M.form_fields(c)
	local reply = assert(c:iq(st.iq({ type = "get", to = c.bare, id = Client.new_id() })
		:tag("query", { xmlns = NS_MAM }):up()))
	if reply.attr.type == "error" then return { error = muc.error_condition(reply) } end
	local form = reply:find("{" .. NS_MAM .. "}query/{jabber:x:data}x")
	local vars = {}
	for field in (form and form:childtags("field") or function() end) do vars[#vars + 1] = field.attr.var end
	table.sort(vars)
	return vars
end

--- The storage settings the archive specs run with: Prosody's file storage, and SQL
--- storage (SQLite3, data/archive.sqlite) for the store named "archive".
M.storages = {
	internal = { storage = "internal" },
	sqlite = { storage = { archive = "sql" }, sql = { driver = "SQLite3", database = "archive.sqlite" } },
}

-- A stored item as { type =, body = }.
local function item_of(stanza)
	return { type = stanza.attr.type or "normal", body = stanza:get_child_text("body") }
end

--- What the archive store `store` of `host` on `srv` holds for `user`, read from both places
--- it can be, behind Prosody's back: { internal = { items } or nil (no file), sql = { items }
--- or nil (no database or no row) }, each item { type =, body = } in stored order.
function M.stored(srv, host, store, user)
	local out = {}
	local enc = Server.dm_encode
	-- (Store names keep their underscores.)
	local store_dir = store:gsub("[^_%w]", function(ch) return ("%%%02x"):format(ch:byte()) end)
	local path = ("%s/data/%s/%s/%s.list"):format(srv.dir, enc(host), store_dir, enc(user))
	local f = io.open(path)
	if f then
		local items = {}
		local env = { item = function(t) items[#items + 1] = item_of(st.deserialize(t)) end }
		assert(load(f:read("a"), path, "t", env))()
		f:close()
		out.internal = items
	end
	local db = srv.dir .. "/data/archive.sqlite"
	f = io.open(db)
	if f then
		f:close()
		local DBI = require "DBI"
		local xml = require "util.xml"
		local conn = assert(DBI.Connect("SQLite3", db))
		local q = assert(conn:prepare([[SELECT "value" FROM "prosodyarchive" WHERE "host" = ? AND "store" = ?]]
			.. [[ AND "user" = ? ORDER BY "sort_id"]]))
		assert(q:execute(host, store, user))
		local items = {}
		for row in q:rows() do items[#items + 1] = item_of(assert(xml.parse(row[1]))) end
		q:close()
		conn:close()
		out.sql = #items > 0 and items or nil
	end
	return out
end

return M
