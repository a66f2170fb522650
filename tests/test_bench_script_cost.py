"""The short form of `python -m bench.script_cost`: a few hundred calls of the project's submit
script on a throwaway Redis, every one accepted, and the cost printed for each command."""

from __future__ import annotations

import pytest

from bench.script_cost import measure
from service.dev.servers import redis_version
from service.scripts import load


def test_the_script_cost_is_measured_on_accepted_calls(capsys: pytest.CaptureFixture[str]) -> None:
    measure(load("submit_score").body, "submit_score", calls=640)
    out = capsys.readouterr().out
    assert "us of Redis CPU per call" in out
    calls = ["evalsha", "fcall"] if redis_version() >= (7,) else ["evalsha"]
    for command in (*calls, "zadd", "zcount", "xadd", "exists"):
        assert f"  {command} " in out, out
