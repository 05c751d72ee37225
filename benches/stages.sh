#!/usr/bin/env bash
# One peerbench run against one tern server, then the server's own stage
# latencies from /metrics (p50, p99, p99.9 of each stage, seconds): where a
# durable message waited. Starts TERN_BIN with a temporary data dir on
# loopback, stops it by pid.
#
#   RATE=32000 TERN_BIN=target/release/tern benches/stages.sh             # durable 1:1, paced
#   RATE=0 SCENARIO=fanout benches/stages.sh                              # fan-out at the maximum
#   SERVER_FLAGS="--workers 1" RATE=32000 benches/stages.sh
#
# Alternate builds (TERN_BIN=/tmp/a, /tmp/b, /tmp/a, ...) to compare them:
# this machine swings by ±10 % at the maximum, and far more at the tail.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
TERN_BIN=${TERN_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/tern/target}/release/tern}
PEERBENCH=${PEERBENCH:-$HOME/.cache/peerbench/target/release/peerbench}
SCENARIO=${SCENARIO:-durable-1to1}
RATE=${RATE:-0}
DUR=${DUR:-10}
OUT=${OUT:-/tmp/tern-stages}
PORT=${PORT:-17700}
HTTP_PORT=${HTTP_PORT:-17780}
[ -x "$TERN_BIN" ] || { echo "no tern binary at $TERN_BIN" >&2; exit 1; }
[ -x "$PEERBENCH" ] || { echo "no peerbench at $PEERBENCH (run ../shared/peerbench/run.sh once)" >&2; exit 1; }

rm -rf "$OUT" && mkdir -p "$OUT"
# shellcheck disable=SC2086 # SERVER_FLAGS is a list of flags
"$TERN_BIN" serve --data-dir "$OUT/data" --listen "127.0.0.1:$PORT" \
    --http-listen "127.0.0.1:$HTTP_PORT" --log warn ${SERVER_FLAGS:-} >"$OUT/server.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -s "$OUT/data/admin.token" ] && break; sleep 0.1; done
TOKEN=$(cat "$OUT/data/admin.token")
"$PEERBENCH" "$SCENARIO" --target tern --addr "127.0.0.1:$PORT" --duration "$DUR" --warmup 1 \
    --drain 5 --size 256 --pairs 50 --subscribers 1000 --window 64 --rate "$RATE" \
    --server-pid "$PID" --label stages --http "127.0.0.1:$HTTP_PORT" --admin-token "$TOKEN" \
    >"$OUT/result.json" 2>"$OUT/peerbench.log"
"$PEERBENCH" table "$OUT/result.json" | tail -1
curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$HTTP_PORT/metrics" |
    awk -F'[{}",= ]+' '/^tern_stage_seconds\{/ && ($5 == "0.5" || $5 == "0.99" || $5 == "0.999") {
        v[$3] = v[$3] sprintf("  p%s %.2f ms", $5 * 100, $NF * 1000); if (!($3 in seen)) { seen[$3] = 1; order[n++] = $3 } }
        END { for (i = 0; i < n; i++) printf "%-6s%s\n", order[i], v[order[i]] }'
kill -TERM "$PID" && wait "$PID" || true
trap - EXIT
echo "(run from $HERE; output in $OUT)"
