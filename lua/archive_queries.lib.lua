-- mod_minimix: MAM queries the module answers itself, exactly as mod_mam would.
--
-- 1. Private-message history stays private-message history. The module's groupchat is in
--    the account's view under the room's bare JID, beside the private messages with its
--    occupants (stored there by mod_mam or by the module, as mod_mam would). mod_mam turns
--    the `with` of a query into a bare JID, so a query by an occupant's full JID (poezio
--    fills a private-chat tab with `with` = room@service/Bob) would return the room's
--    groupchat too. A query whose `with` is a full JID is answered here instead, exactly as
--    mod_mam would answer it if the groupchat lines were not in the archive: same results,
--    same <fin/> (complete, RSM first/last/count), same paging, limits and errors.
-- 2. The shared archive (room_log.lib.lua): groupchat is stored once per host, so a query
--    that can hold a room's groupchat (no `with`, or `with` = a room the account was in)
--    and the <metadata/> query are answered from the account's view (its own archive and
--    the room logs of its periods), as mod_mam answers from an archive holding all of it.
-- Every other query is left to mod_mam, and so is any query with a form mod_mam refuses
-- (its error is the answer).
--
-- Loaded by mod_minimix.lua with `module:require("archive_queries")(archive, view)`, where
-- `archive()` is the shim's (the account's archive store while the module archives, else
-- nil: then mod_mam answers everything) and `view` the shared archive (nil when off).
--
-- Cost of (1). The storage cannot leave out groupchat itself, so the lines of the room
-- (stored per account before the shared archive, or with it off) are read and skipped:
-- - internal storage reads the whole list on every query anyway (its `with` filter loads
--   each item), so one lazy pass of the storage's own iterator is used, stopped as soon as
--   the page is full; an unknown before/after id is handled as internal storage does;
-- - other storage (SQL) is paged through with LIMIT and after/before ids, pages growing
--   from the page size to PAGE_MAX rows, so a page of private messages does not make it
--   load all of a busy room's lines at once; the <count/> (mam_include_total, on by
--   default as in mod_mam) needs every matching line read once, since only the stored
--   stanza says it is groupchat.

local st = require "prosody.util.stanza";
local rsm = require "prosody.util.rsm";
local dataforms = require "prosody.util.dataforms";
local jid_bare = require "prosody.util.jid".bare;
local jid_resource = require "prosody.util.jid".resource;
local timestamp = require "prosody.util.datetime".datetime;
local storagemanager = require "prosody.core.storagemanager";
local modulemanager = require "prosody.core.modulemanager";

local NS_MAM = "urn:xmpp:mam:2";
local NS_FORWARD = "urn:xmpp:forward:0";
local NS_DELAY = "urn:xmpp:delay";
local NS_DATA = "jabber:x:data";

local host = module.host;
local m_min = math.min;

-- mod_mam's options, read as it reads them (modules/mod_mam/mod_mam.lua).
local DEFAULT_MAX = 20;
local store_name = module:get_option_string("archive_store", "archive");
local max_max = module:get_option_integer("max_archive_query_results", 50, 0);
local expires_after = module:get_option_period("archive_expires_after", "1w");
local use_total = module:get_option_boolean("mam_include_total", expires_after ~= math.huge);

-- Rows per storage query when paging through SQL storage: the first page asks for what
-- the answer needs, each further one four times more, up to this.
local PAGE_MAX = 1024;

local function is_groupchat(item)
	return item.attr.type == "groupchat";
end

-- The query form mod_mam serves for this store (its fields depend on the store's caps).
local forms = setmetatable({}, { __mode = "k" });
local function query_form(store)
	local form = forms[store];
	if form then return form; end
	local caps = store.caps or {};
	local layout = {
		{ name = "FORM_TYPE", type = "hidden", value = NS_MAM },
		{ name = "with", type = "jid-single" },
		{ name = "start", type = "text-single", datatype = "xs:dateTime" },
		{ name = "end", type = "text-single", datatype = "xs:dateTime" },
	};
	if caps.full_id_range then
		layout[#layout + 1] = { name = "before-id", type = "text-single" };
		layout[#layout + 1] = { name = "after-id", type = "text-single" };
	end
	if caps.ids then
		layout[#layout + 1] = { name = "ids", type = "list-multi" };
	end
	form = dataforms.new(layout);
	forms[store] = form;
	return form;
end

-- Internal storage (one file per account, read item by item) or another (SQL).
local function is_internal()
	local _, driver_name = storagemanager.get_driver(host, store_name);
	return driver_name == "internal";
end

-- The archive without groupchat, on internal storage: the storage filters by `with`, time
-- and ids and iterates in the asked direction; the rest is applied here as internal storage
-- applies it (after/before ids among the matching items, an unknown one giving nothing,
-- resp. everything; `limit` items at most; a total only for an empty archive).
local function find_internal(store, user, q)
	local page = {};
	if not (q.limit and q.limit <= 0) then
		local iter, err = store:find(user, {
			with = q.with, start = q.start, ["end"] = q["end"], ids = q.ids, reverse = q.reverse,
		});
		if not iter then return nil, err; end
		-- In reverse order, what comes after an id is what is older: before and after swap.
		local skip_until, stop_at = q.after, q.before;
		if q.reverse then skip_until, stop_at = stop_at, skip_until; end
		for id, item, when, with in iter do
			if not is_groupchat(item) then
				if skip_until then
					if id == skip_until then skip_until = nil; end
				elseif id == stop_at then
					break;
				else
					page[#page + 1] = { id, item, when, with };
					if q.limit and #page >= q.limit then break; end
				end
			end
		end
	end
	if page[1] or not (q.before or q.after or q.total) then return page; end
	-- Internal storage tells an empty archive apart: an id then is unknown, and the count
	-- is 0. Without the groupchat, is it empty?
	local iter, err = store:find(user, {});
	if not iter then return nil, err; end
	for _, item in iter do
		if not is_groupchat(item) then return page; end
	end
	if q.before or q.after then return nil, "item-not-found"; end
	return page, 0;
end

-- `each(id, item, when, with)` for every stored item matching `q` (with, time, ids, after,
-- before, in `q.reverse` order), `rows` at a time at first; stops when `each` returns true.
local function page_through(store, user, q, rows, each)
	local after, before = q.after, q.before;
	while true do
		local iter, err = store:find(user, {
			with = q.with, start = q.start, ["end"] = q["end"], ids = q.ids, reverse = q.reverse,
			after = after, before = before, limit = rows,
		});
		if not iter then return nil, err; end
		local n, last = 0, nil;
		for id, item, when, with in iter do
			n, last = n + 1, id;
			if each(id, item, when, with) then return true; end
		end
		if n < rows then return true; end
		if q.reverse then before = last; else after = last; end
		rows = m_min(rows * 4, PAGE_MAX);
	end
end

-- The archive without groupchat, on other storage, as SQL storage answers: an after/before
-- id must be an item of the archive (else item-not-found); the total counts every item
-- matching with, time and ids, whatever the after/before ids.
local function find_paged(store, user, q)
	for _, id in ipairs({ q.after or false, q.before or false }) do
		if id and store.get then
			local item, err = store:get(user, id);
			if not item then return nil, err or "item-not-found"; end
			if is_groupchat(item) then return nil, "item-not-found"; end
		end
	end
	local limit = q.limit;
	local page, total = {}, nil;
	local function take(id, item, when, with)
		if is_groupchat(item) then return; end
		if limit and #page >= limit then
			if not total then return true; end
		else
			page[#page + 1] = { id, item, when, with };
		end
		if total then total = total + 1; end
	end
	if q.total then
		total = 0;
		if q.after or q.before then
			-- The count first, over everything matching; then the page from the id.
			local ok, err = page_through(store, user, { with = q.with, start = q.start, ["end"] = q["end"],
				ids = q.ids }, PAGE_MAX, function (_, item)
				if not is_groupchat(item) then total = total + 1; end
			end);
			if not ok then return nil, err; end
			local counted = total;
			total = nil;
			if not (limit and limit <= 0) then
				ok, err = page_through(store, user, q, m_min(limit or PAGE_MAX, PAGE_MAX), take);
				if not ok then return nil, err; end
			end
			return page, counted;
		end
		-- No id: the page is the start of the count.
		local ok, err = page_through(store, user, q, PAGE_MAX, take);
		if not ok then return nil, err; end
		return page, total;
	end
	if limit and limit <= 0 then return page; end
	local ok, err = page_through(store, user, q, m_min(limit or PAGE_MAX, PAGE_MAX), take);
	if not ok then return nil, err; end
	return page;
end

-- The first `limit` items of the view (an iterator) as a page, and its total.
local function page_of(iter, total, limit)
	if not iter then return nil, total; end
	local page = {};
	if not (limit and limit <= 0) then
		for id, item, when, with in iter do
			page[#page + 1] = { id, item, when, with };
			if limit and #page >= limit then break; end
		end
	end
	return page, total;
end

return function (archive, view)
	local internal; -- known once the first query came

	-- The value of the form's first `with` field ("" when there is none).
	local function with_value(x)
		for field in x:childtags("field") do
			if field.attr.var == "with" then return field:get_child_text("value") or ""; end
		end
		return "";
	end

	-- Answers a query by a full JID, or one the shared archive holds (see the top of this
	-- file); nil for any other query.
	local function answer_query(event)
		local store = archive();
		if not store or not modulemanager.is_loaded(host, "mam") then return; end
		local origin, stanza = event.origin, event.stanza;
		local query = stanza.tags[1];
		local x = query:get_child("x", NS_DATA);
		local form, full_jid;
		if x then
			if dataforms.get_type(x) ~= NS_MAM then return; end
			-- Most queries name no full JID: decide before reading the whole form.
			local with = with_value(x);
			full_jid = with:find("/", 1, true) ~= nil;
			if not full_jid and not (view and view.has_rooms(origin.username, with ~= "" and jid_bare(with) or nil)) then
				return;
			end
			local errors;
			form, errors = query_form(store):data(x);
			if errors then return; end
			if full_jid and not (form.with and jid_resource(form.with)) then return; end
			if not full_jid and form.with and not view.has_rooms(origin.username, jid_bare(form.with)) then return; end
		else
			if not (view and view.has_rooms(origin.username)) then return; end
			form = {};
		end

		origin.mam_requested = true; -- as mod_mam marks a session that queried its archive

		-- RSM, as mod_mam reads it: `before` (possibly empty) pages backwards, flip-page
		-- turns the order of the results.
		local set = rsm.get(query);
		local max = m_min(set and set.max or DEFAULT_MAX, max_max);
		local reverse = set and set.before or false;
		local before, after = set and set.before or form["before-id"], set and set.after or form["after-id"];
		if type(before) ~= "string" then before = nil; end
		local flip = not not reverse;
		if query:get_child("flip-page") then flip = not flip; end

		if internal == nil then internal = is_internal(); end
		local q = {
			with = form.with and jid_bare(form.with), start = form.start, ["end"] = form["end"], ids = form.ids,
			before = before, after = after, reverse = reverse, limit = max == 0 and 0 or max + 1,
			total = use_total or max == 0,
		};
		local page, total;
		if full_jid then
			page, total = (internal and find_internal or find_paged)(store, origin.username, q);
		else
			local ok, iter, n = pcall(view.find, origin.username, q);
			if ok then
				page, total = page_of(iter, n, q.limit);
			else
				module:log("error", "Archive query by %s failed: %s", origin.full_jid, tostring(iter):match("^[^\n]*"));
				page, total = nil, "internal-server-error";
			end
		end
		if not page then
			module:log("debug", "Archive query by %s with %s failed: %s", origin.full_jid, form.with or "*", total);
			if total == "item-not-found" then
				origin.send(st.error_reply(stanza, "modify", "item-not-found"));
			else
				origin.send(st.error_reply(stanza, "cancel", "internal-server-error"));
			end
			return true;
		end

		local qid = query.attr.queryid;
		local reply_attr = { to = stanza.attr.from, from = stanza.attr.to };
		local results, complete = {}, "true";
		for i, row in ipairs(page) do
			if i > max then
				complete = nil; -- one more than asked for: there is more to page through
				break;
			end
			local id, item, when = row[1], row[2], row[3];
			if not st.is_stanza(item) then item = st.deserialize(item); end
			item.attr.xmlns = "jabber:client";
			results[i] = st.message(reply_attr)
				:tag("result", { xmlns = NS_MAM, queryid = qid, id = id })
				:tag("forwarded", { xmlns = NS_FORWARD })
				:tag("delay", { xmlns = NS_DELAY, stamp = timestamp(when) }):up()
				:add_child(item);
		end
		local n = #results;
		for i = 1, n do
			origin.send(results[flip and n + 1 - i or i]);
		end
		local first, last;
		if n > 0 then first, last = page[1][1], page[n][1]; end
		if reverse then first, last = last, first; end
		origin.send(st.reply(stanza)
			:tag("fin", { xmlns = NS_MAM, complete = complete })
			:add_child(rsm.generate({ first = first, last = last, count = total })));
		module:log("debug", "Archive query by %s with %s: %d results", origin.full_jid, form.with or "*", n);
		return true;
	end

	-- Before mod_mam's handler (priority 0) of the same event.
	module:hook("iq-set/self/" .. NS_MAM .. ":query", answer_query, 1);

	if not view then return; end

	-- The first and last item of the account's view, as mod_mam answers from its archive.
	module:hook("iq-get/self/" .. NS_MAM .. ":metadata", function (event)
		local origin, stanza = event.origin, event.stanza;
		if not archive() or not modulemanager.is_loaded(host, "mam") or not view.has_rooms(origin.username) then
			return;
		end
		local reply = st.reply(stanza):tag("metadata", { xmlns = NS_MAM });
		for _, tag in ipairs({ "start", "end" }) do
			local ok, iter = pcall(view.find, origin.username, { limit = 1, reverse = tag == "end" });
			if not (ok and iter) then
				module:log("error", "Archive metadata for %s failed: %s", origin.full_jid, tostring(iter):match("^[^\n]*"));
				origin.send(st.error_reply(stanza, "cancel", "internal-server-error"));
				return true;
			end
			for id, _, when in iter do
				reply:tag(tag, { id = id, timestamp = timestamp(when) }):up();
			end
		end
		origin.send(reply);
		return true;
	end, 1);
end
