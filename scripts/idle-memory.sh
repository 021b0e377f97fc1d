#!/usr/bin/env bash
# Resident memory per idle connection: starts the release gateway, measures its RSS, opens N
# connections that each did what an idle client of their kind has done and now wait, measures
# again, and prints (RSS after - RSS before) / N. Optionally does the same against nginx (--nginx)
# in the same run, for the modes nginx can serve alike (http, stream).
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/idle-memory.sh [--mode M] [--connections N] [--nginx] [--proxy-protocol] [--tls] [--heap] [--no-park] [--field F]...
  --mode M          http (default): keep-alive connections idle after a request;
                    stream: open event streams (GET /mcp) through the proxy to an upstream that
                    holds them silent (scripts/lib/sse_upstream.py), as every MCP client keeps one;
                    ws: WebSocket connections idle after a message, forwarded to that upstream
                    within a session (which holds its standalone stream open); mcpb: the same on
                    the MCPB door; all: each of them in turn
  --connections N   connections to hold (default: http 15000; stream, ws and mcpb 8000, as the
                    gateway then holds two descriptors per connection and the open-file cap is
                    20000 per process)
  --nginx           also measure nginx (worker RSS, same clients; http: return 200, stream:
                    proxy_pass with proxy_buffering off to the same upstream), installing it if missing
  --proxy-protocol  the gateway trusts 127.0.0.0/8 (server.proxy_protocol_networks) and every
                    connection starts with a PROXY v1 header naming a client of its own
  --tls             the clients speak TLS 1.3 to the gateway (tls_cert_file, tls_key_file) and to
                    nginx (listen ssl), with a P-256 certificate made with openssl
  --heap            also the gateway's live heap per connection while they are held (glibc's
                    malloc_stats, called through gdb, installed if missing): steadier than RSS,
                    which moves with how the allocator's pages fall
  --no-park         server.park_idle_connections: false (idle connections wait in their
                    tasks); by default plain ones park, and each measurement waits until the
                    gateway's count of parked connections settles
  --field F         a field line every client's request head carries too (repeatable): say
                    'Authorization: Bearer ...' in ws mode, which the gateway keeps with each
                    WebSocket session for its upstream requests
Runs on loopback only and stops everything it started.
USAGE
}
N=""; NGINX=0; MODE=http; PP=0; TLS=0; HEAP=0; PARK=true; FIELDS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) MODE=$2; shift 2 ;;
    --connections) N=$2; shift 2 ;;
    --nginx) NGINX=1; shift ;;
    --proxy-protocol) PP=1; shift ;;
    --tls) TLS=1; shift ;;
    --heap) HEAP=1; shift ;;
    --no-park) PARK=false; shift ;;
    --field) FIELDS+=(--field "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
case "$MODE" in http|stream|ws|mcpb|all) ;; *) usage; exit 64 ;; esac
cd "$(dirname "$0")/.."
. scripts/lib/need.sh; . scripts/lib/proc.sh; build
scratch

measure() { # name mode port pid...
  local name=$1 mode=$2 port=$3; shift 3
  local n=${N:-$([ "$mode" = http ] && echo 15000 || echo 8000)}
  local pids; pids=$(echo "$@" | tr ' ' ',')
  # Warm up: the buffer pools and allocator arenas reach their working size. Where the
  # connections park (the gateway's, plain), with a wave big enough that the gateway gives
  # freed memory back once it ends (256 a core), as it does after the measured one: both RSS
  # readings are then taken in that state.
  local pp=(); [ "$PP" = 1 ] && [ "$name" != "${name#mcp-gateway}" ] && pp=(--proxy-header)
  [ "$TLS" = 1 ] && pp+=(--tls)
  pp+=(${FIELDS[@]+"${FIELDS[@]}"})
  local settle=() warm=200
  if [ "$name" != "${name#mcp-gateway}" ]; then
    settle=(--settle-url "http://127.0.0.1:$gmetrics/metrics")
    [ "$PARK" = true ] && [ "$TLS" = 0 ] && warm=2000
  fi
  python3 scripts/hold_connections.py --mode "$mode" --port "$port" --connections "$warm" --hold 0 "${pp[@]}" "${settle[@]}" >/dev/null
  echo "$name: $(python3 scripts/hold_connections.py --mode "$mode" --port "$port" --connections "$n" --measure-pids "$pids" "${pp[@]}" "${settle[@]}")"
}

if [ "$TLS" = 1 ]; then
  need openssl
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
fi

# The upstream that holds event streams open (stream mode).
uport=$(port)
python3 scripts/lib/sse_upstream.py "$uport" > "$work/up.log" 2>&1 &
pids+=("$!")
until grep -q listening "$work/up.log"; do sleep 0.1; done

start_gateway() { # mode -> sets gw, gport, gtcp, gmetrics
  gport=$(port); gtcp=$(port); gmetrics=$(port)
  local routing=""
  [ "$1" != http ] && routing="routing:
  health_check_interval: 3600
service_discovery:
  static:
    endpoints:
      default:
        - url: http://127.0.0.1:$uport/mcp"
  cat > "$work/gw.yaml" <<YAML
server:
  host: 127.0.0.1
  port: $gport
  tcp_port: $gtcp
  metrics_port: $gmetrics
  idle_timeout: 600
  park_idle_connections: $PARK
  proxy_protocol_networks: [$([ "$PP" = 1 ] && echo 127.0.0.0/8)]
$([ "$TLS" = 1 ] && printf '  tls_cert_file: %s\n  tls_key_file: %s' "$work/cert.pem" "$work/key.pem")
$routing
YAML
  : > "$work/gw.log"
  ./target/release/mcp-gateway -c "$work/gw.yaml" 2> "$work/gw.log" &
  gw=$!; pids+=("$gw")
  until grep -q listening "$work/gw.log"; do sleep 0.1; done
}

start_nginx() { # mode -> sets master, nport
  need nginx
  nport=$(port)
  mkdir -p "$work/nginx"
  local location="return 200 '{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}';"
  [ "$1" = stream ] && location="proxy_pass http://127.0.0.1:$uport; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off;"
  cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 2;
worker_rlimit_nofile 20000;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 19000; }
http {
  access_log off;
  keepalive_timeout 600;
  keepalive_requests 1000000;
  proxy_read_timeout 600s;
  server {
    listen 127.0.0.1:$nport $([ "$TLS" = 1 ] && echo ssl);
    $([ "$TLS" = 1 ] && echo "ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem;")
    location /mcp { $location }
  }
}
CONF
  rm -f "$work/nginx/nginx.pid"
  nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log"
  until [ -s "$work/nginx/nginx.pid" ]; do sleep 0.1; done
  master=$(cat "$work/nginx/nginx.pid"); pids+=("$master")
  sleep 0.5
}

# The gateway's live heap (bytes in use, all arenas), as glibc's malloc_stats prints it into its log.
heap_in_use() { # pid
  local before; before=$(grep -c "^Total (incl. mmap)" "$work/gw.log" || true)
  gdb -p "$1" -batch -ex 'call (void)malloc_stats()' >/dev/null 2>&1
  for _ in $(seq 50); do
    [ "$(grep -A2 "^Total (incl. mmap)" "$work/gw.log" | grep -c "in use bytes")" -gt "$before" ] && break
    sleep 0.1
  done
  grep -A2 "^Total (incl. mmap)" "$work/gw.log" | grep "in use bytes" | tail -1 | awk '{print $NF}'
}

heap() { # mode port pid: live heap per connection while N connections are held (a fresh gateway)
  local mode=$1 port=$2 pid=$3
  local n=${N:-$([ "$mode" = http ] && echo 15000 || echo 8000)}
  local pp=(); [ "$PP" = 1 ] && pp=(--proxy-header); [ "$TLS" = 1 ] && pp+=(--tls)
  pp+=(${FIELDS[@]+"${FIELDS[@]}"})
  local h0 h1 holder
  python3 scripts/hold_connections.py --mode "$mode" --port "$port" --connections 200 --hold 0 "${pp[@]}" >/dev/null
  sleep 0.5
  h0=$(heap_in_use "$pid")
  mkfifo "$work/hold"
  python3 scripts/hold_connections.py --mode "$mode" --port "$port" --connections "$n" --hold 300 "${pp[@]}" \
    --settle-url "http://127.0.0.1:$gmetrics/metrics" < "$work/hold" > "$work/held" &
  holder=$!
  exec 9> "$work/hold"
  until [ -s "$work/held" ]; do sleep 0.2; done
  sleep 1
  h1=$(heap_in_use "$pid")
  local held; held=$(cat "$work/held")
  exec 9>&-; wait "$holder" 2>/dev/null || true; rm -f "$work/hold" "$work/held"
  echo "mcp-gateway ($mode): live heap $(( (h1 - h0) / n )) bytes per idle connection ($h0 -> $h1 bytes in use; $held)"
}

[ "$HEAP" = 1 ] && need gdb
modes=("$MODE"); [ "$MODE" = all ] && modes=(http stream ws mcpb)
for mode in "${modes[@]}"; do
  start_gateway "$mode"
  port=$gport; [ "$mode" = mcpb ] && port=$gtcp
  measure "mcp-gateway ($mode)" "$mode" "$port" "$gw"
  kill "$gw"; wait "$gw" 2>/dev/null || true
  if [ "$HEAP" = 1 ]; then
    start_gateway "$mode"
    port=$gport; [ "$mode" = mcpb ] && port=$gtcp
    heap "$mode" "$port" "$gw"
    kill "$gw"; wait "$gw" 2>/dev/null || true
  fi
  if [ "$NGINX" = 1 ] && { [ "$mode" = http ] || [ "$mode" = stream ]; }; then
    start_nginx "$mode"
    # shellcheck disable=SC2046
    measure "nginx ($mode)" "$mode" "$nport" $(pgrep -P "$master" | tr '\n' ' ')
    kill -QUIT "$master"; sleep 0.5
  fi
done
