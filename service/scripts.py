"""Lua scripts: loaded once, called by EVALSHA through typed wrappers.

A script's file name carries its key count (`submit_score-7.lua`); the loader reads it and
every call checks it, so a caller that passes the wrong keys fails loudly, not subtly.

The hot path's script also runs as a Redis 7 Function (FCALL): its helpers are defined, and
its settings parsed, once per load of the library instead of on every call (`python -m
bench.script_cost`: 31.5 -> 26.4 us of Redis CPU per call). A Redis without Functions (6.2, the
embedded one) or that refuses them (an ACL without FUNCTION) gets the same file by EVALSHA.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import cache, lru_cache
from typing import Any, Generic, TypeVar

import msgspec
import redis
import redis.asyncio as aioredis
import redis.exceptions
import uuid_utils

from service.batching import NO_WAIT, Replication, auto_pipeline
from service.connections import SOCKET_TIMEOUT_S
from service.keys import KeySchema, PartitionKeys, partition_of, stored_idempotency_key
from service.settings import MAX_SCORE, Settings
from service.shipped import LUA_DIR

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(?P<name>[a-z_]+)-(?P<keys>\d+)\.lua$")
PER_CALL = "\n-- per call --\n"
"""In a script that can run as a Function: the line between what runs when the library is
loaded and the function's body."""

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


_STATUSES = tuple(Status)  # by code: indexing it is a tenth of Status(code)


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

    def function(self) -> tuple[str, str]:
        """The script as a Redis Function: (its name, the library to FUNCTION LOAD). Named
        after the script's text, so that two versions of the service can share a Redis."""
        prelude, mark, per_call = self.body.partition(PER_CALL)
        if not mark:
            raise ValueError(f"lua/{self.name}: no {PER_CALL.strip()!r} line")
        digest = hashlib.sha256(self.body.encode()).hexdigest()[:16]
        name = f"score_{self.name}_{digest}"
        library = (
            f"#!lua name={name}\n{prelude}\n"
            f"local function call(KEYS, ARGV)\n{per_call}\nend\n"
            f"redis.register_function('{name}', call)\n"
        )
        return name, library


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
    p, (leaderboard, events, top, flush_flag, ready, no_idem) = _partition_keys(
        schema, partition_of(user_id, schema.partitions)
    )
    if idempotency_key:
        stored_key = stored_idempotency_key(idempotency_key, operator=operator)
        idem = p.idempotency(user_id, stored_key)
    else:
        stored_key, idem = "", no_idem
    keys = [leaderboard, p.rate(user_id), idem, events, top, flush_flag, ready]
    args: list[str | int] = [
        user_id,
        delta,
        str(uuid_utils.uuid7()),
        stored_key,
        _operator_settings(settings) if operator else _player_settings(settings),
    ]
    return Call("submit_score", keys, args, parse_submit)


@lru_cache(maxsize=1024)  # the same few for every call of a process: named once each
def _partition_keys(
    schema: KeySchema, index: int
) -> tuple[PartitionKeys, tuple[str, str, str, str, str, str]]:
    """A partition and the names of its keys that are the same for every user; the last is
    KEYS[3] of a call without an Idempotency-Key, which the script does not touch (a name in
    the partition's hash slot, as every key of a call must be on a Redis Cluster)."""
    p = schema.partition(index)
    return p, (p.leaderboard, p.events, p.top, p.flush_flag, p.ready, p.idempotency("", ""))


@lru_cache(maxsize=64)  # a process makes two: formatted once each, not per call
def submit_settings(
    interval_us: int,
    burst: int,
    max_delta: int,
    top_n: int,
    idempotency_ttl_s: int,
    allow_negative: bool,
    top_maxlen: int,
    flush_ttl_s: int,
) -> str:
    """submit_score's ARGV[5]: the settings that are the same on every call of a process."""
    return (
        f"{interval_us} {burst} {max_delta} {top_n} {idempotency_ttl_s} {int(allow_negative)} "
        f"{top_maxlen} {flush_ttl_s}"
    )


def _player_settings(s: Settings) -> str:
    return submit_settings(
        s.rate_interval_us, s.rate_burst, s.max_increase, s.top_n, s.idempotency_ttl_s, False,
        TOP_STREAM_MAXLEN, FLUSH_FLAG_TTL_S,
    )  # fmt: skip


def _operator_settings(s: Settings) -> str:
    """No rate limit, negative deltas allowed, and no SCORE_MAX_INCREASE cap."""
    return submit_settings(
        0, s.rate_burst, MAX_SCORE, s.top_n, s.idempotency_ttl_s, True,
        TOP_STREAM_MAXLEN, FLUSH_FLAG_TTL_S,
    )  # fmt: skip


def parse_submit(reply: list[Any]) -> SubmitResult:
    """Turn the raw reply into a SubmitResult (bytes -> str for the version)."""
    return SubmitResult(
        _STATUSES[reply[0]],
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
        self._client = client
        self._scripts = _register(client)
        self._submit = self._scripts["submit_score"]
        self._function, self._library = load("submit_score").function()
        self._functions = True  # until Redis says it has none, or refuses them
        self._loading: asyncio.Future[Any] | None = None
        # The submits of all concurrent requests share one round trip (service/batching.py).
        self._pipeline = auto_pipeline(client, SOCKET_TIMEOUT_S, replication)

    async def submit(self, call: Call[SubmitResult]) -> SubmitResult:
        """Run submit_score (FCALL, or EVALSHA; loading it after a Redis restart), batched
        with the other requests' (the hot path). Sent once: a lost reply is a
        ConnectionError, and the increment may have been counted. (A call that Redis
        answers "no such function" or "no such script" did not run: it is sent again.)"""
        keys = self._submit.checked(call.keys)
        if self._pipeline is None:  # a fake client (tests)
            return parse_submit(await self._submit.script(keys=keys, args=call.args))
        fcall = ("FCALL", self._function, len(keys), *keys, *call.args)
        for loaded in (False, True):  # as it is; then once more, the library loaded
            if not self._functions:
                break
            try:
                return parse_submit(await self._pipeline.execute(*fcall))
            except redis.exceptions.ResponseError as exc:
                if not _did_not_run(exc):
                    raise
                if loaded:
                    log.warning("FCALL refused once loaded (%s): submit_score by EVALSHA", exc)
                    self._functions = False
                else:
                    await self._load_function()  # or learn there are none: EVALSHA below
        sha = self._submit.script.sha
        try:
            reply = await self._pipeline.execute("EVALSHA", sha, len(keys), *keys, *call.args)
        except redis.exceptions.NoScriptError:
            # A new or restarted Redis without the script (nothing ran): EVAL runs the same
            # call and caches the script, still in the batch
            body = self._submit.script.script
            reply = await self._pipeline.execute("EVAL", body, len(keys), *keys, *call.args)
        return parse_submit(reply)

    async def _load_function(self) -> None:
        """Load the library (into every primary of a cluster), once for all the calls that
        found it missing at the same time. A Redis that has no FUNCTION command, or refuses
        it, gets EVALSHA from now on (`_functions` False)."""
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._client.function_load(self._library, True))
        try:
            await asyncio.shield(self._loading)
        except redis.exceptions.ResponseError as exc:  # not an outage: Redis said no
            if self._functions and "unknown command" in str(exc).lower():
                log.info("Redis has no Functions (before 7.0): submit_score by EVALSHA")
            elif self._functions:
                log.warning("Redis refused FUNCTION LOAD (%s): submit_score by EVALSHA", exc)
            self._functions = False

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


def _did_not_run(exc: redis.exceptions.ResponseError) -> bool:
    """Whether an FCALL's error says it did not run for want of the function: not loaded
    (a new, wiped or restarted Redis), no Functions at all (Redis 6.2), or not allowed
    (an ACL without FCALL)."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return True
    message = str(exc).lower()
    return "function not found" in message or "unknown command" in message


def _register(client: redis.Redis | aioredis.Redis) -> dict[str, _Registered]:
    """Every script of lua/, registered on `client` (loaded into Redis by its first call)."""
    return {name: _Registered(name, client) for name in _sources()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
