# mod_minimix — build, run and test. See README.md.
#
#   make            build build/mod_minimix/ (the shim + the Rust core for the target Lua)
#   make run        install what is missing, build, start a development Prosody (Ctrl-C stops)
#   make shell      the admin shell of that server (CMD='minimix memberships alice@localhost')
#   make test       install what is missing, then fmt, clippy, cargo test, luacheck, busted
#   make test-trunk build Prosody trunk into build/prosody-trunk (once), run the specs on it
#   make trunk      only build it (then: make run PROSODY=build/prosody-trunk/prosody)
#   make fuzz       the core's property tests with 100000 cases, then the bridge under
#                   valgrind (tests/bridge.rs, spec/index_spec.lua; several minutes)
#   make install    copy build/mod_minimix/ into $(PLUGIN_DIR)
#   make rock       pack a binary LuaRocks rock into build/ (for prosodyctl install)

# The Prosody to build for and test against: an installed `prosody` script or a source
# tree's (scripts/prosody-cmd.sh runs either; every recipe below sees it in the environment).
PROSODY ?= /usr/bin/prosody
export PROSODY
# The Cargo feature of the Lua the target Prosody runs (lua54 for Prosody 13 and trunk).
LUA_FEATURE ?= $(shell scripts/lua-feature.sh $(PROSODY))
CARGO ?= cargo
CARGO_FLAGS = --release --no-default-features --features $(LUA_FEATURE)
PREFIX ?= /usr/local
PLUGIN_DIR ?= $(PREFIX)/lib/prosody-modules
BUSTED ?= busted --lua=lua5.4
C2S_PORT ?= 5222

PLUGIN := build/mod_minimix
SO := target/release/libminimix.so

.PHONY: all build deps run shell test test-trunk trunk check unit spec lint install clean rock rock-build rock-install bench soak fuzz FORCE

all: build

# The shim and the Lua libraries it loads with module:require (lua/*.lib.lua).
LUA_FILES := $(notdir $(wildcard lua/*.lua))

build: $(addprefix $(PLUGIN)/,$(LUA_FILES)) $(PLUGIN)/minimix.so

# build/lua-feature records the feature minimix.so was built for; it changes (and so
# rebuilds minimix.so) only when the target Lua does.
build/lua-feature: FORCE
	@mkdir -p build
	@echo $(LUA_FEATURE) | cmp -s - $@ || echo $(LUA_FEATURE) > $@

$(PLUGIN)/minimix.so: Cargo.toml Cargo.lock $(wildcard src/*.rs src/*/*.rs) build/lua-feature
	$(CARGO) build $(CARGO_FLAGS)
	mkdir -p $(PLUGIN)
	cp $(SO) $@.tmp && mv $@.tmp $@

$(PLUGIN)/%.lua: lua/%.lua
	mkdir -p $(PLUGIN)
	cp $< $@

deps:
	@scripts/install-deps.sh

# The development server (scripts/dev-config.sh writes build/dev/prosody.cfg.lua); it logs
# to the terminal and to build/dev/prosody.log. `make shell` talks to it while it runs.
DEV_CONFIG := $(CURDIR)/build/dev/prosody.cfg.lua

run: deps build
	@cfg=$$(C2S_PORT=$(C2S_PORT) scripts/dev-config.sh); \
	echo; \
	echo "Prosody with mod_minimix on 127.0.0.1:$(C2S_PORT) ($(PROSODY))"; \
	echo "  accounts: alice@localhost, bob@localhost (password: pass)"; \
	echo "  rooms:    anything@conference.localhost (open at once, no configuration step)"; \
	echo "  connect a client to 127.0.0.1 port $(C2S_PORT), no TLS, PLAIN auth; Ctrl-C stops"; \
	echo "  log:      here and in build/dev/prosody.log"; \
	echo "  admin:    make shell (CMD='minimix memberships alice@localhost' for one command)"; \
	echo; \
	exec scripts/prosody-cmd.sh prosody --config "$$cfg" -F

# Without CMD an interactive admin shell; with it, one command, e.g.
# make shell CMD='minimix room test@conference.localhost'. Give the PROSODY= of `make run`.
shell:
	@test -S $(CURDIR)/build/dev/data/prosody.sock || { echo "make shell: the 'make run' server is not running" >&2; exit 1; }
	@exec scripts/prosody-cmd.sh prosodyctl --config $(DEV_CONFIG) shell $(CMD)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	luacheck -q lua spec

unit:
	$(CARGO) test

# The core's property tests with many more cases (tests/properties.rs; `cargo test` runs
# 2000). FUZZ_CASES=… to change; MINIMIX_KNOWN_BUGS=all also generates known-bug inputs.
# Then what drives the bridge's C API without a server runs once under valgrind's memcheck
# and fails on any error it reports (invalid reads and writes, uses of uninitialised
# memory, bad frees, and memory definitely or indirectly lost at exit): the Rust bridge
# tests (tests/bridge.rs, cargo's runner set to valgrind) and spec/index_spec.lua with the
# built minimix.so (busted in the same process: --ignore-lua keeps it from re-executing
# itself). spec/valgrind.supp holds what is not ours, each entry saying why.
FUZZ_CASES ?= 100000
VALGRIND ?= valgrind --quiet --error-exitcode=99 --leak-check=full \
	--show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect \
	--keep-debuginfo=yes --suppressions=spec/valgrind.supp
fuzz: deps build
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release --test properties -- --nocapture
	$(CARGO) test --test bridge --config "target.'cfg(all())'.runner = '$(VALGRIND)'"
	$(VALGRIND) $(LUA) $$(command -v busted) --ignore-lua spec/index_spec.lua

spec: build
	PROSODY=$(PROSODY) PROSODY_012=$$(scripts/prosody-0.12.sh) $(BUSTED) spec

check: lint unit spec

test: deps
	$(MAKE) check

# Prosody trunk from the snapshot in ../shared/prosody (or TRUNK_TARBALL=…), unpacked and
# built in build/prosody-trunk once (the stamp file marks a finished build), then the whole
# busted suite against it. `make test PROSODY=/path/to/checkout/prosody` tests any other.
TRUNK_TARBALL ?= ../shared/prosody/prosody-trunk-f14f1b331.tar.gz
TRUNK := build/prosody-trunk
TRUNK_STAMP := $(TRUNK)/.minimix-built

$(TRUNK_TARBALL):
	@echo "make test-trunk: no Prosody trunk snapshot at $@ (TRUNK_TARBALL=… names another)" >&2; exit 1

$(TRUNK_STAMP): $(TRUNK_TARBALL) | deps
	@echo "Building Prosody trunk from $(TRUNK_TARBALL) in $(TRUNK) (once)"
	rm -rf $(TRUNK)
	mkdir -p $(TRUNK)
	tar -xzf $(TRUNK_TARBALL) -C $(TRUNK) --strip-components=1
	cd $(TRUNK) && ./configure --ostype=debian --lua-version=5.4 >configure.log 2>&1 \
		|| { cat configure.log; exit 1; }
	env -u MAKEFLAGS -u MAKELEVEL make -C $(TRUNK) >$(TRUNK)/make.log 2>&1 \
		|| { tail -n 40 $(TRUNK)/make.log; exit 1; }
	touch $@

trunk: $(TRUNK_STAMP)

test-trunk: $(TRUNK_STAMP)
	$(MAKE) spec PROSODY=$(CURDIR)/$(TRUNK)/prosody

# Speed and memory against plain Prosody and a pure-Lua implementation (README, Performance).
# In process: Prosody's GC settings, then with 1,000 other memberships held, then Lua's
# own GC settings; memory once. The storage's own append, timed inside Prosody. End to
# end: both shapes and mod_mam's floor (the chat shape), archives on Prosody's files, then
# on SQLite (fewer messages: every archived copy is a transaction). Then the MAM queries
# clients send, on a shared-archive host and a per-account one with the same traffic.
bench: deps build
	lua5.4 spec/bench/inprocess.lua
	lua5.4 spec/bench/inprocess.lua --state 1000 --memory 0
	lua5.4 spec/bench/inprocess.lua --gc lua --memory 0
	lua5.4 spec/bench/storage.lua
	lua5.4 spec/bench/e2e.lua multi,single,chat 3 2000 plain,minimix,minimix+archive,peraccount:minimix+archive,nostore:minimix+archive internal
	lua5.4 spec/bench/e2e.lua fed 3 1000 plain,minimix,minimix+archive,peraccount:minimix+archive,nostore:minimix+archive internal
	lua5.4 spec/bench/e2e.lua multi,single,chat 3 1000 plain,minimix,minimix+archive,peraccount:minimix+archive sqlite
	lua5.4 spec/bench/queries.lua

# Soak: 300 sessions of 100 accounts in 30 rooms, 20,000 messages, join/leave/disconnect
# churn; every delivery checked, server RSS before and after (README, Reliability).
soak: deps build
	PROSODY=$(PROSODY) lua5.4 spec/load/soak.lua

install: build
	install -d $(DESTDIR)$(PLUGIN_DIR)/mod_minimix
	install -m 0644 $(addprefix $(PLUGIN)/,$(LUA_FILES)) $(DESTDIR)$(PLUGIN_DIR)/mod_minimix/
	install -m 0755 $(PLUGIN)/minimix.so $(DESTDIR)$(PLUGIN_DIR)/mod_minimix/

# LuaRocks (mod_minimix-scm-1.rockspec): `luarocks make` runs rock-build, then rock-install
# with the rock's LUADIR; Prosody finds share/lua/5.x/mod_minimix/ in a luarocks tree.
LUA ?= lua5.4
rock-build:
	$(MAKE) build LUA_FEATURE=$$($(LUA) -e 'print(jit and "luajit" or "lua5" .. _VERSION:sub(-1))')

rock-install:
	install -d $(LUADIR)/mod_minimix
	install -m 0644 $(addprefix $(PLUGIN)/,$(LUA_FILES)) $(LUADIR)/mod_minimix/
	install -m 0755 $(PLUGIN)/minimix.so $(LUADIR)/mod_minimix/

# `make rock`: install into a scratch tree, pack that (LuaRocks 3.8's --pack-binary-rock
# installs a "make" rock's files elsewhere), and name the rock for its arch: minimix.so sits
# beside the Lua files, so LuaRocks would label it "all".
ROCKS = luarocks --lua-version=$$($(LUA) -e 'print(_VERSION:sub(-3))')
rock:
	rm -rf build/rock-tree
	$(ROCKS) make --tree $(CURDIR)/build/rock-tree mod_minimix-scm-1.rockspec
	cd build && $(ROCKS) --tree $(CURDIR)/build/rock-tree pack mod_minimix \
		&& mv mod_minimix-scm-1.all.rock mod_minimix-scm-1.$$($(ROCKS) config arch).rock
	rm -rf build/rock-tree

clean:
	rm -rf build
	$(CARGO) clean
