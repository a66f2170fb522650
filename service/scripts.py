"""Lua scripts: loaded once, called by EVALSHA through typed wrappers.

A script's file name carries its key count (`submit_score-7.lua`); the loader reads it and
every call checks it, so a caller that passes the wrong keys fails loudly, not subtly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from typing import Any, Generic, TypeVar

import msgspec
import redis
import redis.asyncio as aioredis
import redis.exceptions
import uuid_utils

from service.batching import NO_WAIT, Replication, auto_pipeline
from service.connections import SOCKET_TIMEOUT_S
from service.keys import KeySchema, PartitionKeys, stored_idempotency_key
from service.settings import MAX_SCORE, Settings
from service.shipped import LUA_DIR

_NAME = re.compile(r"^(?P<name>[a-z_]+)-(?P<keys>\d+)\.lua$")

TOP_STREAM_MAXLEN = 1000
FLUSH_FLAG_TTL_S = 10
T = TypeVar("T")


class Status(IntEnum):
    """Outcomes of submit_score (mirrors the status codes in lua/submit_score-7.lua)."""

    OK = 0
    REPLAY = 1
    RATE_LIMITED = 2
    UNKNOWN_USER = 3
    OUT_OF_RANGE = 4
    IDEMPOTENCY_MISMATCH = 5
    NOT_READY = 6
    """The partition's ready marker is missing (a new or wiped Redis): 503 until rebuilt."""


class SubmitResult(msgspec.Struct, frozen=True):
    """The fixed-shape reply of submit_score."""

    status: Status
    total: int
    rank: int
    retry_after_us: int
    remaining: int
    reset_after_us: int
    flush: bool
    top_version: str


@dataclass(frozen=True, slots=True)
class LuaSource:
    """One script file: its name, key count and body."""

    name: str
    numkeys: int
    body: str


@cache
def _sources() -> dict[str, LuaSource]:
    """Every script of lua/, by name (read once)."""
    found = {}
    for path in sorted(LUA_DIR.glob("*.lua")):
        m = _NAME.match(path.name)
        if m:
            found[m.group("name")] = LuaSource(
                m.group("name"), int(m.group("keys")), path.read_text()
            )
    return found


def load(name: str) -> LuaSource:
    """The script `lua/<name>-<N>.lua`, with its key count N."""
    try:
        return _sources()[name]
    except KeyError:
        raise FileNotFoundError(f"no lua/{name}-N.lua") from None


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One prepared call of a script: its keys and arguments, and how to read its reply.
    Built by the functions below, run by `SyncScripts.run` or `Scripts.run`/`Scripts.submit`."""

    script: str
    keys: list[str]
    args: list[str | int]
    reply: Callable[[Any], T]


def prepare_submit(
    settings: Settings,
    schema: KeySchema,
    user_id: str,
    delta: int,
    *,
    idempotency_key: str | None = None,
    operator: bool = False,
) -> Call[SubmitResult]:
    """submit_score: keys and arguments for one increment.

    Its event id is new, with or without an Idempotency-Key: a key may be used again once
    its record has expired, and that is another increment, another ledger row. It is a
    UUIDv7: unique, and ordered by time, so the ledger's primary key grows at its right edge
    (a random UUID dirtied a page of the index anywhere per event, and cost a system call).
    A retry that races its first attempt needs no shared id: the one Lua call sees the
    first's record.

    `operator` (the admin API): no rate limit, negative deltas allowed, and no
    SCORE_MAX_INCREASE cap, so a reconciliation can correct any drift in one adjustment; its
    Idempotency-Keys are the operators' own, apart from the player's.
    """
    p = schema.for_user(user_id)
    stored_key = (
        stored_idempotency_key(idempotency_key, operator=operator) if idempotency_key else ""
    )
    idem = p.idempotency(user_id, stored_key)
    keys = [p.leaderboard, p.rate(user_id), idem, p.events, p.top, p.flush_flag, p.ready]
    args: list[str | int] = [
        user_id,
        delta,
        str(uuid_utils.uuid7()),
        stored_key,
        0 if operator else settings.rate_interval_us,
        settings.rate_burst,
        MAX_SCORE if operator else settings.max_increase,
        settings.top_n,
        settings.idempotency_ttl_s,
        1 if operator else 0,
        TOP_STREAM_MAXLEN,
        FLUSH_FLAG_TTL_S,
    ]
    return Call("submit_score", keys, args, parse_submit)


def parse_submit(reply: list[Any]) -> SubmitResult:
    """Turn the raw reply into a SubmitResult (bytes -> str for the version)."""
    return SubmitResult(
        Status(reply[0]),
        int(reply[1]),
        int(reply[2]),
        int(reply[3]),
        int(reply[4]),
        int(reply[5]),
        bool(reply[6]),
        _text(reply[7]),
    )


class Swapped(IntEnum):
    """What one call of swap_leaderboard did (mirrors lua/swap_leaderboard-5.lua)."""

    NOT_YET = 0
    """It replayed a chunk; entries may remain."""
    NOW = 1
    ALREADY = 2
    """A repeated call after a lost reply: the swap had been made."""


class SwapStep(msgspec.Struct, frozen=True):
    """The reply of one swap_leaderboard call."""

    swapped: Swapped
    replayed: int
    scanned: int


def publish_top(keys: PartitionKeys, top_n: int) -> Call[str]:
    """Append the partition's current top-N to its top stream; the new version."""
    return Call("publish_top", [keys.leaderboard, keys.top], [top_n, TOP_STREAM_MAXLEN], _text)


def provision_users(keys: PartitionKeys, user_ids: list[str]) -> Call[int]:
    """Add users at 0 to the partition's leaderboard (and to the rebuilt one while a rebuild
    runs); how many were new."""
    call = [keys.leaderboard, keys.rebuilt_leaderboard, keys.rebuild_progress]
    return Call("provision_users", call, list(user_ids), int)


def swap_leaderboard(keys: PartitionKeys, token: str, chunk: int) -> Call[SwapStep]:
    """Replay up to `chunk` increments accepted during rebuild `token` onto the partition's
    rebuilt leaderboard; once caught up, swap it in and set the ready marker. Safe to call
    again after a lost reply."""
    call = [keys.rebuilt_leaderboard, keys.leaderboard, keys.events, keys.rebuild_progress,
            keys.ready]  # fmt: skip
    return Call("swap_leaderboard", call, [token, chunk], _swap_step)


def _swap_step(reply: list[Any]) -> SwapStep:
    swapped, replayed, scanned = reply
    return SwapStep(Swapped(swapped), int(replayed), int(scanned))


def repair_scores(
    keys: PartitionKeys, token: str, ttl_s: int, corrections: list[tuple[str, str, int]]
) -> Call[int | None]:
    """Apply (op, user_id, value) corrections to the partition's leaderboard once per
    `token`: the number applied, or None if that token's were applied already."""
    args: list[str | int] = [ttl_s]
    for op, user_id, value in corrections:
        args += [op, user_id, value]
    return Call("repair_scores", [keys.leaderboard, keys.repair_applied(token)], args, _applied)


def _applied(reply: Any) -> int | None:
    applied = int(reply)
    return None if applied < 0 else applied


def trim_events(keys: PartitionKeys) -> Call[int]:
    """Trim the partition's events stream below the oldest entry a consumer group still
    needs (one atomic step); the number of entries trimmed."""
    return Call("trim_events", [keys.events], [], int)


def forget_consumer(keys: PartitionKeys, group: str, consumer: str, idle_ms: int) -> Call[bool]:
    """Delete `consumer` of the events stream's `group` if it holds no pending entry and
    has been idle for `idle_ms` (one atomic step); whether it was deleted."""
    return Call("forget_consumer", [keys.events], [group, consumer, idle_ms], bool)


class SyncScripts:
    """The scripts on a blocking client (CLI, persister, tests)."""

    def __init__(self, client: redis.Redis) -> None:
        self._scripts = _register(client)

    def run(self, call: Call[T]) -> T:
        """Run `call` (EVALSHA, reloading the script after a Redis restart)."""
        return call.reply(self._scripts[call.script](call))


class Scripts:
    """The scripts on the service's asyncio client."""

    def __init__(self, client: aioredis.Redis, replication: Replication = NO_WAIT) -> None:
        self._scripts = _register(client)
        self._submit = self._scripts["submit_score"]
        # The submits of all concurrent requests share one round trip (service/batching.py).
        self._pipeline = auto_pipeline(client, SOCKET_TIMEOUT_S, replication)

    async def submit(self, call: Call[SubmitResult]) -> SubmitResult:
        """Run submit_score (EVALSHA, reloading the script after a Redis restart), batched
        with the other requests' (the hot path). Sent once: a lost reply is a
        ConnectionError, and the increment may have been counted."""
        keys = self._submit.checked(call.keys)
        if self._pipeline is None:  # a fake client (tests)
            return parse_submit(await self._submit.script(keys=keys, args=call.args))
        sha = self._submit.script.sha
        try:
            reply = await self._pipeline.execute("EVALSHA", sha, len(keys), *keys, *call.args)
        except redis.exceptions.NoScriptError:
            # A new or restarted Redis without the script (nothing ran): EVAL runs the same
            # call and caches the script, still in the batch
            body = self._submit.script.script
            reply = await self._pipeline.execute("EVAL", body, len(keys), *keys, *call.args)
        return parse_submit(reply)

    async def run(self, call: Call[T]) -> T:
        """Run `call` on its own (off the hot path), like `SyncScripts.run`."""
        return call.reply(await self._scripts[call.script](call))


class _Registered:
    """One script registered on one client, with its key count."""

    def __init__(self, name: str, client: redis.Redis | aioredis.Redis) -> None:
        src = load(name)
        self.name, self.numkeys = name, src.numkeys
        self.script: Any = client.register_script(src.body)

    def checked(self, keys: list[str]) -> list[str]:
        """`keys`, or ValueError when their count is not the script's."""
        if len(keys) != self.numkeys:
            raise ValueError(f"{self.name} takes {self.numkeys} keys, got {len(keys)}")
        return keys

    def __call__(self, call: Call[Any]) -> Any:
        """Send `call`: its raw reply (an awaitable on an asyncio client)."""
        return self.script(keys=self.checked(call.keys), args=call.args)


def _register(client: redis.Redis | aioredis.Redis) -> dict[str, _Registered]:
    """Every script of lua/, registered on `client` (loaded into Redis by its first call)."""
    return {name: _Registered(name, client) for name in _sources()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
