"""A small TCP proxy that injects network faults between a client and a server.

It runs its own asyncio loop in a background thread, so blocking tests and subprocesses can
use it alike. Faults are chosen by mode, changed at any time:

- `PASS`: bytes flow both ways.
- `DROP_REPLIES`: requests reach the server, its replies are swallowed and the connection is
  reset as soon as a reply arrives: the server executed the command, the client never hears.
- `DROP_ONE_REPLY`: like DROP_REPLIES for the next reply only, then PASS (the client's retry
  of that command, on a new connection, gets through).
- `DELAY`: every chunk waits `delay_s` before it is forwarded (both ways), or until the mode
  changes.
- `BLACKHOLE`: connections are accepted and nothing is forwarded either way (a partition
  that does not close sockets).
- `REFUSE`: new connections are closed at once (a server that is down).

`reset_all()` resets every open connection now (a proxy or network restart).

`isolate(hosts)` partitions the upstream from the clients that connect from those source
addresses (each process of a test deployment can bind one of its own, 127.0.0.N), whatever the
mode: their bytes stop flowing both ways and their new connections hang, until `heal()`; then
what was held flows on, as TCP delivers it after a short partition. The other clients go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import ssl
import struct
import threading
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Mode(enum.Enum):
    PASS = "pass"
    DROP_REPLIES = "drop_replies"
    DROP_ONE_REPLY = "drop_one_reply"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


_CHUNK = 65536


class FaultProxy:
    """127.0.0.1:<port> -> upstream host:port, with faults (see the module docstring)."""

    def __init__(
        self, upstream_host: str, upstream_port: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.tls = tls  # clients speak TLS to the proxy, which speaks plain TCP upstream
        self.mode = Mode.PASS
        self.delay_s = 0.0
        self.connections = 0  # accepted so far
        self.dropped_replies = 0  # connections reset after swallowing a reply
        self._writers: set[asyncio.StreamWriter] = set()
        self._isolated: frozenset[str] = frozenset()
        self._healed = asyncio.Event()
        self._healed.set()
        self._undelayed = asyncio.Event()
        self._undelayed.set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._call(
            asyncio.start_server(self._handle, "127.0.0.1", 0, reuse_address=True, ssl=self.tls)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            server = self._server

            async def close() -> None:  # on the proxy's loop: asyncio is not thread-safe
                server.close()

            self._call(close())
            self.reset_all()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            # the connections just reset close their sockets on the loop's next turn
            self._loop.call_soon(self._loop.stop)
            self._loop.run_forever()
            self._loop.close()

    def set(self, mode: Mode, delay_s: float = 0.0) -> None:
        self.mode, self.delay_s = mode, delay_s
        delayed = mode is Mode.DELAY and delay_s > 0
        flag = self._undelayed
        self._loop.call_soon_threadsafe(flag.clear if delayed else flag.set)

    def reset_all(self) -> None:
        """Reset (RST, not FIN) every open connection."""

        async def reset() -> None:
            for writer in list(self._writers):
                _reset(writer)

        self._call(reset())

    def isolate(self, hosts: Iterable[str]) -> None:
        """Cut the clients from `hosts` off (see the module docstring)."""
        isolated = frozenset(hosts)

        async def cut() -> None:  # on the proxy's loop: asyncio is not thread-safe
            self._isolated = isolated
            self._healed.clear()

        self._call(cut())

    def heal(self) -> None:
        async def heal() -> None:
            self._isolated = frozenset()
            self._healed.set()

        self._call(heal())

    @contextlib.contextmanager
    def fault(self, mode: Mode, delay_s: float = 0.0) -> Iterator[None]:
        """`mode` for the duration of the block, then PASS again."""
        self.set(mode, delay_s)
        try:
            yield
        finally:
            self.set(Mode.PASS)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode is Mode.REFUSE:
            _reset(writer)
            return
        peername = writer.get_extra_info("peername")  # "" on a Unix socket
        peer = str(peername[0]) if isinstance(peername, tuple) else ""
        while peer in self._isolated:  # a connect across a partition hangs
            await self._healed.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        self._writers.update((writer, up_writer))
        pair = (writer, up_writer)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, pair, peer, reply=False),
                self._pump(up_reader, writer, pair, peer, reply=True),
            )
        finally:
            for w in pair:
                self._writers.discard(w)
                _reset(w)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        peer: str,
        *,
        reply: bool,
    ) -> None:
        try:
            while data := await src.read(_CHUNK):
                while peer in self._isolated:  # held, not lost: TCP retransmits across one
                    await self._healed.wait()
                mode = self.mode
                if mode is Mode.BLACKHOLE:
                    continue
                if reply and mode in (Mode.DROP_REPLIES, Mode.DROP_ONE_REPLY):
                    if mode is Mode.DROP_ONE_REPLY:
                        self.mode = Mode.PASS
                    self.dropped_replies += 1
                    for w in pair:
                        _reset(w)
                    return
                if mode is Mode.DELAY and self.delay_s > 0:
                    # the injected latency: held for delay_s, or until the delay is lifted
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._undelayed.wait(), self.delay_s)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in pair:
                _reset(w)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: the peer sees a connection reset, as after a crash or a lost route."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
