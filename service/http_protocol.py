"""uvicorn's HTTP protocol, sending a small response in one write instead of two.

uvicorn writes a response's head (status line and headers) and its body separately: two
send() system calls per response, and two segments for the client to read. A
`CoalescingTransport` stands between the protocol and the connection's transport and holds
a write that is exactly a response head until the next write, the body, which then goes out
with it; the head goes out alone at the next turn of the event loop if no write follows (an
empty body, a stream that starts later), or before the connection closes. Everything else is
the real transport's. Measured on the hot path (`python -m bench --only write`, with the
timer-free body read of service/requests.py): a worker's CPU per request 80 -> 77 us, the
load generator's 14 -> 11 us.

`serve` passes the protocol to uvicorn (`http=HttpProtocol`); uvicorn's protocol is a
subclass, so its version is bounded in pyproject.toml.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_START = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"


class CoalescingTransport:
    """A transport whose response heads wait for their body (see the module)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            data, self._held = self._held + bytes(data), None
        elif isinstance(data, bytes) and data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
            self._held = data
            asyncio.get_running_loop().call_soon(self._flush)
            return
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def _flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:  # everything else: the real transport's
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a CoalescingTransport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport))  # type: ignore[arg-type]
