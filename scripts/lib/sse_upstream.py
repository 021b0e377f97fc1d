#!/usr/bin/env python3
"""A minimal upstream for memory measurements: answers every POST with a JSON-RPC result (and a
session id) and every GET with an event stream that sends one comment and then stays open, silent, until the
other side closes it (like an MCP server's standalone stream between notifications).
Usage: sse_upstream.py PORT. Loopback only; runs until killed."""
import asyncio, resource, sys

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
BODY = b'{"jsonrpc":"2.0","id":1,"result":{}}'


async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n3\r\n:\n\n\r\n")
                await w.drain()
                await r.read()  # silent until the gateway closes the stream
                return
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await r.readexactly(length)
            # Every POST gets a session id, so a WebSocket or MCPB client's session opens its
            # standalone stream too.
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s1\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)
            await w.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        w.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print("listening", flush=True)
    await server.serve_forever()

asyncio.run(main())
