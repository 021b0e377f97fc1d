#!/usr/bin/env bash
# The global limit under churn: a gateway (one worker per core by default) with a small
# max_connections and the per-IP limit off takes wrk with more connections than the limit, each
# request on a new connection (`Connection: close`), so most are refused at the limit while the
# places of the closed ones move through the workers' reserves. After each round the active
# gauge must be back at 0, and a fill of 10% more than the limit, held at once, must be admitted
# exactly up to the limit and refused 503 beyond it (no more than that, or a worker whose own
# reserve is short would not need the places waiting in the others'). With --per-ip the limit
# under test is max_connections_per_ip instead, every connection from one address (127.0.0.1),
# its places moving through the workers' reserves of per-address places; refusals are 429, and
# the tracked-address gauge must be back at 0 with the active one.
# Prints each round and EXACT or NOT EXACT (exit 1). Loopback only; stops everything it started.
set -euo pipefail
usage() {
  cat <<USAGE
usage: scripts/limit-churn.sh [--per-ip] [--max-connections M] [--connections C] [--duration S] [--rounds R] [--workers W]
  --per-ip             test max_connections_per_ip (one client address) instead of max_connections
  --max-connections M  the limit under test (default 100; 8 with --per-ip, small enough that a
                       worker's share of the fill needs the places reserved on the other)
  --connections C      wrk connections, each request on a new one (default 600)
  --duration S         seconds of churn per round (default 5, at most 60)
  --rounds R           churn-then-fill rounds (default 3)
  --workers W          gateway server.workers (default 0: one per core)
USAGE
}
M=; C=600; D=5; R=3; W=0; KIND=global
while [ $# -gt 0 ]; do
  case "$1" in
    --per-ip) KIND=per_ip; shift ;;
    --max-connections) M=$2; shift 2 ;;
    --connections) C=$2; shift 2 ;;
    --duration) D=$2; shift 2 ;;
    --rounds) R=$2; shift 2 ;;
    --workers) W=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 64 ;;
  esac
done
[ "$D" -le 60 ] || D=60
[ -n "$M" ] || { [ "$KIND" = per_ip ] && M=8 || M=100; }
cd "$(dirname "$0")/.."
. scripts/lib/need.sh; . scripts/lib/proc.sh; need wrk
build
scratch
if [ "$KIND" = per_ip ]; then
  loopback_gateway <<YAML
workers: $W
max_connections_per_ip: $M
YAML
  what="max_connections_per_ip=$M, every connection from 127.0.0.1"
else
  loopback_gateway <<YAML
workers: $W
max_connections: $M
max_connections_per_ip: 0
YAML
  what="max_connections=$M"
fi
echo "gateway: $(grep -o 'workers=[0-9]*' "$work/gw.log" | head -1), $what; wrk: $C connections, Connection: close, ${D}s a round"
python3 - "$http" "$admin" "$KIND" "$M" "$C" "$D" "$R" <<'PY'
import os, re, socket, subprocess, sys, time, urllib.request

http, admin, kind, limit, conns, secs, rounds = *sys.argv[1:4], *map(int, sys.argv[4:])
refusal = 429 if kind == "per_ip" else 503
host, port = http.rsplit(":", 1)
REQ = (b"POST /mcp HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
       b'{"jsonrpc":"2.0","id":1,"method":"ping"}')

def metric(sample):
    for line in urllib.request.urlopen(f"http://{admin}/metrics").read().decode().splitlines():
        if line.startswith(sample + " "):
            return int(float(line.split()[1]))
    return 0

def settled():  # every closed connection's place given back: the gauges at 0
    for _ in range(100):
        if metric("mcp_gateway_connections_active") == 0:
            return metric("mcp_gateway_tracked_ips") == 0
        time.sleep(0.1)
    return False

def fill(n):  # n connections held at once, one request each: their statuses
    held, statuses = [], {}
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=10)
        data = b""
        try:
            s.sendall(REQ)
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass  # a reset, not an answer: counted as status 0, which is not EXACT
        status = int(data.split(b" ")[1]) if data else 0
        statuses[status] = statuses.get(status, 0) + 1
        held.append(s)
    return held, statuses

refused = f'mcp_gateway_connections_rejected_total{{frontend="http",reason="{kind}"}}'
exact = True
for r in range(1, rounds + 1):
    before = metric(refused)
    out = subprocess.run(["wrk", "-t4", f"-c{conns}", f"-d{secs}s", "-s", "scripts/mcp.lua", f"http://{http}/mcp"],
                         env=dict(os.environ, CLOSE="1"),
                         capture_output=True, text=True, timeout=secs + 60).stdout
    rps = re.search(r"requests/s: (\d+)", out)
    zero = settled()
    over = max(1, limit // 10)
    held, statuses = fill(limit + over)
    active = metric("mcp_gateway_connections_active")
    ok = zero and statuses.get(200) == limit and statuses.get(refusal) == over and active == limit
    print(f"round {r}: {rps.group(1) if rps else '?'} requests/s, {metric(refused) - before} refused at the limit, "
          f"gauge after: {'0' if zero else 'NOT 0'}; then {len(held)} held at once: "
          f"{statuses.get(200, 0)} admitted, {statuses.get(refusal, 0)} refused {refusal}, gauge {active}"
          f"{'' if ok else '  <- NOT EXACT'}")
    for s in held:
        s.close()
    exact &= ok and settled()
print(f"tracked IPs {metric('mcp_gateway_tracked_ips')}, active {metric('mcp_gateway_connections_active')}")
print("EXACT" if exact else "NOT EXACT")
sys.exit(0 if exact else 1)
PY
