# shellcheck shell=bash
# Helpers shared by scripts/servers and scripts/faultdb. Sourced, never run.
# The caller sets PROG (its name in messages) and `set -euo pipefail`.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# The servers belong to the machine, not to a checkout: every clone on it (CI runs
# in a fresh one) must find and reuse the same replica, PgBouncer and fault cluster
# instead of starting a second set on the same ports.
STATE="${POOL_SERVERS_DIR:-/var/lib/pool-test-servers}"
PG_USER=postgres

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit 1
}

require_root() {
	[ "$(id -u)" -eq 0 ] || die "run me as root: I install packages and start servers as the postgres user"
}

# Runs a command as the postgres user: postgres, pg_ctl, initdb and pgbouncer refuse root.
as_pg() { runuser -u "$PG_USER" -- "$@"; }

# ensure_pkgs FILE PACKAGE [FILE PACKAGE ...]: apt-get install each PACKAGE whose FILE
# is missing (a file test is much quicker than dpkg-query on the warm path).
APT_UPDATED=0
INSTALLED=() # packages this run installed
ensure_pkgs() {
	local missing=()
	while [ $# -ge 2 ]; do
		[ -e "$1" ] || missing+=("$2")
		shift 2
	done
	[ ${#missing[@]} -gt 0 ] || return 0
	log "installing ${missing[*]} (apt-get)"
	export DEBIAN_FRONTEND=noninteractive
	local out
	out=$(mktemp)
	# 9>&-: a service that a package starts must not inherit the caller's lock
	if [ "$APT_UPDATED" -eq 0 ]; then
		apt-get update -qq >"$out" 2>&1 9>&- || {
			log_tail "$out" 20
			die "apt-get update failed"
		}
		APT_UPDATED=1
	fi
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$out" 2>&1 9>&- || {
		log_tail "$out" 30
		die "apt-get install ${missing[*]} failed"
	}
	rm -f "$out"
	INSTALLED+=("${missing[@]}")
}

# Sets PG_VERSION and PGBIN, installing PostgreSQL when there is none.
pg_binaries() {
	local v
	v=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1 || true)
	if [ -z "$v" ] || [ ! -x "/usr/lib/postgresql/$v/bin/postgres" ]; then
		ensure_pkgs /nonexistent postgresql /nonexistent postgresql-client
	fi
	# The version of the Debian cluster wins when there is one.
	v=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1 || true)
	[ -n "$v" ] || v=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1 || true)
	[ -n "$v" ] && [ -x "/usr/lib/postgresql/$v/bin/postgres" ] ||
		die "no PostgreSQL binaries under /usr/lib/postgresql/${v:-?}/bin"
	# shellcheck disable=SC2034 # for the callers
	PG_VERSION=$v
	# shellcheck disable=SC2034
	PGBIN=/usr/lib/postgresql/$v/bin
}

# /var/run/postgresql goes away when the machine restarts.
ensure_pg_rundir() {
	[ -d /var/run/postgresql ] || install -d -o "$PG_USER" -g "$PG_USER" -m 2775 /var/run/postgresql
}

# ensure_state_dir DIR: DIR (under $STATE) exists, owned by postgres, and postgres can reach it.
ensure_state_dir() {
	[ -d "$STATE" ] || install -d -m 0755 "$STATE"
	[ -d "$1" ] || install -d -o "$PG_USER" -g "$PG_USER" -m "${2:-0755}" "$1"
	as_pg test -w "$1" ||
		die "the postgres user cannot write $1: make the folders above the repo traversable (chmod o+x)"
}

# sock_dir NAME: a folder for unix sockets. A socket path may not pass 107 bytes, so a
# repo in a deep folder gets one under /tmp instead.
sock_dir() {
	local d="$STATE/$1"
	if [ $((${#d} + 14)) -gt 100 ]; then
		d="/tmp/pool-$(printf %s "$STATE" | md5sum | cut -c1-10)-$1"
	fi
	printf %s "$d"
}

# write_if_changed FILE OWNER MODE: stdin becomes FILE, untouched when equal. Returns 0 if
# it wrote, 1 if FILE was already right.
write_if_changed() {
	local tmp
	tmp=$(mktemp "$1.XXXXXX")
	cat >"$tmp"
	if [ -f "$1" ] && cmp -s "$tmp" "$1"; then
		rm -f "$tmp"
		return 1
	fi
	chown "$2" "$tmp"
	chmod "$3" "$tmp"
	mv -f "$tmp" "$1"
}

# alive PID: the process exists and is not a zombie.
alive() {
	[ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || return 1
	local state
	state=$(sed -E 's/^.*\) (.).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
	[ -n "$state" ] && [ "$state" != Z ]
}

gone() { ! alive "$1"; }

# wait_until SECONDS COMMAND...: poll every 0.05 s until COMMAND succeeds.
wait_until() {
	local deadline=$((SECONDS + $1))
	shift
	until "$@"; do
		[ "$SECONDS" -lt "$deadline" ] || return 1
		sleep 0.05
	done
}

# postgres_gone DATADIR SOCKDIR PORT CLUSTER_NAME: no process of the server in DATADIR is
# left, so a new one can start there. After a kill -9 the children (titled
# "postgres: CLUSTER_NAME: ...") exit at once, but they hold the old shared memory till
# then; the postmaster stays a zombie until init reaps it (about 1.5 s here), and a new
# postmaster takes a zombie, or an unrelated process that got its pid, for a live owner
# of the lock files. So those lock files go.
postgres_gone() {
	pgrep -u "$PG_USER" -f "^postgres: $4: " >/dev/null && return 1
	local pid
	pid=$(head -n1 "$1/postmaster.pid" 2>/dev/null || true)
	if [ -z "$pid" ] || [ ! -e "/proc/$pid" ]; then
		return 0
	fi
	if ! alive "$pid" || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != postgres ]; then
		[ "$(head -n1 "$2/.s.PGSQL.$3.lock" 2>/dev/null)" != "$pid" ] || rm -f "$2/.s.PGSQL.$3.lock"
		rm -f "$1/postmaster.pid"
		return 0
	fi
	return 1
}

# The last lines of a log, for error messages.
log_tail() { [ -f "$1" ] && tail -n "${2:-15}" "$1" | sed 's/^/    /' >&2 || true; }
