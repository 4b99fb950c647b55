-- mod_minimix: what mod_mam does around each message it stores, done for what the module
-- stores in an account's archive (a room's groupchat, private messages with occupants).
--
-- Loaded by mod_minimix.lua with `module:require("archive_upkeep")`; `wrap(store)` returns
-- the archive store the shim appends to: the same store, whose `append` also
-- - makes room when the storage says "quota-limit", as mod_mam does: first removes what is
--   older than archive_expires_after, then (when the storage can) truncates the archive to
--   99% of storage_archive_item_limit, and tries once more; what still fails is logged at
--   error level by the shim and the message is forked all the same;
-- - notes the account for expiry: mod_mam expires an account's archive only for accounts
--   it stored something for (on storage without wildcard delete, such as internal
--   storage), so an account with only groupchat would keep it forever. The module notes
--   the day it stored something for an account, and its own daily task ("Remove expired
--   archived messages") deletes what is older than archive_expires_after from the
--   archives of the accounts noted on days before that, as mod_mam's own task does. On
--   storage with wildcard delete (SQL) mod_mam's task covers every account already; the
--   module's task then deletes only when mod_mam is not loaded;
-- - fires "archive-message-added" { origin, stanza, for_user, id } as mod_mam does after
--   storing (`stanza`: a copy of what was stored, made only when something listens), so
--   that modules listening for what enters an archive (mod_cloud_notify's push
--   notifications) learn of it as of a one-to-one message.

local cache = require "prosody.util.cache";
local st = require "prosody.util.stanza";
local async = require "prosody.util.async";
local datestamp = require "prosody.util.datetime".date;
local modulemanager = require "prosody.core.modulemanager";

local host = module.host;
local host_session = prosody.hosts[host];

-- mod_mam's options, read as it reads them (modules/mod_mam/mod_mam.lua).
local expires_after = module:get_option_period("archive_expires_after", "1w") or math.huge;
local expires = expires_after ~= math.huge;

-- Expiry bookkeeping, as mod_mam keeps its own: per day, the accounts something was
-- stored for (map store minimix_archive_expiry, key: the date, field: the account).
local days_store = module:open_store("minimix_archive_expiry");
local days_map = module:open_store("minimix_archive_expiry", "map");
local noted = cache.new(module:get_option_integer("archive_cleanup_date_cache_size", 1000, 1));
local today, tomorrow_at = nil, 0;

local function note_for_expiry(store, user)
	if not expires or (store.caps and store.caps.wildcard_delete) then return; end
	local now = os.time();
	if now >= tomorrow_at then
		today = datestamp(now);
		tomorrow_at = now - now % 86400 + 86400;
	end
	if noted:get(user) == today then return; end
	if days_map:set(today, user, true) then noted:set(user, today); end
end

-- mod_mam's answer to a full archive.
local item_limit, truncate_to;
local function make_room(real, what, user, value, when, with)
	local id, err;
	if expires and real.delete then
		if real:delete(user, { ["end"] = os.time() - expires_after }) then
			id, err = real:append(user, nil, value, when, with);
			if id then
				module:log("info", "The %s of %s was full: removed what was older than archive_expires_after", what, user);
				return id;
			end
		end
	end
	if real.caps and real.caps.truncate and real.delete then
		if not item_limit then
			item_limit = module:get_option_integer("storage_archive_item_limit", real.caps.quota or 1000, 0);
			truncate_to = math.floor(item_limit * 0.99);
		end
		if real:delete(user, { truncate = truncate_to }) then
			id, err = real:append(user, nil, value, when, with);
			if id then
				module:log("info", "The %s of %s was full (storage_archive_item_limit = %d): removed its oldest messages",
					what, user, item_limit);
				return id;
			end
		end
	end
	return nil, err or "quota-limit";
end

-- `origin`: the session the message came from, when known (else the host).
local function append(self, user, key, value, when, with, origin)
	local store = self.real;
	local id, err = store:append(user, key, value, when, with);
	if not id and err == "quota-limit" then
		local what = self.upkeep.name or "archive";
		id, err = make_room(store, what, user, value, when, with);
		if not id then
			err = "quota-limit: the " .. what .. " of " .. user .. " is full (storage_archive_item_limit)";
		end
	end
	if not id then return nil, err; end
	if self.upkeep.expiry ~= false then note_for_expiry(store, user); end
	if self.upkeep.event == false then return id; end
	-- The shim hands the room's own stanza to the storage, and then forks it (with the
	-- archive's stanza-id, to each session's address): listeners get a copy of what was
	-- stored, which nothing changes later. No listener, no copy.
	if host_session.events.get_handlers("archive-message-added") then
		module:fire_event("archive-message-added", {
			origin = origin or host_session, stanza = st.clone(value), for_user = user, id = id,
		});
	end
	return id;
end

-- Deletes what is older than `cut_off` from the archive of each "user" the iterator
-- (`each`, `state`) gives, yielding between them (a daily task runs in an async runner)
-- so that the server serves others meanwhile; `failed(user, err)` for each it could not.
-- Returns how many items were deleted, from how many archives.
local function expire_each(store, each, state, cut_off, failed)
	local deleted, archives = 0, 0;
	for owner in each, state do
		local ok, err = store:delete(owner, { ["end"] = cut_off });
		if ok then
			archives = archives + 1;
			deleted = deleted + (tonumber(ok) or 0);
		else
			failed(owner, err);
		end
		if async.ready() then
			local wait, done = async.waiter();
			module:add_timer(0.01, done);
			wait();
		end
	end
	return deleted, archives;
end

local function remove_expired(store)
	if not store.delete then
		module:log("error", "archive_expires_after is set but this storage cannot delete: nothing expires");
		return;
	end
	local cut_off = os.time() - expires_after;
	if store.caps and store.caps.wildcard_delete then
		if modulemanager.is_loaded(host, "mam") then return; end -- mod_mam's task deletes for everyone
		local ok, err = store:delete(true, { ["end"] = cut_off });
		if not ok then module:log("error", "Could not delete expired messages: %s", err); end
		return;
	end
	local cut_off_day = datestamp(cut_off);
	local users = {};
	for day in days_store:users() do
		if day <= cut_off_day then
			for user in pairs(days_store:get(day) or {}) do users[user] = true; end
			-- A later day's accounts may hold messages that have not expired yet.
			if day < cut_off_day then days_store:set(day, nil); end
		end
	end
	local deleted, accounts = expire_each(store, next, users, cut_off, function (user, err)
		days_map:set(cut_off_day, user, true);
		module:log("error", "Could not delete expired messages of %s: %s", user, err);
	end);
	if accounts > 0 then
		module:log("info", "Removed %d expired messages from the archives of %d accounts", deleted, accounts);
	end
end

return {
	--- The archive store to append to: `store`, with the upkeep above around `append`.
	--- `upkeep.expiry = false`: not noted for this module's expiry (the room logs expire
	--- on their own); `upkeep.event = false`: no "archive-message-added" (fired per account
	--- by the caller); `upkeep.name`: what log lines call the store ("archive").
	wrap = function (store, upkeep)
		return setmetatable({ append = append, real = store, upkeep = upkeep or {} }, { __index = store });
	end;
	expire_each = expire_each;
	--- Registers the daily task; `archive()` is the shim's (the wrapped store or nil).
	schedule = function (archive)
		if not expires then return; end
		module:daily("Remove expired archived messages", function ()
			local store = archive();
			if store then remove_expired(store.real); end
		end);
	end;
};
