-- mod_minimix: the shared archive. A room's groupchat is stored once per host, not once per
-- account, and each account's archive is read as if every message had been stored for it.
--
-- - The room log: an archive store of the module's own (`minimix_rooms`, on the storage
--   driver of mod_mam's store), one "user" per room (the room's bare JID), `with` = the
--   room. Every copy of one room message that reaches the accounts of this host is one
--   item: the room hands the same stanza object to each local account; over s2s each
--   account's copy is matched to the stored item by the room's stanza-id, else the
--   sender's origin-id, else sender and body within CONTENT_WINDOW seconds (each item
--   once per account).
-- - Periods: per account and room, when the account was in the room (store
--   `minimix_periods`, { [room] = { start, end, start, end, ..., start } }, an odd
--   length: still in). A period starts with the first message the account gets from the
--   room (the item's time) and ends when its membership ends (the shim's `sync`). What
--   the account's view holds of a room log is exactly what falls in its periods.
-- - The view: `find(user, query)` answers as the account's own archive store would if
--   every item of its periods had been stored in it (same order, filters, ids, limits,
--   total and errors as the storage driver in use): the account's own archive (private
--   messages, one-to-one chats) merged with the room logs, in the order the items were
--   stored (Prosody's archive ids are UUIDv7: the time they were stored, to 1/16 µs).
--
-- Loaded by mod_minimix.lua with `module:require("room_log")(options)`; see the table it
-- returns at the end.

local st = require "prosody.util.stanza";
local jid_bare = require "prosody.util.jid".bare;
local jid_host = require "prosody.util.jid".host;
local jid_prep = require "prosody.util.jid".prep;
local time_now = require "prosody.util.time".now;
local datetime = require "prosody.util.datetime";
local cache = require "prosody.util.cache";
local sha1 = require "prosody.util.hashes".sha1;
local storagemanager = require "prosody.core.storagemanager";

local NS_STANZA_ID = "urn:xmpp:sid:0";
local NS_DELAY = "urn:xmpp:delay";

local host = module.host;
local host_session = prosody.hosts[host];
local m_min, m_max, m_floor = math.min, math.max, math.floor;

-- Copies of one broadcast reach every account of the host within this many seconds; a
-- message told apart only by sender and body matches a stored one no older than this.
local CONTENT_WINDOW = 30;
-- What is remembered per room for matching: this many seconds, at most this many items.
local KEEP_SECONDS, KEEP_ITEMS = 120, 256;
-- A replay (a rejoin's history) is also looked up in the room log: from this many
-- seconds before its <delay/> stamp (clock skew), this many items at most.
local REPLAY_SKEW, REPLAY_SCAN = 120, 1000;
-- A message stored live is taken for a replayed one told apart by sender and body only
-- when it was stored within this many seconds of the replay's stamp (the servers' clocks
-- and the way between them).
local LIVE_SKEW = 10;
-- Rows per storage query when paging through SQL storage: the first page asks for what
-- the answer needs, each further one four times more, up to this.
local PAGE_MAX = 1024;
-- How long the time of a room log's first item is taken as known (expiry moves it on).
local LOG_START_TTL = 600;

-- The time an item was stored: from its UUIDv7 id (what Prosody's storage drivers make),
-- else the stored time.
local function stored_at(id, when)
	local a, b, c, d = id:match("^(%x%x%x%x%x%x%x%x)%-(%x)(%x%x%x)%-7(%x%x%x)%-");
	if a then
		return tonumber(a .. b, 16) + tonumber(c, 16) / 0x1000 + tonumber(d, 16) / 0x1000000;
	end
	return tonumber(when) or 0;
end

-- Items in the order they were stored: by time, then id.
local function earlier(t1, id1, t2, id2)
	if t1 ~= t2 then return t1 < t2; end
	return id1 < id2;
end

return function (opts)
	local archive = opts.archive; -- the shim's: the account's archive store (wrapped) or nil
	local wrap = opts.wrap; -- archive_upkeep's wrap (quota handling around append)
	local bare_jids = opts.bare_jids;

	local store_name = module:get_option_string("archive_store", "archive");
	local expires_after = module:get_option_period("archive_expires_after", "1w") or math.huge;

	local log_store;
	local function room_store()
		if not log_store then
			local driver = storagemanager.get_driver(host, store_name);
			local opened, err = driver:open("minimix_rooms", "archive");
			if not opened then error("cannot open the room log: " .. tostring(err)); end
			log_store = wrap(opened, { event = false, expiry = false, name = "room log" });
		end
		return log_store;
	end

	local internal;
	local function is_internal()
		if internal == nil then
			local _, driver_name = storagemanager.get_driver(host, store_name);
			internal = driver_name == "internal";
		end
		return internal;
	end

	---------------------------------------------------------------------------------------
	-- Periods

	local periods_store = module:open_store("minimix_periods");
	local periods_cache = cache.new(module:get_option_integer("minimix_periods_cache_size", 1000, 1));

	local function periods_of(user)
		local p = periods_cache:get(user);
		if p == nil then
			local err;
			p, err = periods_store:get(user);
			if not p and err then error("cannot read the periods of " .. user .. ": " .. tostring(err)); end
			p = p or {};
			periods_cache:set(user, p);
		end
		return p;
	end

	local function save_periods(user, p)
		local ok, err = periods_store:set(user, next(p) and p or nil);
		if not ok then module:log("error", "Could not store the archive periods of %s: %s", user, err); end
	end

	-- The start of the account's open period in the room, if it is in one.
	local function open_since(user, room)
		local list = periods_of(user)[room];
		if list and #list % 2 == 1 then return list[#list]; end
		return nil;
	end

	local function open_period(user, room, t)
		local p = periods_of(user);
		local list = p[room];
		if not list then
			list = {};
			p[room] = list;
		end
		list[#list + 1] = t;
		save_periods(user, p);
	end

	-- Ends the open periods of rooms no longer in `rooms` (a set of the account's
	-- memberships, from the shim's persist).
	local function sync(user, rooms)
		local p = periods_of(user);
		local changed = false;
		local prepped = {};
		for room in pairs(rooms) do prepped[jid_prep(room) or room] = true; end
		for room, list in pairs(p) do
			if #list % 2 == 1 and not rooms[room] and not prepped[jid_prep(room) or room] then
				list[#list + 1] = time_now();
				changed = true;
			end
		end
		if changed then save_periods(user, p); end
	end

	local function in_periods(list, t)
		for i = 1, #list, 2 do
			if t >= list[i] and (list[i + 1] == nil or t <= list[i + 1]) then return true; end
		end
		return false;
	end

	---------------------------------------------------------------------------------------
	-- Storing: one item per room message per host

	-- Per room: what was stored (or matched) lately, oldest first.
	local recent = {};
	local by_object = setmetatable({}, { __mode = "k" });
	local last_when = 0;

	local function room_recent(room)
		local r = recent[room];
		if not r then
			r = { first = 1, last = 0, by_key = {}, by_id = {} };
			recent[room] = r;
		end
		return r;
	end

	local function forget_old(r, now)
		while r.first <= r.last do
			local e = r[r.first];
			if r.last - r.first < KEEP_ITEMS and e.seen >= now - KEEP_SECONDS then break; end
			r[r.first] = nil;
			r.first = r.first + 1;
			local list = r.by_key[e.key];
			if list then
				for i = 1, #list do
					if list[i] == e then table.remove(list, i); break; end
				end
				if not list[1] then r.by_key[e.key] = nil; end
			end
			if r.by_id[e.id] == e then r.by_id[e.id] = nil; end
		end
		if r.first > r.last then
			r.first, r.last = 1, 0;
		end
	end

	local function remember(r, e)
		r.last = r.last + 1;
		r[r.last] = e;
		local list = r.by_key[e.key];
		if not list then
			list = {};
			r.by_key[e.key] = list;
		end
		list[#list + 1] = e;
		r.by_id[e.id] = e;
		return e;
	end

	-- What tells one room message apart: the room's stanza-id, else the sender's
	-- origin-id, else sender and body (content = true).
	local function key_of(stanza, room)
		local from = stanza.attr.from or "";
		local origin_id;
		for _, tag in ipairs(stanza.tags) do
			if tag.name == "stanza-id" and tag.attr.xmlns == NS_STANZA_ID and tag.attr.by == room and tag.attr.id then
				return "s\0" .. tag.attr.id, false;
			elseif tag.name == "origin-id" and tag.attr.xmlns == NS_STANZA_ID and tag.attr.id then
				origin_id = tag.attr.id;
			end
		end
		if origin_id then return "o\0" .. from .. "\0" .. origin_id, false; end
		-- A digest: bodies can be long, and these keys stay in memory for a while.
		return "b\0" .. sha1(from .. "\0" .. (stanza:get_child_text("body") or "")), true;
	end

	-- A remembered item with this key the account has not had yet: the oldest since its
	-- period began, or (no period: its first message from the room) the newest.
	local function match(r, key, content, user, since, now)
		local list = r.by_key[key];
		if not list then return nil; end
		local best;
		for i = 1, #list do
			local e = list[i];
			if not e.claimed[user] and (not content or e.seen >= now - CONTENT_WINDOW) then
				if since then
					if e.t >= since then return e; end
				else
					best = e;
				end
			end
		end
		return best;
	end

	local function delay_of(stanza)
		local delay = stanza:get_child("delay", NS_DELAY);
		return delay and delay.attr.stamp and datetime.parse(delay.attr.stamp);
	end

	-- A replayed message (it carries the room's <delay/>) another account of this host
	-- stored already, looked up in the room log around its stamp. Told apart by sender and
	-- body only, a stored item is the same message when it was stored from a replay with
	-- the same stamp, or live within LIVE_SKEW seconds of it (so that the same words said
	-- again later are a message of their own).
	local function match_stored(r, key, content, room, user, stanza)
		local stamp = delay_of(stanza);
		if not stamp then return nil; end
		local iter = room_store():find(room, { start = stamp - REPLAY_SKEW, limit = REPLAY_SCAN });
		if not iter then return nil; end
		for id, item, when in iter do
			local e = r.by_id[id];
			if not (e and e.claimed[user]) then
				item.attr.xmlns = nil;
				if key_of(item, room) == key then
					local stored_stamp = content and delay_of(item);
					if not content or stored_stamp == stamp
						or (not stored_stamp and math.abs(when - stamp) <= LIVE_SKEW) then
						return e or remember(r, { id = id, t = stored_at(id, when), key = key, seen = os.time(), claimed = {} });
					end
				end
			end
		end
		return nil;
	end

	-- Whether `tag` is a <stanza-id/> claiming to be the archive of an account of this host
	-- (only the archive may say that; compared after JID preparation, as mod_mam does).
	local function claim(tag, room)
		if tag.name ~= "stanza-id" or tag.attr.xmlns ~= NS_STANZA_ID or tag.attr.by == room then return false; end
		local by = jid_prep(tag.attr.by or "");
		return by ~= nil and jid_host(by) == host;
	end

	-- The stanza to store and fork: without such claims, a copy only when it has one.
	local function without_claims(stanza, room)
		for _, tag in ipairs(stanza.tags) do
			if claim(tag, room) then
				local copy = st.clone(stanza);
				copy:maptags(function (t)
					if claim(t, room) then return nil; end
					return t;
				end);
				return copy;
			end
		end
		return stanza;
	end

	-- What quiet rooms remembered goes after KEEP_SECONDS too.
	module:add_timer(KEEP_SECONDS, function ()
		local now = os.time();
		for room, r in pairs(recent) do
			forget_old(r, now);
			if r.last == 0 then recent[room] = nil; end
		end
		return KEEP_SECONDS;
	end);

	-- Stores a live groupchat message from a room for the account `user`, once per host:
	-- returns the stanza to fork and the archive's id for it (nil, err when it could not
	-- be stored).
	local function store_live(user, stanza)
		-- The same stanza object handed to the next account of the host: stored already.
		local e = by_object[stanza];
		local room = e and e.room or jid_bare(stanza.attr.from);
		local since = open_since(user, room);
		if e and (e.claimed[user] or (since and e.t < since)) then e = nil; end
		local key, content, now, r;
		if not e then
			now = os.time();
			r = room_recent(room);
			forget_old(r, now);
			key, content = key_of(stanza, room);
			e = match(r, key, content, user, since, now);
			if not e and stanza:get_child("delay", NS_DELAY) then
				e = match_stored(r, key, content, room, user, stanza);
			end
		end
		local out = e and e.stanza or stanza;
		if not e then
			out = without_claims(stanza, room);
			local when = time_now();
			if when <= last_when then when = last_when + 1e-6; end
			last_when = when;
			local to = out.attr.to;
			out.attr.to = nil;
			local id, err = room_store():append(room, nil, out, when, room);
			out.attr.to = to;
			if not id then return stanza, nil, err; end
			e = remember(r, { id = id, t = stored_at(id, when), key = key, seen = now, claimed = {}, room = room });
			if out ~= stanza then e.stanza = out; end
			by_object[stanza] = e;
		end
		e.claimed[user] = true;
		if not since then open_period(user, room, e.t); end
		if host_session.events.get_handlers("archive-message-added") then
			local copy = st.clone(out);
			copy.attr.to = bare_jids[user];
			module:fire_event("archive-message-added", {
				origin = host_session, stanza = copy, for_user = user, id = e.id,
			});
		end
		return out, e.id;
	end

	---------------------------------------------------------------------------------------
	-- The view

	-- Items of `store` for `user` matching `q` (with, start, end, ids, reverse), each as
	-- (t, id, item, when, with), those failing `keep(t)` left out (and none after one for
	-- which it says "stop"); SQL storage is paged
	-- through, `rows` at first.
	local function source(store, user, q, keep, rows)
		local find_q = { with = q.with, start = q.start, ["end"] = q["end"], ids = q.ids, reverse = q.reverse };
		local iter, buffer, i, done, last_id;
		local function fetch()
			if is_internal() then
				if iter then return false; end
				local err;
				iter, err = store:find(user, find_q);
				if not iter then error(err or "archive query failed"); end
				return true;
			end
			if done then return false; end
			find_q.limit = rows;
			if last_id then
				if q.reverse then find_q.before = last_id; else find_q.after = last_id; end
			end
			local it, err = store:find(user, find_q);
			if not it then error(err or "archive query failed"); end
			buffer, i = {}, 0;
			for id, item, when, with in it do buffer[#buffer + 1] = { id, item, when, with }; end
			done = #buffer < rows;
			if buffer[1] then last_id = buffer[#buffer][1]; end
			rows = m_min(rows * 4, PAGE_MAX);
			return true;
		end
		local function raw()
			if is_internal() then
				if not iter then fetch(); end
				return iter();
			end
			while true do
				if buffer and i < #buffer then
					i = i + 1;
					local row = buffer[i];
					return row[1], row[2], row[3], row[4];
				end
				if not fetch() then return nil; end
			end
		end
		return function ()
			while true do
				local id, item, when, with = raw();
				if id == nil then return nil; end
				local t = stored_at(id, when);
				if not keep then return t, id, item, when, with; end
				local verdict = keep(t);
				if verdict == true then return t, id, item, when, with; end
				if verdict == "stop" then return nil; end
			end
		end;
	end

	-- The account's rooms (bare JIDs) with periods, optionally only `with`.
	local function rooms_of(user, with)
		local p = periods_of(user);
		if with then
			return p[with] and { with } or {};
		end
		local rooms = {};
		for room in pairs(p) do rooms[#rooms + 1] = room; end
		table.sort(rooms);
		return rooms;
	end

	-- Where the item `id` is in the account's view: { t, with, when } (nil if not there).
	local located = cache.new(4096);
	local function locate(user, id)
		local key = user .. "\0" .. id;
		local at = located:get(key);
		if at then return at; end
		local item, when, with = archive():get(user, id);
		if item then
			at = { stored_at(id, when), with, when };
		else
			for room, list in pairs(periods_of(user)) do
				item, when, with = room_store():get(room, id);
				if item then
					local t = stored_at(id, when);
					if in_periods(list, t) then at = { t, with, when }; end
					break;
				end
			end
		end
		if at then located:set(key, at); end
		return at;
	end

	-- Whether an item matches a query's with, start, end and ids (internal storage looks
	-- for an after/before id only among those).
	local function matches(q, id, with, when)
		if q.with and with ~= q.with then return false; end
		if q.start and when < q.start then return false; end
		if q["end"] and when > q["end"] then return false; end
		if q.ids then
			for _, wanted in ipairs(q.ids) do
				if wanted == id then return true; end
			end
			return false;
		end
		return true;
	end

	-- How many items of the room log `room` in a period [s, e] match with, start, end
	-- and ids: the storage counts by the stored time (SQL compares it with whole seconds),
	-- the items of the period's first and last second that fall outside it are taken off.
	local function count_period(room, s, e, q)
		local store = room_store();
		local lo, hi = m_max(q.start or -math.huge, m_floor(s)), q["end"] or math.huge;
		if e then hi = m_min(hi, m_floor(e) + 1); end
		if lo > hi then return 0; end
		local function native(a, b, extra)
			return store:find(room, { start = a > -math.huge and a or nil, ["end"] = b < math.huge and b or nil,
				ids = q.ids, limit = extra, total = extra == 0 });
		end
		local _, n = native(lo, hi, 0);
		n = tonumber(n) or 0;
		local function take_off(a, b, outside)
			if a > b then return; end
			local it = native(a, b, nil);
			if not it then return; end
			for id, _, when in it do
				if outside(stored_at(id, when)) then n = n - 1; end
			end
		end
		take_off(lo, m_min(hi, m_floor(s) + 1), function (t) return t < s; end);
		if e then take_off(m_max(lo, m_floor(e)), hi, function (t) return t > e; end); end
		return n;
	end

	-- Internal storage only: the first item of the account's view stored after `after`
	-- (a time), or with `after` nil its last item, whatever the query's filters.
	local function edge_item(user, after)
		local best;
		local function scan(store, owner, fq, keep, room)
			local it = store:find(owner, fq);
			if not it then return; end
			for id, item, when, with in it do
				local t = stored_at(id, when);
				if (not keep or keep(t)) and (not after or when > after) then
					if not best or (after and earlier(t, id, best.t, best.id))
						or (not after and earlier(best.t, best.id, t, id)) then
						best = { t = t, id = id, item = item, when = when, with = with, room = room };
					end
					return;
				end
			end
		end
		scan(archive(), user, after and { start = after } or { reverse = true });
		for room, list in pairs(periods_of(user)) do
			for i = 1, #list, 2 do
				local s, e = list[i], list[i + 1];
				local function keep(t) return t >= s and (e == nil or t <= e); end
				if after then
					if e == nil or e > after then scan(room_store(), room, { start = m_max(after, m_floor(s)) }, keep, room); end
				else
					scan(room_store(), room, { reverse = true, ["end"] = e }, keep, room);
				end
			end
		end
		return best;
	end

	-- The stored time of a room log's first item (minus a second; -inf for an empty
	-- log), remembered for LOG_START_TTL seconds.
	local log_starts = {};
	local function log_start(room)
		local known = log_starts[room];
		local now = os.time();
		if known and known[2] > now then return known[1]; end
		local first = math.huge;
		local iter = room_store():find(room, { limit = 1 });
		if iter then
			for _, _, when in iter do first = (tonumber(when) or 0) - 1; end
		end
		if first == math.huge then first = -math.huge; end
		log_starts[room] = { first, now + LOG_START_TTL };
		return first;
	end

	-- Whether this internal storage lets one item past a time bound through (above): asked
	-- once of a non-empty archive (the account's own, else a room log of its periods) with
	-- a start after everything.
	local one_through;
	local function lets_one_through(user)
		if one_through ~= nil then return one_through; end
		local candidates = { { archive(), user } };
		for room in pairs(periods_of(user)) do candidates[#candidates + 1] = { room_store(), room }; end
		for _, c in ipairs(candidates) do
			local store, owner = c[1], c[2];
			local any = store:find(owner, { limit = 1 });
			if any and any() then
				local past = store:find(owner, { start = 2 ^ 40 });
				one_through = (past and past()) ~= nil;
				return one_through;
			end
		end
		return false;
	end

	-- The account's view: as its own archive store's find(user, q) would answer.
	local function find(user, q)
		local personal = archive();
		local sql = not is_internal();
		local reverse = q.reverse;
		-- after/before ids: where they are (nil: not in the view).
		local after_t, before_t;
		for _, side in ipairs({ "after", "before" }) do
			local id = q[side];
			local at = id and locate(user, id);
			-- SQL storage finds the id anywhere in the archive; internal storage only among
			-- the items the query's with, time and ids let through.
			if at and (sql or matches(q, id, at[2], at[3])) then
				if side == "after" then after_t = at[1]; else before_t = at[1]; end
			end
		end
		if (q.after and not after_t) or (q.before and not before_t) then
			if sql then return nil, "item-not-found"; end
			-- Internal storage: an unknown id where the iteration starts gives nothing, one
			-- where it stops is never met (no bound).
			if (reverse and q.before and not before_t) or (not reverse and q.after and not after_t) then
				return function () end;
			end
		end
		local lo_t, hi_t = after_t, before_t; -- exclusive bounds
		-- Each source's storage applies start and end; on internal storage (which lets one
		-- item past a bound through, below) they are applied again here.
		local q_start, q_end = not sql and q.start, not sql and q["end"];
		local function within(t, id, when, exempt)
			if lo_t and not earlier(lo_t, q.after, t, id) then return false; end
			if hi_t and not earlier(t, id, hi_t, q.before) then return false; end
			if not exempt and ((q_start and when < q_start) or (q_end and when > q_end)) then return false; end
			return true;
		end
		-- Internal storage finds where a time bound begins by bisecting the archive, which
		-- in Prosody 13.0 lets one item past it through: paging backwards from `end`, the
		-- first item stored after it; going forward from a `start` past everything, the
		-- archive's last item (trunk filters by both bounds after bisecting). Where the
		-- storage does that, the view lets the same one item through, once, when the
		-- query's other filters let it.
		local extra;
		if not sql and (q.start or q["end"]) and lets_one_through(user) then
			if reverse and q["end"] then
				extra = edge_item(user, q["end"]);
			elseif not reverse and q.start then
				extra = edge_item(user, nil);
				if extra and extra.when >= q.start then extra = nil; end
			end
			if extra and not matches({ with = q.with, ids = q.ids, start = reverse and q.start or nil,
				["end"] = not reverse and q["end"] or nil }, extra.id, extra.with, extra.when) then
				extra = nil;
			end
		end
		-- Storage queries start a second early around an id (SQL keeps whole seconds).
		local base = { with = q.with, start = q.start, ["end"] = q["end"], ids = q.ids, reverse = reverse };
		if lo_t then base.start = m_max(base.start or -math.huge, m_floor(lo_t) - 1); end
		if hi_t then base["end"] = m_min(base["end"] or math.huge, m_floor(hi_t) + 1); end
		local rows = m_min(q.limit and q.limit > 0 and q.limit or 20, PAGE_MAX);

		local sources = { source(personal, user, base, nil, rows) };
		local bare = bare_jids[user];
		local room_sources = {};
		for _, room in ipairs(rooms_of(user, q.with)) do
			local list = periods_of(user)[room];
			for i = 1, #list, 2 do
				local s, e = list[i], list[i + 1];
				-- The period's own ends go to the storage only where they cut something
				-- off: SQL storage given a time bound sorts every row within it (while
				-- without one it walks its order index and stops at the limit). An open
				-- period read backwards stops at its start by itself; one that began
				-- before the log's first item cuts nothing there.
				local lo, hi = base.start or -math.huge, base["end"] or math.huge;
				if (e or not reverse) and s > log_start(room) then lo = m_max(lo, m_floor(s)); end
				if e then hi = m_min(hi, e + 1); end
				if lo <= hi then
					local pq = {
						start = lo > -math.huge and lo or nil, ["end"] = hi < math.huge and hi or nil,
						ids = q.ids, reverse = reverse,
					};
					local src = source(room_store(), room, pq, function (t)
						if t < s then return reverse and "stop" or false; end
						if e and t > e then return not reverse and "stop" or false; end
						return true;
					end, rows);
					sources[#sources + 1] = src;
					room_sources[src] = true;
				end
			end
		end

		local exempt;
		if extra then
			local given_once = false;
			sources[#sources + 1] = function ()
				if given_once then return nil; end
				given_once = true;
				if extra.room then extra.item.attr.to = bare; end
				return extra.t, extra.id, extra.item, extra.when, extra.with;
			end;
			exempt = #sources;
		end

		local heads = {};
		for i, src in ipairs(sources) do heads[i] = { src() }; end
		local limit = q.limit;
		local given = 0;
		local taken; -- the source whose head was given last: read on only when needed
		local iterator = function ()
			while true do
				if limit and given >= limit then return nil; end
				if taken then
					heads[taken] = { sources[taken]() };
					taken = nil;
				end
				local best;
				for i = 1, #heads do
					local h = heads[i];
					if h[1] then
						if not best then
							best = i;
						else
							local b = heads[best];
							if reverse then
								if earlier(b[1], b[2], h[1], h[2]) then best = i; end
							elseif earlier(h[1], h[2], b[1], b[2]) then
								best = i;
							end
						end
					end
				end
				if not best then return nil; end
				local h = heads[best];
				local t, id, item, when, with = h[1], h[2], h[3], h[4], h[5];
				taken = best;
				if within(t, id, when, best == exempt) then
					given = given + 1;
					if room_sources[sources[best]] then item.attr.to = bare; end
					located:set(user .. "\0" .. id, { t, with, when });
					return id, item, when, with;
				elseif (not reverse and hi_t and not earlier(t, id, hi_t, q.before))
					or (reverse and lo_t and not earlier(lo_t, q.after, t, id)) then
					return nil; -- past the bound the iteration stops at
				end
			end
		end;

		local total;
		if q.total and sql then
			local _, n = personal:find(user, {
				with = q.with, start = q.start, ["end"] = q["end"], ids = q.ids, limit = 0, total = true,
			});
			total = tonumber(n) or 0;
			for _, room in ipairs(rooms_of(user, q.with)) do
				local list = periods_of(user)[room];
				for i = 1, #list, 2 do
					total = total + count_period(room, list[i], list[i + 1], q);
				end
			end
		end
		return iterator, total;
	end

	-- Whether the account has anything in room logs (else its own archive is its view).
	local function has_rooms(user, with)
		local p = periods_of(user);
		if with then return p[with] ~= nil; end
		return next(p) ~= nil;
	end

	---------------------------------------------------------------------------------------
	-- Upkeep

	-- Removes what is older than archive_expires_after from the room logs, and the periods
	-- that ended before that.
	local function remove_expired()
		if expires_after == math.huge then return; end
		local store = room_store();
		local cut_off = os.time() - expires_after;
		if store.caps and store.caps.wildcard_delete then
			local ok, err = store:delete(true, { ["end"] = cut_off });
			if not ok then module:log("error", "Could not delete expired messages from the room logs: %s", err); end
		elseif store.users then
			local logs = {};
			for room in store:users() do logs[room] = true; end
			local deleted, rooms = opts.expire_each(store, next, logs, cut_off, function (room, err)
				module:log("error", "Could not delete expired messages from the log of %s: %s", room, err);
			end);
			if deleted > 0 then
				module:log("info", "Removed %d expired messages from the logs of %d rooms", deleted, rooms);
			end
		end
		if periods_store.users then
			for user in periods_store:users() do
				local p = periods_of(user);
				local changed = false;
				for room, list in pairs(p) do
					while list[2] and list[2] < cut_off do
						table.remove(list, 1);
						table.remove(list, 1);
						changed = true;
					end
					if not list[1] then p[room] = nil; end
				end
				if changed then save_periods(user, p); end
			end
		end
	end

	-- An account deleted: its periods go (the room logs are the other accounts' too).
	module:hook_global("user-deleted", function (event)
		if event.host ~= host then return; end
		periods_cache:set(event.username, nil);
		periods_store:set(event.username, nil);
	end);

	return {
		--- store_live(user, stanza) -> stanza to fork, id (nil, err: not stored)
		store_live = store_live;
		--- sync(user, rooms): ends the periods of rooms not in the set `rooms`
		sync = sync;
		--- find(user, q) -> iterator (id, item, when, with), total: the account's view
		find = find;
		--- has_rooms(user[, with]): whether the account's view holds any room log
		has_rooms = has_rooms;
		--- remove_expired(): the daily expiry of the room logs
		remove_expired = remove_expired;
		--- the room log store (for the metrics and specs)
		store = room_store;
	};
end
