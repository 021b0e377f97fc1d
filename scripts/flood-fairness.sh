#!/usr/bin/env bash
# Flood fairness: wrk measures well-behaved clients (from 127.0.0.1) with and without one source
# address (127.0.0.66) trying far more connections than max_connections_per_ip at a high rate
# (mcp-loadgen). Prints throughput and p99 for both phases and the flooded/unflooded ratio, and
# the rejections the flood caused. Loopback only; stops everything it started.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/flood-fairness.sh [--duration S] [--connections C] [--max-per-ip L] [--flood-rate R]
  --duration S     seconds per phase (default 10, at most 60)
  --connections C  wrk connections of the well-behaved clients (default 32)
  --max-per-ip L   gateway server.max_connections_per_ip (default 50)
  --flood-rate R   flood connection attempts per second (default 5000)
USAGE
}
D=10; C=32; L=50; FR=5000
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) D=$2; shift 2 ;;
    --connections) C=$2; shift 2 ;;
    --max-per-ip) L=$2; shift 2 ;;
    --flood-rate) FR=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$D" -le 60 ] || D=60
[ "$C" -lt "$L" ] || { echo "--connections must stay under --max-per-ip (wrk uses one address)" >&2; exit 64; }
cd "$(dirname "$0")/.."
. scripts/lib/need.sh; . scripts/lib/proc.sh; need wrk
build
scratch
loopback_gateway <<YAML
max_connections_per_ip: $L
# The load generator shares these cores: unpinned, like nginx's and HAProxy's workers (pinned
# workers wait for the core wrk runs on; on dedicated cores pin_workers: true is the default).
pin_workers: false
YAML

phase() { timeout $((D + 30)) wrk -t1 -c"$C" -d"${D}s" -s scripts/mcp.lua "http://$http/mcp" > "$work/$1.txt"; }
phase quiet
./target/release/mcp-loadgen --target "$http" --connections $((FR * (D + 2))) --rate "$FR" \
  --hold $((D + 2)) --sources 127.0.0.66 > "$work/flood.txt" 2>&1 &
pids+=("$!")
sleep 1
phase flooded
rq=$(awk '/^requests\/s:/ {print $2}' "$work/quiet.txt"); rf=$(awk '/^requests\/s:/ {print $2}' "$work/flooded.txt")
pq=$(awk '/^p99 latency:/ {print $3}' "$work/quiet.txt"); pf=$(awk '/^p99 latency:/ {print $3}' "$work/flooded.txt")
rej=$(curl -s "http://$admin/metrics" | awk '$1=="mcp_gateway_connections_rejected_total{frontend=\"http\",reason=\"per_ip\"}" {print $2}')
echo "| phase | requests/s | p99 (ms) |"
echo "|---|---|---|"
echo "| well-behaved only | $rq | $pq |"
echo "| with a one-address flood ($FR conn/s, limit $L per IP) | $rf | $pf |"
echo
echo "flooded/unflooded throughput: $(python3 -c "print(f'{$rf/$rq:.2f}')"); flood connections rejected per_ip: ${rej%.*}"
