#!/usr/bin/env bash
# Side by side: mcp-gateway, nginx (limit_conn per IP) and HAProxy (maxconn, stick table on src
# with conn_cur), same limits, same JSON-RPC answer, run alternately in one invocation, one
# markdown table with ratios against nginx.
#
# Mode "direct" (the only one until forwarding lands): every server answers the JSON-RPC POST
# itself (mcp-gateway from builtin:echo, nginx with `return 200`, HAProxy with `http-request
# return`), so the table compares front doors: parsing, limits, keep-alive, connection handling.
# Installs nginx, haproxy and wrk from Debian's packages when missing. Loopback only.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/compare.sh [--duration S] [--connections C] [--idle N] [--max-per-ip L] [--rounds R]
  --duration S     seconds per throughput measurement (default 5, at most 60)
  --connections C  wrk connections (default 32; must stay under --max-per-ip)
  --idle N         idle connections for the memory measurement (default 10000)
  --max-per-ip L   per-IP limit on every server (default 50)
  --rounds R       alternating rounds; the table shows the best of them (default 1)
USAGE
}
D=5; C=32; IDLE=10000; L=50; ROUNDS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) D=$2; shift 2 ;;
    --connections) C=$2; shift 2 ;;
    --idle) IDLE=$2; shift 2 ;;
    --max-per-ip) L=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$D" -le 60 ] || D=60
[ "$C" -lt "$L" ] || { echo "--connections must stay under --max-per-ip (wrk uses one address)" >&2; exit 64; }
cd "$(dirname "$0")/.."
need=()
for t in nginx haproxy wrk; do command -v "$t" >/dev/null || need+=("$t"); done
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx/nginx.pid" ] && kill -QUIT "$(cat "$work/nginx/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ANSWER='{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello"}],"isError":false}}'

# mcp-gateway
gport=$(port)
cat > "$work/gw.yaml" <<YAML
server:
  host: 127.0.0.1
  port: $gport
  tcp_port: 0
  metrics_port: 0
  max_connections: 19000
  max_connections_per_ip: $L
  idle_timeout: 600
YAML
./target/release/mcp-gateway -c "$work/gw.yaml" 2> "$work/gw.log" &
gw=$!; pids+=("$gw")
# nginx
nport=$(port); mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 2;
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
  server {
    listen 127.0.0.1:$nport reuseport;
    limit_conn perip $L;
    location /mcp { default_type application/json; return 200 '$ANSWER'; }
  }
}
CONF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log"
# HAProxy
hport=$(port)
cat > "$work/haproxy.cfg" <<CFG
global
  maxconn 19000
  nbthread 2
defaults
  mode http
  timeout client 600s
  timeout connect 5s
  timeout server 30s
  timeout http-keep-alive 600s
frontend fe
  bind 127.0.0.1:$hport
  maxconn 19000
  stick-table type ip size 100k store conn_cur
  tcp-request connection track-sc0 src
  http-request deny deny_status 429 if { sc0_conn_cur gt $L }
  http-request return status 200 content-type application/json string '$ANSWER'
CFG
haproxy -f "$work/haproxy.cfg" -q &
hp=$!; pids+=("$hp")
until grep -q listening "$work/gw.log" && [ -s "$work/nginx/nginx.pid" ]; do sleep 0.1; done
sleep 0.5
nginx_pids() { pgrep -P "$(cat "$work/nginx/nginx.pid")" | tr '\n' ' '; }
declare -A PORT=([mcp-gateway]=$gport [nginx]=$nport [haproxy]=$hport)
servers=(mcp-gateway nginx haproxy)
pids_of() { case "$1" in mcp-gateway) echo "$gw" ;; nginx) nginx_pids ;; haproxy) echo "$hp" ;; esac; }
rss_kib() { local t=0; for p in $(pids_of "$1"); do t=$((t + $(awk '/VmRSS/{print $2}' "/proc/$p/status"))); done; echo "$t"; }

wrk_run() { # server mode -> "req/s p99ms"
  local out
  out=$(CLOSE=$2 timeout $((D + 30)) wrk -t1 -c"$C" -d"${D}s" -s scripts/mcp.lua "http://127.0.0.1:${PORT[$1]}/mcp")
  echo "$(awk '/^requests\/s:/ {print $2}' <<<"$out") $(awk '/^p99 latency:/ {print $3}' <<<"$out")"
}
idle_bytes() {
  local before after
  before=$(rss_kib "$1")
  mkfifo "$work/hold-$1-$2"
  python3 scripts/hold_connections.py --port "${PORT[$1]}" --connections "$IDLE" --sources 400 < "$work/hold-$1-$2" > "$work/held-$1-$2" &
  local h=$!
  exec 9>"$work/hold-$1-$2"
  until grep -q held "$work/held-$1-$2" 2>/dev/null; do sleep 0.2; done
  sleep 1
  after=$(rss_kib "$1")
  exec 9>&-
  wait "$h" || true
  echo $(( (after - before) * 1024 / IDLE ))
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
declare -A KA KAP CL MEM FL
best() { python3 -c "import sys; a=[float(x) for x in sys.argv[2:] if x]; print(max(a) if sys.argv[1]=='max' else min(a))" "$@"; }
for round in $(seq 1 "$ROUNDS"); do
  for s in "${servers[@]}"; do
    read -r rps p99 <<<"$(wrk_run "$s" 0)"; KA[$s]="${KA[$s]:-} $rps"; KAP[$s]="${KAP[$s]:-} $p99"
  done
  for s in "${servers[@]}"; do CL[$s]="${CL[$s]:-} $(wrk_run "$s" 1 | cut -d' ' -f1)"; done
  for s in "${servers[@]}"; do MEM[$s]="${MEM[$s]:-} $(idle_bytes "$s" "$round")"; done
  for s in "${servers[@]}"; do FL[$s]="${FL[$s]:-} $(flood_kept "$s")"; done
done
ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
echo "| server | keep-alive req/s | p99 ms | Connection: close req/s | bytes per idle connection | throughput kept under a one-address flood |"
echo "|---|---|---|---|---|---|"
for s in "${servers[@]}"; do
  ka=$(best max ${KA[$s]}); p=$(best min ${KAP[$s]}); cl=$(best max ${CL[$s]}); m=$(best min ${MEM[$s]}); f=$(best max ${FL[$s]})
  nka=$(best max ${KA[nginx]}); ncl=$(best max ${CL[nginx]}); nm=$(best min ${MEM[nginx]})
  echo "| $s | ${ka%.*} ($(ratio "$ka" "$nka")) | $p | ${cl%.*} ($(ratio "$cl" "$ncl")) | ${m%.*} ($(ratio "$m" "$nm")) | $f |"
done
echo
echo "direct mode: each server answers the POST itself; $C wrk connections, ${D} s per run, $IDLE idle connections, per-IP limit $L, $ROUNDS round(s), best of rounds"
