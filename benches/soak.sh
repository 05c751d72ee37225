#!/usr/bin/env bash
# Durable soak: one release server, peerbench durable-1to1 paced at RATE
# msgs/s for DUR seconds (50 pairs, window 64, 256-byte payloads), with the
# server's RSS and the size of its database sampled every 60 s.
#
#   benches/soak.sh [RATE [DUR]]          # defaults: 15000 msgs/s, 1800 s
#   SERVER_FLAGS="--dedup-window 300 --default-expiry 300" benches/soak.sh
#   SCENARIO=fanout benches/soak.sh 290 600   # 290 group sends/s to 1,000 members
#
# With the default day-long dedup window the database grows for a day before
# dedup records start to expire; short windows reach the steady state within
# a 30-minute run. Needs peerbench built (../shared/peerbench/run.sh builds
# it under ~/.cache/peerbench). Loopback only; the server is stopped by pid.
set -euo pipefail
RATE=${1:-15000}
DUR=${2:-1800}
T=${TERN_BIN:-$HOME/.cache/tern/target/release/tern}
PB=${PEERBENCH:-$HOME/.cache/peerbench/target/release/peerbench}
W=$(mktemp -d -t tern-soak.XXXXXX)
PID=""
SAMPLER=""
cleanup() {
    [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null || true
    if [ -n "$PID" ]; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$W"
}
trap cleanup EXIT

# shellcheck disable=SC2086
"$T" serve --data-dir "$W/data" --listen 127.0.0.1:17711 --http-listen 127.0.0.1:17781 \
    --admin-token soak --log warn ${SERVER_FLAGS:-} >"$W/server.log" 2>&1 &
PID=$!
until curl -s -o /dev/null 127.0.0.1:17781/healthz; do sleep 0.1; done

sample() {
    # RocksDB's own view (summed over column families, MiB): the SST files,
    # the live data in them, what compaction still has to rewrite; and how
    # late the expiry sweep is.
    local m
    m=$(curl -s 127.0.0.1:17781/metrics || true)
    sum() { awk -v n="$1" 'index($0, n "{") == 1 {s += $2} END {printf "%d", s / 1048576}' <<<"$m"; }
    echo "$(date -u +%T) rss_kib=$(awk '/VmRSS/{print $2}' /proc/$PID/status)" \
        "db_kib=$(du -sk "$W/data/db" | cut -f1)" \
        "sst_mib=$(sum tern_store_sst_bytes) live_mib=$(sum tern_store_live_bytes)" \
        "pending_mib=$(sum tern_store_pending_compaction_bytes)" \
        "l0=$(awk 'index($0, "tern_store_l0_files{") == 1 {s += $2} END {print s + 0}' <<<"$m")" \
        "expiry_lag_ms=$(awk '$1 == "tern_expiry_lag_ms" {print $2}' <<<"$m")" \
        "held=$(awk '$1 == "tern_group_shares_held" {print $2}' <<<"$m")"
}
SCENARIO=${SCENARIO:-durable-1to1}
echo "start: $SCENARIO, rate $RATE msgs/s, $DUR s, server pid $PID, flags: ${SERVER_FLAGS:-none}"
(while kill -0 "$PID" 2>/dev/null; do sample; sleep 60; done) &
SAMPLER=$!

"$PB" "$SCENARIO" --target tern --addr 127.0.0.1:17711 --duration "$DUR" --warmup 1 \
    --drain 5 --size 256 --pairs 50 --subscribers 1000 --window 64 --rate "$RATE" --server-pid "$PID" \
    --http 127.0.0.1:17781 --admin-token soak 2>&1 >/dev/null | tail -3
sample
curl -s 127.0.0.1:17781/metrics | grep -E '^tern_stage_seconds\{stage="(queue|batch|sync|total)"|^tern_queue_depth'
