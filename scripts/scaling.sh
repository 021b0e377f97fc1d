#!/usr/bin/env bash
# Multi-core scaling: keep-alive JSON-RPC throughput of mcp-gateway (and nginx beside it, same
# cores, same run) with W workers on W dedicated cores, for each W given. The servers run on cores
# 0..W-1 (taskset; mcp-gateway pins its workers inside that set), the upstream (mode proxy) on the
# next cores, wrk on all the cores left. Each row also reports how busy the server's cores were
# and its CPU time per request (from /proc), so a row where the load generator, not the server,
# was the limit shows as a server below W busy cores. Needs a machine with more cores than 2W:
# on a 2-core machine only W=1 means anything. Installs wrk and nginx from Debian's packages when
# missing (nginx is skipped when it cannot be had). Loopback only; everything stops on exit.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/scaling.sh [--workers "1 2 4 8"] [--mode proxy|direct] [--upstream-workers U] [--duration S] [--rounds R] [--warmup S] [--driver D] [--no-nginx]
  --workers LIST  worker counts to measure (default "1 2 4 8"; rows needing more cores are skipped)
  --mode M        proxy (default): forward to an upstream MCP server (mcp-gateway, builtin:echo,
                  ceil(W/2) workers on their own cores); direct: answer from builtin:echo / return 200
  --upstream-workers U  the upstream's workers in proxy mode (default 0 = ceil(W/2))
  --duration S    seconds per measurement (default 5, at most 60)
  --rounds R      alternating rounds, best of them shown (default 1); each measurement is also
                  said on stderr (req/s, p99)
  --warmup S      seconds of load each server gets before its first measurement (default 1; 0:
                  none), so that connection set-up (the clients', and the proxies' upstream
                  connections, opened on demand) is not measured
  --driver D      mcp-gateway's server.driver: auto (default), io_uring or epoll
  --no-nginx      measure mcp-gateway only
USAGE
}
WS="1 2 4 8"; MODE=proxy; D=5; ROUNDS=1; NGINX=1; DRIVER=auto; UW=0; WARMUP=1
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WS=$2; shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    --duration) D=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --driver) DRIVER=$2; shift 2 ;;
    --upstream-workers) UW=$2; shift 2 ;;
    --no-nginx) NGINX=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$D" -le 60 ] || D=60
case "$MODE" in proxy|direct) ;; *) usage; exit 64 ;; esac
cd "$(dirname "$0")/.."
. scripts/lib/need.sh; . scripts/lib/proc.sh; need wrk
[ "$NGINX" = 0 ] || need nginx 2>/dev/null || { echo "nginx not available: measuring mcp-gateway only" >&2; NGINX=0; }
build
N=$(nproc)
work=$(mktemp -d)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
cleanup() { stop; rm -rf "$work"; }
trap cleanup EXIT
ANSWER='{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello"}],"isError":false}}'
answers() { # port -> waits until POST /mcp answers 200
  for _ in $(seq 100); do
    python3 - "$1" <<'PY' && return 0
import sys, http.client
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=1)
try:
    c.request("POST", "/mcp", '{"jsonrpc":"2.0","id":1,"method":"ping"}', {"content-type": "application/json"})
    sys.exit(0 if c.getresponse().status == 200 else 1)
except OSError:
    sys.exit(1)
PY
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2; cat "$work"/*.log "$work"/nginx/*.log >&2 2>/dev/null; return 1
}
thread_ticks() { # pids... -> "tid:ticks" per thread, one per line
  local p t
  for p in "$@"; do for t in /proc/"$p"/task/*; do awk -v t="${t##*/}" '{print t ":" $14 + $15}' "$t/stat" 2>/dev/null || true; done; done
}
spread() { # label before-file after-file -> says on stderr how busy each busy thread was
  python3 - "$1" "$2" "$3" "$(getconf CLK_TCK)" "$D" <<'PY' >&2
import sys
label, b, a, hz, d = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
def load(f):
    return dict(l.strip().split(":") for l in open(f) if ":" in l)
before, after = load(b), load(a)
busy = sorted(((int(v) - int(before.get(t, 0))) / hz / d for t, v in after.items()), reverse=True)
print(f"{label} busy per thread: " + " ".join(f"{x:.2f}" for x in busy if x >= 0.05))
PY
}
measure() { # port cores-of-wrk pids... -> "req/s p99ms busy-cores us-per-request"
  local port=$1 lcores=$2; shift 2
  local threads conns before after out rps
  threads=$(( $(awk -F, '{print NF}' <<<"$lcores") )); [ "$threads" -gt 0 ] || threads=1
  conns=$(( 64 * W > threads ? 64 * W : threads ))
  local up0=0 up1=0
  [ -n "$up_pid" ] && up0=$(cpu_ticks "$up_pid") && thread_ticks "$up_pid" > "$work/up.before"
  thread_ticks "$@" > "$work/server.before"
  before=$(cpu_ticks "$@")
  out=$(CLOSE=0 timeout $((D + 30)) taskset -c "$lcores" wrk -t"$threads" -c"$conns" -d"${D}s" -s scripts/mcp.lua "http://127.0.0.1:$port/mcp")
  after=$(cpu_ticks "$@")
  thread_ticks "$@" > "$work/server.after"
  # Said on stderr: how evenly the server's cores were loaded, and whether the shared upstream
  # (or one of its workers) was the limit.
  spread "W=$W port $port: server" "$work/server.before" "$work/server.after"
  if [ -n "$up_pid" ]; then
    up1=$(cpu_ticks "$up_pid"); thread_ticks "$up_pid" > "$work/up.after"
    python3 -c "print(f'W=$W port $port: upstream busy {($up1 - $up0) / $(getconf CLK_TCK) / $D:.2f} of $U cores')" >&2
    spread "W=$W port $port: upstream" "$work/up.before" "$work/up.after"
  fi
  rps=$(awk '/^requests\/s:/ {print $2}' <<<"$out")
  echo "W=$W port $port: $rps req/s, p99 $(awk '/^p99 latency:/ {print $3}' <<<"$out") ms" >&2
  grep -q 'non-2xx 0$' <<<"$out" || echo "warning: errors on port $port: $(grep 'socket errors' <<<"$out")" >&2
  python3 -c "
hz = $(getconf CLK_TCK); cpu = ($after - $before) / hz
print(f'$rps $(awk '/^p99 latency:/ {print $3}' <<<"$out") {cpu / $D:.2f} {cpu * 1e6 / ($rps * $D):.1f}')"
}
seqlist() { seq -s, "$1" "$2"; }

rows=()
up_pid=""
for W in $WS; do
  U=0
  if [ "$MODE" = proxy ]; then U=$([ "$UW" -gt 0 ] && echo "$UW" || echo $(( (W + 1) / 2 ))); fi
  if [ $((W + U + W)) -gt "$N" ]; then
    echo "skipping W=$W: $W server + $U upstream + at least $W load cores > $N cores" >&2; continue
  fi
  scores=$(seqlist 0 $((W - 1)))
  lcores=$(seqlist $((W + U)) $((N - 1)))
  upstream_yaml=""
  if [ "$MODE" = proxy ]; then
    uport=$(port)
    cat > "$work/up.yaml" <<YAML
server: {host: 127.0.0.1, port: $uport, tcp_port: 0, metrics_port: 0, workers: $U, max_connections_per_ip: 0, idle_timeout: 600}
YAML
    taskset -c "$(seqlist "$W" $((W + U - 1)))" ./target/release/mcp-gateway -c "$work/up.yaml" 2> "$work/up.log" &
    pids+=("$!"); up_pid=$!
    answers "$uport"
    upstream_yaml="routing: {health_check_interval: 60}
service_discovery: {static: {endpoints: {default: [{url: http://127.0.0.1:$uport/mcp}]}}}"
    nginx_mcp="proxy_pass http://mcp; proxy_http_version 1.1; proxy_set_header Connection \"\";"
  else
    nginx_mcp="default_type application/json; return 200 '$ANSWER';"
  fi
  gport=$(port)
  cat > "$work/gw.yaml" <<YAML
server: {host: 127.0.0.1, port: $gport, tcp_port: 0, metrics_port: 0, workers: $W, pin_workers: true, max_connections_per_ip: 0, idle_timeout: 600, driver: $DRIVER}
$upstream_yaml
YAML
  taskset -c "$scores" ./target/release/mcp-gateway -c "$work/gw.yaml" 2> "$work/gw.log" &
  gw=$!; pids+=("$gw")
  answers "$gport"
  used=$(grep -o 'driver="[a-z_]*' "$work/gw.log" | head -1 | cut -d'"' -f2)
  if [ "$NGINX" = 1 ]; then
    nport=$(port); mkdir -p "$work/nginx"
    masks=$(python3 -c "print(' '.join(format(1 << i, '0${W}b') for i in range($W)))")
    cat > "$work/nginx/nginx.conf" <<CONF
worker_processes $W;
worker_cpu_affinity $masks;
worker_rlimit_nofile 20000;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log crit;
events { worker_connections 10000; }
http {
  access_log off;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  keepalive_timeout 600;
  keepalive_requests 100000000;
  upstream mcp { server 127.0.0.1:${uport:-1}; keepalive 64; }
  server {
    listen 127.0.0.1:$nport reuseport;
    location /mcp { $nginx_mcp }
  }
}
CONF
    taskset -c "$scores" nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log"
    until [ -s "$work/nginx/nginx.pid" ]; do sleep 0.1; done
    answers "$nport"
  fi
  declare -A best=()
  if [ "$WARMUP" != 0 ]; then
    for p in "$gport" $([ "$NGINX" = 1 ] && echo "$nport"); do
      conns=$(( 64 * W )); t=$(( $(awk -F, '{print NF}' <<<"$lcores") ))
      CLOSE=0 timeout $((WARMUP + 30)) taskset -c "$lcores" wrk -t"$t" -c"$conns" -d"${WARMUP}s" -s scripts/mcp.lua "http://127.0.0.1:$p/mcp" >/dev/null
    done
  fi
  for _ in $(seq 1 "$ROUNDS"); do
    for s in mcp-gateway nginx; do
      [ "$s" = nginx ] && [ "$NGINX" = 0 ] && continue
      if [ "$s" = nginx ]; then
        r=$(measure "$nport" "$lcores" $(pgrep -P "$(cat "$work/nginx/nginx.pid")"))
      else
        r=$(measure "$gport" "$lcores" "$gw")
      fi
      prev=${best[$s]:-0 0 0 0}
      if python3 -c "import sys; sys.exit(0 if float('${r%% *}') > float('${prev%% *}') else 1)"; then best[$s]=$r; fi
    done
  done
  [ "$NGINX" = 1 ] && kill -QUIT "$(cat "$work/nginx/nginx.pid")" 2>/dev/null && rm -f "$work/nginx/nginx.pid"
  stop
  read -r g gp gb gu <<<"${best[mcp-gateway]}"
  row="| $W | $((N - W - U)) | ${g%.*} | $gp | $gb | $gu |"
  if [ "$NGINX" = 1 ]; then
    read -r n np nb nu <<<"${best[nginx]}"
    row="$row ${n%.*} | $np | $nb | $nu | $(python3 -c "print(f'{$g/$n:.2f}x')") |"
  fi
  rows+=("$row")
  unset best
done
echo
if [ "$NGINX" = 1 ]; then
  echo "| workers | wrk cores | mcp-gateway req/s | p99 ms | busy cores | us CPU/request | nginx req/s | p99 ms | busy cores | us CPU/request | mcp-gateway/nginx |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
else
  echo "| workers | wrk cores | mcp-gateway req/s | p99 ms | busy cores | us CPU/request |"
  echo "|---|---|---|---|---|---|"
fi
printf '%s\n' "${rows[@]}"
echo
echo "mode $MODE$([ "$MODE" = proxy ] && echo " (upstream workers: ${UW/#0/ceil(W\/2)})"); mcp-gateway driver ${used:-?}; $N cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); $D s per run, 64 wrk connections per worker, best of $ROUNDS round(s)"
