#!/usr/bin/env bash
# Resident memory per idle keep-alive connection: starts the release gateway, measures its RSS,
# opens N connections that each made one request and now wait, measures again, and prints
# (RSS after - RSS before) / N. Optionally does the same against nginx (--nginx) in the same run.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/idle-memory.sh [--connections N] [--nginx]
  --connections N   idle connections to hold (default 15000; the open-file cap is 20000 per process)
  --nginx           also measure nginx (worker RSS, same clients), installing it if missing
Runs on loopback only and stops everything it started.
USAGE
}
N=15000; NGINX=0
while [ $# -gt 0 ]; do
  case "$1" in
    --connections) N=$2; shift 2 ;;
    --nginx) NGINX=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
cd "$(dirname "$0")/.."
cargo build --release --quiet
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

measure() { # name port pid...
  local name=$1 port=$2; shift 2
  local pids; pids=$(echo "$@" | tr ' ' ',')
  echo "$name: $(python3 scripts/hold_connections.py --port "$port" --connections "$N" --measure-pids "$pids")"
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/gw.yaml" <<YAML
server:
  host: 127.0.0.1
  port: $port
  tcp_port: 0
  metrics_port: 0
  idle_timeout: 600
YAML
./target/release/mcp-gateway -c "$work/gw.yaml" 2> "$work/gw.log" &
gw=$!; pids+=("$gw")
until grep -q listening "$work/gw.log"; do sleep 0.1; done
# Warm up: the buffer pools and allocator arenas reach their working size.
python3 scripts/hold_connections.py --port "$port" --connections 200 --hold 0 >/dev/null
measure mcp-gateway "$port" "$gw"

if [ "$NGINX" = 1 ]; then
  . scripts/lib/need.sh; need nginx
  nport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$work/nginx"
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
  server { listen 127.0.0.1:$nport; location /mcp { return 200 '{"jsonrpc":"2.0","id":1,"result":{}}'; } }
}
CONF
  nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log"
  until [ -s "$work/nginx/nginx.pid" ]; do sleep 0.1; done
  master=$(cat "$work/nginx/nginx.pid"); pids+=("$master")
  sleep 0.5
  workers=$(pgrep -P "$master" | tr '\n' ' ')
  python3 scripts/hold_connections.py --port "$nport" --connections 200 --hold 0 >/dev/null
  # shellcheck disable=SC2086
  measure nginx "$nport" $workers
  kill -QUIT "$master"
fi
