"""service.tally: counts handed over in bulk give the metric exactly what counting each one
at once gives it."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.tally import CountTally, HistogramTally

BUCKETS = (0.0005, 0.001, 0.01, 0.1, 1.0)
amounts = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=5, allow_nan=False),
        st.sampled_from([0.0, *BUCKETS, 2.0]),  # on a bound: that bucket, as observe() does
    ),
    max_size=50,
)


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    return {
        (s.name.removeprefix(name), s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


@given(st.lists(amounts, min_size=1, max_size=4))
def test_a_histogram_tally_flushed_between_rounds_equals_observing_each(rounds) -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    expected = Histogram("h", "h", ["status"], buckets=BUCKETS, registry=direct).labels("200")
    tally = HistogramTally(
        Histogram("h", "h", ["status"], buckets=BUCKETS, registry=tallied).labels("200")
    )
    for amounts_of_round in rounds:
        for amount in amounts_of_round:
            expected.observe(amount)
            tally.observe(amount)
        tally.flush()
        got, want = _samples(tallied, "h"), _samples(direct, "h")
        # the sum is added up in another order: equal up to rounding
        assert math.isclose(got.pop(("_sum", "")), want.pop(("_sum", "")), rel_tol=1e-12)
        assert got == want  # the count and every bucket, exactly


def test_a_count_tally_adds_its_count_at_flush_only() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", registry=registry)
    tally = CountTally(counter)
    for _ in range(3):
        tally.inc()
    assert registry.get_sample_value("c_total") == 0
    tally.flush()
    tally.flush()  # nothing new: nothing added
    assert registry.get_sample_value("c_total") == 3
