"""Live leaderboard frames: one leaderboard state, encoded once for every client and transport.

A frame carries its JSON three ways: as the ASGI `websocket.send` message, as one SSE event,
and as the exact bytes of a WebSocket text frame on the wire. The last is what makes fan-out
cheap: a server's frames are not masked (RFC 6455 section 5.1), so the same bytes are right
for every client and are built once per state, not once per client.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from service import streamids
from service.models import Leaderboard, encoder


def websocket_text_frame(payload: bytes) -> bytes:
    """`payload` as one final, unmasked WebSocket text frame (RFC 6455 section 5.2): the header
    (FIN + opcode 1, then the length in 7, 7+16 or 7+64 bits), then the payload."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One leaderboard state, encoded once for every client and transport."""

    order: streamids.Order  # the version, comparable
    text: str  # the JSON frame
    ws: dict[str, Any]  # the ASGI websocket.send message
    sse: dict[str, Any]  # the ASGI http.response.body message: one event, id = version
    wire: bytes  # the WebSocket frame's bytes, written as they are to every client's transport


def encode_frame(board: Leaderboard) -> Frame:
    """`board` as a frame: its JSON once, wrapped for WebSocket and SSE."""
    body = encoder.encode(board)
    text = body.decode()
    event = b"id: " + board.version.encode() + b"\ndata: " + body + b"\n\n"
    return Frame(
        order=streamids.parse(board.version) or (0, 0),
        text=text,
        ws={"type": "websocket.send", "text": text},
        sse={"type": "http.response.body", "body": event, "more_body": True},
        wire=websocket_text_frame(body),
    )
