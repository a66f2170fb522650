"""Lua scripts: loaded once, called by EVALSHA through typed wrappers.

A script's file name carries its key count (`submit_score-7.lua`); the loader reads it and
every call checks it, so a caller that passes the wrong keys fails loudly, not subtly.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis
import redis.exceptions

from service.batching import NO_WAIT, Replication, auto_pipeline
from service.connections import SOCKET_TIMEOUT_S
from service.keys import KeySchema, PartitionKeys, stored_idempotency_key
from service.settings import MAX_SCORE, Settings
from service.shipped import LUA_DIR

_NAME = re.compile(r"^(?P<name>[a-z_]+)-(?P<keys>\d+)\.lua$")

TOP_STREAM_MAXLEN = 1000
FLUSH_FLAG_TTL_S = 10


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
def load(name: str) -> LuaSource:
    """Read `lua/<name>-<N>.lua` and its key count N."""
    for path in LUA_DIR.glob(f"{name}-*.lua"):
        m = _NAME.match(path.name)
        if m and m.group("name") == name:
            return LuaSource(name, int(m.group("keys")), path.read_text())
    raise FileNotFoundError(f"no lua/{name}-N.lua")


@dataclass(frozen=True, slots=True)
class Submit:
    """A prepared submit_score call: its keys and arguments."""

    keys: list[str]
    args: list[str | int]


def prepare_submit(
    settings: Settings,
    schema: KeySchema,
    user_id: str,
    delta: int,
    *,
    idempotency_key: str | None = None,
    operator: bool = False,
) -> Submit:
    """Keys and arguments for one increment.

    Its event id is random, with or without an Idempotency-Key: a key may be used again once
    its record has expired, and that is another increment, another ledger row. A retry that
    races its first attempt needs no shared id: the one Lua call sees the first's record.

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
        str(uuid.uuid4()),
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
    return Submit(keys, args)


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


class Scripts:
    """The project's scripts registered on one asyncio Redis client."""

    def __init__(self, client: aioredis.Redis, replication: Replication = NO_WAIT) -> None:
        self._submit = _Registered("submit_score", client)
        self._publish = _Registered("publish_top", client)
        self._provision = _Registered("provision_users", client)
        # The submits of all concurrent requests share one round trip (service/batching.py).
        self._pipeline = auto_pipeline(client, SOCKET_TIMEOUT_S, replication)

    async def submit(self, call: Submit) -> SubmitResult:
        """Run submit_score (EVALSHA, reloading the script after a Redis restart). Sent
        once: a lost reply is a ConnectionError, and the increment may have been counted."""
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

    async def publish_top(self, keys: PartitionKeys, top_n: int) -> str:
        """Append the partition's current top-N to its top stream; the new version."""
        return _text(await self._publish.script(**_publish_call(self._publish, keys, top_n)))

    async def provision(self, keys: PartitionKeys, user_ids: list[str]) -> int:
        """Add users at 0 to the partition's leaderboard (and to the rebuilt one while a rebuild
        runs); how many were new."""
        return int(await self._provision.script(**_provision_call(self._provision, keys, user_ids)))


class SyncScripts:
    """The same scripts on a blocking client (CLI, persister, tests)."""

    def __init__(self, client: redis.Redis) -> None:
        self._submit = _Registered("submit_score", client)
        self._publish = _Registered("publish_top", client)
        self._swap = _Registered("swap_leaderboard", client)
        self._provision = _Registered("provision_users", client)
        self._repair = _Registered("repair_scores", client)
        self._trim = _Registered("trim_events", client)
        self._forget = _Registered("forget_consumer", client)

    def submit(self, call: Submit) -> SubmitResult:
        """Run submit_score (EVALSHA, reloading the script after a Redis restart)."""
        reply = self._submit.script(keys=self._submit.checked(call.keys), args=call.args)
        return parse_submit(reply)

    def publish_top(self, keys: PartitionKeys, top_n: int) -> str:
        """Append the partition's current top-N to its top stream; the new version."""
        return _text(self._publish.script(**_publish_call(self._publish, keys, top_n)))

    def swap_leaderboard(self, keys: PartitionKeys, token: str, chunk: int) -> SwapStep:
        """Replay up to `chunk` increments accepted during rebuild `token` onto the partition's
        rebuilt leaderboard; once caught up, swap it in and set the ready marker. Safe to call
        again after a lost reply."""
        call = self._swap.checked(
            [keys.rebuilt_leaderboard, keys.leaderboard, keys.events, keys.rebuild_progress,
             keys.ready]
        )  # fmt: skip
        swapped, replayed, scanned = self._swap.script(keys=call, args=[token, chunk])
        return SwapStep(Swapped(swapped), int(replayed), int(scanned))

    def provision(self, keys: PartitionKeys, user_ids: list[str]) -> int:
        """Add users at 0 to the partition's leaderboard (and to the rebuilt one while a rebuild
        runs); how many were new."""
        return int(self._provision.script(**_provision_call(self._provision, keys, user_ids)))

    def repair(
        self, keys: PartitionKeys, token: str, ttl_s: int, corrections: list[tuple[str, str, int]]
    ) -> int | None:
        """Apply (op, user_id, value) corrections to the partition's leaderboard once per
        `token`: the number applied, or None if that token's were applied already."""
        args: list[str | int] = [ttl_s]
        for op, user_id, value in corrections:
            args += [op, user_id, value]
        call = self._repair.checked([keys.leaderboard, keys.repair_applied(token)])
        applied = int(self._repair.script(keys=call, args=args))
        return None if applied < 0 else applied

    def trim_events(self, keys: PartitionKeys) -> int:
        """Trim the partition's events stream below the oldest entry a consumer group still
        needs (one atomic step); the number of entries trimmed."""
        return int(self._trim.script(keys=self._trim.checked([keys.events])))

    def forget_consumer(self, keys: PartitionKeys, group: str, consumer: str, idle_ms: int) -> bool:
        """Delete `consumer` of the events stream's `group` if it holds no pending entry and
        has been idle for `idle_ms` (one atomic step); whether it was deleted."""
        call = self._forget.checked([keys.events])
        return bool(self._forget.script(keys=call, args=[group, consumer, idle_ms]))


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


def _publish_call(script: _Registered, keys: PartitionKeys, top_n: int) -> dict[str, Any]:
    return {
        "keys": script.checked([keys.leaderboard, keys.top]),
        "args": [top_n, TOP_STREAM_MAXLEN],
    }


def _provision_call(
    script: _Registered, keys: PartitionKeys, user_ids: list[str]
) -> dict[str, Any]:
    call = [keys.leaderboard, keys.rebuilt_leaderboard, keys.rebuild_progress]
    return {"keys": script.checked(call), "args": user_ids}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
