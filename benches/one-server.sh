# Sourced by benches/prof.sh and benches/stages.sh: one tern server on
# loopback with a temporary data dir, and one peerbench run against it.
#
#   OUT=/tmp/x; . benches/one-server.sh   # checks TERN_BIN and PEERBENCH
#   start_server                          # sets PID and TOKEN; SERVER_FLAGS are passed on
#   run_peerbench SCENARIO LABEL DURATION RATE   # writes $OUT/result.json
#                                         # (PB_ARGS: more peerbench flags)
#   stop_server                           # by pid
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TERN_BIN=${TERN_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/tern/target}/release/tern}
PEERBENCH=${PEERBENCH:-$HOME/.cache/peerbench/target/release/peerbench}
PORT=${PORT:-17700}
HTTP_PORT=${HTTP_PORT:-17780}
[ -x "$TERN_BIN" ] || { echo "no tern binary at $TERN_BIN" >&2; exit 1; }
[ -x "$PEERBENCH" ] || { echo "no peerbench at $PEERBENCH (run ../shared/peerbench/run.sh once)" >&2; exit 1; }

start_server() {
    rm -rf "$OUT" && mkdir -p "$OUT"
    # shellcheck disable=SC2086 # SERVER_FLAGS is a list of flags
    "$TERN_BIN" serve --data-dir "$OUT/data" --listen "127.0.0.1:$PORT" \
        --http-listen "127.0.0.1:$HTTP_PORT" --log warn ${SERVER_FLAGS:-} >"$OUT/server.log" 2>&1 &
    PID=$!
    trap 'kill -TERM $PID 2>/dev/null || true' EXIT
    for _ in $(seq 1 100); do [ -s "$OUT/data/admin.token" ] && break; sleep 0.1; done
    TOKEN=$(cat "$OUT/data/admin.token")
}

# shellcheck disable=SC2086 # PB_ARGS is a list of flags
run_peerbench() { # scenario label duration rate
    "$PEERBENCH" "$1" --target tern --addr "127.0.0.1:$PORT" --duration "$3" --warmup 1 \
        --drain 5 --size 256 --pairs 50 --subscribers 1000 --window 64 --rate "$4" \
        --server-pid "$PID" --label "$2" --http "127.0.0.1:$HTTP_PORT" --admin-token "$TOKEN" \
        ${PB_ARGS:-} >"$OUT/result.json" 2>"$OUT/peerbench.log"
}

stop_server() {
    kill -TERM "$PID" && wait "$PID" || true
    trap - EXIT
}
