"""SCORE_RATE_LIMIT and SCORE_RATE_BURST: whatever passes startup works in the hot path.

`1/3000000h` once passed startup and then made every request a 500: lua/submit_score-6.lua
refuses an emission interval past 2^53-1 us (an error reply). Here every rate and burst either
is refused by `Settings.from_env` with one line, or runs through the script: accepted, then
accepted or rate-limited, never an error; and the rate limit's state stays an exact integer
with a valid expiry. Hypothesis draws the settings (on fakeredis); the extremes that pass run
on both fakeredis and the real Redis.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import fakeredis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from lua_harness import BACKENDS, Harness, open_backend

from service.scripts import Status
from service.settings import MAX_RATE_WINDOW_US, MAX_SCORE, ConfigError, Settings

SECRET = "s" * 40
_users = itertools.count()

counts = st.one_of(st.integers(1, 1000), st.integers(1, 10**15))
multiples = st.one_of(st.just(""), st.integers(0, 1000).map(str), st.integers(0, 10**15).map(str))
units = st.sampled_from(["ms", "s", "m", "h"])
bursts = st.one_of(st.integers(1, 100), st.integers(-1, 2_000_000))


def settings_for(rate: str, burst: int) -> Settings | None:
    """The settings, or None when startup refuses them (with one line naming the variable)."""
    env = {"SCORE_JWT_SECRET": SECRET, "SCORE_RATE_LIMIT": rate, "SCORE_RATE_BURST": str(burst)}
    try:
        return Settings.from_env(env)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and "SCORE_RATE_" in message, message
        return None


def runs(client: redis.Redis, s: Settings) -> None:
    """Three calls of one new user through the script: no error reply, an exact state."""
    h = Harness(client, s)
    user = f"rate-{next(_users)}"
    h.provision(user)
    statuses = []
    for _ in range(3):
        result = h.submit(user, 1)
        statuses.append(result.status)
        assert 0 <= result.retry_after_us <= s.rate_interval_us * s.rate_burst
        assert 0 <= result.reset_after_us <= s.rate_interval_us * s.rate_burst
    assert statuses[0] is Status.OK
    assert set(statuses) <= {Status.OK, Status.RATE_LIMITED}
    rate_key = h.prepare(user, 1).keys[1]
    tat = h.client.get(rate_key)  # gone already, when a fast rate's state lived a millisecond
    assert tat is None or 0 < int(tat) <= MAX_SCORE  # written with %d: an exact integer
    assert h.client.pttl(rate_key) != -1  # never kept without an expiry


@pytest.fixture(scope="module")
def fake() -> Iterator[redis.Redis]:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    client.close()


@settings(max_examples=300, deadline=None)
@given(count=counts, multiple=multiples, unit=units, burst=bursts)
def test_any_rate_that_passes_startup_runs_in_the_script(
    fake: redis.Redis, count: int, multiple: str, unit: str, burst: int
) -> None:
    s = settings_for(f"{count}/{multiple}{unit}", burst)
    if s is not None:
        runs(fake, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("rate", "burst"),
    [("1/87600h", 1), ("1/315360ms", 1_000_000), ("1000/ms", 1_000_000), ("1000/ms", 1),
     ("1/1ms", 1)],
    ids=["slowest", "slowest with the largest burst", "fastest, largest burst", "fastest",
         "one per ms"],
)  # fmt: skip
def test_the_extremes_that_pass_run_on_both_backends(
    request: pytest.FixtureRequest, backend: str, rate: str, burst: int
) -> None:
    s = settings_for(rate, burst)
    assert s is not None and s.rate_interval_us * s.rate_burst <= MAX_RATE_WINDOW_US
    with open_backend(backend, request) as client:
        runs(client, s)


@pytest.mark.parametrize(
    ("rate", "burst"), [("1/3000000h", 1), ("1/87600h", 2), ("1/315361ms", 1_000_000)]
)
def test_just_past_the_extremes_is_refused(rate: str, burst: int) -> None:
    assert settings_for(rate, burst) is None
