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

SCENARIO=${SCENARIO:-durable-1to1}
OUT=${OUT:-/tmp/tern-stages}
# shellcheck source=benches/one-server.sh
. "$(dirname "$0")/one-server.sh"

start_server
run_peerbench "$SCENARIO" stages "${DUR:-10}" "${RATE:-0}"
"$PEERBENCH" table "$OUT/result.json" | tail -1
curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$HTTP_PORT/metrics" |
    awk -F'[{}",= ]+' '/^tern_stage_seconds\{/ && ($5 == "0.5" || $5 == "0.99" || $5 == "0.999") {
        v[$3] = v[$3] sprintf("  p%s %.2f ms", $5 * 100, $NF * 1000); if (!($3 in seen)) { seen[$3] = 1; order[n++] = $3 } }
        END { for (i = 0; i < n; i++) printf "%-6s%s\n", order[i], v[order[i]] }'
stop_server
echo "(run from $HERE; output in $OUT)"
