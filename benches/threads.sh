#!/usr/bin/env bash
# Per-thread CPU (% of one core) and context switches per second of one tern
# server, over 5 s in the middle of a 10-s peerbench run (from
# /proc/PID/task/*/stat and status). Starts TERN_BIN with a temporary data
# dir on loopback, stops it by pid.
#
#   RATE=0 TERN_BIN=target/release/tern benches/threads.sh          # durable 1:1 at the maximum
#   RATE=92000 benches/threads.sh                                   # paced
#   SCENARIO=fanout RATE=400 benches/threads.sh
set -euo pipefail

SCENARIO=${SCENARIO:-durable-1to1}
OUT=${OUT:-/tmp/tern-threads}
# shellcheck source=benches/one-server.sh
. "$(dirname "$0")/one-server.sh"

# One line per thread name: name, utime+stime (ticks), voluntary and
# involuntary context switches (threads of one name summed).
snapshot() {
    for t in /proc/"$PID"/task/*; do
        printf '%s %s %s %s\n' "$(tr ' ' '_' <"$t/comm")" \
            "$(awk '{print $14 + $15}' "$t/stat")" \
            "$(awk '/^voluntary_ctxt/ {print $2}' "$t/status")" \
            "$(awk '/^nonvoluntary_ctxt/ {print $2}' "$t/status")"
    done | awk '{c[$1] += $2; v[$1] += $3; n[$1] += $4}
        END {for (k in c) print k, c[k], v[k], n[k]}' | sort
}

start_server
TICKS=$(getconf CLK_TCK)
(sleep 4; snapshot >"$OUT/before"; sleep 5; snapshot >"$OUT/after") &
SNAP=$!
run_peerbench "$SCENARIO" threads 10 "${RATE:-0}"
wait "$SNAP"
stop_server
"$PEERBENCH" table "$OUT/result.json" | tail -1
join "$OUT/before" "$OUT/after" | awk -v hz="$TICKS" '$5 > $2 || $6 > $3 {
    printf "%-16s cpu %5.1f %%  voluntary %7.0f/s  involuntary %6.0f/s\n",
        $1, ($5 - $2) * 100 / hz / 5, ($6 - $3) / 5, ($7 - $4) / 5 }'
echo "(run from $HERE; output in $OUT)"
