#!/usr/bin/env bash
# What TLS costs the gateway, on either side, with certificates from a throwaway CA made with
# openssl (P-256; TLS 1.3). wrk runs the same load through a plain and a TLS setup in alternating
# rounds; prints requests/s and the server's CPU per request from /proc.
#   --side upstream (default): nginx as the upstream MCP server (a fixed JSON-RPC answer) on a
#     plain and a TLS port, and two mcp-gateways (1 worker each) in front, one forwarding to
#     http://, one to https:// with `tls_ca_file`; keep-alive. The upstream connections are
#     pooled, so this is TLS's cost per request (records sealed and opened), not handshakes'.
#   --side doors: two mcp-gateways (1 worker each, builtin:echo), one with
#     `tls_cert_file`/`tls_key_file`; wrk over http:// and https://, keep-alive (the cost per
#     request) or, with --close, a new connection and a full handshake per request; nginx (1
#     worker, a fixed answer) terminating the same TLS is measured beside it.
# Installs wrk, nginx and openssl from Debian's packages when missing. Loopback only; everything
# stops on exit.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/tls.sh [--side upstream|doors] [--close] [--duration S] [--rounds R] [--connections N]
  --side S         upstream (default): TLS to the upstream; doors: TLS from the clients
  --close          (doors) Connection: close, a handshake per request (default keep-alive)
  --duration S     seconds per measurement (default 4, at most 60)
  --rounds R       alternating rounds (default 3)
  --connections N  wrk connections (default 32)
USAGE
}
SIDE=upstream; CLOSE=0; D=4; ROUNDS=3; C=32
while [ $# -gt 0 ]; do
  case "$1" in
    --side) SIDE=$2; shift 2 ;;
    --close) CLOSE=1; shift ;;
    --duration) D=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --connections) C=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
case "$SIDE" in upstream|doors) ;; *) usage; exit 64 ;; esac
[ "$D" -le 60 ] || D=60
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/sbin
. scripts/lib/need.sh; . scripts/lib/proc.sh; . scripts/lib/nginx.sh; need wrk nginx openssl
build
scratch

# A CA and a server certificate for 127.0.0.1 (P-256, valid for two days).
(
  cd "$work"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=bench-ca -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
    -keyout srv.key -out srv.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext.cnf
  openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile ext.cnf -out srv.pem 2>/dev/null
)

ssl_cert=$work/srv.pem; ssl_key=$work/srv.key
plain=$(port); tls=$(port)
start_nginx() { # -> nginx (1 worker, a fixed answer) on the plain port and the TLS one
  fixed_nginx "127.0.0.1:$plain" "127.0.0.1:$tls ssl"
  listening "$plain"; listening "$tls"
}

declare -A gw_port gw_pid url
gateway() { # mode yaml-server-extra yaml-rest -> starts the gateway of that mode
  gw_port[$1]=$(port)
  cat > "$work/$1.yaml" <<YAML
server: {host: 127.0.0.1, port: ${gw_port[$1]}, tcp_port: 0, metrics_port: 0, workers: 1, pin_workers: false, max_connections_per_ip: 0$2}
$3
YAML
  ./target/release/mcp-gateway -c "$work/$1.yaml" 2> "$work/$1.log" &
  gw_pid[$1]=$!; pids+=("$!")
  listening "${gw_port[$1]}"
}

modes=(http https)
if [ "$SIDE" = upstream ]; then
  start_nginx
  for mode in http https; do
    up="http://127.0.0.1:$plain/mcp"; extra=""
    [ "$mode" = https ] && up="https://127.0.0.1:$tls/mcp" && extra="
          tls_ca_file: $work/ca.pem"
    gateway "$mode" "" "routing: {health_check_interval: 3600}
service_discovery:
  static:
    endpoints:
      default:
        - url: $up$extra"
    url[$mode]="http://127.0.0.1:${gw_port[$mode]}/mcp"
  done
else
  gateway http "" ""
  gateway https ", tls_cert_file: $work/srv.pem, tls_key_file: $work/srv.key" ""
  url[http]="http://127.0.0.1:${gw_port[http]}/mcp"
  url[https]="https://127.0.0.1:${gw_port[https]}/mcp"
  # nginx terminating the same TLS, answering a fixed body: the reference for the cost.
  start_nginx
  gw_pid[nginx-http]=$nginx_worker; gw_pid[nginx-https]=$nginx_worker
  url[nginx-http]="http://127.0.0.1:$plain/mcp"; url[nginx-https]="https://127.0.0.1:$tls/mcp"
  modes+=(nginx-http nginx-https)
fi

echo "| round | $([ "$SIDE" = upstream ] && echo upstream || echo clients) | requests/s | server µs CPU/request |"
echo "|---|---|---|---|"
for r in $(seq 1 "$ROUNDS"); do
  for mode in "${modes[@]}"; do
    t0=$(cpu_ticks "${gw_pid[$mode]}")
    out=$(CLOSE=$CLOSE timeout $((D + 30)) wrk -t1 -c"$C" -d"${D}s" -s scripts/mcp.lua "${url[$mode]}")
    t1=$(cpu_ticks "${gw_pid[$mode]}")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    grep -q 'non-2xx 0$' <<<"$out" || echo "warning: errors ($mode): $(grep -i 'non-2xx\|socket errors' <<<"$out")" >&2
    echo "| $r | $mode | $(awk '/^requests\/s:/ {print $2}' <<<"$out") | $(python3 -c "print(f'{($t1 - $t0) / $(getconf CLK_TCK) * 1e6 / $n:.1f}')") |"
  done
done
echo
if [ "$SIDE" = upstream ]; then
  echo "mcp-gateway (1 worker) in front of nginx (1 worker, fixed answer) over http:// and https:// (TLS 1.3, P-256); keep-alive, $C connections, $D s per run; $(nproc) cores"
else
  echo "clients over http:// and https:// (TLS 1.3, P-256) to mcp-gateway (1 worker, builtin:echo) and to nginx (1 worker, a fixed answer); $([ "$CLOSE" = 1 ] && echo "Connection: close, a handshake per request" || echo keep-alive), $C connections, $D s per run; $(nproc) cores"
fi
