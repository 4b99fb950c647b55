#!/usr/bin/env bash
# Prints the Cargo feature (lua54, lua53, …) for the Lua that a Prosody executable runs.
# Usage: lua-feature.sh [/path/to/prosody]
set -eu
prosody=${1:-/usr/bin/prosody}
interp=""
if [ -f "$prosody" ]; then
  interp=$(head -n 1 "$prosody" | sed -n 's/^#!.*[/ ]\(lua[0-9.]*\|luajit\)[[:space:]]*$/\1/p')
fi
case "$interp" in
  lua5.1) echo lua51 ;;
  lua5.2) echo lua52 ;;
  lua5.3) echo lua53 ;;
  luajit) echo luajit ;;
  *) echo lua54 ;;  # Prosody 13 and trunk run on Lua 5.4
esac
