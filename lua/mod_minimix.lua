-- mod_minimix: group chats joined per account, forked to the account's sessions.
--
-- This file is the thin driver: it registers Prosody hooks, hands each stanza to the Rust
-- core (minimix.so, loaded from this module's directory) and carries out the actions the
-- core returns. All membership state lives in the core, one object per VirtualHost.

local st = require "prosody.util.stanza";

if module:get_host_type() ~= "local" then
	module:log("error", "mod_minimix belongs under a VirtualHost, not on %s", module.host);
	return;
end

local NS_TEST_FAULT = "urn:xmpp:minimix:test-fault";
local OP_DELIVER, OP_SEND = 1, 2;

local host = module.host;
local full_sessions = prosody.full_sessions;

local function load_core()
	local path = module:get_directory() .. "/minimix.so";
	local open, err = package.loadlib(path, "luaopen_minimix");
	if not open then
		error("mod_minimix: cannot load the Rust core from " .. path .. ": " .. tostring(err));
	end
	return open();
end

local minimix = load_core();

local function read_config()
	return {
		history_length = module:get_option_integer("minimix_history_length", 20, 0);
		max_rooms = module:get_option_integer("minimix_max_rooms", 100, 1);
		max_occupants = module:get_option_integer("minimix_max_occupants", 1000, 1);
		max_pending_iqs = module:get_option_integer("minimix_max_pending_iqs", 256, 1);
		iq_timeout = module:get_option_integer("minimix_iq_timeout", 120, 1);
		excluded_hosts = module:get_option_array("minimix_excluded_hosts", {});
		excluded_rooms = module:get_option_array("minimix_excluded_rooms", {});
		test_faults = module:get_option_boolean("minimix_test_faults", false);
	};
end

local config = read_config();
-- `core` holds this host's state; `room_event` and `session_event` are its hot entry
-- points (C functions over the same state).
local core, room_event, session_event = minimix.new(host, config, st.stanza_mt);

local function carry_out(user, actions, stanza)
	local bare = user .. "@" .. host;
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

-- The first line of an error: errors from the core carry a Lua stack trace that says
-- nothing more to an admin than the first line does.
local function first_line(err)
	return (tostring(err):match("^[^\n]*"));
end

local function log_failure(stanza, err)
	module:log("error", "mod_minimix failed on %s, passing it on untouched: %s",
		stanza and stanza:top_tag() or "an event", first_line(err));
end

-- Carries out what the core decided. The core answers `handled, user, actions, notes`
-- (or `handled, user, nil, notes, recipients` for a fork), nothing for a stanza it leaves
-- alone, or `nil, message` when it failed. Any failure is
-- logged and the stanza goes on as if this module were not loaded: returning nil lets
-- Prosody's own handlers take it.
local function finish(stanza, ok, handled, user, actions, notes, recipients)
	if not ok or handled == nil then
		if not ok or user then log_failure(stanza, not ok and handled or user); end
		return nil;
	end
	if notes then
		for _, note in ipairs(notes) do module:log("info", "%s", note); end
	end
	if recipients then
		-- A fork: the stanza that came in, to each of these sessions.
		for i = 1, #recipients do
			local full = recipients[i];
			local session = full_sessions[full];
			if session then
				stanza.attr.to = full;
				session.send(stanza);
			end
		end
	elseif user and actions[1] then
		local done, err = pcall(carry_out, user, actions, stanza);
		if not done then
			module:log("error", "mod_minimix failed while sending for %s: %s", stanza:top_tag(), first_line(err));
		end
	end
	if handled then return true; end
	return nil;
end

local function test_fault(stanza)
	local fault = stanza:get_child("fault", NS_TEST_FAULT);
	if fault and fault.attr.kind == "lua-error" then
		error("deliberate test fault");
	end
end

-- A stanza one of this host's client sessions sends.
local function from_session(event)
	local origin, stanza = event.origin, event.stanza;
	if origin.type ~= "c2s" or origin.host ~= host or not origin.resource then return; end
	if not stanza.attr.to then return; end
	if config.test_faults then
		local ok, err = pcall(test_fault, stanza);
		if not ok then
			log_failure(stanza, err);
			return;
		end
	end
	return finish(stanza, pcall(session_event, origin.username, origin.resource, stanza, os.time()));
end

-- A stanza for one of this host's accounts (the bare JID): what rooms send to the account.
local function to_account(event)
	local stanza = event.stanza;
	return finish(stanza, pcall(room_event, stanza, os.time()));
end

-- Above mod_vcard_legacy (1, which adds the avatar hash to presence), below mod_blocklist
-- (100), before mod_presence's directed-presence tracking, mod_mam and mod_carbons (0 and
-- lower), so a stanza the account sends for a session is neither tracked, archived nor
-- copied as the session's own.
local PRIORITY_OUT = 0.5;
module:hook("pre-presence/full", from_session, PRIORITY_OUT);
module:hook("pre-message/full", from_session, PRIORITY_OUT);
module:hook("pre-message/bare", from_session, PRIORITY_OUT);
module:hook("pre-iq/full", from_session, PRIORITY_OUT);
module:hook("pre-iq/bare", from_session, PRIORITY_OUT);

-- Before mod_presence, mod_message and mod_iq (0), which would forward room presences to
-- every session or bounce groupchat (which makes the room kick the account); after
-- mod_blocklist (100), so a blocked room stays blocked.
local PRIORITY_IN = 50;
module:hook("presence/bare", to_account, PRIORITY_IN);
module:hook("message/bare", to_account, PRIORITY_IN);
module:hook("iq/bare", to_account, PRIORITY_IN);

module:hook("resource-unbind", function (event)
	local session = event.session;
	if session.host ~= host or not session.username or not session.resource then return; end
	local ok, notes = pcall(core.session_ended, core, session.username, session.resource);
	if not ok then
		log_failure(nil, notes);
	elseif notes then
		for _, note in ipairs(notes) do module:log("info", "%s", note); end
	end
end);

-- A reload keeps the core object and with it every membership: nothing goes to any room.
function module.save()
	return { core = core, room_event = room_event, session_event = session_event };
end

function module.restore(saved)
	if saved and saved.core and saved.room_event and saved.session_event then
		core, room_event, session_event = saved.core, saved.room_event, saved.session_event;
	end
end

module:log("info", "mod_minimix %s loaded", minimix.version);
