"""The chaos soak's short form: one minute of every fault family with a fixed seed.

`make soak` runs the same engine for ten minutes with a new seed each time (tests/soak/, and
the README's "Chaos soak"). A failure prints the report: what was injected, every answer per
status, which users differ in which store, and the command that replays the run.
"""

from __future__ import annotations

import pytest
from soak.driver import FAMILIES
from soak.run import SoakConfig, run_soak

SEED = 20261202


@pytest.mark.timeout(420)
def test_a_minute_of_chaos_loses_nothing_and_doubles_nothing() -> None:
    result = run_soak(SoakConfig(seconds=60, seed=SEED, families=set(FAMILIES), max_hold_s=3.0))
    if result.failures:
        pytest.fail(result.report, pytrace=False)
