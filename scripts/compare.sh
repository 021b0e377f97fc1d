#!/usr/bin/env bash
# Side by side: mcp-gateway, nginx (limit_conn per IP) and HAProxy (maxconn, stick table on src
# with conn_cur), same limits, run alternately in one invocation, one markdown table with ratios
# against nginx.
#
# Mode "proxy" (default): all three forward the JSON-RPC POST to the same upstream MCP server (a
# second mcp-gateway answering from builtin:echo, one unpinned worker) over keep-alive upstream
# connections: mcp-gateway with its forwarding, nginx with proxy_pass and an upstream keepalive
# pool, HAProxy with http-reuse. Mode "direct": every server answers the POST itself
# (builtin:echo, `return 200`, `http-request return`), which compares the front doors alone.
# Per server: keep-alive requests/s, p99 and CPU per request (the server's own processes, from
# /proc), Connection: close requests/s and CPU per request, memory per idle connection, and the
# throughput kept under a one-address flood.
# Installs nginx, haproxy and wrk from Debian's packages when missing. Loopback only.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/compare.sh [--mode proxy|direct] [--duration S] [--connections C] [--idle N] [--max-per-ip L] [--rounds R] [--workers W]
  --mode M         proxy (default): forward to one shared upstream; direct: answer locally
  --duration S     seconds per throughput measurement (default 5, at most 60)
  --connections C  wrk connections (default 32; must stay under --max-per-ip)
  --idle N         idle connections for the memory measurement (default 8000; HAProxy gets
                   maxconn 9900, as it reserves two descriptors per connection)
  --max-per-ip L   per-IP limit on every server (default 50)
  --rounds R       alternating rounds; the table shows the best of them (default 1)
  --workers W      workers of each server: mcp-gateway's workers, nginx's worker_processes,
                   HAProxy's nbthread (default 2, one per core of the 2-core machine)
USAGE
}
D=5; C=32; IDLE=8000; L=50; ROUNDS=1; MODE=proxy; W=2
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) MODE=$2; shift 2 ;;
    --duration) D=$2; shift 2 ;;
    --connections) C=$2; shift 2 ;;
    --idle) IDLE=$2; shift 2 ;;
    --max-per-ip) L=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --workers) W=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$D" -le 60 ] || D=60
case "$MODE" in proxy|direct) ;; *) usage; exit 64 ;; esac
[[ "$W" =~ ^[1-9][0-9]*$ ]] || { echo "--workers must be a positive number" >&2; exit 64; }
[ "$C" -lt "$L" ] || { echo "--connections must stay under --max-per-ip (wrk uses one address)" >&2; exit 64; }
cd "$(dirname "$0")/.."
. scripts/lib/need.sh; . scripts/lib/proc.sh; need nginx haproxy wrk
build
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx/nginx.pid" ] && kill -QUIT "$(cat "$work/nginx/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ANSWER='{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello"}],"isError":false}}'

# The shared upstream (proxy mode): an MCP server answering from builtin:echo.
uport=$(port)
if [ "$MODE" = proxy ]; then
  cat > "$work/up.yaml" <<YAML
server:
  host: 127.0.0.1
  port: $uport
  tcp_port: 0
  metrics_port: 0
  workers: 1
  pin_workers: false
  max_connections_per_ip: 0
  idle_timeout: 600
YAML
  ./target/release/mcp-gateway -c "$work/up.yaml" 2> "$work/up.log" &
  pids+=("$!")
  until grep -q listening "$work/up.log"; do sleep 0.1; done
  GW_UPSTREAMS="routing:
  health_check_interval: 60
service_discovery:
  static:
    endpoints:
      default:
        - url: http://127.0.0.1:$uport/mcp"
  NGINX_MCP="proxy_pass http://mcp; proxy_http_version 1.1; proxy_set_header Connection \"\";"
  HAPROXY_MCP="default_backend up
backend up
  http-reuse always
  server up 127.0.0.1:$uport"
else
  GW_UPSTREAMS=""
  NGINX_MCP="default_type application/json; return 200 '$ANSWER';"
  HAPROXY_MCP="http-request return status 200 content-type application/json string '$ANSWER'"
fi

# mcp-gateway
gport=$(port); gmetrics=$(port)
cat > "$work/gw.yaml" <<YAML
server:
  host: 127.0.0.1
  port: $gport
  tcp_port: 0
  metrics_port: $gmetrics
  max_connections: 19000
  max_connections_per_ip: $L
  workers: $W
  # The load generator shares these cores: unpinned, like nginx's and HAProxy's workers (pinned
  # workers wait for the core wrk runs on; on dedicated cores pin_workers: true is the default).
  pin_workers: false
  idle_timeout: 600
$GW_UPSTREAMS
YAML
./target/release/mcp-gateway -c "$work/gw.yaml" 2> "$work/gw.log" &
gw=$!; pids+=("$gw")
# nginx
nport=$(port); mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes $W;
worker_rlimit_nofile 20000;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log crit;
events { worker_connections 19000; }
http {
  access_log off;
  keepalive_timeout 600;
  keepalive_requests 100000000;
  limit_conn_zone \$binary_remote_addr zone=perip:10m;
  limit_conn_status 429;
  upstream mcp { server 127.0.0.1:$uport; keepalive 64; }
  server {
    listen 127.0.0.1:$nport reuseport;
    limit_conn perip $L;
    location /mcp { $NGINX_MCP }
  }
}
CONF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log"
# HAProxy
hport=$(port)
cat > "$work/haproxy.cfg" <<CFG
global
  maxconn 9900
  ulimit-n 20000
  nbthread $W
defaults
  mode http
  timeout client 600s
  timeout connect 5s
  timeout server 30s
  timeout http-keep-alive 600s
frontend fe
  bind 127.0.0.1:$hport
  maxconn 9900
  stick-table type ip size 100k store conn_cur
  tcp-request connection track-sc0 src
  http-request deny deny_status 429 if { sc0_conn_cur gt $L }
  $HAPROXY_MCP
CFG
haproxy -f "$work/haproxy.cfg" -q &
hp=$!; pids+=("$hp")
until grep -q listening "$work/gw.log" && [ -s "$work/nginx/nginx.pid" ]; do sleep 0.1; done
for p in $gport $nport $hport; do # every server answers before anything is measured
  ok=0
  for _ in $(seq 50); do
    if curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' -d '{"jsonrpc":"2.0","id":1,"method":"ping"}' "http://127.0.0.1:$p/mcp" | grep -q 200; then ok=1; break; fi
    sleep 0.1
  done
  [ $ok = 1 ] || { echo "server on port $p does not answer 200 (mcp-gateway $gport, nginx $nport, haproxy $hport)" >&2; cat "$work"/*.log "$work"/*.cfg "$work"/nginx/*.conf >&2 2>/dev/null; exit 1; }
done
nginx_pids() { pgrep -P "$(cat "$work/nginx/nginx.pid")" | tr '\n' ' '; }
declare -A PORT=([mcp-gateway]=$gport [nginx]=$nport [haproxy]=$hport)
servers=(mcp-gateway nginx haproxy)
pids_of() { case "$1" in mcp-gateway) echo "$gw" ;; nginx) nginx_pids ;; haproxy) echo "$hp" ;; esac; }

wrk_run() { # server mode -> "req/s p99ms cpu-us-per-request" (the server's own processes' CPU)
  local out t0 t1 rps
  # shellcheck disable=SC2046 # one pid per word
  t0=$(cpu_ticks $(pids_of "$1"))
  out=$(CLOSE=$2 timeout $((D + 30)) wrk -t1 -c"$C" -d"${D}s" -s scripts/mcp.lua "http://127.0.0.1:${PORT[$1]}/mcp")
  # shellcheck disable=SC2046
  t1=$(cpu_ticks $(pids_of "$1"))
  rps=$(awk '/^requests\/s:/ {print $2}' <<<"$out")
  echo "$rps $(awk '/^p99 latency:/ {print $3}' <<<"$out") $(python3 -c "print(f'{($t1-$t0)*1e6/$TCK/($rps*$D):.1f}' if $rps else 0)")"
}
idle_bytes() { # server round -> bytes per idle connection
  # Warm up (buffer pools, allocator arenas; for mcp-gateway, a wave of idle connections that
  # park, as the measured ones do, big enough that it gives freed memory back once the wave
  # ends: see scripts/idle-memory.sh), then measure the growth for $IDLE idle connections.
  local settle=() warm=200
  [ "$1" = mcp-gateway ] && settle=(--settle-url "http://127.0.0.1:$gmetrics/metrics") && warm=2000
  python3 scripts/hold_connections.py --port "${PORT[$1]}" --connections "$warm" --sources 48 --hold 0 "${settle[@]}" >/dev/null
  python3 scripts/hold_connections.py --port "${PORT[$1]}" --connections "$IDLE" \
    --sources $(( IDLE / (L - 1) + 1 )) --measure-pids "$(pids_of "$1" | xargs | tr ' ' ',')" "${settle[@]}" |
    sed -E 's/.*: (-?[0-9]+) bytes per idle connection.*/\1/'
}
flood_kept() { # throughput with a one-address flood / without
  local quiet flooded f
  quiet=$(wrk_run "$1" 0 | cut -d' ' -f1)
  ./target/release/mcp-loadgen --target "127.0.0.1:${PORT[$1]}" --connections $((3000 * (D + 2))) --rate 3000 \
    --hold $((D + 2)) --sources 127.0.0.66 > /dev/null 2>&1 &
  f=$!
  sleep 1
  flooded=$(wrk_run "$1" 0 | cut -d' ' -f1)
  kill "$f" 2>/dev/null; wait "$f" 2>/dev/null || true
  python3 -c "print(f'{$flooded/$quiet:.2f}')"
}
declare -A KA KAP KACPU CL CLCPU MEM FL
TCK=$(getconf CLK_TCK)
first() { echo "$1"; } # memory: the first round's (later rounds reuse memory freed by earlier runs)
best() { python3 -c "import sys; a=[float(x) for x in sys.argv[2:] if x]; print(max(a) if sys.argv[1]=='max' else min(a))" "$@"; }
for round in $(seq 1 "$ROUNDS"); do
  # Memory first: after the throughput runs, allocators hold freed memory that idle connections
  # would reuse without growing the RSS.
  for s in "${servers[@]}"; do MEM[$s]="${MEM[$s]:-} $(idle_bytes "$s" "$round")"; done
  for s in "${servers[@]}"; do
    read -r rps p99 cpu <<<"$(wrk_run "$s" 0)"
    KA[$s]="${KA[$s]:-} $rps"; KAP[$s]="${KAP[$s]:-} $p99"; KACPU[$s]="${KACPU[$s]:-} $cpu"
  done
  for s in "${servers[@]}"; do
    read -r rps _ cpu <<<"$(wrk_run "$s" 1)"; CL[$s]="${CL[$s]:-} $rps"; CLCPU[$s]="${CLCPU[$s]:-} $cpu"
  done
  for s in "${servers[@]}"; do FL[$s]="${FL[$s]:-} $(flood_kept "$s")"; done
done
ratio() { python3 -c "print(f'{$1/$2:.2f}x' if $2 else 'n/a')"; }
echo "| server | keep-alive req/s | p99 ms | CPU µs per keep-alive request | Connection: close req/s | CPU µs per Connection: close request | bytes per idle connection | throughput kept under a one-address flood |"
echo "|---|---|---|---|---|---|---|---|"
for s in "${servers[@]}"; do
  ka=$(best max ${KA[$s]}); p=$(best min ${KAP[$s]}); cpu=$(best min ${KACPU[$s]}); cl=$(best max ${CL[$s]}); ccpu=$(best min ${CLCPU[$s]}); m=$(first ${MEM[$s]}); f=$(best max ${FL[$s]})
  nka=$(best max ${KA[nginx]}); ncpu=$(best min ${KACPU[nginx]}); ncl=$(best max ${CL[nginx]}); nccpu=$(best min ${CLCPU[nginx]}); nm=$(first ${MEM[nginx]})
  echo "| $s | ${ka%.*} ($(ratio "$ka" "$nka")) | $p | $cpu ($(ratio "$cpu" "$ncpu")) | ${cl%.*} ($(ratio "$cl" "$ncl")) | $ccpu ($(ratio "$ccpu" "$nccpu")) | ${m%.*} ($(ratio "$m" "$nm")) | $f |"
done
echo
what=$([ "$MODE" = proxy ] && echo "proxy mode: each server forwards to one shared upstream MCP server (mcp-gateway, builtin:echo, 1 worker)" || echo "direct mode: each server answers the POST itself")
echo "$what; $W worker(s) each, $C wrk connections, ${D} s per run, $IDLE idle connections, per-IP limit $L, $ROUNDS round(s), best of rounds (memory: first round)"
