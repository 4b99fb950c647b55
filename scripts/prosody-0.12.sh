#!/usr/bin/env bash
# Unpacks Debian bookworm's Prosody 0.12 into build/prosody-0.12 (not installed system-wide)
# and prints the path of its `prosody` script, for the spec that checks mod_minimix refuses
# to load there. Prints nothing if the package cannot be had (the spec is then pending).
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
dir="$top/build/prosody-0.12"
bin="$dir/root/usr/bin/prosody"
if [ ! -x "$bin" ]; then
  rm -rf "$dir" && mkdir -p "$dir" || exit 0
  ( cd "$dir" && apt-get download -qq prosody/bookworm >/dev/null 2>&1 ) || exit 0
  deb=$(ls "$dir"/prosody_0.12*.deb 2>/dev/null | head -n 1)
  [ -n "$deb" ] || exit 0
  dpkg -x "$deb" "$dir/root" || exit 0
  # Point the scripts at the unpacked tree instead of /usr/lib/prosody and /etc/prosody.
  for f in "$dir/root/usr/bin/prosody" "$dir/root/usr/bin/prosodyctl"; do
    sed -i -e "s|^CFG_SOURCEDIR=.*|CFG_SOURCEDIR='$dir/root/usr/lib/prosody';|" \
           -e "s|^CFG_CONFIGDIR=.*|CFG_CONFIGDIR='$dir/etc';|" \
           -e "s|^CFG_PLUGINDIR=.*|CFG_PLUGINDIR='$dir/root/usr/lib/prosody/modules/';|" "$f"
  done
  mkdir -p "$dir/etc"
fi
echo "$bin"
