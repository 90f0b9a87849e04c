"""The data channel's websocket client (dbtunneld.adapters.ssm.wsclient) against a real websocket server
on loopback (the stand-in's HTTP/websocket server, dbtunneld.sandbox.ssm_http)."""

from __future__ import annotations

import asyncio

from dbtunneld.adapters.ssm.wsclient import WsClient
from dbtunneld.sandbox.ssm_http import HttpResponse, HttpServer

MESSAGES = 2000  # far more than the client queues before it pauses reading (MAX_QUEUE)


async def _flood_then_listen(conn) -> None:
    for i in range(MESSAGES):
        await conn.send(i.to_bytes(4, "big") * 256)
    async for _ in conn:  # keep reading: the server side answers pings while it iterates
        pass


async def _serve() -> HttpServer:
    server = HttpServer(lambda request: _not_found(), _flood_then_listen, lambda request: None)
    await server.start("127.0.0.1", 0)
    return server


async def _not_found() -> HttpResponse:
    return HttpResponse.json({}, 404)


def test_a_back_pressured_reader_does_not_miss_pong_deadlines():
    """A consumer slower than the server pauses reading, so pongs wait unread behind the queued
    messages. Before, the ping deadline ran on and the socket was aborted (~60 s with the
    channel's 30 s pings); now the deadline is paused while reading is."""

    async def scenario() -> tuple[int, bool]:
        server = await _serve()
        try:
            client = await WsClient.connect(f"ws://127.0.0.1:{server.port}/flood", {}, open_timeout=5, max_size=1 << 20, ping_interval=0.2)
            await asyncio.sleep(0.5)
            assert client.reading_paused  # the consumer is behind: reading is paused
            await asyncio.sleep(1.5)  # several ping intervals without taking a message
            got = 0
            while got < MESSAGES:
                await asyncio.wait_for(client.__anext__(), 5)
                got += 1
            await asyncio.sleep(0.5)  # pings keep being answered once reading resumed
            alive = not client.closed
            await client.close()
            return got, alive
        finally:
            await server.stop()

    got, alive = asyncio.run(scenario())
    assert got == MESSAGES and alive
