"""service/http_protocol.py: a response head waits for its body and leaves with it, and
never waits longer than the event loop's turn; every other write goes out as it comes, in
order. (The whole suite's HTTP runs through it: `serve` uses it.)"""

from __future__ import annotations

import asyncio
from typing import cast

from service.http_protocol import CoalescingTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorder(asyncio.Transport):
    """A transport that keeps what is written to it, one entry per write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def _wrapped() -> tuple[CoalescingTransport, Recorder]:
    real = Recorder()
    return CoalescingTransport(cast(asyncio.Transport, real)), real


async def test_a_head_and_its_body_leave_in_one_write() -> None:
    wrapper, real = _wrapped()
    wrapper.write(HEAD)
    assert real.writes == []
    wrapper.write(b"{}")
    assert real.writes == [HEAD + b"{}"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing held
    assert real.writes == [HEAD + b"{}"]


async def test_a_head_alone_leaves_at_the_next_turn_of_the_loop() -> None:
    wrapper, real = _wrapped()
    wrapper.write(HEAD)
    assert wrapper.get_write_buffer_size() == len(HEAD)
    await asyncio.sleep(0)
    assert real.writes == [HEAD]


async def test_other_writes_go_out_at_once_and_close_sends_a_held_head_first() -> None:
    wrapper, real = _wrapped()
    wrapper.write(b"data: 1\n\n")  # a stream's chunk, a WebSocket frame: not a head
    wrapper.write(b"HTTP/1.1 200 OK\r\n")  # a head's start only
    assert real.writes == [b"data: 1\n\n", b"HTTP/1.1 200 OK\r\n"]
    wrapper.write(HEAD)
    wrapper.close()
    assert real.writes[-1] == HEAD and real.closed


async def test_an_aborted_connection_drops_a_held_head() -> None:
    wrapper, real = _wrapped()
    wrapper.write(HEAD)
    wrapper.abort()
    await asyncio.sleep(0)
    assert real.writes == [] and real.closed
