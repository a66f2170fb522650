"""A raw HTTP/1.1 client over a socket: what exactly happened to a request (no response at
all, a response cut in the middle, or a whole one), which an HTTP library would blur."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass


class Cut(Exception):
    """The connection ended in the middle of a response."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def read_reply(sock: socket.socket) -> Reply | None:
    """The HTTP response on `sock`; None if the connection ended before its first byte
    (the server never took the request in); Cut if it ended in the middle."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = _recv(sock)
        if not chunk:
            if data:
                raise Cut(data)
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = _recv(sock)
        if not chunk:
            raise Cut(data + body)
        body += chunk
    return Reply(int(lines[0].split()[1]), headers, body)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def score_request(host: str, token: str, user: str, key: str, delta: int) -> tuple[bytes, bytes]:
    """The head and the body of POST /api/v1/score."""
    body = json.dumps({"user_id": user, "score_increase": delta}).encode()
    head = (
        f"POST /api/v1/score HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body
