#!/usr/bin/env bash
# Prints the Cargo feature (lua54, lua53, …) for the Lua that a Prosody runs: an installed
# one (its script's #! line) or a source tree (the Lua its ./configure chose), as
# scripts/prosody-cmd.sh finds it.
# Usage: lua-feature.sh [/path/to/prosody]   (default: $PROSODY, else /usr/bin/prosody)
set -eu
here=$(dirname "$0")
[ $# -gt 0 ] && export PROSODY="$1"
interp=$("$here/prosody-cmd.sh" --print prosody 2>/dev/null | sed -n 's/^lua=//p') || interp=""
case "$interp" in
  lua5.1|lua51) echo lua51 ;;
  lua5.2|lua52) echo lua52 ;;
  lua5.3|lua53) echo lua53 ;;
  luajit*) echo luajit ;;
  *) echo lua54 ;;  # Prosody 13 and trunk run on Lua 5.4
esac
