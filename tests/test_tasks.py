"""service/tasks.py: a task that is ended is awaited, not only asked to end. When a live
client's connection ends, its reader task has ended (its cleanup done) before the endpoint
goes on."""

from __future__ import annotations

import asyncio

from starlette.types import Message

from service.keys import KeySchema
from service.live.broadcast import Broadcaster
from service.live.endpoints import CLIENT_LEFT, LiveStream
from service.live.subscribers import Ending, Pumped
from service.settings import Settings


async def test_a_live_connection_ends_with_its_reader(settings: Settings) -> None:
    endpoint = LiveStream(Broadcaster(settings, KeySchema(settings.partitions)))
    sub = Pumped("client")
    cleaned_up = asyncio.Event()

    async def read() -> Ending:  # the client's side: reads until cancelled, then cleans up
        asyncio.get_running_loop().call_soon(sub.end, CLIENT_LEFT)  # the server ends it
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()
        return CLIENT_LEFT

    async def send(message: Message) -> None:
        pass

    ending = await endpoint.follow(sub, read, send, lambda frame: frame.sse)

    assert ending is CLIENT_LEFT
    assert cleaned_up.is_set()  # its reader has ended, not only been asked to end
