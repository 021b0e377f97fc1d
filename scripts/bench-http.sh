#!/usr/bin/env bash
# HTTP throughput of mcp-gateway with wrk: JSON-RPC tools/call on POST /mcp (builtin:echo), in
# keep-alive or Connection: close mode. Starts a release gateway on a free loopback port, runs
# wrk, prints requests/s and latency percentiles, and stops the gateway.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/bench-http.sh [--connections N] [--duration S] [--threads T] [--close] [--workers W]
  --connections N  concurrent connections (default 64)
  --duration S     seconds (default 10, at most 120)
  --threads T      wrk threads (default 1)
  --close          Connection: close on every request (measures connection churn)
  --workers W      gateway workers (default 0 = one per core)
Loopback only; installs wrk from Debian's packages when missing.
USAGE
}
C=64; D=10; T=1; CLOSE=0; W=0
while [ $# -gt 0 ]; do
  case "$1" in
    --connections) C=$2; shift 2 ;;
    --duration) D=$2; shift 2 ;;
    --threads) T=$2; shift 2 ;;
    --close) CLOSE=1; shift ;;
    --workers) W=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$D" -le 120 ] || { echo "duration capped at 120 s" >&2; D=120; }
cd "$(dirname "$0")/.."
. scripts/lib/need.sh; . scripts/lib/proc.sh; need wrk
build
scratch
loopback_gateway <<YAML
workers: $W
max_connections_per_ip: 0
# The load generator shares these cores: unpinned, like nginx's and HAProxy's workers (pinned
# workers wait for the core wrk runs on; on dedicated cores pin_workers: true is the default).
pin_workers: false
YAML
mode=$([ "$CLOSE" = 1 ] && echo "Connection: close" || echo "keep-alive")
echo "mcp-gateway at $http, $mode, $C connections, $D s, $T wrk thread(s)"
CLOSE=$CLOSE timeout $((D + 30)) wrk -t"$T" -c"$C" -d"${D}s" -s scripts/mcp.lua "http://$http/mcp"
