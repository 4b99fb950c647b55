-- Start and stop a real Prosody for integration tests.
--
--   local Server = require "spec.helpers.server"
--   local srv = Server.start{ module = false }   -- srv.port, srv.dir, srv.host, srv.muc_host
--   ...
--   Server.stop_all()                           -- from teardown()/finally()
--
-- Server.start(opts) options (all optional):
--   module = true          load "minimix" on the VirtualHost (false: plain Prosody)
--   plugin_path            dir holding mod_minimix/mod_minimix.lua (default
--                          $MINIMIX_PLUGIN_PATH, else <repo>/build)
--   host, muc_host         "localhost", "conference.localhost"
--   accounts               { user = password }, default alice/bob/carol/dave with "pass"
--   modules, options       extra modules_enabled / options for the VirtualHost
--                          (e.g. smacks_hibernation_time, default 60; minimix_* settings)
--   muc_modules, muc_options   the same for the MUC component
--   global_options         extra/overriding global options
--   components             more components: a list of { host =, plugin = "muc", options =,
--                          modules = }; without `plugin` and with `secret` an external
--                          (XEP-0114) component, served on srv.component_port
--   log_level ("debug"), http (true: give http_ports a free port, srv.http_port),
--   port (default: a free one), start_timeout (10 s)
--   vhosts                 more VirtualHosts on the same server: a list of { host =,
--                          accounts = (default: the same four), modules =, options =,
--                          module = (default false; true loads "minimix" there too) }
--   s2s                    true or { port =, pins = { [domain] = port } }: server-to-server
--                          on 127.0.0.1:port (srv.s2s_port; default a free one) with
--                          mod_dialback, no TLS, s2s_secure_auth and s2s_require_encryption
--                          off, and spec/modules/mod_test_s2s_pin on every host: outgoing
--                          s2s to a domain in `pins` goes to 127.0.0.1:<its port>, to any
--                          other domain nowhere (no DNS query ever leaves the machine)
--
-- Server.federation{ home = opts, remote = opts } starts two servers that reach each other
-- over s2s (every domain of each pinned to its s2s port in the other's config) and
-- returns home, remote. srv:domains() lists the domains a server serves.
--
-- Every server gets a fresh temp dir holding its config (prosody.cfg.lua), data_path
-- (data/), log (prosody.log) and stdout/stderr (stdout.log). Accounts are written straight
-- into data/ in the format mod_auth_internal_plain reads, so start-up stays fast.
--
-- Prosody runs under a small supervising shell that waits for it (so no zombie outlives it)
-- and kills it if the test process (busted) goes away without calling stop().
--
-- PROSODY=/path/to/prosody selects the executable: an installed one (its CFG_SOURCEDIR
-- points at the libraries) or a source checkout (run from inside it with the Lua its
-- ./configure chose, or $PROSODY_LUA); scripts/prosody-cmd.sh decides, for everything
-- that starts Prosody or prosodyctl (Server.prosody_command). Temp dirs are removed by stop_all()/destroy() unless
-- MINIMIX_KEEP_TMP is set.

local socket = require "socket"

local Server = {}
Server.__index = Server

local running = {} -- every started server object, so stop_all() can find them

local function sh_quote(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function capture(cmd)
	local f = assert(io.popen(cmd, "r"))
	local out = f:read("a")
	local ok, _, code = f:close()
	return out, ok, code
end

local function read_file(path)
	local f = io.open(path, "r")
	if not f then return nil end
	local data = f:read("a")
	f:close()
	return data
end

local function write_file(path, data)
	local f = assert(io.open(path, "w"))
	assert(f:write(data))
	assert(f:close())
end

local function dirname(path)
	return path:match("^(.*)/[^/]*$") or "."
end

local function realpath(path)
	local out = capture("readlink -f " .. sh_quote(path))
	out = out:gsub("%s+$", "")
	return out ~= "" and out or path
end

-- The repository root: two levels above this file.
local function repo_root()
	local src = debug.getinfo(1, "S").source:gsub("^@", "")
	if src:sub(1, 1) ~= "/" then
		src = capture("pwd"):gsub("%s+$", "") .. "/" .. src
	end
	return realpath(dirname(src) .. "/../..")
end

---------------------------------------------------------------------------
-- Locating Prosody

-- How to run the Prosody under test, as scripts/prosody-cmd.sh (the one place that tells an
-- installed Prosody from a source tree) prints it: kind, cwd, lua, libdir, argv. PROSODY and
-- PROSODY_LUA are read here (os.getenv) and handed to the script, asked once per value.
local command_cache = {}
local function prosody_info(name)
	local exe, lua = os.getenv("PROSODY") or "", os.getenv("PROSODY_LUA") or ""
	local key = table.concat({ name, exe, lua }, "\0")
	if not command_cache[key] then
		local cmd = ("PROSODY=%s PROSODY_LUA=%s %s --print %s 2>&1"):format(sh_quote(exe), sh_quote(lua),
			sh_quote(repo_root() .. "/scripts/prosody-cmd.sh"), name)
		local out, ok = capture(cmd)
		assert(ok, "scripts/prosody-cmd.sh: " .. out)
		local info = {}
		for line in out:gmatch("[^\n]+") do
			local k, v = line:match("^(%w+)=(.*)$")
			if k then info[k] = v end
		end
		assert(info.kind and info.cwd and info.argv and info.libdir, "scripts/prosody-cmd.sh: " .. out)
		command_cache[key] = info
	end
	return command_cache[key]
end

--- How the Prosody under test runs `name` ("prosody" or "prosodyctl"): a table with kind
--- ("installed" or "source"), cwd, lua, libdir and argv (shell-quoted words to run from cwd).
function Server.prosody_command(name)
	return prosody_info(name or "prosody")
end

--- A shell command line that runs `name` ("prosody"/"prosodyctl") with the shell-quoted
--- `args` (a string) from the right folder.
function Server.prosody_shell_command(name, args)
	local info = prosody_info(name)
	return ("cd %s && %s %s"):format(sh_quote(info.cwd), info.argv, args or "")
end

--- Directory holding Prosody's util/, core/, net/ (and loader.lua on 0.12+/13).
function Server.prosody_lib_dir()
	return prosody_info("prosody").libdir
end

-- Make that Prosody's libraries loadable here (util.stanza and the rest, as
-- `require "util.stanza"`); returns their folder.
function Server.use_prosody_libraries()
	local libdir = Server.prosody_lib_dir()
	if not package.path:find(libdir .. "/?.lua", 1, true) then
		package.path = libdir .. "/?.lua;" .. package.path
		package.cpath = libdir .. "/?.so;" .. package.cpath
	end
	pcall(require, "loader") -- Prosody 13 modules require "prosody.util.*"; loader maps them
	return libdir
end

---------------------------------------------------------------------------
-- Processes

local function sleep(s) socket.sleep(s) end

local function alive(pid)
	local stat = read_file("/proc/" .. pid .. "/stat")
	if stat then
		return not stat:match("^%d+ %b() [ZX]")
	end
	return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true
end

local function signal(pid, sig)
	os.execute(("kill -%s %d 2>/dev/null"):format(sig, pid))
end

local function wait_dead(pid, timeout)
	local deadline = socket.gettime() + timeout
	while alive(pid) do
		if socket.gettime() > deadline then return false end
		sleep(0.05)
	end
	return true
end

local function my_pid()
	local stat = assert(read_file("/proc/self/stat"), "needs /proc")
	return tonumber(stat:match("^(%d+)"))
end

local function free_port()
	local s = assert(socket.bind("127.0.0.1", 0))
	local _, port = s:getsockname()
	s:close()
	return tonumber(port)
end

local function port_open(port)
	local c = socket.tcp()
	c:settimeout(0.2)
	local ok = c:connect("127.0.0.1", port)
	c:close()
	return ok ~= nil
end

---------------------------------------------------------------------------
-- Config

local function is_identifier(k)
	return type(k) == "string" and k:match("^[%a_][%w_]*$") ~= nil
end

-- Serialise a Lua value (numbers, strings, booleans, nested tables) as Lua source.
local function serialise(v)
	local t = type(v)
	if t == "string" then
		return ("%q"):format(v)
	elseif t == "number" then
		return math.type(v) == "integer" and tostring(v) or ("%.17g"):format(v)
	elseif t == "boolean" or t == "nil" then
		return tostring(v)
	elseif t == "table" then
		local parts, n = {}, #v
		for i = 1, n do parts[#parts + 1] = serialise(v[i]) end
		local keys = {}
		for k in pairs(v) do
			if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
		end
		table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
		for _, k in ipairs(keys) do
			local key = is_identifier(k) and k or ("[" .. serialise(k) .. "]")
			parts[#parts + 1] = key .. " = " .. serialise(v[k])
		end
		return "{ " .. table.concat(parts, ", ") .. " }"
	end
	error("cannot serialise a " .. t .. " into the Prosody config")
end

local function option_lines(options, indent)
	local keys = {}
	for k in pairs(options) do
		assert(is_identifier(k), "config option names must be identifiers: " .. tostring(k))
		keys[#keys + 1] = k
	end
	table.sort(keys)
	local lines = {}
	for _, k in ipairs(keys) do
		lines[#lines + 1] = indent .. k .. " = " .. serialise(options[k])
	end
	return table.concat(lines, "\n")
end

-- Modules every test server needs on top of Prosody's autoloaded ones
-- (presence, message, iq, offline, c2s; s2s is disabled below).
Server.base_modules = {
	"saslauth",    -- SASL PLAIN and resource binding
	"roster",      -- jabber:iq:roster; presence broadcast reads the roster
	"disco",       -- service discovery on the VirtualHost
	"ping",        -- XEP-0199, handy liveness check
	"smacks",      -- XEP-0198 stream management and hibernation
	"admin_shell", -- server:shell(); pulls in admin_socket (data/prosody.sock)
}

local function merge(a, b)
	local out = {}
	for k, v in pairs(a or {}) do out[k] = v end
	for k, v in pairs(b or {}) do out[k] = v end
	return out
end

local function list_concat(...)
	local out = {}
	for i = 1, select("#", ...) do
		for _, v in ipairs(select(i, ...) or {}) do out[#out + 1] = v end
	end
	return out
end

-- The spec/modules folder: test-only Prosody modules (mod_test_s2s_pin).
local function spec_modules_dir()
	return repo_root() .. "/spec/modules"
end

function Server:write_config()
	local o = self.opts
	local global = {
		pidfile = self.dir .. "/prosody.pid",
		data_path = self.dir .. "/data",
		plugin_paths = { o.plugin_path },
		interfaces = { "127.0.0.1" },
		local_interfaces = { "127.0.0.1" },
		c2s_ports = { self.port },
		c2s_direct_tls_ports = {},
		legacy_ssl_ports = {},
		s2s_ports = {},
		http_ports = { self.http_port },
		component_ports = { self.component_port },
		https_ports = {},
		c2s_require_encryption = false,
		s2s_require_encryption = false,
		allow_unencrypted_plain_auth = true,
		authentication = "internal_plain",
		storage = "internal",
		log = { { levels = { min = o.log_level }, to = "file", filename = self.dir .. "/prosody.log" } },
		modules_enabled = Server.base_modules,
		modules_disabled = { "s2s", "s2s_auth_certs" },
	}
	if self.is_root then global.run_as_root = true end
	local pin = {} -- the pinning module, for every host's modules_enabled when s2s is on
	if self.s2s_port then
		global.plugin_paths = { o.plugin_path, spec_modules_dir() }
		global.s2s_ports = { self.s2s_port }
		global.s2s_secure_auth = false
		global.s2s_require_encryption = false
		global.test_s2s_pins = o.s2s_pins
		global.modules_enabled = list_concat(Server.base_modules, { "dialback" })
		global.modules_disabled = { "s2s_auth_certs" }
		pin = { "test_s2s_pin" }
	end
	global = merge(global, o.global_options)

	local vhost = merge({ smacks_hibernation_time = 60 }, o.options)
	vhost.modules_enabled = list_concat(o.module and { "minimix" } or {}, o.modules, pin)

	local muc = merge({ restrict_room_creation = false }, o.muc_options)
	muc.modules_enabled = list_concat(o.muc_modules, pin)

	local cfg = table.concat({
		"-- Generated by spec/helpers/server.lua",
		option_lines(global, ""),
		"",
		"VirtualHost " .. serialise(self.host),
		option_lines(vhost, "\t"),
		"",
	}, "\n")
	for _, v in ipairs(o.vhosts) do
		local options = merge({ smacks_hibernation_time = 60 }, v.options)
		options.modules_enabled = list_concat(v.module and { "minimix" } or {}, v.modules, pin)
		cfg = cfg .. table.concat({
			"VirtualHost " .. serialise(v.host),
			option_lines(options, "\t"),
			"",
		}, "\n")
	end
	cfg = cfg .. table.concat({
		"Component " .. serialise(self.muc_host) .. ' "muc"',
		option_lines(muc, "\t"),
		"",
	}, "\n")
	for _, c in ipairs(o.components or {}) do
		local options = merge(c.plugin and {} or { component_secret = c.secret }, c.options)
		options.modules_enabled = list_concat(c.modules, c.plugin and pin or nil)
		cfg = cfg .. table.concat({
			"Component " .. serialise(c.host) .. (c.plugin and (" " .. serialise(c.plugin)) or ""),
			option_lines(options, "\t"),
			"",
		}, "\n")
	end
	write_file(self.config, cfg)
end

-- datamanager's file name encoding: every non-alphanumeric char as %xx.
local function dm_encode(s)
	return (s:gsub("%W", function(c) return ("%%%02x"):format(c:byte()) end))
end

--- How Prosody's file storage names a host, store or user in data/ (every
--- non-alphanumeric char as %xx): srv.dir .. "/data/" .. Server.dm_encode(host) .. "/...".
Server.dm_encode = dm_encode

local function write_host_accounts(data_dir, host, accounts)
	local dir = data_dir .. "/" .. dm_encode(host) .. "/accounts"
	os.execute("mkdir -p " .. sh_quote(dir))
	for user, password in pairs(accounts) do
		write_file(dir .. "/" .. dm_encode(user) .. ".dat",
			("return {\n\t[\"password\"] = %s;\n};\n"):format(serialise(password)))
	end
end

function Server:write_accounts()
	-- certs/ only exists so certmanager does not log an error about a missing dir
	os.execute("mkdir -p " .. sh_quote(self.dir .. "/certs"))
	write_host_accounts(self.dir .. "/data", self.host, self.opts.accounts)
	for _, v in ipairs(self.opts.vhosts) do
		write_host_accounts(self.dir .. "/data", v.host, v.accounts or Server.default_accounts())
	end
end

--- Every domain this server serves: the VirtualHosts, the MUC and the other internal
--- components (external ones are left out).
function Server:domains()
	local o = self.opts
	local list = { self.host }
	for _, v in ipairs(o.vhosts) do list[#list + 1] = v.host end
	list[#list + 1] = self.muc_host
	for _, c in ipairs(o.components) do
		if c.plugin then list[#list + 1] = c.host end
	end
	return list
end

---------------------------------------------------------------------------
-- Lifecycle

local function tail(text, n)
	local lines = {}
	for line in (text or ""):gmatch("[^\n]*") do lines[#lines + 1] = line end
	return table.concat(lines, "\n", math.max(1, #lines - n), #lines)
end

-- Launch Prosody under a supervising shell: it records the PID, waits for Prosody (so it is
-- reaped at once) and, in the background, kills it if the test process disappears.
function Server:launch()
	local info = prosody_info("prosody")
	local prosody, cwd = info.argv, info.cwd
	local pidfile = self.dir .. "/harness.pid"
	os.remove(pidfile)
	local script = table.concat({
		"cd " .. sh_quote(cwd) .. " || exit 1",
		("exec %s --config %s >>%s 2>&1 </dev/null &"):format(prosody, sh_quote(self.config),
			sh_quote(self.dir .. "/stdout.log")),
		"P=$!",
		("echo $P > %s.tmp && mv %s.tmp %s"):format(sh_quote(pidfile), sh_quote(pidfile), sh_quote(pidfile)),
		("(while kill -0 %d 2>/dev/null; do sleep 1; done; kill -TERM $P 2>/dev/null; sleep 5;"
			.. " kill -KILL $P 2>/dev/null) &"):format(my_pid()),
		"W=$!",
		"wait $P",
		"kill $W 2>/dev/null",
	}, "\n")
	os.execute("(" .. script .. "\n) >/dev/null 2>&1 </dev/null &")

	local deadline = socket.gettime() + 5
	repeat
		local pid = tonumber(read_file(pidfile) or "")
		if pid then self.pid = pid break end
		sleep(0.02)
	until socket.gettime() > deadline
	if not self.pid then error("prosody did not launch (no pid file) in " .. self.dir) end

	deadline = socket.gettime() + (self.opts.start_timeout or 10)
	while not port_open(self.port) do
		if not alive(self.pid) or socket.gettime() > deadline then
			local why = alive(self.pid) and "did not open c2s port " .. self.port or "exited"
			self:stop()
			error(("prosody %s (dir %s)\n--- stdout/stderr:\n%s\n--- log tail:\n%s"):format(why, self.dir,
				tail(read_file(self.dir .. "/stdout.log"), 20), tail(self:log(), 40)), 2)
		end
		sleep(0.05)
	end
	self.running = true
	running[self] = true
	return self
end

--- Start a Prosody; see the file header for the options. Errors (with the log tail) if
--- the c2s port never opens.
function Server.default_accounts()
	return { alice = "pass", bob = "pass", carol = "pass", dave = "pass" }
end

function Server.start(opts)
	opts = opts or {}
	local root = repo_root()
	local s2s = opts.s2s == true and {} or opts.s2s
	local o = {
		module = opts.module ~= false,
		plugin_path = opts.plugin_path or os.getenv("MINIMIX_PLUGIN_PATH") or (root .. "/build"),
		host = opts.host or "localhost",
		muc_host = opts.muc_host or "conference.localhost",
		accounts = opts.accounts or Server.default_accounts(),
		vhosts = opts.vhosts or {},
		s2s_pins = s2s and (s2s.pins or {}) or nil,
		modules = opts.modules or {},
		options = opts.options or {},
		muc_options = opts.muc_options or {},
		muc_modules = opts.muc_modules or {},
		global_options = opts.global_options or {},
		components = opts.components or {},
		log_level = opts.log_level or "debug",
		http = opts.http,
		start_timeout = opts.start_timeout,
	}
	local dir = capture("mktemp -d /tmp/minimix-spec.XXXXXX"):gsub("%s+$", "")
	assert(dir ~= "", "mktemp failed")
	local self = setmetatable({
		opts = o,
		dir = dir,
		config = dir .. "/prosody.cfg.lua",
		host = o.host,
		muc_host = o.muc_host,
		port = opts.port or free_port(),
		http_port = o.http and free_port() or nil,
		s2s_port = s2s and (s2s.port or free_port()) or nil,
		is_root = capture("id -u"):match("^0%s") ~= nil,
	}, Server)
	for _, c in ipairs(o.components) do
		if c.secret and not c.plugin then self.component_port = self.component_port or free_port() end
	end
	self:write_config()
	self:write_accounts()
	running[self] = true -- so stop_all() cleans up even if launch fails
	return self:launch()
end

-- The domains a server started with `opts` will serve, known before it starts.
local function domains_of(opts)
	local list = { opts.host or "localhost" }
	for _, v in ipairs(opts.vhosts or {}) do list[#list + 1] = v.host end
	list[#list + 1] = opts.muc_host or "conference.localhost"
	for _, c in ipairs(opts.components or {}) do
		if c.plugin then list[#list + 1] = c.host end
	end
	return list
end

--- Start two servers that reach each other over s2s on loopback: spec.home and spec.remote
--- are Server.start options (give them distinct host/muc_host). Each gets an s2s port of
--- its own and pins every domain of both servers to the right port; any other domain is
--- refused. Returns home, remote.
function Server.federation(spec)
	local home_opts, remote_opts = assert(spec.home, "needs home"), assert(spec.remote, "needs remote")
	local taken = {}
	local function port()
		local p
		repeat p = free_port() until not taken[p]
		taken[p] = true
		return p
	end
	local home_port, remote_port = port(), port()
	local pins = {}
	for _, d in ipairs(domains_of(home_opts)) do pins[d] = home_port end
	for _, d in ipairs(domains_of(remote_opts)) do
		assert(not pins[d], "both servers serve " .. d)
		pins[d] = remote_port
	end
	local function with_s2s(opts, s2s_port)
		local copy = {}
		for k, v in pairs(opts) do copy[k] = v end
		copy.s2s = { port = s2s_port, pins = pins }
		copy.port = copy.port or port()
		return copy
	end
	local remote = Server.start(with_s2s(remote_opts, remote_port))
	local home = Server.start(with_s2s(home_opts, home_port))
	return home, remote
end

--- SIGTERM, wait up to `timeout` (default 5) seconds, then SIGKILL.
function Server:stop(timeout)
	if self.pid and alive(self.pid) then
		signal(self.pid, "TERM")
		if not wait_dead(self.pid, timeout or 5) then
			signal(self.pid, "KILL")
			wait_dead(self.pid, 5)
		end
	end
	self.running = false
	return self
end

--- SIGKILL, no shutdown at all (as in a crash).
function Server:kill9()
	if self.pid and alive(self.pid) then
		signal(self.pid, "KILL")
		wait_dead(self.pid, 5)
	end
	self.running = false
	return self
end

--- Stop and start again on the same data dir, config and port.
function Server:restart()
	self:stop()
	self.pid = nil
	return self:launch()
end

--- Start again on the same data dir, config and port after stop() or kill9().
function Server:relaunch()
	assert(not (self.pid and alive(self.pid)), "relaunch() needs a stopped server")
	self.pid = nil
	return self:launch()
end

--- Evaluate Lua inside the server through the admin shell (`> code`); returns the text
--- the shell printed after "Result: " (nil if none) and the whole output.
function Server:eval(code)
	local out = self:shell("> " .. code)
	local result = out:match("\nResult: ([^\n]*)") or out:match("^Result: ([^\n]*)")
	return result, out
end

--- Stop and delete the temp dir (unless MINIMIX_KEEP_TMP is set).
function Server:destroy()
	self:stop()
	running[self] = nil
	if not os.getenv("MINIMIX_KEEP_TMP") and self.dir:match("^/tmp/minimix%-spec%.") then
		os.execute("rm -rf " .. sh_quote(self.dir))
	end
end

--- Stop (and clean up) every server started by this process.
function Server.stop_all()
	for srv in pairs(running) do srv:destroy() end
end

---------------------------------------------------------------------------
-- Inspection

function Server:log()
	return read_file(self.dir .. "/prosody.log") or ""
end

--- Lua-pattern search over the log (plain = true for a plain substring).
function Server:log_has(pattern, plain)
	return self:log():find(pattern, 1, plain) ~= nil
end

--- Log lines that look like Lua errors: error-level lines, tracebacks and the lines
--- following them. `ignore` is an optional list of Lua patterns for expected errors.
function Server:tracebacks(ignore)
	local found, in_trace = {}, false
	for line in self:log():gmatch("[^\n]+") do
		local is_entry = line:match("^%a%a%a %d%d %d%d:%d%d:%d%d ") ~= nil
		local hit = line:find("\terror\t", 1, true) or line:find("stack traceback", 1, true)
			or line:find("Traceback", 1, true) or line:find("Top-level error", 1, true)
		if hit then
			in_trace = true
		elseif is_entry then
			in_trace = false
		end
		if hit or in_trace then
			local ignored = false
			for _, pat in ipairs(ignore or {}) do
				if line:find(pat) then ignored = true break end
			end
			if not ignored then found[#found + 1] = line end
		end
	end
	return found
end

--- Run `prosodyctl --config <cfg> shell <cmd>` against the admin socket.
--- Returns the output (stdout+stderr) and whether the command succeeded.
function Server:shell(cmd)
	local out, ok = capture(Server.prosody_shell_command("prosodyctl",
		("--config %s shell %s 2>&1"):format(sh_quote(self.config), sh_quote(cmd))))
	return out, ok == true
end

-- Last resort: stop servers when the Lua state closes (busted exit) if nobody did.
Server._sentinel = setmetatable({}, { __gc = function() Server.stop_all() end })

return Server
