#!/usr/bin/env bash
# Installs what building and testing mod_minimix needs on a Debian 12 machine:
# Prosody 13 from bookworm-backports, Lua 5.4 with headers, busted, luacheck, luarocks,
# lua-unbound (Prosody's DNS resolver; without it Prosody prints a warning at every start),
# and what building Prosody trunk from source needs (make test-trunk): a C compiler, the
# ICU and OpenSSL headers (its ./configure uses ICU for IDNA unless told otherwise),
# lua-expat, lua-filesystem, lua-socket and lua-sec; valgrind (make fuzz); lua-dbi-sqlite3
# (Prosody's SQL storage on SQLite, for the archive specs and make bench).
# Quick and silent when everything is there.
# The backports source is derived from the machine's own apt sources, so no
# mirror host name is written here.
set -euo pipefail

need=()
command -v prosody >/dev/null 2>&1 || need+=(prosody)
command -v lua5.4 >/dev/null 2>&1 || need+=(lua5.4)
[ -f /usr/include/lua5.4/lua.h ] || need+=(liblua5.4-dev)
command -v busted >/dev/null 2>&1 || need+=(lua-busted)
command -v luacheck >/dev/null 2>&1 || need+=(lua-check)
[ -f /usr/bin/pkg-config ] || need+=(pkg-config)
command -v luarocks >/dev/null 2>&1 || need+=(luarocks)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v make >/dev/null 2>&1 || need+=(make)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
# Libraries: ask dpkg which of these are installed, in one call.
libs=(lua-socket lua-expat lua-filesystem lua-sec lua-unbound lua-dbi-sqlite3 libicu-dev libssl-dev libc6-dev)
have=" $(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${libs[@]}" 2>/dev/null | awk '$2 == "ii" { printf "%s ", $1 }' || true)"
for p in "${libs[@]}"; do
  case "$have" in *" $p "*) ;; *) need+=("$p") ;; esac
done

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

src=/etc/apt/sources.list.d/debian.sources
bpo=/etc/apt/sources.list.d/minimix-backports.sources
if [ ! -f "$bpo" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  if [ -f "$src" ]; then
    # Take the first stanza that lists the main "bookworm" suite and reuse its
    # URIs and keyring for bookworm-backports.
    uris=$(awk '/^URIs:/{u=$2} /^Suites:/{ for(i=2;i<=NF;i++) if($i=="bookworm"){print u; exit} }' "$src")
    keyring=$(awk '/^Signed-By:/{k=$2} /^Suites:/{ for(i=2;i<=NF;i++) if($i=="bookworm"){f=1} } f&&/^Signed-By:/{print $2; exit}' "$src")
    [ -n "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  elif [ -f /etc/apt/sources.list ]; then
    uris=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  fi
  if [ -z "${uris:-}" ]; then
    echo "install-deps: cannot find a bookworm source in the apt sources to derive backports from" >&2
    exit 1
  fi
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
    "$uris" "$keyring" | $SUDO tee "$bpo" >/dev/null
fi

$SUDO apt-get update -qq
pkgs=()
for p in "${need[@]}"; do
  if [ "$p" = prosody ]; then pkgs+=(prosody/bookworm-backports); else pkgs+=("$p"); fi
done
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
# The Debian package starts a system Prosody; the tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prosody 2>/dev/null; then
  $SUDO systemctl stop prosody || true
fi
if [ -x /etc/init.d/prosody ]; then $SUDO /etc/init.d/prosody stop >/dev/null 2>&1 || true; fi
