#!/usr/bin/env bash
# Files throughput: 512 MiB up and down with the release CLI, local vs s3 (moto).
set -euo pipefail
T=$HOME/.cache/tern/target/release/tern
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT
head -c $((512<<20)) /dev/urandom > "$W/f.bin"
python3 -m moto.server -H 127.0.0.1 -p 17790 >"$W/moto.log" 2>&1 &
until curl -s -o /dev/null 127.0.0.1:17790; do sleep 0.2; done
curl -s -X PUT 127.0.0.1:17790/bench >/dev/null
S3="--files-backend s3 --s3-endpoint http://127.0.0.1:17790 --s3-bucket bench --s3-path-style true --s3-access-key k --s3-secret-key s"
run() { # name, port, flags...
  local name=$1 port=$2; shift 2
  $T serve --data-dir "$W/$name" --listen 127.0.0.1:0 --http-listen 127.0.0.1:$port --admin-token t --max-file-size 1073741824 --log warn "$@" >/dev/null 2>&1 &
  local pid=$!
  until curl -s -o /dev/null 127.0.0.1:$port/healthz; do sleep 0.1; done
  for mode in proxied ${DIRECT:-}; do
    extra=""; [ "$mode" = direct ] && extra=--direct
    s=$(date +%s.%N); id=$(TERN_HTTP=127.0.0.1:$port TERN_ADMIN_TOKEN=t $T upload $extra "$W/f.bin" | python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])'); e=$(date +%s.%N)
    up=$(python3 -c "print(round(512/($e-$s)))")
    s=$(date +%s.%N); TERN_HTTP=127.0.0.1:$port TERN_ADMIN_TOKEN=t $T download $id -o "$W/out.bin"; e=$(date +%s.%N)
    down=$(python3 -c "print(round(512/($e-$s)))")
    cmp -s "$W/f.bin" "$W/out.bin"
    echo "$name upload=$mode: upload $up MiB/s, download $down MiB/s"
  done
  kill $pid; wait $pid 2>/dev/null || true
}
run local 17791
run s3-proxied 17792 $S3
DIRECT=direct run s3-direct 17793 $S3 --files-direct true
