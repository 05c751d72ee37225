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
OUT=${OUT:-/tmp/tern-prof}
# shellcheck source=benches/one-server.sh
. "$(dirname "$0")/one-server.sh"

start_server
(sleep 4; perf record -F 999 -g -p "$PID" -o "$OUT/perf.data" -- sleep 6) >"$OUT/perf.log" 2>&1 &
PERF=$!
run_peerbench "$SCENARIO" prof 10 "${RATE:-0}"
wait "$PERF" || true
stop_server
"$PEERBENCH" table "$OUT/result.json" | tail -1
perf report -i "$OUT/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -8
echo "(run from $HERE; perf data in $OUT/perf.data)"
