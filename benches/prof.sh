#!/usr/bin/env bash
# One profiled peerbench run against one tern server: starts TERN_BIN with a
# temporary data dir on loopback, runs `peerbench SCENARIO` at the maximum
# rate for 10 s, records 6 s of its middle with `perf record -g` (software
# clock: works in containers), stops the server by pid and prints the
# result line, then the share of samples per thread.
#
#   TERN_BIN=target/release/tern benches/prof.sh durable-1to1
#   TERN_BIN=/tmp/tern-a benches/prof.sh fanout; TERN_BIN=/tmp/tern-b benches/prof.sh fanout
#   RATE=32000 benches/prof.sh durable-1to1   # paced (msgs/s in all), not the maximum
#   perf report -i "$OUT/perf.data" --no-children --comm tern-commit-w --sort sym
#
# Alternate two builds a few times to compare them: this machine swings by
# ±10 % from one minute to the next. Needs perf and peerbench built
# (../shared/peerbench/run.sh builds it under ~/.cache/peerbench).
set -euo pipefail

SCENARIO=${1:-durable-1to1}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TERN_BIN=${TERN_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/tern/target}/release/tern}
PEERBENCH=${PEERBENCH:-$HOME/.cache/peerbench/target/release/peerbench}
OUT=${OUT:-/tmp/tern-prof}
PORT=${PORT:-17700}
HTTP_PORT=${HTTP_PORT:-17780}
[ -x "$TERN_BIN" ] || { echo "no tern binary at $TERN_BIN" >&2; exit 1; }
[ -x "$PEERBENCH" ] || { echo "no peerbench at $PEERBENCH (run ../shared/peerbench/run.sh once)" >&2; exit 1; }

rm -rf "$OUT" && mkdir -p "$OUT"
"$TERN_BIN" serve --data-dir "$OUT/data" --listen "127.0.0.1:$PORT" \
    --http-listen "127.0.0.1:$HTTP_PORT" --log warn >"$OUT/server.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -s "$OUT/data/admin.token" ] && break; sleep 0.1; done
TOKEN=$(cat "$OUT/data/admin.token")
(sleep 4; perf record -F 999 -g -p "$PID" -o "$OUT/perf.data" -- sleep 6) >"$OUT/perf.log" 2>&1 &
PERF=$!
"$PEERBENCH" "$SCENARIO" --target tern --addr "127.0.0.1:$PORT" --duration 10 --warmup 1 \
    --drain 5 --size 256 --pairs 50 --subscribers 1000 --window 64 --rate "${RATE:-0}" \
    --server-pid "$PID" --label prof --http "127.0.0.1:$HTTP_PORT" --admin-token "$TOKEN" \
    >"$OUT/result.json" 2>"$OUT/peerbench.log"
wait "$PERF" || true
kill -TERM "$PID" && wait "$PID" || true
trap - EXIT
"$PEERBENCH" table "$OUT/result.json" | tail -1
perf report -i "$OUT/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -8
echo "(run from $HERE; perf data in $OUT/perf.data)"
