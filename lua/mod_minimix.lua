-- mod_minimix: group chats joined per account, forked to the account's sessions.
--
-- This file is the thin driver: it registers Prosody hooks, hands each stanza to the Rust
-- core (minimix.so, loaded from this module's directory) and carries out the actions the
-- core returns. All membership state lives in the core, one object per VirtualHost.

-- Prosody 13 and trunk only (README, Compatibility): 0.12 and older lack the prosody.*
-- module names and APIs used below, so check before anything else.
if tostring(prosody.version):match("^0%.") then
	module:log("error", "mod_minimix needs Prosody 13 or trunk, not %s: not loading", prosody.version);
	return;
end

local st = require "prosody.util.stanza";
local jid_bare = require "prosody.util.jid".bare;
local jid_prep = require "prosody.util.jid".prep;
local jid_node = require "prosody.util.jid".node;
local jid_host = require "prosody.util.jid".host;
local new_id = require "prosody.util.id".short;
local time_now = require "prosody.util.time".now;

if module:get_host_type() ~= "local" then
	module:log("error", "mod_minimix belongs under a VirtualHost, not on %s", module.host);
	return;
end

local NS_TEST_FAULT = "urn:xmpp:minimix:test-fault";
local NS_STANZA_ID = "urn:xmpp:sid:0";
local NS_BOOKMARKS = "urn:xmpp:bookmarks:1";
local NS_MUC = "http://jabber.org/protocol/muc";
local NS_DISCO_INFO = "http://jabber.org/protocol/disco#info";

local host = module.host;
local hosts = prosody.hosts;
local full_sessions = prosody.full_sessions;

-- Bare JIDs of this host's accounts, made once each.
local bare_jids = setmetatable({}, { __index = function (t, user)
	local bare = user .. "@" .. host;
	t[user] = bare;
	return bare;
end });

local function load_core()
	local path = module:get_directory() .. "/minimix.so";
	local open, err = package.loadlib(path, "luaopen_minimix");
	if not open then
		error("mod_minimix: cannot load the Rust core from " .. path .. ": " .. tostring(err));
	end
	return open();
end

local minimix = load_core();
if not (minimix.flags and minimix.ops) then
	-- A minimix.so from an older version, still in memory after an in-place upgrade and a
	-- reload (package.loadlib keeps what it loaded once).
	module:log("error", "The loaded Rust core is older than this mod_minimix.lua: restart Prosody to finish upgrading");
	return;
end
-- What the core's outcomes say, as the core names it (src/bridge/reply.rs, Reply).
local OP_DELIVER, OP_SEND = minimix.ops.deliver, minimix.ops.send;
local FLAG_PERSIST, FLAG_ARCHIVE = minimix.flags.persist, minimix.flags.archive;
local FLAG_SEND_ORIGINAL, FLAG_ONE_SESSION = minimix.flags.send_original, minimix.flags.one_session;
local FLAG_WARN, FLAG_SOONER_DEADLINE = minimix.flags.warn, minimix.flags.sooner_deadline;

-- A setting read with its bounds; a bad value is logged and the default used instead.
local function integer_setting(name, default, min)
	local ok, value = pcall(module.get_option_integer, module, name, default, min);
	if not ok then
		module:log("error", "Ignoring %s: %s; using %d", name, tostring(value):match("^[^\n]*"), default);
		return default;
	end
	return value;
end

local function read_config()
	return {
		history_length = integer_setting("minimix_history_length", 20, 0);
		max_rooms = integer_setting("minimix_max_rooms", 100, 1);
		max_occupants = integer_setting("minimix_max_occupants", 1000, 1);
		max_pending_iqs = integer_setting("minimix_max_pending_iqs", 256, 1);
		iq_timeout = integer_setting("minimix_iq_timeout", 120, 1);
		excluded_hosts = module:get_option_array("minimix_excluded_hosts", {});
		excluded_rooms = module:get_option_array("minimix_excluded_rooms", {});
		test_faults = module:get_option_boolean("minimix_test_faults", false);
		self_ping_interval = integer_setting("minimix_self_ping_interval", 300, 0);
		rejoin_attempts = integer_setting("minimix_rejoin_attempts", 8, 1);
	};
end

local config = read_config();
-- nil: archive when mod_mam is loaded on this host.
local archive_setting = module:get_option_boolean("minimix_archive", nil);
-- Groupchat stored once per host (room_log.lib.lua), not once per account.
local shared_archive = module:get_option_boolean("minimix_shared_archive", true);
local bookmarks_setting = module:get_option_boolean("minimix_bookmarks", true);

-- `core` holds this host's state and its admin methods; `room_event`, `session_event`
-- and `control` are its entry points (C functions over the same state). `session_rooms`
-- is the core's index of the rooms each session takes part in,
-- `session_rooms[full_jid][room] == true`, kept up to date by the core and only read here.
local core, room_event, session_event, control, session_rooms = minimix.new(host, config, st.stanza_mt);


-- Which services are MUCs. A presence without <x xmlns='http://jabber.org/protocol/muc'/>
-- is a join only when it goes to one (SPEC, rules that always hold): else it is a directed
-- presence to a contact and not the module's. Local services are known by what they load;
-- others are asked once with disco#info (a `conference/text` identity), and the answer is
-- remembered and told to the core. `services[domain]`: true, false, or the callbacks
-- waiting for an answer.
local services, service_count = {}, 0;
local MAX_SERVICES = 10000;

local function service_known(domain, is_muc, waiting)
	if services[domain] == nil then service_count = service_count + 1; end
	services[domain] = is_muc;
	local ok, err = pcall(control, "service", domain, is_muc);
	if not ok then module:log("error", "Could not note whether %s is a MUC: %s", domain, err); end
	for _, callback in ipairs(waiting or {}) do callback(is_muc); end
end

local function has_muc_identity(reply)
	local query = reply and reply:get_child("query", NS_DISCO_INFO);
	for identity in (query and query:childtags("identity") or function () end) do
		if identity.attr.category == "conference" and identity.attr.type == "text" then
			return true;
		end
	end
	return false;
end

-- `callback(is_muc)`, at once when known, else when disco#info answers; `is_muc` is nil
-- when the service did not answer (unreachable, timeout): it is asked again next time.
local function is_muc_service(domain, callback)
	local known = services[domain];
	if type(known) == "boolean" then return callback(known); end
	if type(known) == "table" then
		known[#known + 1] = callback;
		return;
	end
	local local_host = hosts[domain];
	if local_host then
		return service_known(domain, local_host.type == "component" and local_host.modules.muc ~= nil,
			{ callback });
	end
	if domain == "" or service_count >= MAX_SERVICES then return callback(nil); end
	local waiting = { callback };
	services[domain] = waiting;
	service_count = service_count + 1;
	local query = st.iq({ type = "get", to = domain, from = host, id = new_id() }):query(NS_DISCO_INFO);
	module:send_iq(query, nil, 30):next(function (answer)
		local is_muc = has_muc_identity(answer.stanza);
		module:log("debug", "%s is %sa MUC service (disco#info)", domain, is_muc and "" or "not ");
		service_known(domain, is_muc, waiting);
	end, function (err)
		module:log("debug", "No disco#info from %s (%s): not taken for a MUC for now", domain, tostring(err));
		services[domain] = nil;
		service_count = service_count - 1;
		for _, waiter in ipairs(waiting) do waiter(nil); end
	end);
end

-- Memberships survive restarts: per account, { [room] = { nick = …, password = …,
-- joined = true|nil, got = … } }, `got` being what the account got from the room (the
-- core's Received: the last message and marks of the latest ones), so that a rejoin asks
-- for the history since then.
local store = module:open_store("minimix");
-- Host-wide: { running = <start time> } while the server runs, removed at a clean stop. A
-- start that finds it knows the last stop was not clean (a crash, kill -9): what the
-- account got since `got` was last stored is then read back from the archive.
local state_store = module:open_store("minimix_state");

-- The shared archive (set below when on), and the account's archive store while the
-- module archives (below).
local room_log, archive;

local function persist(user)
	local ok, rows = pcall(core.persisted, core, user);
	if not ok then
		module:log("error", "Could not list the memberships of %s: %s", user, rows);
		return;
	end
	local data;
	for _, row in ipairs(rows) do
		data = data or {};
		data[row.room] = { nick = row.nick, password = row.password, joined = row.joined or nil, got = row.got };
	end
	if room_log and archive() then
		-- A membership that ended ends the account's period in the room's log.
		local synced, err = pcall(room_log.sync, user, data or {});
		if not synced then module:log("error", "Could not end the archive periods of %s: %s", user, err); end
	end
	local saved, err = store:set(user, data);
	if not saved then
		module:log("error", "Could not store the memberships of %s: %s", user, err);
	end
end

-- What mod_mam does around storing (quota, expiry, "archive-message-added"), around the
-- archive store's `append` (archive_upkeep.lib.lua beside this file).
local archive_upkeep = module:require("archive_upkeep");

-- The account's own MAM archive, when archiving is on.
local modulemanager = require "prosody.core.modulemanager";
local archive_store;
function archive()
	if archive_setting == false then return nil; end
	if archive_setting == nil and not modulemanager.is_loaded(host, "mam") then
		return nil;
	end
	if not archive_store then
		archive_store = archive_upkeep.wrap(
			module:open_store(module:get_option_string("archive_store", "archive"), "archive"));
	end
	return archive_store;
end
archive_upkeep.schedule(archive);

-- The shared archive: a room's groupchat stored once per host, each account's archive read
-- as if it had been stored for it (room_log.lib.lua beside this file).
if shared_archive then
	local log_ok, log_err = pcall(function ()
		room_log = module:require("room_log")({
			archive = archive, wrap = archive_upkeep.wrap, expire_each = archive_upkeep.expire_each, bare_jids = bare_jids,
		});
	end);
	if not log_ok then
		room_log = nil;
		module:log("error", "The shared archive is off, groupchat is stored per account (room_log.lib.lua): %s",
			tostring(log_err):match("^[^\n]*"));
	elseif module:get_option_period("archive_expires_after", "1w") ~= math.huge then
		module:daily("Remove expired messages from the room logs", function ()
			if archive() then room_log.remove_expired(); end
		end);
	end
end

-- A MAM query by an occupant's full JID returns the private messages only, as without the
-- module; with the shared archive, the queries that can hold groupchat are answered from
-- the account's view (archive_queries.lib.lua beside this file).
local queries_ok, queries_err = pcall(function () module:require("archive_queries")(archive, room_log); end);
if not queries_ok then
	module:log("error", "MAM queries by a full JID return the room's groupchat too%s (archive_queries.lib.lua): %s",
		room_log and ", and the shared archive is not in query results" or "", tostring(queries_err):match("^[^\n]*"));
end

-- Whether `stanza` carries a <stanza-id/> claiming to be the archive of the account `bare`
-- (only the archive may say that). `by` is compared as mod_mam does, after JID preparation;
-- a room's own stanza-id (by the room) is told apart without it.
local function claims_archive(stanza, bare, room)
	local tags = stanza.tags;
	for i = 1, #tags do
		local tag = tags[i];
		if tag.name == "stanza-id" and tag.attr.xmlns == NS_STANZA_ID then
			local by = tag.attr.by;
			if by == bare or (by ~= room and jid_prep(by) == bare) then return true; end
		end
	end
	return false;
end

-- A copy of `stanza` to store for the account `bare`, without any <stanza-id/> claiming to
-- be the account's archive's.
local function own_copy(stanza, bare, room)
	local copy = st.clone(stanza);
	copy:maptags(function (tag)
		if tag.name == "stanza-id" and tag.attr.xmlns == NS_STANZA_ID
			and (tag.attr.by == bare or (tag.attr.by ~= room and jid_prep(tag.attr.by) == bare)) then
			return nil;
		end
		return tag;
	end);
	return copy;
end

-- Store a live message from a room once in the account's archive: returns the stanza to
-- fork and the archive's id for it (nil when it could not be stored). The stanza itself is
-- handed to the storage, which copies or serializes it before append returns (internal,
-- memory and SQL storage all do), addressed to the account's bare JID as the room sent it;
-- only when the room put a stanza-id in the account's name is a copy without it made.
local function archive_live(user, stanza)
	local store_to = archive();
	if not store_to then return stanza, nil; end
	local bare = bare_jids[user];
	stanza.attr.to = bare;
	if room_log and stanza.attr.type == "groupchat" then
		local out, id, err = room_log.store_live(user, stanza);
		if not id then
			module:log("error", "Could not archive a message from %s for %s: %s", stanza.attr.from, user, err);
		end
		return out, id;
	end
	local from = stanza.attr.from;
	local room = jid_bare(from);
	if claims_archive(stanza, bare, room) then stanza = own_copy(stanza, bare, room); end
	stanza.attr.to = bare;
	local id, err = store_to:append(user, nil, stanza, time_now(), room);
	if not id then
		module:log("error", "Could not archive a message from %s for %s: %s", from, user, err);
	end
	return stanza, id;
end

-- The archive's <stanza-id/> on the stanza to fork, for as long as it is sent: the room may
-- hand the same stanza object to other accounts after this one, so `unstamp` takes it off
-- again. Sending serializes (or copies, as mod_smacks and mod_csi_simple do) at once, so
-- one tag serves every fork, its `by` and `id` set for each (a new one only when a fork
-- is made while another is being sent).
local stamp_tag, stamp_busy = st.stanza("stanza-id", { xmlns = NS_STANZA_ID }), false;
local function stamp(stanza, user, id)
	local tag;
	if stamp_busy then
		tag = st.stanza("stanza-id", { xmlns = NS_STANZA_ID, by = bare_jids[user], id = id });
	else
		tag, stamp_busy = stamp_tag, true;
		tag.attr.by, tag.attr.id = bare_jids[user], id;
	end
	stanza:add_direct_child(tag);
	return tag;
end

local function unstamp(stanza, tag)
	if tag == stamp_tag then stamp_busy = false; end
	local tags = stanza.tags;
	if tags[#tags] == tag and stanza[#stanza] == tag then
		tags[#tags] = nil;
		stanza[#stanza] = nil;
	else
		stanza:maptags(function (t) if t == tag then return nil; end return t; end);
	end
end

-- A message a session sends to its room or to an occupant (a private message, an
-- invitation) leaves from the account, past mod_mam's hook for what sessions send. Archive
-- it as mod_mam would have: if mod_mam's own rules ("archive-should-store") say so, as the
-- session sent it, under the room's bare JID. (Groupchat is stored as the room reflects it.)
local function archive_sent(origin, stanza)
	local store_to = archive();
	if not store_to then return; end
	if not module:fire_event("archive-should-store", { stanza = stanza, session = origin }) then return; end
	local user = origin.username;
	local bare = bare_jids[user];
	local with = jid_bare(stanza.attr.to);
	local copy = own_copy(stanza, bare, with);
	local id, err = store_to:append(user, nil, copy, time_now(), with, origin);
	if not id then
		module:log("error", "Could not archive a message from %s to %s: %s", origin.full_jid, stanza.attr.to, err);
	end
end

local function carry_out(user, actions, stanza)
	local bare = bare_jids[user];
	local last_resource, full, session;
	for i = 1, #actions, 4 do
		local op, resource, out, id = actions[i], actions[i + 1], actions[i + 2], actions[i + 3];
		out = out or stanza;
		if id then out.attr.id = id; end
		if op == OP_DELIVER then
			-- Consecutive actions mostly go to the same session (a join served locally).
			if resource ~= last_resource then
				last_resource, full = resource, bare .. "/" .. resource;
				session = full_sessions[full];
			end
			if session then
				out.attr.to = full;
				session.send(out);
			end
		elseif op == OP_SEND then
			out.attr.from = bare;
			module:send(out);
		end
	end
end

-- `stanzas` (false: the stanza that came in), in order, to the session `full`.
local function deliver_all(full, stanzas, stanza)
	local session = full_sessions[full];
	if not session then return; end
	for i = 1, #stanzas do
		local out = stanzas[i] or stanza;
		out.attr.to = full;
		session.send(out);
	end
end

-- The first line of an error: errors from the core carry a Lua stack trace that says
-- nothing more to an admin than the first line does.
local function first_line(err)
	return (tostring(err):match("^[^\n]*"));
end

-- `what`: what failed, e.g. "on %s, passing it on untouched" (%s: the stanza's top tag).
local function log_error(what, stanza, err)
	module:log("error", "mod_minimix failed " .. what .. ": %s",
		stanza and stanza:top_tag() or "an event", first_line(err));
end

local function log_failure(stanza, err)
	log_error("on %s, passing it on untouched", stanza, err);
end

local function log_notes(notes, level)
	for _, note in ipairs(notes) do module:log(level, "%s", note); end
end

-- What a session sends to a room it takes part in goes out from the account. When that
-- fails, the stanza goes on untouched (from the session) as if the module were not loaded.
local function send_from_account(stanza, user)
	local from = stanza.attr.from;
	stanza.attr.from = bare_jids[user];
	local sent, err = pcall(module.send, module, stanza);
	if not sent then
		stanza.attr.from = from;
		log_error("while sending for %s, passing it on untouched", stanza, err);
		return nil;
	end
	return true;
end

-- A fork: the stanza that came in, to each of these sessions.
local function fork(recipients, stanza)
	for i = 1, #recipients do
		local full = recipients[i];
		local session = full_sessions[full];
		if session then
			stanza.attr.to = full;
			session.send(stanza);
		end
	end
end

-- Re-arms the core's timer when its next deadline came sooner (defined with the timer, below).
local rearm_timers;

-- Carries out what the core decided. The core answers
-- `handled, user, actions, notes, recipients, flags`, nothing for a stanza it leaves
-- alone, or `nil, message` when it failed (see src/bridge/reply.rs, Reply). Any failure is
-- logged and the stanza goes on as if this module were not loaded: returning nil lets
-- Prosody's own handlers take it.
local function finish(stanza, ok, handled, user, actions, notes, recipients, flags)
	if not ok or handled == nil then
		if not ok or user then log_failure(stanza, not ok and handled or user); end
		return nil;
	end
	if notes then log_notes(notes, flags & FLAG_WARN ~= 0 and "warn" or "info"); end
	local archived_id;
	if flags ~= 0 then
		if flags & FLAG_SOONER_DEADLINE ~= 0 then rearm_timers(); end
		if flags & FLAG_PERSIST ~= 0 then persist(user); end
		if flags & FLAG_ARCHIVE ~= 0 then
			local done, out, id = pcall(archive_live, user, stanza);
			if done then
				stanza, archived_id = out, id;
			else
				log_error("to archive %s", stanza, out);
			end
		end
	end
	if flags & FLAG_SEND_ORIGINAL ~= 0 then
		return send_from_account(stanza, user);
	end
	-- Sending changes the addresses of the stanza that came in; a failure puts them back
	-- and lets it go on as if this module were not loaded (some sessions may then get it
	-- twice, none loses it).
	local attr = stanza and stanza.attr; -- none for what the module does of its own accord
	local from, to = attr and attr.from, attr and attr.to;
	local stamped = archived_id and (recipients ~= nil or (actions ~= nil and actions[1] ~= nil))
		and stamp(stanza, user, archived_id);
	local sent, err = true, nil;
	if flags & FLAG_ONE_SESSION ~= 0 then
		sent, err = pcall(deliver_all, recipients, actions, stanza);
	elseif recipients then
		sent, err = pcall(fork, recipients, stanza);
	elseif actions[1] then
		sent, err = pcall(carry_out, user, actions, stanza);
	end
	if stamped then unstamp(stanza, stamped); end
	if not sent then
		if attr then attr.from, attr.to = from, to; end
		log_error("while sending for %s, passing it on untouched", stanza, err);
		return nil;
	end
	if handled then return true; end
	return nil;
end

local test_faults = config.test_faults;
local decide = module:require("session_index").decide;

-- With minimix_test_faults, a stanza carrying <fault xmlns='urn:xmpp:minimix:test-fault'
-- kind='lua-error|panic|memory'/> fails the module on purpose: a Lua error here, a panic in
-- the core, or a Lua memory error while the core's reply is made (such a stanza goes to the
-- core, whatever the index says). Every other stanza takes
-- the production path.
local function faulty(origin, stanza)
	local fault = stanza:get_child("fault", NS_TEST_FAULT);
	if fault.attr.kind == "lua-error" then
		local _, err = pcall(error, "deliberate test fault");
		log_failure(stanza, err);
		return;
	end
	return finish(stanza, pcall(session_event, origin.username, origin.resource, stanza));
end

-- A stanza one of this host's client sessions sends (a presence without `to` is the
-- session's broadcast presence, which the room sees through the account). Messages and
-- broadcast presences only concern rooms the session takes part in, so the index decides
-- them without a call into the core (lua/session_index.lib.lua: the core decides the same);
-- everything from a session in no room (one-to-one chat, most presence broadcasts) is left
-- alone at once.
local function from_session(event)
	local origin, stanza = event.origin, event.stanza;
	if origin.type ~= "c2s" or origin.host ~= host or not origin.resource then return; end
	if test_faults and stanza:get_child("fault", NS_TEST_FAULT) then
		return faulty(origin, stanza);
	end
	local what = decide(session_rooms[origin.full_jid], stanza);
	if what == "account" then
		if stanza.attr.type ~= "groupchat" then
			local archived, err = pcall(archive_sent, origin, stanza);
			if not archived then log_error("to archive %s", stanza, err); end
		end
		return send_from_account(stanza, origin.username);
	elseif what == "drop" then
		return true;
	elseif what == nil then
		return;
	end
	local to = stanza.attr.to;
	if to then
		-- Addresses on this server's VirtualHosts are accounts, never rooms.
		local to_host = jid_host(to);
		local on = hosts[to_host];
		if on and on.type == "local" then return; end
		-- A presence without <x/> to a service not known as a MUC: the core takes it for a
		-- contact's (unless the account has rooms there); learn the service for next time.
		if stanza.name == "presence" and services[to_host] == nil and not stanza.attr.type
			and to:find("/", 1, true) and not stanza:get_child("x", NS_MUC) then
			is_muc_service(to_host, function () end);
		end
	end
	return finish(stanza, pcall(session_event, origin.username, origin.resource, stanza));
end

-- A stanza for one of this host's accounts (the bare JID): what rooms send to the account.
local function to_account(event)
	local stanza = event.stanza;
	return finish(stanza, pcall(room_event, stanza));
end

-- Something the module does of its own accord (see src/bridge/entry.rs, control).
local function act(...)
	return finish(nil, pcall(control, ...));
end

-- Above mod_vcard_legacy (1, which adds the avatar hash to presence), below mod_blocklist
-- (100), before mod_presence's directed-presence tracking, mod_mam and mod_carbons (0 and
-- lower), so a stanza the account sends for a session is neither tracked, archived nor
-- copied as the session's own.
local PRIORITY_OUT = 0.5;
module:hook("pre-presence/full", from_session, PRIORITY_OUT);
module:hook("pre-presence/bare", from_session, PRIORITY_OUT);
module:hook("pre-message/full", from_session, PRIORITY_OUT);
module:hook("pre-message/bare", from_session, PRIORITY_OUT);
module:hook("pre-iq/full", from_session, PRIORITY_OUT);
module:hook("pre-iq/bare", from_session, PRIORITY_OUT);

-- Before mod_presence, mod_message and mod_iq (0), which would forward room presences to
-- every session or bounce groupchat (which makes the room kick the account), and before
-- mod_mam and mod_carbons (which would archive it per session or copy it); after
-- mod_blocklist (100), so a blocked room stays blocked.
local PRIORITY_IN = 50;
module:hook("presence/bare", to_account, PRIORITY_IN);
module:hook("message/bare", to_account, PRIORITY_IN);
module:hook("iq/bare", to_account, PRIORITY_IN);

module:hook("resource-unbind", function (event)
	local session = event.session;
	if session.host ~= host or not session.username or not session.resource then return; end
	act("ended", session.username, session.resource);
end);

-- XEP-0402 bookmarks: autojoin makes the account join, its end makes it leave.
if bookmarks_setting then
	local hooked = {};
	module:handle_items("pep-service", function (event)
		local service, user = event.item.service, jid_node(event.item.jid);
		if not user or hooked[service] then return; end
		local function published(data)
			local conference = data.item and data.item:get_child("conference", NS_BOOKMARKS);
			if not conference or not data.id then return; end
			local autojoin = conference.attr.autojoin == "true" or conference.attr.autojoin == "1";
			act("bookmark", user, data.id, conference:get_child_text("nick"),
				conference:get_child_text("password"), autojoin);
		end
		local function retracted(data)
			if data.node == NS_BOOKMARKS and data.id then
				act("bookmark", user, data.id, nil, nil, false);
			end
		end
		hooked[service] = { published = published, retracted = retracted };
		module:hook_object_event(service.events, "item-published/" .. NS_BOOKMARKS, published);
		module:hook_object_event(service.events, "item-retracted", retracted);
	end, function (event)
		local service = event.item.service;
		local h = hooked[service];
		if not h then return; end
		hooked[service] = nil;
		module:unhook_object_event(service.events, "item-published/" .. NS_BOOKMARKS, h.published);
		module:unhook_object_event(service.events, "item-retracted", h.retracted);
	end, true);
end

-- A reload keeps the core and with it every membership: nothing goes to any room.
local reloaded = false;

function module.save()
	return { core = core, room_event = room_event, session_event = session_event, control = control,
		session_rooms = session_rooms };
end

function module.restore(saved)
	if saved and saved.core and saved.room_event and saved.session_event and saved.control
		and saved.session_rooms then
		core, room_event, session_event, control = saved.core, saved.room_event, saved.session_event, saved.control;
		session_rooms = saved.session_rooms;
		reloaded = true;
	end
end

-- What the account got from a room after the last time it was stored, read back from its
-- archive (after an unclean stop): the newest messages with the room, for the core to
-- recognise when the room replays them.
local function remember_archived(user, room)
	local archive_of = archive();
	if not archive_of then return; end
	local ok, err = pcall(function ()
		local q = { with = room, reverse = true, limit = minimix.marks_kept };
		local items, find_err;
		if room_log and room_log.has_rooms(user, room) then
			items, find_err = room_log.find(user, q);
		else
			items, find_err = archive_of:find(user, q);
		end
		if not items then error(find_err or "no answer"); end
		local unread = 0;
		for _, item, when in items do
			-- Stored stanzas lose the stream's namespace: give it back for the core's parser.
			item.attr.xmlns = item.attr.xmlns or "jabber:client";
			if not core:remember(user, room, math.floor(when or 0), tostring(item)) then
				unread = unread + 1;
			end
		end
		if unread > 0 then error(("%d archived message(s) could not be read"):format(unread)); end
	end);
	if not ok then
		module:log("warn", "Could not read what %s got from %s from the archive: %s", user, room, first_line(err));
	end
end

-- After a start (not a reload), accounts rejoin the rooms they were in, asking for the
-- history since the last message they got (the core's restore). This runs once the
-- server has started (the MUC components are there) and after module.restore had its
-- chance.
local function rejoin_stored()
	if reloaded then return; end
	if not store.users then
		module:log("warn", "This storage cannot list accounts: memberships are not restored after a restart");
		return;
	end
	local last_run = state_store:get(nil);
	local unclean = type(last_run) == "table" and last_run.running ~= nil;
	if unclean then
		module:log("info", "The last stop was not clean: reading what accounts got from rooms back from the archive");
	end
	state_store:set(nil, { running = os.time() });
	local count = 0;
	for user in store:users() do
		local rooms = store:get(user);
		for room, m in pairs(rooms or {}) do
			if m.joined then
				if unclean then remember_archived(user, room); end
				act("restore", user, room, m.nick, m.password, m.got);
				count = count + 1;
			else
				-- Never confirmed by the room: stored by an older version for any directed
				-- presence, or a join still unanswered at shutdown. Rejoined only when it
				-- is on a MUC service (or the service does not answer now).
				is_muc_service(jid_host(room) or "", function (is_muc)
					if is_muc == false then
						module:log("info", "Dropping the stored membership of %s in %s: never confirmed, and %s is no MUC service",
							user, room, jid_host(room));
						local data = store:get(user);
						if data and data[room] then
							data[room] = nil;
							store:set(user, next(data) and data or nil);
						end
					else
						act("restore", user, room, m.nick, m.password, m.got);
					end
				end);
			end
		end
	end
	if count > 0 then module:log("info", "Rejoined %d stored memberships", count); end
end

-- What accounts got from rooms is stored with their memberships every
-- minimix_save_interval seconds (for the accounts where it changed) and at a clean stop,
-- not per message: a crash costs a longer replay, which the core recognises.
local save_interval = integer_setting("minimix_save_interval", 300, 1);

local function save_unsaved()
	local ok, users = pcall(core.take_unsaved, core);
	if not ok then
		log_error("listing what to store (%s)", nil, users);
		return;
	end
	for _, user in ipairs(users) do persist(user); end
end

module:add_timer(save_interval, function ()
	save_unsaved();
	return save_interval;
end);

module:hook_global("server-stopping", function ()
	save_unsaved();
	state_store:set(nil, nil);
end);

prosody.started:next(function ()
	module:add_timer(0, rejoin_stored);
end);

-- The core's timers (Host::tick): an IQ reply waited for longer than minimix_iq_timeout is
-- forgotten, so that a late one reaches no session; the account self-pings the rooms no
-- session is joined to and rejoins those it is out of after an outage (README, Outages).
-- What they make due is carried out one outcome at a time, like any other event's. Run
-- when the core says something is due, else every minimix_iq_timeout seconds (an IQ
-- proxied meanwhile is due after that).
-- The timer, the time (os.time) it is armed for, and whether it is running (it then arms
-- itself again when done).
local timer, armed_for, ticking;
local function next_run()
	local ok, deadline = pcall(core.next_deadline, core);
	if not ok then
		log_error("reading its timers (%s)", nil, deadline);
	elseif deadline then
		-- At least every minimix_iq_timeout: an IQ proxied meanwhile expires then, and
		-- proxying one does not move the core's next deadline.
		return math.max(1, math.min(deadline - os.time(), config.iq_timeout));
	end
	return config.iq_timeout;
end
local function run_timers()
	ticking = true;
	act("tick", host);
	local counted, queued = pcall(core.due_count, core);
	for _ = 1, counted and queued or 0 do
		act("due", host);
	end
	ticking = false;
	local delay = next_run();
	armed_for = os.time() + delay;
	return delay;
end
function rearm_timers()
	if ticking then return; end
	local delay = next_run();
	if armed_for and os.time() + delay >= armed_for then return; end
	if timer then timer:stop(); end
	armed_for = os.time() + delay;
	timer = module:add_timer(delay, run_timers);
end
armed_for = os.time() + config.iq_timeout;
timer = module:add_timer(config.iq_timeout, run_timers);

module:log("info", "mod_minimix %s loaded", minimix.version);

-- Admin: shell commands (minimix:memberships/room/leave) and metrics, in admin.lib.lua
-- beside this file. `core` and `control` change on reload (module.restore), so the library
-- reaches them through functions.
local admin_ok, admin_err = pcall(function ()
	module:require("admin")({ core = function () return core; end; act = function (...) return act(...); end; });
end);
if not admin_ok then
	module:log("error", "No shell commands or metrics (admin.lib.lua): %s", first_line(admin_err));
end
