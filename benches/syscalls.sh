#!/usr/bin/env bash
# System calls per second of the event loops (and the load generator) in the
# middle of one peerbench run against one tern server: starts TERN_BIN with a
# temporary data dir on loopback, runs `peerbench SCENARIO` for 10 s at RATE
# (0: the maximum), counts 3 s of `recvfrom`, `sendto` and `epoll_wait` with
# `perf stat` (tracepoints: needs perf and tracefs), stops the server by pid.
#
#   RATE=40000 TERN_BIN=target/release/tern benches/syscalls.sh
#   RATE=0 SCENARIO=fanout benches/syscalls.sh
#   EVENTS=syscalls:sys_enter_sched_yield,syscalls:sys_enter_fdatasync RATE=10000 benches/syscalls.sh
set -euo pipefail

SCENARIO=${SCENARIO:-durable-1to1}
OUT=${OUT:-/tmp/tern-syscalls}
# shellcheck source=benches/one-server.sh
. "$(dirname "$0")/one-server.sh"

start_server
run_peerbench "$SCENARIO" syscalls 10 "${RATE:-0}" &
BENCH=$!
sleep 4
perf stat --per-thread -p "$PID" -o "$OUT/stat.txt" \
    -e "${EVENTS:-syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait}" \
    -- sleep 3 >/dev/null 2>&1 || true
wait "$BENCH"
stop_server
"$PEERBENCH" table "$OUT/result.json" | tail -1
# Lines are "comm-tid  count  event": the loops' counts summed, per second.
awk '$1 ~ /^tern-loop/ && $2 ~ /^[0-9,]+$/ { v = $2; gsub(",", "", v); s[$3] += v }
     END { for (e in s) printf "event loops  %-32s %8.0f/s\n", e, s[e] / 3 }' "$OUT/stat.txt" | sort
echo "(run from $HERE; output in $OUT)"
