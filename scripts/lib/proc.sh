# Sourced by the bench scripts: a scratch folder with the processes to stop on exit, a gateway
# started on a configuration file (or on loopback with a few server keys), free ports, waiting for a listener, and CPU time from /proc.

scratch() { # -> $work, a folder removed on exit, and $pids, processes killed on exit (and an
  # nginx whose pid file is $work/nginx.pid, see lib/nginx.sh)
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -s "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"' EXIT
}

start_gateway() { # config log -> runs ./target/release/mcp-gateway until exit, waiting until it
  # listens; sets $gw (its pid) and $http and $admin (the addresses its log names)
  ./target/release/mcp-gateway -c "$1" 2> "$2" &
  gw=$!; pids+=("$gw")
  until grep -q listening "$2"; do sleep 0.1; kill -0 "$gw"; done
  http=$(grep -o 'http=[0-9.:]*' "$2" | head -1 | cut -d= -f2)
  admin=$(grep -o 'admin=[0-9.:]*' "$2" | head -1 | cut -d= -f2)
}

loopback_gateway() { # [tcp_port] <<< server keys -> writes $work/gw.yaml, a gateway on a free
  # port of 127.0.0.1 (the TCP door off unless tcp_port is given, the admin port free too) with
  # the server keys read from stdin, and starts it (see start_gateway)
  { printf 'server:\n  host: 127.0.0.1\n  port: 0\n  tcp_port: %s\n  metrics_port: 0\n' "${1:-0}"
    sed 's/^/  /'; } > "$work/gw.yaml"
  start_gateway "$work/gw.yaml" "$work/gw.log"
}

port() { # -> a free TCP port of 127.0.0.1
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

listening() { # port -> waits until something listens on 127.0.0.1:port (without connecting);
  # fails after 10 s, printing the logs in "$work"
  local want; want=$(printf '0100007F:%04X' "$1")
  for _ in $(seq 100); do
    awk -v w="$want" '$2 == w && $4 == "0A" {found=1} END {exit !found}' /proc/net/tcp && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; cat "$work"/*.log >&2 2>/dev/null; return 1
}

cpu_ticks() { # pids... -> utime+stime clock ticks summed (threads included)
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}
