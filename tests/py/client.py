"""The official MCP Python SDK client, through the gateway. Prints one JSON object.

usage: client.py --url URL [--sessions N] [--calls K] [--transport http|ws] [--token T]
For each of N sessions: initialize, tools/list, K x whoami, one progress call (its progress
notifications counted), one announce call (whose tools/list_changed notification must arrive on
the standalone stream), then close. Output: {"sessions": [{"tools": [...], "served_by": [...],
"progress_events": n, "progress_result": "..."}...]}
With --token, every request says `Authorization: Bearer T`: as an argument of the SDK's
Streamable HTTP client, and in the WebSocket upgrade request (the SDK's WebSocket client takes
no fields, so its connect is given them here, as a client that can set fields would send them).
"""
import argparse
import asyncio
import json

from mcp import ClientSession

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--sessions", type=int, default=1)
p.add_argument("--calls", type=int, default=3)
p.add_argument("--transport", default="http", choices=["http", "ws"])
p.add_argument("--token", help="bearer token for every request")
args = p.parse_args()


def text(result):
    return result.content[0].text


async def one_session():
    fields = {"Authorization": f"Bearer {args.token}"} if args.token else None
    if args.transport == "ws":
        import mcp.client.websocket as ws
        from websockets.asyncio.client import connect

        if fields:
            ws.ws_connect = lambda url, **kw: connect(url, additional_headers=fields, **kw)
        transport = ws.websocket_client(args.url)
    else:
        from mcp.client.streamable_http import streamablehttp_client

        transport = streamablehttp_client(args.url, headers=fields)
    changed = asyncio.Event()

    async def on_message(message):
        root = getattr(message, "root", None)
        if getattr(root, "method", None) == "notifications/tools/list_changed":
            changed.set()

    async with transport as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write, message_handler=on_message) as session:
            await session.initialize()
            tools = sorted(t.name for t in (await session.list_tools()).tools)
            served = [text(await session.call_tool("whoami", {})) for _ in range(args.calls)]
            events = []

            async def on_progress(progress, total, message):
                events.append(progress)

            result = await session.call_tool(
                "progress", {"steps": 3, "pause": 0.05}, progress_callback=on_progress
            )
            echo = text(await session.call_tool("echo", {"message": "héllo"}))
            # Sent outside any request: it comes on the standalone stream.
            await session.call_tool("announce", {})
            try:
                await asyncio.wait_for(changed.wait(), 10)
                got_changed = True
            except asyncio.TimeoutError:
                got_changed = False
            return {
                "list_changed_received": got_changed,
                "tools": tools,
                "served_by": served,
                "progress_events": len(events),
                "progress_result": text(result),
                "echo": echo,
            }


async def main():
    out = []
    for _ in range(args.sessions):
        out.append(await asyncio.wait_for(one_session(), 30))
    print(json.dumps({"sessions": out}))


asyncio.run(main())
