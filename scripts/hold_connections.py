#!/usr/bin/env python3
"""Opens N connections to the gateway from K source addresses (127.0.3.1, 127.0.3.2, ...
continuing into 127.0.4.x past 250), makes each one do what an idle client of its kind has
done, then holds them until stdin closes or --hold seconds pass. Prints a summary line.
Modes: http (default): one JSON-RPC request, then an idle keep-alive connection; stream: a GET
whose event stream stays open (the standalone stream every MCP client keeps; it needs an
upstream that holds it); ws: a WebSocket upgrade and one message; mcpb: one MCPB Request frame
(to the MCPB port). Loopback only."""
import argparse, resource, socket, ssl, struct, sys, time, select, urllib.request

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--port", type=int, required=True)
p.add_argument("--connections", type=int, default=15000)
p.add_argument("--sources", type=int, default=16, help="number of source addresses, from 127.0.3.1 (250 per /24)")
p.add_argument("--hold", type=float, default=120.0, help="seconds to hold at most")
p.add_argument("--mode", choices=["http", "stream", "ws", "mcpb"], default="http",
               help="what each connection does before it idles (see above)")
p.add_argument("--tls", action="store_true",
               help="speak TLS (the certificate is not checked: a benchmark on loopback)")
p.add_argument("--proxy-header", action="store_true",
               help="start each connection with a PROXY v1 header naming a client 10.x.y.z of its own "
                    "(for a gateway whose server.proxy_protocol_networks holds 127.0.0.0/8)")
p.add_argument("--settle-url", default="",
               help="the gateway's /metrics: once all are held, wait until its count of parked "
                    "connections (mcp_gateway_connections_parked) stops moving before going on")
p.add_argument("--field", action="append", default=[],
               help="a field line ('Authorization: Bearer x') every request head (http, stream, ws) "
                    "carries too; repeatable")
p.add_argument("--measure-pids", default="",
               help="comma-separated pids: print their RSS growth per held connection, then close")
a = p.parse_args()


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return total


def parked(url):
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return int(float(next(l.split()[1] for l in text.splitlines()
                          if l.startswith("mcp_gateway_connections_parked "))))


def settle(url):
    """Idle connections park a sweep or two after their last request, a batch per sweep, and
    the gateway gives freed memory back once a wave has ended: wait until two reads of the
    parked count a second apart agree (at most a minute)."""
    last, deadline = -1, time.time() + 60
    while time.time() < deadline:
        time.sleep(1)
        now = parked(url)
        if now == last:
            break
        last = now
    return last


measured = [int(x) for x in a.measure_pids.split(",") if x]
if measured and a.settle_url:
    settle(a.settle_url)  # what an earlier client left (its connections leaving the lot) settles
before = rss_kib(measured) if measured else 0

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
if a.connections + 16 > hard:
    sys.exit(f"need {a.connections} descriptors, hard limit is {hard}: split across processes")

body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
mask = b"\x12\x34\x56\x78"
# (bytes to send, bytes that end a good answer's start, what the answer starts with)
fields = b"".join(f.encode() + b"\r\n" for f in a.field)
SEND = {
    "http": (b"POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
             % (len(body), fields)) + body,
    "stream": b"GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n" + fields + b"\r\n",
    "ws": b"GET /mcp HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + fields + b"\r\n"
          + bytes([0x81, 0x80 | len(body)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body)),
    "mcpb": b"MCPB" + struct.pack(">HHI", 1, 1, len(body)) + body,
}
# What has arrived once the connection is idle: its answer (or the stream's first event).
DONE = {"http": b"}", "stream": b":\n\n", "ws": b"}", "mcpb": b"}"}
START = {"http": b"HTTP/1.1 200", "stream": b"HTTP/1.1 200", "ws": b"HTTP/1.1 101", "mcpb": b"MCPB"}
req = SEND[a.mode]
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
tls.check_hostname = False
tls.verify_mode = ssl.CERT_NONE
socks, failed = [], 0
for i in range(a.connections):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    k = i % a.sources
    s.bind((f"127.0.{3 + k // 250}.{1 + k % 250}", 0))
    try:
        s.connect(("127.0.0.1", a.port))
        if a.proxy_header:
            s.sendall(b"PROXY TCP4 10.%d.%d.%d 127.0.0.1 40000 %d\r\n"
                      % ((i >> 16) & 255, (i >> 8) & 255, i & 255, a.port))
        if a.tls:
            s = tls.wrap_socket(s)
        s.sendall(req)
        resp = b""
        while DONE[a.mode] not in resp:
            got = s.recv(4096)
            if not got:
                break
            resp += got
        if not resp.startswith(START[a.mode]) or DONE[a.mode] not in resp:
            failed += 1
    except OSError:
        failed += 1
    socks.append(s)

settled = ""
if a.settle_url:
    last = settle(a.settle_url)
    settled = f", {last} parked"
if measured:
    time.sleep(1)  # let the servers finish with the last requests
    after = rss_kib(measured)
    print(f"held {len(socks) - failed} ok, {failed} failed; RSS before {before} KiB, after {after} KiB: "
          f"{(after - before) * 1024 // a.connections} bytes per idle connection ({a.mode}{settled})", flush=True)
    sys.exit(0)
print(f"held {len(socks) - failed} ok, {failed} failed{settled}", flush=True)
select.select([sys.stdin], [], [], a.hold)
