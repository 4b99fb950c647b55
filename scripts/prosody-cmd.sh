#!/usr/bin/env bash
# How to run the Prosody under test: the one place that knows, for `make run`, `make shell`,
# the specs, the benchmarks and the soak test (spec/helpers/server.lua asks this script).
#
#   scripts/prosody-cmd.sh prosody|prosodyctl [ARGS...]   run it (exec) with ARGS
#   scripts/prosody-cmd.sh --print prosody|prosodyctl     print how, as key=value lines:
#       kind=installed|source   an installed Prosody, or a source tree run in place
#       cwd=DIR                 the working directory to run it from
#       lua=NAME                the Lua interpreter it runs on (lua5.4, luajit, ...)
#       libdir=DIR              the folder holding its core/, util/, net/ (and loader.lua)
#       argv=WORDS              the command, shell-quoted, to run from cwd
#
# PROSODY (default /usr/bin/prosody) is the `prosody` script, a name on PATH or a source
# tree's folder. An installed script has CFG_SOURCEDIR written into it and is run as it is,
# from /. A source tree (its script reads CFG_SOURCEDIR from the environment instead) is run
# from its own folder with the Lua its ./configure chose (RUNWITH in config.unix; PROSODY_LUA
# overrides; default lua5.4), since its `#!/usr/bin/env lua` may be another Lua. Because of
# that change of folder, a relative `--config FILE` argument is made absolute.
set -eu

print=""
if [ "${1:-}" = "--print" ]; then print=1; shift; fi
name=${1:-}
case "$name" in
  prosody|prosodyctl) shift ;;
  *) echo "usage: $0 [--print] prosody|prosodyctl [ARGS...]" >&2; exit 2 ;;
esac

exe=${PROSODY:-/usr/bin/prosody}
[ -d "$exe" ] && exe="$exe/prosody"
case "$exe" in
  */*) ;;
  *) exe=$(command -v "$exe") || { echo "$0: prosody executable not found: ${PROSODY:-}" >&2; exit 1; } ;;
esac
exe=$(readlink -f "$exe")
if [ ! -r "$exe" ]; then
  echo "$0: cannot read the prosody script $exe (PROSODY=${PROSODY:-})" >&2
  exit 1
fi
bindir=$(dirname "$exe")
script="$bindir/$name"

sourcedir=$(sed -n "s/^CFG_SOURCEDIR[[:space:]]*=[[:space:]]*['\"]\([^'\"]*\)['\"].*/\1/p" "$exe" | head -n 1)
if [ -n "$sourcedir" ]; then
  kind=installed
  cwd=/
  libdir=${sourcedir%/}
  lua=$(head -n 1 "$script" | sed -n 's/^#!.*[/ ]\(lua[0-9.]*\|luajit\)[[:space:]]*$/\1/p')
  cmd=("$script")
else
  kind=source
  cwd=$bindir
  libdir=$bindir
  lua=${PROSODY_LUA:-}
  if [ -z "$lua" ] && [ -f "$bindir/config.unix" ]; then
    lua=$(sed -n 's/^RUNWITH=\(.*\)$/\1/p' "$bindir/config.unix" | head -n 1)
  fi
  lua=${lua:-lua5.4}
  cmd=("$lua" "./$name")
fi

if [ -n "$print" ]; then
  echo "kind=$kind"
  echo "cwd=$cwd"
  echo "lua=$lua"
  echo "libdir=$libdir"
  printf 'argv='
  sep=""
  for word in "${cmd[@]}"; do printf "%s'%s'" "$sep" "${word//\'/\'\\\'\'}"; sep=" "; done
  echo
  exit 0
fi

args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config)
      args+=("$1")
      if [ $# -gt 1 ]; then
        case "$2" in /*) args+=("$2") ;; *) args+=("$PWD/$2") ;; esac
        shift
      fi
      ;;
    --config=*)
      value=${1#--config=}
      case "$value" in /*) args+=("$1") ;; *) args+=("--config=$PWD/$value") ;; esac
      ;;
    *) args+=("$1") ;;
  esac
  shift
done
cd "$cwd"
exec "${cmd[@]}" ${args[@]+"${args[@]}"}
