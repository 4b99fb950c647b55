-- mod_minimix admin: shell commands and metrics.
--
-- Loaded at the end of mod_minimix.lua with `module:require("admin")(api)`, so it runs in
-- the module's environment (`module` is mod_minimix's). `api` reaches the shim's state,
-- which a reload replaces, through functions:
--   api.core()      the host's core (admin methods: memberships, stats, persisted)
--   api.act(...)    the shim's `act`: `act("leave", user, room, why)` makes an account leave
--
-- Shell commands (Prosody 13 `prosodyctl shell`):
--   minimix:memberships(jid)        an account's rooms, nick and joined sessions
--   minimix:room(room_jid)          this server's accounts in a room (every host with the module)
--   minimix:leave(jid, room_jid)    make an account leave a room
--
-- Metrics (Prosody's statistics, e.g. /metrics with mod_http_openmetrics), labelled by host;
-- OpenMetrics names are `prosody_mod_minimix__<name>`: the gauges memberships,
-- joined_sessions, accounts, cached_presences, cached_messages, pending_iqs, kept_bytes and
-- the counters stanzas_forked, joins_served_locally, iqs_proxied, iqs_expired, rejoins,
-- rejoins_given_up, self_pings, self_pings_answered, self_pings_gone, self_pings_failed,
-- replayed_new, replayed_known (from the core) and errors
-- (error lines this module logs). They are read from the core when statistics are collected
-- ("stats-update"; on every scrape with `statistics_interval = "manual"`).

local jid_split = require "prosody.util.jid".split;
local jid_prep = require "prosody.util.jid".prep;
local modulemanager = require "prosody.core.modulemanager";

local host = module.host;

return function (api)
	local store = module:open_store("minimix");

	-- Every host that loads mod_minimix registers here, so minimix:room() can ask them all.
	local registry = module:shared("/*/minimix/admin");

	-- The accounts worth asking the core about: those with a session and those with stored
	-- memberships (the core stores an account's memberships as soon as it joins a room).
	local function known_accounts()
		local users = {};
		local sessions = prosody.hosts[host] and prosody.hosts[host].sessions or {};
		for user in pairs(sessions) do users[user] = true; end
		-- (a `for` over the call itself: internal storage's iterator needs its state value)
		if store.users then
			for user in store:users() do users[user] = true; end
		end
		local list = {};
		for user in pairs(users) do list[#list + 1] = user; end
		table.sort(list);
		return list;
	end

	-- { { user, nick, sessions } } of this host's accounts in `room`.
	local function members_of(room)
		local core, found = api.core(), {};
		for _, user in ipairs(known_accounts()) do
			for _, m in ipairs(core:memberships(user)) do
				if m.room == room then
					found[#found + 1] = { user = user, nick = m.nick, sessions = m.sessions };
				end
			end
		end
		return found;
	end

	local this = { members_of = members_of };
	registry[host] = this;

	-- Prosody 13.0.1's admin shell never drops a per-host command (its item-removed handler
	-- compares the handler with the host dispatcher), so an unloaded or replaced instance's
	-- commands stay callable: they refuse to run.
	local function current()
		if registry[host] ~= this or not modulemanager.is_loaded(host, "minimix") then
			return nil, "mod_minimix is not loaded on " .. host;
		end
		return true;
	end

	local function sessions_text(sessions)
		if #sessions == 0 then return "no session joined"; end
		return "sessions: " .. table.concat(sessions, ", ");
	end

	-- An account of this host from a shell argument.
	local function account(jid)
		local user, domain, resource = jid_split(jid_prep(jid) or "");
		if not user or domain ~= host or resource then
			return nil, ("'%s' is not an account of %s"):format(tostring(jid), host);
		end
		return user;
	end

	local function room_jid(jid)
		local room = jid_prep(jid or "");
		if not room or not room:find("@", 1, true) or room:find("/", 1, true) then
			return nil, ("'%s' is not a room's JID"):format(tostring(jid));
		end
		return room;
	end

	local SECTION = "minimix";
	local SECTION_DESC = "Group chats joined per account (mod_minimix)";

	module:add_item("shell-command", {
		section = SECTION;
		section_desc = SECTION_DESC;
		name = "memberships";
		desc = "Show the rooms an account is in, with its nick and the sessions that joined";
		args = { { name = "jid", type = "string" } };
		host_selector = "jid";
		handler = function (self, jid)
			local loaded, not_loaded = current();
			if not loaded then return nil, not_loaded; end
			local user, err = account(jid);
			if not user then return nil, err; end
			local print = self.session.print;
			local list = api.core():memberships(user);
			for _, m in ipairs(list) do
				print(("%s\tnick=%s\t%s"):format(m.room, m.nick, sessions_text(m.sessions)));
			end
			return true, ("%d room(s)"):format(#list);
		end;
	});

	module:add_item("shell-command", {
		section = SECTION;
		section_desc = SECTION_DESC;
		name = "leave";
		desc = "Make an account leave a room (its joined sessions get the room's leave presence)";
		args = { { name = "jid", type = "string" }, { name = "room_jid", type = "string" } };
		host_selector = "jid";
		handler = function (_, jid, room)
			local loaded, not_loaded = current();
			if not loaded then return nil, not_loaded; end
			local user, err = account(jid);
			if not user then return nil, err; end
			room, err = room_jid(room);
			if not room then return nil, err; end
			local member = false;
			for _, m in ipairs(api.core():memberships(user)) do
				if m.room == room then member = true; end
			end
			if not member then
				return nil, ("%s@%s is not in %s"):format(user, host, room);
			end
			if not api.act("leave", user, room, "asked by an admin") then
				return nil, "mod_minimix could not leave the room (see the log)";
			end
			return true, ("%s@%s leaves %s"):format(user, host, room);
		end;
	});

	-- minimix:room() is about a room, not an account, so no host can be told from its
	-- argument: it is a global command that asks every host where mod_minimix is loaded.
	-- Its handler only reads `registry`, so whichever host registered it last, it stays right.
	local room_command = {
		section = SECTION;
		section_desc = SECTION_DESC;
		name = "room";
		desc = "Show this server's accounts in a room, with nick and joined sessions";
		args = { { name = "room_jid", type = "string" } };
		handler = function (self, room)
			local err;
			room, err = room_jid(room);
			if not room then return nil, err; end
			local print = self.session.print;
			local hosts, count = {}, 0;
			for h in pairs(registry) do
				if modulemanager.is_loaded(h, "minimix") then hosts[#hosts + 1] = h; end
			end
			if #hosts == 0 then return nil, "mod_minimix is not loaded on any host"; end
			table.sort(hosts);
			for _, h in ipairs(hosts) do
				for _, m in ipairs(registry[h].members_of(room)) do
					print(("%s@%s\tnick=%s\t%s"):format(m.user, h, m.nick, sessions_text(m.sessions)));
					count = count + 1;
				end
			end
			return true, ("%d account(s) in %s"):format(count, room);
		end;
	};
	local function add_room_command()
		prosody.events.fire_event("item-added/shell-command", { source = module, item = room_command });
	end
	add_room_command();
	-- The admin shell only looks at global modules' items when it loads: tell it again.
	module:hook_global("module-loaded", function (event)
		if event.module == "admin_shell" then add_room_command(); end
	end);

	-- Metrics. Gauges and counters are set from the core's stats when statistics are
	-- collected; `errors` counts this module's error log lines as they are written.
	local gauges = {
		{ "memberships", "Memberships (account, room) held by the module" },
		{ "joined_sessions", "Client sessions joined to a room through the module" },
		{ "accounts", "Accounts with at least one membership" },
		{ "cached_presences", "Occupant presences kept for local joins" },
		{ "cached_messages", "History messages kept for local joins" },
		{ "pending_iqs", "IQs sent to rooms for a session, awaiting the reply" },
		{ "kept_bytes", "Bytes of stanza text kept for local joins" },
	};
	local counters = {
		{ "stanzas_forked", "forked", "Stanzas from rooms handed on to an account's sessions (forks, IQ replies)" },
		{ "joins_served_locally", "joins_served_locally", "Joins answered without asking the room" },
		{ "iqs_proxied", "iqs_proxied", "IQs sent to rooms from the account for a session" },
		{ "iqs_expired", "iqs_expired", "IQs whose reply was waited for longer than minimix_iq_timeout" },
		{ "rejoins", "rejoins", "Joins sent to bring an account back into a room (after a restart or an outage)" },
		{ "rejoins_given_up", "rejoins_given_up", "Rooms the module stopped rejoining after minimix_rejoin_attempts" },
		{ "self_pings", "self_pings", "Self-pings an account sent to a room no session is joined to" },
		{ "self_pings_answered", "self_pings_answered", "Self-pings that found the account still in the room" },
		{ "self_pings_gone", "self_pings_gone", "Self-pings that found the room had forgotten the account (it rejoins)" },
		{ "self_pings_failed", "self_pings_failed", "Self-pings with a network error or no answer (tried again later)" },
		{ "replayed_new", "replayed_new", "Replayed messages new to the account after a rejoin (archived, forked once)" },
		{ "replayed_known", "replayed_known", "Messages replayed after a rejoin that the account already had (dropped)" },
	};
	local set = {};
	for _, g in ipairs(gauges) do
		local metric = module:metric("gauge", g[1], "", g[2], {}):with_labels();
		set[#set + 1] = function (stats) metric:set(stats[g[1]] or 0); end;
	end
	for _, c in ipairs(counters) do
		local metric = module:metric("counter", c[1], "", c[3], {}):with_labels();
		set[#set + 1] = function (stats) metric:set(stats[c[2]] or 0); end;
	end
	module:hook_global("stats-update", function ()
		local ok, stats = pcall(function () return api.core():stats(); end);
		if not ok then
			module:log("error", "Could not read the statistics of mod_minimix: %s", tostring(stats):match("^[^\n]*"));
			return;
		end
		for _, f in ipairs(set) do f(stats); end
	end);

	local errors = module:metric("counter", "errors", "", "Error lines logged by mod_minimix", {}):with_labels();
	-- Count every error this module logs: a field on this module's own API object, found
	-- before the shared method, so every `module:log("error", ...)` of the shim goes here.
	local log = module.log;
	module.log = function (self, level, ...) -- luacheck: ignore 122
		if level == "error" then errors:add(1); end
		return log(self, level, ...);
	end;
end
