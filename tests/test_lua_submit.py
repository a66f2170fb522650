"""Contract of lua/submit_score-7.lua, the hot path: the same tests on fakeredis and real Redis.

Every test runs twice, `[fake]` (fakeredis, Lua 5.1 via lupa) and `[real]` (the suite's
redis-server, FLUSHDB first). A test that passes on one and fails on the other is a fakeredis
divergence: it is reported, never hidden by a skip.

The rate limit is one request per hour (lua_harness.HOUR_US), so no allowance is refilled
while a test runs and the tests need no clock: every accepted call spends exactly one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import uuid
from collections.abc import Iterator

import pytest
import redis
from lua_harness import (
    BACKENDS,
    HOUR_US,
    Harness,
    HotPathRedis,
    async_twin,
    has_functions,
    open_backend,
)

from service.scripts import FLUSH_FLAG_TTL_S, Scripts, Status, load, publish_top, submit_settings
from service.settings import MAX_SCORE


@pytest.fixture(params=BACKENDS)
def h(request: pytest.FixtureRequest) -> Iterator[Harness]:
    with open_backend(request.param, request) as client:
        yield Harness(client)


def ids(*names: str) -> list[str]:
    """User ids private to this test, in the same byte order as `names`."""
    prefix = uuid.uuid4().hex[:8]
    return [f"{prefix}-{name}" for name in names]


# --- accepted increments -------------------------------------------------------------------


def test_ok_returns_total_and_rank_with_ties_sharing_a_rank(h: Harness) -> None:
    z, a, big_b, d, e = ids("z", "a", "B", "d", "e")  # byte order: B < a < d < e < z
    h.provision(z, a, big_b, d, e)

    outcomes = [
        (h.submit(z, 10), 10, 1),
        (h.submit(a, 10), 10, 1),  # ties z: the same rank
        (h.submit(d, 25), 25, 1),
        (h.submit(big_b, 10), 10, 2),  # 1 + the one user strictly higher (d)
        (h.submit(e, 1), 1, 5),  # 1 + d, B, a, z
    ]
    for result, total, rank in outcomes:
        assert (result.status, result.total, result.rank) == (Status.OK, total, rank)
        assert result.retry_after_us == 0
        assert result.remaining == h.settings.rate_burst - 1  # each user's first request

    # listed by score descending, then user_id ascending (bytes: "B" < "a")
    assert h.board() == [(d, 25), (big_b, 10), (a, 10), (z, 10), (e, 1)]
    assert h.submit(z, 15).rank == 1  # z 25 ties d 25
    assert h.board()[:2] == [(d, 25), (z, 25)]


def test_each_accepted_increment_appends_one_event_with_its_id(h: Harness) -> None:
    a, b = ids("a", "b")
    h.provision(a, b)
    plain = h.prepare(a, 5)
    keyed = h.prepare(b, 7, "order-1")
    adjustment = h.prepare(a, -1, operator=True)
    for call in (plain, keyed, adjustment):
        assert h.scripts.run(call).status is Status.OK

    events = h.events()
    assert [fields for _, fields in events] == [
        {"e": str(plain.args[2]), "u": a, "d": "5"},
        {"e": str(keyed.args[2]), "u": b, "d": "7", "k": "order-1", "t": "7"},  # key, new total
        {"e": str(adjustment.args[2]), "u": a, "d": "-1"},
    ]
    assert len({fields["e"] for _, fields in events}) == 3  # unique per accepted increment
    assert h.prepare(b, 7, "order-1").args[2] != keyed.args[2]  # random, even with a key
    assert h.submit("ghost", 1).status is Status.UNKNOWN_USER
    assert h.submit(b, 7, "order-1").status is Status.REPLAY
    assert len(h.events()) == 3  # refusals and replays record no increment


# --- idempotency ---------------------------------------------------------------------------


def test_replay_returns_the_first_total_and_adds_nothing(h: Harness) -> None:
    a, b = ids("a", "b")
    h.provision(a, b)
    first = h.submit(a, 7, "k1")
    assert (first.status, first.total, first.rank) == (Status.OK, 7, 1)
    idem = h.prepare(a, 7, "k1").keys[2]
    assert 0 < h.client.ttl(idem) <= h.settings.idempotency_ttl_s
    assert h.submit(a, 3).total == 10
    assert h.submit(b, 20).total == 20
    board, events, tops = h.board(), h.events(), h.top_entries()

    replay = h.submit(a, 7, "k1")
    assert (replay.status, replay.total) == (Status.REPLAY, 7)  # the first call's total
    assert replay.rank == 1  # the first call's rank, though b has passed a since
    assert (replay.flush, replay.top_version) == (False, "")
    assert (h.board(), h.events(), h.top_entries()) == (board, events, tops)


def test_a_key_used_again_after_its_record_expired_is_another_increment(h: Harness) -> None:
    a, b = ids("a", "b")
    h.provision(a, b)
    assert h.submit(a, 7, "k1").total == 7
    assert h.submit(b, 7, "k1").total == 7  # keys are per user
    h.client.delete(h.prepare(a, 7, "k1").keys[2])  # what its expiry does, a day later

    again = h.submit(a, 7, "k1")
    assert (again.status, again.total) == (Status.OK, 14)
    assert h.submit(a, 7, "k1").status is Status.REPLAY  # remembered again, from now on
    first, _, second = (fields for _, fields in h.events())
    assert (first["k"], first["t"], second["k"], second["t"]) == ("k1", "7", "k1", "14")
    assert first["e"] != second["e"]  # two increments: two ledger rows in Postgres
    assert h.board() == [(a, 14), (b, 7)]


def test_a_players_key_and_an_operators_are_apart(h: Harness) -> None:
    """A player who uses an operator's adjustment key first does not turn the adjustment
    into a conflict; each replay returns its own first result."""
    a, b = ids("a", "b")
    h.provision(a, b)
    assert h.submit(b, 50).total == 50
    player = h.submit(a, 10, "penalty-2026-11")
    assert (player.status, player.total, player.rank) == (Status.OK, 10, 2)
    operator = h.submit(a, -4, "penalty-2026-11", operator=True)
    assert (operator.status, operator.total, operator.rank) == (Status.OK, 6, 2)
    assert h.board() == [(b, 50), (a, 6)]
    again = h.submit(a, 10, "penalty-2026-11")
    assert (again.status, again.total, again.rank) == (Status.REPLAY, 10, 2)
    again = h.submit(a, -4, "penalty-2026-11", operator=True)
    assert (again.status, again.total, again.rank) == (Status.REPLAY, 6, 2)
    # the stream (and so the ledger) tells them apart: a rebuild restores each to its own
    keys = [fields.get("k") for _, fields in h.events()]
    assert keys == [None, "penalty-2026-11", "operator penalty-2026-11"]
    assert h.prepare(a, 1, "k").keys[2] != h.prepare(a, 1, "k", operator=True).keys[2]


def test_a_record_restored_without_a_rank_replays_with_rank_0(h: Harness) -> None:
    (a,) = ids("a")
    h.provision(a)
    idem = h.prepare(a, 7, "k1").keys[2]
    h.client.set(idem, "7:40")  # what a rebuild restores from the ledger: no rank
    replay = h.submit(a, 7, "k1")
    assert (replay.status, replay.total, replay.rank) == (Status.REPLAY, 40, 0)
    assert h.submit(a, 8, "k1").status is Status.IDEMPOTENCY_MISMATCH


def test_idempotency_key_reused_with_another_delta_writes_nothing(h: Harness) -> None:
    (a,) = ids("a")
    h.provision(a)
    assert h.submit(a, 7, "k1").status is Status.OK
    before = h.snapshot()

    for delta in (8, 70):
        mismatch = h.submit(a, delta, "k1")
        assert mismatch.status is Status.IDEMPOTENCY_MISMATCH
        assert (mismatch.total, mismatch.rank) == (0, 0)
    assert h.submit(a, 8, "k1").remaining == h.settings.rate_burst - 1  # nothing spent
    h.assert_unchanged(before)
    assert h.submit(a, 8, "k2").total == 15  # another key is another request
    assert h.submit(a, -7, "k3", operator=True).total == 8
    before = h.snapshot()
    mismatch = h.submit(a, -8, "k3", operator=True)  # an operator's key: the same rule
    assert (mismatch.status, mismatch.total, mismatch.rank) == (Status.IDEMPOTENCY_MISMATCH, 0, 0)
    h.assert_unchanged(before)


# --- unknown users -------------------------------------------------------------------------


def test_unknown_user_leaves_the_keyspace_byte_for_byte_unchanged(h: Harness) -> None:
    a, ghost = ids("a", "ghost")
    h.provision(a)
    assert h.submit(a, 3, "k").status is Status.OK  # every kind of key exists now
    before = h.snapshot()
    assert {kind for kind, _, _ in before.values()} == {b"zset", b"string", b"stream"}

    for key in (None, "k", "other"):
        for _ in range(3):
            result = h.submit(ghost, 5, key)
            assert (result.status, result.total, result.rank) == (Status.UNKNOWN_USER, 0, 0)
            assert result.remaining == h.settings.rate_burst  # its allowance is untouched
            assert result.flush is False
    h.assert_unchanged(before)


# --- range ---------------------------------------------------------------------------------


def test_exactly_2_53_minus_1_is_accepted_and_read_back_exactly(h: Harness) -> None:
    a, b = ids("a", "b")
    wide = h.with_settings(max_increase=MAX_SCORE)
    wide.provision(a, b)
    result = wide.submit(a, MAX_SCORE)
    assert (result.status, result.total, result.rank) == (Status.OK, MAX_SCORE, 1)

    raw = h.client.zrange(h.keys.leaderboard, 0, 0, withscores=True, score_cast_func=bytes)
    assert raw == [(a.encode(), b"-9007199254740991")]  # Redis's own text, not a float
    assert wide.board() == [(a, MAX_SCORE), (b, 0)]
    assert wide.events()[-1][1]["d"] == "9007199254740991"
    assert wide.top_entries()[-1][1] == [(a, MAX_SCORE), (b, 0)]

    before = wide.snapshot()
    over = wide.submit(a, 1)
    assert (over.status, over.total, over.rank) == (Status.OUT_OF_RANGE, 0, 0)
    wide.assert_unchanged(before)


def test_a_total_past_2_53_minus_1_is_refused_never_rounded(h: Harness) -> None:
    (a,) = ids("a")
    h.provision(a)
    h.client.zadd(h.keys.leaderboard, {a: -(MAX_SCORE - 3)})
    before = h.snapshot()
    for delta in (4, 5, 1_000_000):  # MAX+2 = 2^53+1 is no double: it would round to 2^53
        assert h.submit(a, delta).status is Status.OUT_OF_RANGE
    h.assert_unchanged(before)

    assert h.submit(a, 3).total == MAX_SCORE
    assert h.board() == [(a, MAX_SCORE)]


def test_out_of_range_deltas_are_refused_and_write_nothing(h: Harness) -> None:
    (a,) = ids("a")
    h.provision(a)
    assert h.submit(a, 10).total == 10
    before = h.snapshot()
    refused = [
        h.submit(a, -1),  # players only add
        h.submit(a, h.settings.max_increase + 1),
        h.submit(a, 2**60),  # beyond any double-exact integer: out of range, not misuse
        h.submit(a, -(2**60), operator=True),
        h.submit(a, -11, operator=True),  # the total may not go below 0
    ]
    for result in refused:
        assert (result.status, result.total, result.rank) == (Status.OUT_OF_RANGE, 0, 0)
    h.assert_unchanged(before)


def test_operator_may_subtract_down_to_zero(h: Harness) -> None:
    a, b = ids("a", "b")
    h.provision(a, b)
    assert h.submit(a, 10).total == 10
    assert h.submit(b, 4).total == 4
    down = h.submit(a, -7, operator=True)
    assert (down.status, down.total, down.rank) == (Status.OK, 3, 2)
    zero = h.submit(a, -3, operator=True)
    assert (zero.status, zero.total, zero.rank) == (Status.OK, 0, 2)
    assert h.board() == [(b, 4), (a, 0)]
    assert h.events()[-1][1]["d"] == "-3"
    assert h.submit(a, -1, operator=True).status is Status.OUT_OF_RANGE
    # operators are not rate limited: only a's own +10 has spent from its allowance
    assert h.submit(a, 1).remaining == h.settings.rate_burst - 2


# --- rate limit ----------------------------------------------------------------------------


def test_burst_then_refusal_with_a_retry_delay(h: Harness) -> None:
    a, b = ids("a", "b")
    limited = h.with_settings(rate_burst=3)
    limited.provision(a, b)

    for spent in (1, 2, 3):
        ok = limited.submit(a, 1)
        assert (ok.status, ok.remaining) == (Status.OK, 3 - spent)
        # the full burst is back `spent` intervals after the first call (less the time gone)
        assert (spent - 1) * HOUR_US < ok.reset_after_us <= spent * HOUR_US
    rate_key = limited.prepare(a, 1).keys[1]
    assert 0 < h.client.pttl(rate_key) <= math.ceil(3 * HOUR_US / 1000)

    before = limited.snapshot()
    for key in (None, "k"):
        refused = limited.submit(a, 1, key)
        assert (refused.status, refused.total, refused.rank) == (Status.RATE_LIMITED, 0, 0)
        assert 0 < refused.retry_after_us <= HOUR_US  # one interval after the first call
        assert refused.remaining == 0
        assert 2 * HOUR_US < refused.reset_after_us <= 3 * HOUR_US
        assert refused.flush is False
    limited.assert_unchanged(before)  # a refusal does not push the next slot further away

    assert limited.submit(b, 1).status is Status.OK  # the allowance is per user
    assert limited.submit(a, 1, operator=True).status is Status.OK  # operators: no limit
    assert h.board()[0] == (a, 4)


def test_only_accepted_calls_and_replays_spend_the_allowance(h: Harness) -> None:
    (a,) = ids("a")
    limited = h.with_settings(rate_burst=3)
    limited.provision(a)
    first = limited.submit(a, 1, "k")
    assert (first.status, first.remaining) == (Status.OK, 2)
    replay = limited.submit(a, 1, "k")
    assert (replay.status, replay.remaining) == (Status.REPLAY, 1)  # a replay spends

    for _ in range(5):
        mismatch = limited.submit(a, 2, "k")
        assert (mismatch.status, mismatch.remaining) == (Status.IDEMPOTENCY_MISMATCH, 1)
        assert limited.submit(a, -1).status is Status.OUT_OF_RANGE
        assert limited.submit(a, limited.settings.max_increase + 1).status is Status.OUT_OF_RANGE
    h.client.zadd(h.keys.leaderboard, {a: -MAX_SCORE})
    for _ in range(5):
        over = limited.submit(a, 1)
        assert (over.status, over.remaining) == (Status.OUT_OF_RANGE, 1)
    for _ in range(5):
        unknown = limited.submit("ghost", 1)  # never provisioned: 404s cost it nothing
        assert (unknown.status, unknown.remaining) == (Status.UNKNOWN_USER, 3)

    assert limited.submit(a, -5, operator=True).total == MAX_SCORE - 5
    last = limited.submit(a, 1)
    assert (last.status, last.remaining, last.total) == (Status.OK, 0, MAX_SCORE - 4)
    assert limited.submit(a, 1).status is Status.RATE_LIMITED


# --- top-N stream --------------------------------------------------------------------------


def test_top_stream_is_appended_only_when_the_top_n_changes(h: Harness) -> None:
    a, b, c, d = ids("a", "b", "c", "d")
    top2 = h.with_settings(top_n=2)
    top2.provision(a, b, c, d)
    assert top2.top_entries()[-1][1] == [(a, 0), (b, 0)]

    steps = [  # (user, delta, the new top-2, or None when it must not change)
        (c, 10, [(c, 10), (a, 0)]),  # enters
        (d, 20, [(d, 20), (c, 10)]),
        (a, 1, None),  # a change below the top-2
        (b, 5, None),
        (c, 1, [(d, 20), (c, 11)]),  # a member's score changes
        (b, 10, [(d, 20), (b, 15)]),  # b enters, c leaves
        (c, 4, None),  # c ties b at 15 but sorts after it: still outside
        (a, 19, [(a, 20), (d, 20)]),  # a ties d and sorts before it
        (a, -20, [(d, 20), (b, 15)]),  # an operator takes a out: b moves up
        (c, -15, None),  # an operator lowers c, below the top-2
    ]
    for user, delta, expected in steps:
        entries = top2.top_entries()
        result = top2.submit(user, delta, operator=delta < 0)
        assert result.status is Status.OK
        if expected is None:
            assert result.top_version == ""
            assert top2.top_entries() == entries
        else:
            after = top2.top_entries()
            assert after[:-1] == entries  # exactly one entry appended
            assert after[-1] == (result.top_version, expected)


def test_refused_calls_publish_nothing(h: Harness) -> None:
    (a,) = ids("a")
    h.provision(a)
    entries = h.top_entries()
    assert len(entries) == 1
    assert h.submit(a, -1).top_version == ""
    assert h.submit("ghost", 1).top_version == ""
    assert h.top_entries() == entries


def test_publish_top_appends_the_current_top_n(h: Harness) -> None:
    a, b, c = ids("a", "b", "c")
    version = h.scripts.run(publish_top(h.keys, 2))
    assert h.top_entries() == [(version, [])]  # an empty leaderboard is a version too
    h.provision(a, b, c)
    h.client.zadd(h.keys.leaderboard, {c: -7})  # e.g. a rebuild, outside submit_score
    version = h.scripts.run(publish_top(h.keys, 2))
    assert h.top_entries()[-1] == (version, [(c, 7), (a, 0)])

    before = h.snapshot()
    for top_n in (0, -1, "x"):
        with pytest.raises(redis.ResponseError, match="publish_top: bad top N"):
            h.client.eval(load("publish_top").body, 2, h.keys.leaderboard, h.keys.top, top_n, 10)
    h.assert_unchanged(before)


# --- flush flag ----------------------------------------------------------------------------


def test_flush_is_requested_once_while_the_flag_exists(h: Harness) -> None:
    a, b = ids("a", "b")
    h.provision(a, b)
    assert h.submit("ghost", 1).flush is False
    assert h.client.exists(h.keys.flush_flag) == 0  # a refusal requests nothing

    assert h.submit(a, 1).flush is True
    assert 0 < h.client.ttl(h.keys.flush_flag) <= FLUSH_FLAG_TTL_S
    assert h.submit(b, 1).flush is False
    assert h.submit(a, 1, operator=True).flush is False

    h.client.delete(h.keys.flush_flag)  # the flag expired, or the persister cleared it
    assert h.submit(a, 1, "k").flush is True
    h.client.delete(h.keys.flush_flag)
    assert h.submit(a, 1, "k").flush is False  # a replay has no event to flush
    assert h.client.exists(h.keys.flush_flag) == 0


# --- misuse --------------------------------------------------------------------------------


def test_wrong_key_count_is_refused_in_python_and_in_lua(h: Harness) -> None:
    (a,) = ids("a")
    h.provision(a)
    call = h.prepare(a, 1)
    before = h.snapshot()
    for keys in (call.keys[:6], [*call.keys, "extra"]):
        with pytest.raises(ValueError, match="submit_score takes 7 keys"):
            h.scripts.run(dataclasses.replace(call, keys=keys))
        # a caller that bypasses the wrapper gets an error reply from the script itself
        with pytest.raises(redis.ResponseError, match="submit_score: takes 7 keys"):
            h.client.eval(load("submit_score").body, len(keys), *keys, *call.args)
    h.assert_unchanged(before)


GOOD_SETTINGS = submit_settings(1, 1, 1, 1, 1, False, 1, 1)


def _with_setting(index: int, value: str) -> str:
    """submit_score's settings argument with its `index`th field replaced by `value`."""
    fields = GOOD_SETTINGS.split(" ")
    fields[index] = value
    return " ".join(fields)


BAD_ARGS = [
    (0, ""),  # user_id
    (1, "0"),  # delta
    (1, "-0"),
    (1, "abc"),
    (1, "1.5"),
    (1, "1e3"),
    (1, " 7"),
    (1, "0x10"),
    (1, "nan"),
    (1, ""),
    (2, ""),  # event id
    (4, _with_setting(0, "-1")),  # interval
    (4, _with_setting(0, str(2**53))),
    (4, _with_setting(1, "0")),  # burst
    (4, _with_setting(2, "0")),  # max |delta|
    (4, _with_setting(3, "0")),  # top N
    (4, _with_setting(3, "2.5")),
    (4, _with_setting(4, "0")),  # idempotency TTL
    (4, _with_setting(5, "2")),  # negative flag
    (4, _with_setting(6, "0")),  # top MAXLEN
    (4, _with_setting(7, "-5")),  # flush TTL
    (4, _with_setting(7, "10 1")),  # nine settings
    (4, _with_setting(7, "")),  # seven, and a trailing space
    (4, " " + _with_setting(0, "0")),
    (4, _with_setting(0, "0").replace(" ", "  ", 1)),
    (4, ""),
]


@pytest.mark.parametrize(("index", "value"), BAD_ARGS)
def test_bad_argument_is_an_error_reply_and_writes_nothing(
    h: Harness, index: int, value: str
) -> None:
    (a,) = ids("a")
    h.provision(a)
    assert h.submit(a, 1, "k").status is Status.OK
    call = h.prepare(a, 1, "k2")
    before = h.snapshot()
    args = list(call.args)
    args[index] = value
    with pytest.raises(redis.ResponseError, match="submit_score: "):
        h.scripts.run(dataclasses.replace(call, args=args))
    h.assert_unchanged(before)


def test_wrong_argument_count_is_an_error_reply(h: Harness) -> None:
    (a,) = ids("a")
    h.provision(a)
    call = h.prepare(a, 1)
    before = h.snapshot()
    for args in (call.args[:4], [*call.args, "extra"], []):
        with pytest.raises(redis.ResponseError, match="submit_score: takes 5 arguments"):
            h.scripts.run(dataclasses.replace(call, args=args))
    h.assert_unchanged(before)


# --- script cache --------------------------------------------------------------------------


def _forget_scripts(client: redis.Redis) -> None:
    """What a Redis restarted without its data knows of our scripts: nothing."""
    client.script_flush()
    if has_functions(client):
        client.function_flush()


def _loaded(client: redis.Redis) -> set[str]:
    """How submit_score is loaded into Redis: as a script (EVALSHA), as a Function (FCALL)."""
    src = load("submit_score")
    forms = set()
    if client.script_exists(hashlib.sha1(src.body.encode()).hexdigest()) == [True]:
        forms.add("script")
    if has_functions(client):
        name, _ = src.function()
        if client.function_list(library=name):
            forms.add("function")
    return forms


def test_script_is_reloaded_after_redis_forgets_it(h: Harness) -> None:
    (a,) = ids("a")
    h.provision(a)
    assert h.submit(a, 1).total == 1
    forms = _loaded(h.client)
    hot = isinstance(h.client, HotPathRedis) and has_functions(h.client)
    assert forms == ({"function"} if hot else {"script"})  # hot: FCALL, where Redis has it

    _forget_scripts(h.client)
    assert _loaded(h.client) == set()
    assert h.submit(a, 2).total == 3  # NOSCRIPT or no such function, reload, run once
    assert _loaded(h.client) == forms
    assert [fields["d"] for _, fields in h.events()] == ["1", "2"]


async def test_async_scripts_reload_after_script_flush(h: Harness) -> None:
    (a,) = ids("a")
    h.provision(a)
    client = async_twin(h.client)
    try:
        scripts = Scripts(client)
        assert (await scripts.submit(h.prepare(a, 4))).total == 4
        _forget_scripts(h.client)
        assert (await scripts.submit(h.prepare(a, 5))).total == 9
        assert await scripts.run(publish_top(h.keys, 1)) == h.top_entries()[-1][0]
    finally:
        await client.aclose()
    assert h.board() == [(a, 9)]
