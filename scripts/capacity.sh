#!/usr/bin/env bash
# Connection capacity: starts a release gateway with the given limits, opens N connections from K
# source addresses (127.0.2.1..K) at a given rate, holds them, and reports how many the gateway
# admitted and rejected per reason (from its own metrics, the source of truth) and its resident
# memory per held connection. With --rounds, does it again on the same gateway once every
# connection has closed: the places they left wait in the workers' reserves, and each round must
# admit as many as the first. Uses tcpkali when installed, mcp-loadgen otherwise, with the same
# options either way. Loopback only; everything it starts is stopped on exit.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/capacity.sh [options]
  --connections N      connections to open (default 10000; 20000 descriptors per process here)
  --sources K          source addresses 127.0.2.1..K (default 16)
  --rate R             new connections per second (default 2000)
  --hold S             seconds to hold them (default 10, at most 300)
  --protocol P         http | ws | mcpb (default http)
  --max-connections M  gateway server.max_connections (default 50000)
  --max-per-ip L       gateway server.max_connections_per_ip (default 1000)
  --rounds X           open, hold and close them X times on the same gateway (default 1)
USAGE
}
N=10000; K=16; R=2000; H=10; P=http; MAXC=50000; MAXIP=1000; ROUNDS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --connections) N=$2; shift 2 ;;
    --sources) K=$2; shift 2 ;;
    --rate) R=$2; shift 2 ;;
    --hold) H=$2; shift 2 ;;
    --protocol) P=$2; shift 2 ;;
    --max-connections) MAXC=$2; shift 2 ;;
    --max-per-ip) MAXIP=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$H" -le 300 ] || H=300
cd "$(dirname "$0")/.."
. scripts/lib/need.sh; . scripts/lib/proc.sh; build
scratch

tcp=0
[ "$P" = mcpb ] && tcp=$(port)
loopback_gateway "$tcp" <<YAML
max_connections: $MAXC
max_connections_per_ip: $MAXIP
idle_timeout: $((H + 60))
YAML
tcp=$(grep -o 'tcp=[0-9.:]*' "$work/gw.log" | head -1 | cut -d= -f2 || true)
target=$http; [ "$P" = mcpb ] && target=$tcp
metric() { curl -s "http://$admin/metrics" | awk -v m="$1" '$1==m {print $2}'; }
rss() { awk '/VmRSS/{print $2}' "/proc/$gw/status"; }
before=$(rss)

# The clients are split over processes of at most 18 000 connections each, so that a run past
# the per-process open-file limit (20 000 here) needs no more than the gateway's own limit.
procs=$(( (N + 17999) / 18000 ))
rejected() { # reason door -> the count so far
  local v; v=$(metric "mcp_gateway_connections_rejected_total{frontend=\"$2\",reason=\"$1\"}"); v=${v%.*}; echo "${v:-0}"
}
echo "limits: max_connections=$MAXC max_connections_per_ip=$MAXIP"
for round in $(seq 1 "$ROUNDS"); do
  declare -A was=()
  for reason in global per_ip ip_table_full; do for door in http tcp; do was[$reason.$door]=$(rejected "$reason" "$door"); done; done
  clients=()
  for n in $(seq 1 "$procs"); do
    share=$(( N / procs + (n <= N % procs ? 1 : 0) ))
    rate=$(python3 -c "print($R / $procs)")
    if command -v tcpkali >/dev/null 2>&1; then
      tool=tcpkali
      src=(); for i in $(seq 1 "$K"); do src+=(--source-ip "127.0.2.$i"); done
      body='{"jsonrpc":"2.0","id":1,"method":"ping"}'
      case "$P" in
        http) first=(-e -1 "POST /mcp HTTP/1.1\\r\\nHost: g\\r\\nContent-Type: application/json\\r\\nContent-Length: ${#body}\\r\\n\\r\\n$body") ;;
        ws) first=(--ws -1 "$body") ;;
        mcpb) first=() ;;
      esac
      tcpkali -c "$share" --connect-rate "$rate" -T "$((N / R + H))s" "${src[@]}" "${first[@]}" "$target" > "$work/client.$n.log" 2>&1 &
    else
      tool=mcp-loadgen
      ./target/release/mcp-loadgen --target "$target" --protocol "$P" --connections "$share" --rate "$rate" \
        --hold "$H" --sources "127.0.2.1-127.0.2.$K" --threads 1 > "$work/client.$n.log" 2>&1 &
    fi
    clients+=("$!"); pids+=("$!")
  done
  running() { for c in "${clients[@]}"; do kill -0 "$c" 2>/dev/null && return 0; done; return 1; }
  # Sample while the connections are held: the peak of admitted connections and the RSS then.
  peak=0; peak_rss=$before
  deadline=$((SECONDS + N / R + H + 30))
  while running && [ $SECONDS -lt $deadline ]; do
    a=$(metric mcp_gateway_connections_active); a=${a%.*}
    if [ "${a:-0}" -gt "$peak" ]; then peak=$a; peak_rss=$(rss); fi
    sleep 0.5
  done
  for c in "${clients[@]}"; do wait "$c" || true; done
  # Every connection closed: the gauge is back to zero (the places wait in the reserves).
  for _ in $(seq 50); do [ "$(metric mcp_gateway_connections_active)" = 0 ] && break; sleep 0.1; done
  [ "$ROUNDS" = 1 ] || echo "=== round $round of $ROUNDS"
  echo "client: $tool in $procs process(es), $N connections from $K sources at $R/s, held ${H}s, protocol $P"
  echo "admitted (peak open): $peak"
  for reason in global per_ip ip_table_full; do
    for door in http tcp; do
      v=$(( $(rejected "$reason" "$door") - ${was[$reason.$door]} ))
      [ "$v" != 0 ] && echo "rejected $door/$reason: $v"
    done
  done
  echo "open after the run: $(metric mcp_gateway_connections_active)"
  if [ "$peak" -gt 0 ]; then
    echo "gateway RSS: ${before} KiB idle, ${peak_rss} KiB at peak: $(( (peak_rss - before) * 1024 / peak )) bytes per held connection"
  fi
done
for n in $(seq 1 "$procs"); do echo "--- client report $n of $procs"; cat "$work/client.$n.log"; done
