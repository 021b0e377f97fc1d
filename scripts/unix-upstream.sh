#!/usr/bin/env bash
# What a Unix socket to the upstream saves against loopback TCP: nginx as the upstream MCP
# server (one worker, a fixed JSON-RPC answer) listening on a TCP port of 127.0.0.1 and on a
# Unix socket, two mcp-gateways (one worker each) in front, one forwarding to
# http://127.0.0.1:PORT/mcp, one to http://unix:/...sock:/mcp, and wrk (keep-alive) through
# each in alternating rounds (each first in every other round). Reports requests/s, the gateway's CPU per request and the
# upstream's (nginx's worker), from /proc.
# Installs wrk and nginx from Debian's packages when missing. Loopback only; everything stops
# on exit.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/unix-upstream.sh [--duration S] [--rounds R] [--connections N]
  --duration S     seconds per measurement (default 4, at most 60)
  --rounds R       alternating rounds (default 3)
  --connections N  wrk connections (default 32)
USAGE
}
D=4; ROUNDS=3; C=32
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) D=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --connections) C=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$D" -le 60 ] || D=60
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/sbin
. scripts/lib/need.sh; . scripts/lib/proc.sh; . scripts/lib/nginx.sh; need wrk nginx
build
scratch

plain=$(port)
fixed_nginx "127.0.0.1:$plain" "unix:$work/up.sock"
listening "$plain"
until [ -S "$work/up.sock" ]; do sleep 0.1; done

declare -A gw_pid url
for mode in tcp unix; do
  p=$(port)
  up="http://127.0.0.1:$plain/mcp"
  [ "$mode" = unix ] && up="http://unix:$work/up.sock:/mcp"
  cat > "$work/$mode.yaml" <<YAML
server: {host: 127.0.0.1, port: $p, tcp_port: 0, metrics_port: 0, workers: 1, pin_workers: false, max_connections_per_ip: 0}
routing: {health_check_interval: 3600}
service_discovery:
  static:
    endpoints:
      default:
        - url: $up
YAML
  ./target/release/mcp-gateway -c "$work/$mode.yaml" 2> "$work/$mode.log" &
  gw_pid[$mode]=$!; pids+=("$!")
  listening "$p"
  url[$mode]="http://127.0.0.1:$p/mcp"
done

per_request() { # ticks-before ticks-after requests -> µs
  python3 -c "print(f'{($2 - $1) / $(getconf CLK_TCK) * 1e6 / $3:.1f}')"
}
echo "| round | upstream over | requests/s | gateway µs CPU/request | upstream µs CPU/request |"
echo "|---|---|---|---|---|"
for r in $(seq 1 "$ROUNDS"); do
  order="tcp unix"; [ $((r % 2)) = 0 ] && order="unix tcp" # neither always measured first
  for mode in $order; do
    g0=$(cpu_ticks "${gw_pid[$mode]}"); u0=$(cpu_ticks "$nginx_worker")
    out=$(timeout $((D + 30)) wrk -t1 -c"$C" -d"${D}s" -s scripts/mcp.lua "${url[$mode]}")
    g1=$(cpu_ticks "${gw_pid[$mode]}"); u1=$(cpu_ticks "$nginx_worker")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    grep -q 'non-2xx 0$' <<<"$out" || echo "warning: errors ($mode): $(grep -i 'non-2xx\|socket errors' <<<"$out")" >&2
    echo "| $r | $mode | $(awk '/^requests\/s:/ {print $2}' <<<"$out") | $(per_request "$g0" "$g1" "$n") | $(per_request "$u0" "$u1" "$n") |"
  done
done
echo
echo "mcp-gateway (1 worker) in front of nginx (1 worker, fixed answer) over loopback TCP and over a Unix socket; keep-alive, $C connections, $D s per run; $(nproc) cores"
