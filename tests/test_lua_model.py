"""Hypothesis state machine: lua/submit_score-7.lua against a pure-Python leaderboard model.

The machine provisions users, submits for random users (unknown ones included) with random
deltas (too large ones included), with or without Idempotency-Keys (reused ones included, with
another delta too, and again after their record expired), and makes operator adjustments
(with the same keys: an operator's namespace is not the player's); a replay must answer the
first response's total and rank;
after every step the script's replies, the leaderboard, the top stream, the events stream
(with the key and the new total of a keyed increment), the flush flag and the rate limit must
be what the model says.

Time: the rate limit is one request per hour (lua_harness.HOUR_US) with a burst of BURST, so
no allowance is refilled while an example runs: a user's first BURST spending calls pass, the
rest are refused, and the model needs no clock. The flush flag lives an hour too (instead of
FLUSH_FLAG_TTL_S, 10 s, which a slow example on a loaded machine can outlive); its expiry is
the rule that clears it. Each example starts from an empty Redis (a new fakeredis server, or
FLUSHDB on the real one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from lua_harness import BACKENDS, HOUR_US, Harness, open_backend

import service.scripts
from service.keys import stored_idempotency_key
from service.scripts import FLUSH_FLAG_TTL_S, Status, SubmitResult
from service.settings import MAX_SCORE, Settings

BURST = 4
FLUSH_TTL_S = HOUR_US // 1_000_000
TOP_N = 3
MAX_INCREASE = MAX_SCORE  # the largest allowed: one or two steps can pass 2^53-1
MODEL_SETTINGS = Settings(
    rate_interval_us=HOUR_US, rate_burst=BURST, max_increase=MAX_INCREASE, top_n=TOP_N
)
# byte order "B" < "a" < "ab" < "b" < "c" < "zz": ties are listed in this order
USERS = ["a", "b", "B", "ab", "c", "zz"]
IDEMPOTENCY_KEYS = ["k1", "k2"]

users = st.sampled_from(USERS)
idempotency_keys = st.none() | st.sampled_from(IDEMPOTENCY_KEYS)
player_deltas = st.one_of(
    st.integers(1, 50),
    st.integers(1, MAX_INCREASE),
    st.sampled_from([MAX_SCORE, MAX_SCORE + 1, 2**64]),  # the largest accepted, too large
    st.integers(-50, -1),  # refused: players only add
)
operator_deltas = st.one_of(
    st.integers(-60, -1), st.integers(-MAX_INCREASE, -1), st.integers(1, 50)
)
gaps = st.integers(-1, 1)  # to land on a bound (0, 2^53-1) or one either side of it
REFUSALS = {Status.RATE_LIMITED, Status.UNKNOWN_USER, Status.OUT_OF_RANGE}


@dataclass(frozen=True)
class Expected:
    status: Status
    total: int = 0
    rank: int = 0
    remaining: int = 0


@dataclass
class Model:
    """The leaderboard as the contract describes it, in plain Python."""

    scores: dict[str, int] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)  # rate allowance spent, per user
    records: dict[tuple[str, str, bool], tuple[int, int, int]] = field(default_factory=dict)
    """(user, key, by an operator) -> (delta, total, rank) of the first response: players and
    operators have separate namespaces."""
    events: list[dict[str, str]] = field(default_factory=list)
    top_entries: int = 0
    flush_flag: bool = False

    def board(self) -> list[tuple[str, int]]:
        """Score descending, then user_id ascending by bytes (Redis's order for ties)."""
        return sorted(self.scores.items(), key=lambda item: (-item[1], item[0].encode()))

    def top(self) -> list[tuple[str, int]]:
        return self.board()[:TOP_N]

    def rank(self, user: str) -> int:
        return 1 + sum(score > self.scores[user] for score in self.scores.values())

    def submit(
        self, user: str, delta: int, key: str | None, operator: bool, event_id: str
    ) -> Expected:
        """Apply one call in the script's order of checks; what it must reply."""
        if (delta < 0 and not operator) or abs(delta) > MAX_INCREASE:
            return Expected(Status.OUT_OF_RANGE)
        spent = self.spent.get(user, 0)
        if not operator and spent >= BURST:
            return Expected(Status.RATE_LIMITED)
        remaining = 0 if operator else BURST - spent
        record = self.records.get((user, key, operator)) if key is not None else None
        if record is not None:
            if record[0] != delta:
                return Expected(Status.IDEMPOTENCY_MISMATCH, remaining=remaining)
            remaining = self._spend(user, operator, remaining)
            return Expected(Status.REPLAY, record[1], record[2], remaining)
        if user not in self.scores:
            return Expected(Status.UNKNOWN_USER, remaining=remaining)
        total = self.scores[user] + delta
        if not 0 <= total <= MAX_SCORE:
            return Expected(Status.OUT_OF_RANGE, remaining=remaining)
        remaining = self._spend(user, operator, remaining)
        self.scores[user] = total
        event = {"e": event_id, "u": user, "d": str(delta)}
        if key is not None:
            self.records[(user, key, operator)] = (delta, total, self.rank(user))
            event.update(k=stored_idempotency_key(key, operator=operator), t=str(total))
        self.events.append(event)
        return Expected(Status.OK, total, self.rank(user), remaining)

    def _spend(self, user: str, operator: bool, remaining: int) -> int:
        if operator:
            return 0
        self.spent[user] = self.spent.get(user, 0) + 1
        return remaining - 1


class LeaderboardMachine(RuleBasedStateMachine):
    """The script and the model, driven by the same operations."""

    def __init__(self, empty_redis: Callable[[], redis.Redis]) -> None:
        super().__init__()
        self.h = Harness(empty_redis(), MODEL_SETTINGS)
        self.model = Model()
        self.first_tat: dict[str, int] = {}  # GCRA state after a user's first spend

    @initialize(ids=st.lists(users, min_size=2, max_size=4))
    def provision_first(self, ids: list[str]) -> None:
        self.provision(ids)

    @rule(ids=st.lists(users, min_size=1, max_size=3))
    def provision(self, ids: list[str]) -> None:
        self.h.provision(*ids)
        if any(user not in self.model.scores for user in ids):
            self.model.top_entries += 1  # new members: the top is published again
        for user in ids:
            self.model.scores.setdefault(user, 0)

    @rule(user=users, delta=player_deltas, key=idempotency_keys)
    def submit(self, user: str, delta: int, key: str | None) -> None:
        self._call(user, delta, key, operator=False)

    @rule(user=users, delta=operator_deltas, key=idempotency_keys)
    def adjust(self, user: str, delta: int, key: str | None) -> None:
        self._call(user, delta, key, operator=True)

    @rule(
        user=users,
        bound=st.sampled_from([0, MAX_SCORE]),
        gap=gaps,
        key=idempotency_keys,
        operator=st.booleans(),
    )
    def to_bound(self, user: str, bound: int, gap: int, key: str | None, operator: bool) -> None:
        """Move a total to 0 or 2^53-1, give or take one: random deltas almost never do."""
        delta = bound - self.model.scores.get(user, 0) + gap
        assume(delta != 0)
        self._call(user, delta, key, operator)

    @precondition(lambda self: bool(self.model.records))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """Send an accepted request again, Idempotency-Key and delta unchanged."""
        user, key, operator = data.draw(st.sampled_from(sorted(self.model.records)))
        delta = self.model.records[(user, key, operator)][0]
        self._call(user, delta, key, operator)

    @precondition(lambda self: bool(self.model.records))
    @rule(data=st.data())
    def record_expires_then_the_key_is_used_again(self, data: st.DataObject) -> None:
        """An Idempotency-Key record reaches its TTL (deleted: what the expiry does); the same
        request sent again is a new increment."""
        user, key, operator = data.draw(st.sampled_from(sorted(self.model.records)))
        delta = self.model.records.pop((user, key, operator))[0]
        idem = self.h.prepare(user, delta, key, operator=operator).keys[2]
        assert self.h.client.delete(idem) == 1
        self._call(user, delta, key, operator)

    @precondition(lambda self: self.model.flush_flag)
    @rule()
    def persister_clears_the_flush_flag(self) -> None:
        self.h.client.delete(self.h.keys.flush_flag)
        self.model.flush_flag = False

    def _call(self, user: str, delta: int, key: str | None, operator: bool) -> None:
        call = self.h.prepare(user, delta, key, operator=operator)
        top_before = self.model.top()
        before = self.h.snapshot()
        result = self.h.scripts.run(call)
        expected = self.model.submit(user, delta, key, operator, str(call.args[2]))

        got = Expected(result.status, result.total, result.rank, result.remaining)
        assert got == expected, (user, delta, key, operator)
        assert (result.retry_after_us > 0) == (result.status is Status.RATE_LIMITED)
        assert result.retry_after_us <= HOUR_US
        self._check_flush(result)
        self._check_top(result, top_before)
        if self.model.spent.get(user) == 1 and user not in self.first_tat:
            self.first_tat[user] = int(self.h.client.get(call.keys[1]) or 0)
        if result.status in REFUSALS or result.status is Status.IDEMPOTENCY_MISMATCH:
            self.h.assert_unchanged(before)
        elif result.status is Status.REPLAY:
            # only the rate allowance moves
            self.h.assert_unchanged(before, but=[call.keys[1].encode()])

    def _check_flush(self, result: SubmitResult) -> None:
        accepted = result.status is Status.OK
        assert result.flush == (accepted and not self.model.flush_flag)
        self.model.flush_flag = self.model.flush_flag or accepted

    def _check_top(self, result: SubmitResult, top_before: list[tuple[str, int]]) -> None:
        changed = self.model.top() != top_before
        assert (result.top_version != "") == changed
        if changed:
            self.model.top_entries += 1
            assert self.h.top_entries()[-1][0] == result.top_version

    @invariant()
    def scores_agree(self) -> None:
        assert self.h.board() == self.model.board()

    @invariant()
    def top_stream_agrees(self) -> None:
        entries = self.h.top_entries()
        assert len(entries) == self.model.top_entries
        if entries:
            assert entries[-1][1] == self.model.top()

    @invariant()
    def events_agree(self) -> None:
        assert [fields for _, fields in self.h.events()] == self.model.events

    @invariant()
    def flush_flag_agrees(self) -> None:
        ttl = self.h.client.ttl(self.h.keys.flush_flag)
        assert (ttl != -2) == self.model.flush_flag  # -2: no such key
        if self.model.flush_flag:
            assert FLUSH_FLAG_TTL_S < ttl <= FLUSH_TTL_S  # the long TTL is in force

    @invariant()
    def rate_state_moves_one_interval_per_spend(self) -> None:
        for user in USERS:
            tat = self.h.client.get(self.h.prepare(user, 1).keys[1])
            spent = self.model.spent.get(user, 0)
            if spent == 0:
                assert tat is None  # refusals never create the state
            else:
                assert int(tat or 0) == self.first_tat[user] + (spent - 1) * HOUR_US


RUNS = {"fake": (150, 30), "real": (40, 30), "hot": (40, 30)}  # (examples, steps per example)


@pytest.mark.timeout(600)  # a failure is shrunk, step by step, before it is reported
@pytest.mark.parametrize("kind", BACKENDS)
def test_script_agrees_with_the_model(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    examples, steps = RUNS[kind]
    monkeypatch.setattr(service.scripts, "FLUSH_FLAG_TTL_S", FLUSH_TTL_S)
    with open_backend(kind, request) as client:

        def empty_redis() -> redis.Redis:
            if kind == "fake":
                return fakeredis.FakeRedis(server=fakeredis.FakeServer())
            client.flushdb()
            return client

        run_state_machine_as_test(
            lambda: LeaderboardMachine(empty_redis),
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                derandomize=True,  # CI: the same examples every run, no flaky discoveries
                database=None,  # nothing written to .hypothesis/ by CI runs
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


def test_model_orders_ties_by_user_id_bytes() -> None:
    model = Model(scores={"a": 5, "B": 5, "ab": 7, "zz": 0})
    assert model.board() == [("ab", 7), ("B", 5), ("a", 5), ("zz", 0)]
    assert [model.rank(u) for u in ("ab", "B", "a", "zz")] == [1, 2, 2, 4]
