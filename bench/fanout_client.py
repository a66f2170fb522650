"""Many WebSocket clients in one process, for the fan-out scenario (run by bench.fanout).

A minimal client over raw sockets and epoll: a Python WebSocket library would spend more
time per frame than the server does, and that time would be counted against the server.
Arrival times come from the kernel (SO_TIMESTAMPNS: when the bytes reached this machine's
socket), not from when this process got round to reading them.

Talks to its parent in JSON lines: prints `connected` once every client holds its snapshot
and waits for a line on stdin (the parent measures the server's memory meanwhile), then
posts scores and prints a `level` record; `error` if it cannot go on.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import msgspec

BATCH = 200
RECV = 1 << 16
CMSG = socket.CMSG_SPACE(16)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
DELTA = 1000
FRAME_WAIT_S = 3.0


class Head(msgspec.Struct):
    type: str
    version: str = ""


_head = msgspec.json.Decoder(Head)


class Conn:
    __slots__ = ("buf", "got_at", "message", "sock", "version")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.message = bytearray()
        self.version = ""
        self.got_at = 0

    def feed(self, data: bytes, at: int) -> None:
        """Take bytes; note `at` if they complete a frame with a new version."""
        self.buf += data
        buf = self.buf
        while len(buf) >= 2:
            fin, opcode, length, pos = buf[0] & 0x80, buf[0] & 0x0F, buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, pos = struct.unpack_from("!H", buf, 2)[0], 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, pos = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) < pos + length:
                return
            payload = bytes(buf[pos : pos + length])
            del buf[: pos + length]
            if opcode == 0x9:  # ping: answer with a (zero-masked) pong
                self.sock.send(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            elif opcode in (0x0, 0x1):
                self.message += payload
                if fin:
                    self._message(bytes(self.message), at)
                    self.message.clear()

    def _message(self, payload: bytes, at: int) -> None:
        head = _head.decode(payload)
        if head.type == "leaderboard" and head.version != self.version:
            self.version = head.version
            if not self.got_at:
                self.got_at = at


def connect_batch(host: str, port: int, path: str, count: int) -> list[Conn]:
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, port), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        socks.append(s)
    conns = []
    for s in socks:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(RECV)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        if not status.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"no upgrade: {status.splitlines()[0].decode()}")
        s.setblocking(False)
        conn = Conn(s)
        conn.feed(rest, time.time_ns())
        conns.append(conn)
    return conns


def pump(
    poller: select.epoll, by_fd: dict[int, Conn], done: Callable[[], bool], timeout: float
) -> None:
    """Read whatever arrives until `done()` or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        for fd, _ in poller.poll(0.2):
            conn = by_fd[fd]
            try:
                data, anc, _, _ = conn.sock.recvmsg(RECV, CMSG)
            except BlockingIOError:
                continue
            at = time.time_ns()
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    at = sec * 1_000_000_000 + nsec
            if not data:
                poller.unregister(fd)
                continue
            conn.feed(data, at)


def post(host: str, port: int, user: str, token: str) -> tuple[int, socket.socket]:
    """Send one score (Connection: close); the send time and the socket to read the reply."""
    body = json.dumps({"user_id": user, "score_increase": DELTA}).encode()
    s = socket.create_connection((host, port), timeout=10)
    request = (
        f"POST /api/v1/score HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    sent = time.time_ns()
    s.sendall(request)
    return sent, s


def read_status(s: socket.socket) -> int:
    reply = b""
    while chunk := s.recv(RECV):
        reply += chunk
    s.close()
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ws", required=True)
    p.add_argument("--levels", required=True, help="comma-separated client counts")
    p.add_argument("--posts", type=int, default=30)
    p.add_argument("--user", required=True)
    p.add_argument("--token", required=True)
    args = p.parse_args()
    url = urlsplit(args.ws)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    conns: list[Conn] = []
    by_fd: dict[int, Conn] = {}
    poller = select.epoll()

    def emit(record: dict[str, object]) -> None:
        print(json.dumps(record), flush=True)

    for level in (int(x) for x in args.levels.split(",")):
        started = time.monotonic()
        try:
            while len(conns) < level:
                batch = connect_batch(host, port, url.path, min(BATCH, level - len(conns)))
                for c in batch:
                    poller.register(c.sock.fileno(), select.EPOLLIN)
                    by_fd[c.sock.fileno()] = c
                conns += batch
        except (OSError, ConnectionError) as exc:
            emit({"event": "error", "clients": len(conns), "error": str(exc)})
            return
        pump(poller, by_fd, lambda conns=conns: all(c.version for c in conns), 60)
        ready = sum(1 for c in conns if c.version)
        emit({"event": "connected", "clients": level, "with_snapshot": ready,
              "connect_s": time.monotonic() - started})  # fmt: skip
        sys.stdin.readline()
        last_ms: list[float] = []
        median_ms: list[float] = []
        acked = in_doubt = missing = 0
        for _ in range(args.posts):
            for c in conns:
                c.got_at = 0
            sent, s = post(host, port, args.user, args.token)
            pump(poller, by_fd, lambda conns=conns: all(c.got_at for c in conns), FRAME_WAIT_S)
            status = read_status(s)
            acked += DELTA if status == 200 else 0
            in_doubt += DELTA if status == 0 else 0
            got = sorted(c.got_at for c in conns if c.got_at)
            missing += len(conns) - len(got)
            if status != 200 or not got:
                error = f"a post answered {status} and reached {len(got)} clients"
                emit({"event": "error", "clients": level, "error": error})
                return
            if got:
                last_ms.append((got[-1] - sent) / 1e6)
                median_ms.append((got[len(got) // 2] - sent) / 1e6)
            time.sleep(0.05 + random.random() * 0.1)  # land in a random phase of the tick
        emit({"event": "level", "clients": level, "last_ms": last_ms, "median_ms": median_ms,
              "acked": acked, "in_doubt": in_doubt, "missing": missing})  # fmt: skip
    emit({"event": "done"})


if __name__ == "__main__":
    main()
