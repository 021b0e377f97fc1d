#!/usr/bin/env bash
# What the PROXY protocol costs the gateway: HAProxy (mode tcp) in front of two mcp-gateways on
# builtin:echo, one reached with `send-proxy-v2` (and `server.proxy_protocol_networks` naming
# HAProxy), one plain; wrk runs the same load through each in alternating rounds. Prints requests/s
# and the gateway's CPU per request (per connection with --close, where the header is read once
# per request) from /proc. Installs wrk and haproxy from Debian's packages when missing.
# Loopback only; everything stops on exit.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/proxy-protocol.sh [--duration S] [--rounds R] [--connections N] [--keep-alive]
  --duration S     seconds per measurement (default 4, at most 60)
  --rounds R       alternating rounds (default 3)
  --connections N  wrk connections (default 16)
  --keep-alive     keep connections open (default: Connection: close, one header per request)
USAGE
}
D=4; ROUNDS=3; C=16; CLOSE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) D=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --connections) C=$2; shift 2 ;;
    --keep-alive) CLOSE=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$D" -le 60 ] || D=60
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/sbin
. scripts/lib/need.sh; . scripts/lib/proc.sh; need wrk haproxy
build
scratch
declare -A gw_port lb_port gw_pid
for mode in proxy plain; do
  gw_port[$mode]=$(port); lb_port[$mode]=$(port)
  trusted=""; [ "$mode" = proxy ] && trusted=", proxy_protocol_networks: [127.0.0.1/32]"
  cat > "$work/$mode.yaml" <<YAML
server: {host: 127.0.0.1, port: ${gw_port[$mode]}, tcp_port: 0, metrics_port: 0, workers: 1, pin_workers: false, max_connections_per_ip: 0$trusted}
YAML
  ./target/release/mcp-gateway -c "$work/$mode.yaml" 2> "$work/$mode.log" &
  gw_pid[$mode]=$!; pids+=("$!")
  listening "${gw_port[$mode]}"
done
cat > "$work/haproxy.cfg" <<CFG
global
  maxconn 9000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
listen proxy
  bind 127.0.0.1:${lb_port[proxy]}
  server gw 127.0.0.1:${gw_port[proxy]} send-proxy-v2
listen plain
  bind 127.0.0.1:${lb_port[plain]}
  server gw 127.0.0.1:${gw_port[plain]}
CFG
haproxy -db -f "$work/haproxy.cfg" > "$work/haproxy.log" 2>&1 &
pids+=("$!")
listening "${lb_port[proxy]}"; listening "${lb_port[plain]}"
echo "| round | mode | requests/s | gateway µs CPU/request |"
echo "|---|---|---|---|"
for r in $(seq 1 "$ROUNDS"); do
  for mode in proxy plain; do
    t0=$(cpu_ticks "${gw_pid[$mode]}")
    out=$(CLOSE=$CLOSE timeout $((D + 30)) wrk -t1 -c"$C" -d"${D}s" -s scripts/mcp.lua "http://127.0.0.1:${lb_port[$mode]}/mcp")
    t1=$(cpu_ticks "${gw_pid[$mode]}")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    grep -q 'non-2xx 0$' <<<"$out" || echo "warning: errors ($mode): $(grep 'socket errors' <<<"$out")" >&2
    label=$([ "$mode" = proxy ] && echo "send-proxy-v2" || echo "plain")
    echo "| $r | $label | $(awk '/^requests\/s:/ {print $2}' <<<"$out") | $(python3 -c "print(f'{($t1 - $t0) / $(getconf CLK_TCK) * 1e6 / $n:.1f}')") |"
  done
done
echo
echo "HAProxy (mode tcp) in front of mcp-gateway (1 worker, builtin:echo); $([ "$CLOSE" = 1 ] && echo "Connection: close" || echo "keep-alive"), $C connections, $D s per run; $(nproc) cores"
