# shellcheck shell=bash
#
# scripts/test-services.sh — provide a PostgreSQL and a Redis for the tests.
#
# SOURCE this file from bash (it exports variables and defines functions in
# the calling shell):
#
#     . scripts/test-services.sh || exit 1
#     trap postwire_test_services_stop EXIT
#
# For each service, in this order:
#   PostgreSQL
#     1. POSTWIRE_TEST_DATABASE_URL, if already set, is used as is.
#     2. The machine's server at 127.0.0.1:5432, if `pg_isready` sees it and
#        `psql postgres://postgres@127.0.0.1:5432/postgres -c 'select 1'` works
#        (trust authentication).
#     3. Otherwise a PRIVATE throw-away instance: `initdb` into a `mktemp -d`
#        directory and `pg_ctl start` on the first free port from 55432 up,
#        listening on 127.0.0.1 only. When running as root, initdb/pg_ctl run as
#        the `postgres` system user (runuser). If no PostgreSQL binaries exist
#        and we are root, the Debian `postgresql` package is installed.
#   Redis
#     1. POSTWIRE_TEST_REDIS_URL, if already set, is used as is.
#     2. The machine's server at 127.0.0.1:6379, if it answers PING with PONG.
#     3. Otherwise a PRIVATE `redis-server` (no persistence) on the first free
#        port from 56379 up. If `redis-server` is missing and we are root, the
#        Debian `redis-server` package is installed.
#
# Exports:
#   POSTWIRE_TEST_DATABASE_URL  postgres://... URL of the PostgreSQL to use
#   POSTWIRE_TEST_REDIS_URL     redis://... URL of the Redis to use
#   POSTWIRE_PG_BIN_DIR         directory holding initdb/pg_ctl (if found)
#   POSTWIRE_REDIS_SERVER_BIN   path of redis-server (if found)
#   (the last two let tests start private instances of their own, e.g. for
#   fault injection)
#
# Defines:
#   postwire_test_services_stop  stops (and deletes) ONLY the private
#       instances started by this file. It never touches the machine's shared
#       services. An EXIT trap calling it is installed when this file is
#       sourced; callers that install their own EXIT trap must call it too.
#
# Knobs:
#   POSTWIRE_TEST_FORCE_PRIVATE=1  ignore both preset URLs and the machine's
#       services and always start private instances (used to test this file).
#
# One line per service is printed to stderr saying what is used. Returns 1
# (with a message) only when a service cannot be provided.

if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
    echo "scripts/test-services.sh must be sourced: . scripts/test-services.sh" >&2
    exit 2
fi

# Private instances started by this shell (space-separated temp dirs). Never
# trust lists inherited from another process (e.g. under `set -a`): a child
# shell must not stop its parent's instances.
if [[ "${_POSTWIRE_SERVICES_PID:-}" != "$$" ]]; then
    _POSTWIRE_SERVICES_PID=$$
    _POSTWIRE_PRIVATE_PG_DIRS=""
    _POSTWIRE_PRIVATE_REDIS_DIRS=""
fi

_postwire_log() {
    echo "test-services: $*" >&2
}

_postwire_is_root() {
    [[ "$(id -u)" == 0 ]]
}

_postwire_force_private() {
    [[ "${POSTWIRE_TEST_FORCE_PRIVATE:-0}" == 1 ]]
}

# True if something accepts TCP connections on 127.0.0.1:$1.
_postwire_port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Run a PostgreSQL server binary, as the `postgres` user when we are root
# (initdb and postgres refuse to run as root). Runs from inside $dir so the
# unprivileged user never needs access to the caller's working directory.
_postwire_pg_run() {
    local dir="$1"
    shift
    if _postwire_is_root; then
        (cd "$dir" && runuser -u "${_POSTWIRE_PG_USER:-postgres}" -- "$@")
    else
        (cd "$dir" && "$@")
    fi
}

# pg_isready against 127.0.0.1:$1, with its exit code (0 ready, 1 rejecting,
# 2 no answer, 3 no attempt made / pg_isready not found).
_postwire_pg_isready() {
    local bin
    bin="$(command -v pg_isready 2>/dev/null || true)"
    if [[ -z "$bin" && -x "${POSTWIRE_PG_BIN_DIR:-}/pg_isready" ]]; then
        bin="$POSTWIRE_PG_BIN_DIR/pg_isready"
    fi
    [[ -n "$bin" ]] || return 3
    "$bin" -q -h 127.0.0.1 -p "$1" >/dev/null 2>&1
}

# Print the directory holding both initdb and pg_ctl, if any: the newest
# /usr/lib/postgresql/*/bin first, then `pg_config --bindir`, then PATH.
_postwire_find_pg_bin_dir() {
    local dir candidates=()
    if [[ -n "${POSTWIRE_PG_BIN_DIR:-}" && -x "$POSTWIRE_PG_BIN_DIR/initdb" && -x "$POSTWIRE_PG_BIN_DIR/pg_ctl" ]]; then
        echo "$POSTWIRE_PG_BIN_DIR"
        return 0
    fi
    mapfile -t candidates < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -rV)
    if command -v pg_config >/dev/null 2>&1; then
        candidates+=("$(pg_config --bindir 2>/dev/null || true)")
    fi
    if command -v initdb >/dev/null 2>&1; then
        candidates+=("$(dirname "$(readlink -f "$(command -v initdb)")")")
    fi
    for dir in "${candidates[@]+"${candidates[@]}"}"; do
        if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

_postwire_apt_install() {
    if ! _postwire_is_root; then
        _postwire_log "package $1 is missing and we are not root: install it (apt-get install $1)"
        return 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        _postwire_log "package $1 is missing and apt-get is not available"
        return 1
    fi
    _postwire_log "installing the Debian package $1 ..."
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$1"
    } >&2
}

# ---------------------------------------------------------------- PostgreSQL

_postwire_start_private_pg() {
    local bin_dir tmp port tries=0 rc started=0
    if ! bin_dir="$(_postwire_find_pg_bin_dir)"; then
        _postwire_apt_install postgresql || return 1
        bin_dir="$(_postwire_find_pg_bin_dir)" || {
            _postwire_log "no initdb/pg_ctl found even after installing postgresql"
            return 1
        }
    fi
    export POSTWIRE_PG_BIN_DIR="$bin_dir"

    # As root, the data must live where the postgres user can reach it.
    if _postwire_is_root; then
        _POSTWIRE_PG_USER=postgres
        if ! id -u postgres >/dev/null 2>&1; then
            _postwire_log "running as root but there is no 'postgres' user to run PostgreSQL as"
            return 1
        fi
        tmp="$(mktemp -d /tmp/postwire-pg.XXXXXX)" || return 1
        chown postgres: "$tmp" || return 1
    else
        tmp="$(mktemp -d "${TMPDIR:-/tmp}/postwire-pg.XXXXXX")" || return 1
    fi
    # Registered before anything runs, so the cleanup always deletes it.
    _POSTWIRE_PRIVATE_PG_DIRS="${_POSTWIRE_PRIVATE_PG_DIRS:+$_POSTWIRE_PRIVATE_PG_DIRS }$tmp"

    if ! _postwire_pg_run "$tmp" "$bin_dir/initdb" -D "$tmp/data" -U postgres \
        --auth=trust --no-locale --encoding=UTF8 >"$tmp/initdb.log" 2>&1; then
        _postwire_log "initdb failed:"
        cat "$tmp/initdb.log" >&2
        return 1
    fi

    port=55432
    while ((tries < 50)) && ((!started)); do
        tries=$((tries + 1))
        rc=0
        _postwire_pg_isready "$port" || rc=$?
        # pg_isready exits with 2 when nothing answers at all (3: not installed).
        if [[ "$rc" != 2 && "$rc" != 3 ]] || _postwire_port_in_use "$port"; then
            port=$((port + 1))
            continue
        fi
        rm -f "$tmp/postgres.log"
        if _postwire_pg_run "$tmp" "$bin_dir/pg_ctl" -D "$tmp/data" -l "$tmp/postgres.log" \
            -w -t 60 -o "-p $port -k $tmp -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
            start >/dev/null 2>&1; then
            started=1
        elif grep -q -i "address already in use\|could not create any TCP/IP sockets" "$tmp/postgres.log" 2>/dev/null; then
            port=$((port + 1)) # lost a race for the port: try the next one
        else
            _postwire_log "pg_ctl start failed:"
            tail -n 30 "$tmp/postgres.log" >&2 2>/dev/null
            return 1
        fi
    done
    if ((!started)); then
        _postwire_log "found no free port for a private PostgreSQL (from 55432 up)"
        return 1
    fi
    echo "$port" >"$tmp/port"

    local url="postgres://postgres@127.0.0.1:$port/postgres" i
    for ((i = 0; i < 60; i++)); do
        if _postwire_pg_isready "$port"; then
            break
        fi
        sleep 0.5
    done
    if ! _postwire_pg_isready "$port"; then
        _postwire_log "the private PostgreSQL on port $port did not become ready:"
        tail -n 30 "$tmp/postgres.log" >&2 2>/dev/null
        return 1
    fi
    export POSTWIRE_TEST_DATABASE_URL="$url"
    _postwire_log "started a private PostgreSQL at $url (data in $tmp)"
}

_postwire_provide_pg() {
    local machine_url="postgres://postgres@127.0.0.1:5432/postgres"
    if ! _postwire_force_private; then
        if [[ -n "${POSTWIRE_TEST_DATABASE_URL:-}" ]]; then
            _postwire_log "using PostgreSQL from POSTWIRE_TEST_DATABASE_URL: $POSTWIRE_TEST_DATABASE_URL"
            export POSTWIRE_TEST_DATABASE_URL
            return 0
        fi
        if _postwire_pg_isready 5432; then
            if command -v psql >/dev/null 2>&1 && psql "$machine_url" -X -q -t -c 'select 1' >/dev/null 2>&1; then
                export POSTWIRE_TEST_DATABASE_URL="$machine_url"
                _postwire_log "using the machine's PostgreSQL at $machine_url"
                return 0
            fi
            _postwire_log "a PostgreSQL answers at 127.0.0.1:5432 but '$machine_url' does not accept connections; starting a private one"
        fi
    fi
    _postwire_start_private_pg
}

# --------------------------------------------------------------------- Redis

# True if a Redis at 127.0.0.1:$1 answers PING with PONG.
_postwire_redis_ping() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]]
        return
    fi
    # No redis-cli: speak the protocol over bash's /dev/tcp.
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'PING\r\n' >&3
        IFS= read -r -t 2 line <&3 || exit 1
        [[ "${line%$'\r'}" == "+PONG" ]]
    ) 2>/dev/null
}

_postwire_start_private_redis() {
    local bin tmp port tries=0 i started=0
    bin="${POSTWIRE_REDIS_SERVER_BIN:-$(command -v redis-server 2>/dev/null || true)}"
    if [[ -z "$bin" || ! -x "$bin" ]]; then
        _postwire_apt_install redis-server || return 1
        bin="$(command -v redis-server 2>/dev/null || true)"
        if [[ -z "$bin" ]]; then
            _postwire_log "no redis-server found even after installing redis-server"
            return 1
        fi
    fi
    export POSTWIRE_REDIS_SERVER_BIN="$bin"

    tmp="$(mktemp -d "${TMPDIR:-/tmp}/postwire-redis.XXXXXX")" || return 1
    _POSTWIRE_PRIVATE_REDIS_DIRS="${_POSTWIRE_PRIVATE_REDIS_DIRS:+$_POSTWIRE_PRIVATE_REDIS_DIRS }$tmp"

    port=56379
    while ((tries < 50)); do
        tries=$((tries + 1))
        if _postwire_port_in_use "$port"; then
            port=$((port + 1))
            continue
        fi
        rm -f "$tmp/redis.pid"
        if ! "$bin" --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
            --daemonize yes --pidfile "$tmp/redis.pid" --dir "$tmp" \
            --logfile "$tmp/redis.log" >/dev/null 2>&1; then
            _postwire_log "redis-server failed to start:"
            tail -n 30 "$tmp/redis.log" >&2 2>/dev/null
            return 1
        fi
        for ((i = 0; i < 50; i++)); do
            if _postwire_redis_ping "$port"; then
                started=1
                break
            fi
            # Daemonized server gone (e.g. lost a race for the port)?
            if [[ -f "$tmp/redis.pid" ]] && ! kill -0 "$(cat "$tmp/redis.pid")" 2>/dev/null; then
                break
            fi
            sleep 0.2
        done
        if ((started)); then
            break
        fi
        if grep -q -i "address already in use" "$tmp/redis.log" 2>/dev/null; then
            port=$((port + 1))
            continue
        fi
        _postwire_log "the private Redis on port $port did not answer:"
        tail -n 30 "$tmp/redis.log" >&2 2>/dev/null
        return 1
    done
    if ((!started)); then
        _postwire_log "found no free port for a private Redis (56379-56428)"
        return 1
    fi
    echo "$port" >"$tmp/port"
    export POSTWIRE_TEST_REDIS_URL="redis://127.0.0.1:$port"
    _postwire_log "started a private Redis at $POSTWIRE_TEST_REDIS_URL (files in $tmp)"
}

_postwire_provide_redis() {
    if ! _postwire_force_private; then
        if [[ -n "${POSTWIRE_TEST_REDIS_URL:-}" ]]; then
            _postwire_log "using Redis from POSTWIRE_TEST_REDIS_URL: $POSTWIRE_TEST_REDIS_URL"
            export POSTWIRE_TEST_REDIS_URL
            return 0
        fi
        if _postwire_redis_ping 6379; then
            export POSTWIRE_TEST_REDIS_URL="redis://127.0.0.1:6379"
            _postwire_log "using the machine's Redis at $POSTWIRE_TEST_REDIS_URL"
            return 0
        fi
    fi
    _postwire_start_private_redis
}

# ------------------------------------------------------------------- cleanup

# Stop and delete the private instances started above (and nothing else).
# Safe to call more than once.
postwire_test_services_stop() {
    local dir pid port i
    for dir in ${_POSTWIRE_PRIVATE_REDIS_DIRS:-}; do
        if [[ -f "$dir/redis.pid" ]]; then
            pid="$(cat "$dir/redis.pid" 2>/dev/null || true)"
            # Only signal the process if it still is a redis-server.
            if [[ -n "$pid" ]] && grep -q redis-server "/proc/$pid/cmdline" 2>/dev/null; then
                kill "$pid" 2>/dev/null || true
                for ((i = 0; i < 50; i++)); do
                    kill -0 "$pid" 2>/dev/null || break
                    sleep 0.1
                done
                kill -9 "$pid" 2>/dev/null || true
            fi
        fi
        if [[ -f "$dir/port" ]]; then
            port="$(cat "$dir/port")"
            if [[ "${POSTWIRE_TEST_REDIS_URL:-}" == "redis://127.0.0.1:$port" ]]; then
                unset POSTWIRE_TEST_REDIS_URL
            fi
            _postwire_log "stopped the private Redis on port $port"
        fi
        rm -rf "$dir"
    done
    _POSTWIRE_PRIVATE_REDIS_DIRS=""

    for dir in ${_POSTWIRE_PRIVATE_PG_DIRS:-}; do
        if [[ -f "$dir/data/postmaster.pid" && -n "${POSTWIRE_PG_BIN_DIR:-}" ]]; then
            _postwire_pg_run "$dir" "$POSTWIRE_PG_BIN_DIR/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
                _postwire_pg_run "$dir" "$POSTWIRE_PG_BIN_DIR/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
                _postwire_log "could not stop the private PostgreSQL in $dir"
        fi
        if [[ -f "$dir/port" ]]; then
            port="$(cat "$dir/port")"
            if [[ "${POSTWIRE_TEST_DATABASE_URL:-}" == "postgres://postgres@127.0.0.1:$port/postgres" ]]; then
                unset POSTWIRE_TEST_DATABASE_URL
            fi
            _postwire_log "stopped the private PostgreSQL on port $port"
        fi
        rm -rf "$dir"
    done
    _POSTWIRE_PRIVATE_PG_DIRS=""
    return 0
}

# ---------------------------------------------------------------------- main

_postwire_test_services_main() {
    local found
    # Binaries for tests that start instances of their own.
    if found="$(_postwire_find_pg_bin_dir)"; then
        export POSTWIRE_PG_BIN_DIR="$found"
    fi
    if [[ -z "${POSTWIRE_REDIS_SERVER_BIN:-}" ]] && found="$(command -v redis-server 2>/dev/null)"; then
        export POSTWIRE_REDIS_SERVER_BIN="$found"
    fi

    if ! _postwire_provide_pg; then
        _postwire_log "ERROR: cannot provide a PostgreSQL for the tests (set POSTWIRE_TEST_DATABASE_URL to use an existing one)"
        return 1
    fi
    if ! _postwire_provide_redis; then
        _postwire_log "ERROR: cannot provide a Redis for the tests (set POSTWIRE_TEST_REDIS_URL to use an existing one)"
        return 1
    fi
    return 0
}

# Installed before anything starts, so a failure half-way still cleans up.
trap postwire_test_services_stop EXIT

_postwire_test_services_main || return 1
