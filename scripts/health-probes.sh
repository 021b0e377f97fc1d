#!/usr/bin/env bash
# What active health checks cost the gateway: N upstreams (paths of one nginx `return 200`, so
# every probe passes), checked every S seconds, and no client traffic. Prints the gateway's CPU
# per second and per probe (from /proc, after the first probes) and its probe threads. With
# --bin, the same for another build of the gateway (an older commit, say), alternated with this
# one, round by round. Installs nginx from Debian's packages when missing. Loopback only;
# everything stops on exit.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/health-probes.sh [--upstreams N] [--interval S] [--duration S] [--rounds R] [--bin PATH]
  --upstreams N  upstreams to check (default 500, at most 4000)
  --interval S   routing.health_check_interval in seconds (default 1)
  --duration S   seconds measured per round, after 3 s of warm-up (default 10, at most 60)
  --rounds R     rounds (default 2)
  --bin PATH     another mcp-gateway binary, measured in turn with this one
USAGE
}
N=500; I=1; D=10; ROUNDS=2; OTHER=""
while [ $# -gt 0 ]; do
  case "$1" in
    --upstreams) N=$2; shift 2 ;;
    --interval) I=$2; shift 2 ;;
    --duration) D=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --bin) OTHER=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$D" -le 60 ] || D=60
[ "$N" -le 4000 ] || N=4000
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/sbin
. scripts/lib/need.sh; . scripts/lib/proc.sh; need nginx
build
scratch
up=$(port)
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
daemon off;
error_log $work/nginx.log;
pid $work/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work;
  server { listen 127.0.0.1:$up; location / { return 200 '{"jsonrpc":"2.0","id":1,"result":{}}'; } }
}
CONF
nginx -c "$work/nginx.conf" > "$work/nginx.out" 2>&1 &
pids+=("$!")
listening "$up"
gw=$(port)
{
  echo "server: {host: 127.0.0.1, port: $gw, tcp_port: 0, metrics_port: 0, workers: 1, pin_workers: false}"
  echo "routing: {health_check_interval: $I}"
  echo "service_discovery:"
  echo "  static:"
  echo "    endpoints:"
  echo "      default:"
  for n in $(seq 1 "$N"); do echo "        - url: http://127.0.0.1:$up/mcp/$n"; done
} > "$work/gw.yaml"
bins=("$PWD/target/release/mcp-gateway")
[ -n "$OTHER" ] && bins+=("$(realpath "$OTHER")")
hz=$(getconf CLK_TCK)
echo "| round | gateway | ms CPU per second | µs CPU per probe | probe threads |"
echo "|---|---|---|---|---|"
for r in $(seq 1 "$ROUNDS"); do
  for bin in "${bins[@]}"; do
    "$bin" -c "$work/gw.yaml" 2> "$work/gw.log" &
    pid=$!; pids+=("$pid")
    listening "$gw"
    sleep 3
    t0=$(cpu_ticks "$pid")
    sleep "$D"
    t1=$(cpu_ticks "$pid")
    threads=$(cat /proc/"$pid"/task/*/comm 2>/dev/null | grep -c "^mcp-health-pro" || true)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    label=$([ "$bin" = "${bins[0]}" ] && echo "this build" || echo "$OTHER")
    python3 -c "
t = ($t1 - $t0) / $hz
probes = $N * $D / $I
print(f'| $r | $label | {t * 1000 / $D:.0f} | {t * 1e6 / probes:.0f} | $threads |')"
  done
done
echo
echo "$N upstreams checked every $I s (probes per second: $(python3 -c "print(round($N / $I))")); ${D} s per measurement; gateway: 1 worker"
