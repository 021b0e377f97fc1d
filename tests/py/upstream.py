"""A real MCP server (official Python SDK, Streamable HTTP) used as an upstream in tests.

usage: upstream.py --name NAME [--json] [--resumable] [--token T]
                   [--tls-cert PEM --tls-key PEM | --uds PATH]
Listens on a free port of 127.0.0.1 of its own choosing and prints that port on its first line;
with --tls-cert and --tls-key, over TLS (https) with that certificate chain and key; with --uds,
on the Unix socket PATH instead (printing PATH), taking `Host: localhost`, what the gateway
sends to a Unix-socket upstream.
Tools: whoami (returns NAME), echo(message), progress(steps, pause) which sends `steps`
progress notifications `pause` seconds apart before answering, and announce, which sends
notifications/tools/list_changed on the session's standalone stream.
With --resumable, its requests' event streams can be resumed (an event store, events with ids,
`retry: 50`), and `progress` closes its request's stream after the first notification (MCP
2025-11-25: the client is to resume it with `Last-Event-ID`, and the rest of the call comes
then). (SDK 1.30 gives the session's standalone stream no event id to resume from.)
With --token, it is an OAuth resource server (the SDK's `auth`) that takes one bearer token,
T: every request without `Authorization: Bearer T` gets 401.
"""
import argparse
import asyncio
import socket

import uvicorn

from mcp.server.fastmcp import Context, FastMCP

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--json", action="store_true", help="answer with JSON instead of SSE")
p.add_argument("--tls-cert", help="certificate chain (PEM): serve https")
p.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
p.add_argument("--uds", help="listen on this Unix socket instead of a TCP port")
p.add_argument("--resumable", action="store_true", help="resumable streams; progress polls")
p.add_argument("--token", help="require this bearer token on every request")
args = p.parse_args()

# On 127.0.0.1 the SDK checks `Host` against `127.0.0.1:*`, `localhost:*` and `[::1]:*` (DNS
# rebinding protection); a request over a Unix socket names `localhost`, with no port.
# SDK versions older than the check have neither it nor the argument: nothing to set there.
extra = {}
if args.uds:
    try:
        from mcp.server.transport_security import TransportSecuritySettings
    except ImportError:
        TransportSecuritySettings = None
    if TransportSecuritySettings is not None:
        extra["transport_security"] = TransportSecuritySettings(
            enable_dns_rebinding_protection=True, allowed_hosts=["localhost"]
        )


class MemoryEvents:
    """The events of every stream, kept for replay after a given one (an EventStore). A request's
    stream is replayed once its response is stored: the SDK's server hands what comes after a
    replay to the resumed stream only once it has registered it, and a message sent in between
    would be lost (its "replay to live-tail window"), which would make the test's outcome depend
    on timing. The SDK names a request's stream by the request's id, so one store shared by
    sessions that run at once with the same ids would mix their streams: the tests' clients run
    their sessions one after another."""

    def __init__(self):
        self.events = []  # (event id, stream id, message)
        self.stored = asyncio.Condition()

    async def store_event(self, stream_id, message):
        event_id = str(len(self.events) + 1)
        self.events.append((event_id, stream_id, message))
        async with self.stored:
            self.stored.notify_all()
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        from mcp.server.streamable_http import EventMessage
        from mcp.types import JSONRPCError, JSONRPCResponse

        at = next((i for i, e in enumerate(self.events) if e[0] == last_event_id), None)
        if at is None:
            return None
        stream = self.events[at][1]

        def answered():
            return any(
                s == stream and isinstance(getattr(m, "root", None), (JSONRPCResponse, JSONRPCError))
                for _, s, m in self.events[at + 1 :]
            )

        async with self.stored:
            try:
                await asyncio.wait_for(self.stored.wait_for(answered), 10)
            except asyncio.TimeoutError:
                pass
        for event_id, stream_id, message in self.events[at + 1 :]:
            if stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


class OneToken:
    """A token verifier (the SDK's TokenVerifier) that knows one token."""

    async def verify_token(self, token):
        from mcp.server.auth.provider import AccessToken

        if token != args.token:
            return None
        return AccessToken(token=token, client_id="tests", scopes=[])


if args.token:
    from mcp.server.auth.settings import AuthSettings

    settings = {
        "issuer_url": "https://auth.example.com",
        "resource_server_url": "http://127.0.0.1/mcp",
    }
    if "validate_token_resource" in AuthSettings.model_fields:  # SDK 1.30 warns without it
        settings["validate_token_resource"] = False
    extra["token_verifier"] = OneToken()
    extra["auth"] = AuthSettings(**settings)
if args.resumable:
    extra["event_store"] = MemoryEvents()
    extra["retry_interval"] = 50
mcp = FastMCP(
    args.name, host="127.0.0.1", json_response=args.json, log_level="WARNING", **extra
)


@mcp.tool()
def whoami() -> str:
    """The name of this upstream."""
    return args.name


@mcp.tool()
def echo(message: str) -> str:
    """Returns its message."""
    return message


@mcp.tool()
async def announce(ctx: Context) -> str:
    """Sends tools/list_changed outside this request (on the session's standalone stream)."""
    await ctx.session.send_tool_list_changed()
    return "announced"


@mcp.tool()
async def progress(steps: int, pause: float, ctx: Context) -> str:
    """Reports progress `steps` times, `pause` seconds apart."""
    for i in range(steps):
        await ctx.report_progress(i + 1, steps)
        if args.resumable and i == 0:
            # Polling: the client resumes the stream and gets the rest of the call then.
            await ctx.close_sse_stream()
        await asyncio.sleep(pause)
    return f"{args.name} done"


# The listening socket is made here, so the port is this process's from the start (no window in
# which another process could take a port found free a moment ago).
if args.uds:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(args.uds)
    sock.listen(128)
    print(args.uds, flush=True)
else:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(sock.getsockname()[1], flush=True)
server = uvicorn.Server(
    uvicorn.Config(
        mcp.streamable_http_app(),
        log_level="warning",
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
    )
)
asyncio.run(server.serve(sockets=[sock]))
