# mod_minimix — build, run and test. See README.md.
#
#   make            build build/mod_minimix/ (the shim + the Rust core for the target Lua)
#   make run        install what is missing, build, start a development Prosody (Ctrl-C stops)
#   make test       install what is missing, then fmt, clippy, cargo test, luacheck, busted
#   make fuzz       the core's property tests with 100000 cases (a few minutes)
#   make install    copy build/mod_minimix/ into $(PLUGIN_DIR)
#   make rock       pack a binary LuaRocks rock into build/ (for prosodyctl install)

PROSODY ?= /usr/bin/prosody
# The Cargo feature of the Lua the target Prosody runs (lua54 for Prosody 13).
LUA_FEATURE ?= $(shell scripts/lua-feature.sh $(PROSODY))
CARGO ?= cargo
CARGO_FLAGS = --release --no-default-features --features $(LUA_FEATURE)
PREFIX ?= /usr/local
PLUGIN_DIR ?= $(PREFIX)/lib/prosody-modules
BUSTED ?= busted --lua=lua5.4
C2S_PORT ?= 5222

PLUGIN := build/mod_minimix
SO := target/release/libminimix.so

.PHONY: all build deps run test check unit spec lint install clean rock rock-build rock-install bench soak fuzz

all: build

# The shim and the Lua libraries it loads with module:require (lua/*.lib.lua).
LUA_FILES := $(notdir $(wildcard lua/*.lua))

build: $(addprefix $(PLUGIN)/,$(LUA_FILES)) $(PLUGIN)/minimix.so

$(PLUGIN)/minimix.so: Cargo.toml Cargo.lock $(wildcard src/*.rs src/*/*.rs)
	$(CARGO) build $(CARGO_FLAGS)
	mkdir -p $(PLUGIN)
	cp $(SO) $@.tmp && mv $@.tmp $@

$(PLUGIN)/%.lua: lua/%.lua
	mkdir -p $(PLUGIN)
	cp $< $@

deps:
	scripts/install-deps.sh

run: deps build
	@cfg=$$(C2S_PORT=$(C2S_PORT) scripts/dev-config.sh); \
	echo; \
	echo "Prosody with mod_minimix on 127.0.0.1:$(C2S_PORT)"; \
	echo "  accounts: alice@localhost, bob@localhost (password: pass)"; \
	echo "  rooms:    anything@conference.localhost"; \
	echo "  connect a client to 127.0.0.1 port $(C2S_PORT), no TLS, PLAIN auth; Ctrl-C stops"; \
	echo; \
	exec $(PROSODY) --config $$cfg -F

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	luacheck -q lua spec

unit:
	$(CARGO) test

# The core's property tests with many more cases (tests/properties.rs; `cargo test` runs
# 2000). FUZZ_CASES=… to change; MINIMIX_KNOWN_BUGS=all also generates known-bug inputs.
FUZZ_CASES ?= 100000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release --test properties -- --nocapture

spec: build
	PROSODY=$(PROSODY) PROSODY_012=$$(scripts/prosody-0.12.sh) $(BUSTED) spec

check: lint unit spec

test: deps
	$(MAKE) check

# Speed and memory against plain Prosody and a pure-Lua implementation (README, Performance).
# In process: Prosody's GC settings, then with 1,000 other memberships held, then Lua's
# own GC settings; memory once.
bench: deps build
	lua5.4 spec/bench/inprocess.lua
	lua5.4 spec/bench/inprocess.lua --state 1000 --memory 0
	lua5.4 spec/bench/inprocess.lua --gc lua --memory 0
	lua5.4 spec/bench/e2e.lua both 3 2000

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
