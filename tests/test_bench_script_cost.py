"""The short form of `python -m bench.script_cost` (and of its --stages and --floor): a few
hundred calls of the project's submit script on a throwaway Redis, every one accepted, and the
cost printed for each command."""

from __future__ import annotations

import pytest

from bench.script_cost import FLOOR, STAGES, measure, stages
from service.dev.servers import redis_version
from service.scripts import load


def test_the_script_cost_is_measured_on_accepted_calls(capsys: pytest.CaptureFixture[str]) -> None:
    measure(load("submit_score").body, "submit_score", calls=640)
    out = capsys.readouterr().out
    assert "us of Redis CPU per call" in out
    calls = ["evalsha", "fcall"] if redis_version() >= (7,) else ["evalsha"]
    for command in (*calls, "zadd", "zcount", "xadd", "exists"):
        assert f"  {command} " in out, out


def test_each_step_of_the_script_and_its_floor_are_measured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stages(load("submit_score").body, calls=320)  # every cut must still be accepted
    measure(FLOOR.read_text(), "floor", calls=320)
    out = capsys.readouterr().out
    for label, _ in STAGES:
        assert f"{label} by " in out, out
    assert "whole script by " in out and "floor by EVALSHA: " in out
