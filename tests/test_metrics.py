"""/metrics: the hot path's responses are counted and timed, and with several workers a scrape
of any one of them reports them all (Prometheus multiprocess mode), a dead worker's gauges
excepted."""

from __future__ import annotations

import os
import re
import signal

import httpx
from support import start_service, stop_process

from service.dev.servers import wait_for
from service.keys import KeySchema


def _accepted(text: str) -> float:
    m = re.search(r'^score_update_responses_total\{status="200"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"no {series} in /metrics"
    return float(m.group(1))


def _pids(text: str) -> set[int]:
    """The processes with a live leaderboard gauge in /metrics."""
    return {int(pid) for pid in re.findall(r'^score_live_\w+\{pid="(\d+)"\}', text, re.M)}


def test_a_killed_worker_s_gauges_go_away(env, r, tmp_path) -> None:
    r.mset(dict.fromkeys(KeySchema(1).ready_markers, "1"))
    svc = start_service(env, tmp_path / "serve.log", "--workers", "2")
    try:

        def scrape() -> str:
            return httpx.get(svc.base + "/metrics", headers={"Connection": "close"}).text

        wait_for(lambda: len(_pids(scrape())) == 2, 30, "both workers' live gauges")
        victim, survivor = sorted(_pids(scrape()))
        assert f'score_live_following{{pid="{victim}"}} 1.0' in scrape()
        os.kill(victim, signal.SIGKILL)  # no shutdown hook runs: the scrape must notice
        wait_for(lambda: victim not in _pids(scrape()), 30, "the killed worker's gauges to go")
        assert survivor in _pids(scrape())
    finally:
        stop_process(svc.process)


def test_a_worker_that_exits_removes_its_gauges(env, r, tmp_path) -> None:
    r.mset(dict.fromkeys(KeySchema(1).ready_markers, "1"))
    files = tmp_path / "metrics"
    files.mkdir()
    svc = start_service(
        {**env, "PROMETHEUS_MULTIPROC_DIR": str(files)}, tmp_path / "serve.log", "--workers", "2"
    )
    try:

        def live_files(pid: int) -> list[str]:
            return [f.name for f in files.glob(f"gauge_live*_{pid}.db")]

        def scrape() -> str:
            return httpx.get(svc.base + "/metrics", headers={"Connection": "close"}).text

        wait_for(lambda: len(_pids(scrape())) == 2, 30, "both workers' live gauges")
        leaving = min(_pids(scrape()))
        assert live_files(leaving)
        os.kill(leaving, signal.SIGTERM)  # a clean exit: its lifespan ends

        def gone() -> bool:
            try:
                os.kill(leaving, 0)
            except ProcessLookupError:
                return True
            return False

        wait_for(gone, 30, "the worker to exit")
        assert live_files(leaving) == []  # removed by the worker itself, before any scrape
    finally:
        stop_process(svc.process)


def test_two_workers_report_every_accepted_update(env, r, add_users, token, tmp_path) -> None:
    (alice,) = add_users(count=1)
    r.mset(dict.fromkeys(KeySchema(1).ready_markers, "1"))  # no rebuild to wait for
    svc = start_service(env, tmp_path / "serve.log", "--workers", "2")
    try:
        headers = {"Authorization": f"Bearer {token(alice)}"}
        with httpx.Client(base_url=svc.base, timeout=5) as c:
            for _ in range(40):  # new connections: both workers answer some of them
                r = c.post(
                    "/api/v1/score",
                    json={"user_id": alice, "score_increase": 1},
                    headers={**headers, "Connection": "close"},
                )
                assert r.status_code == 200
            unknown = c.post(
                "/api/v1/score",
                json={"user_id": "ghost", "score_increase": 1},
                headers={"Authorization": f"Bearer {token('ghost')}"},
            )
            assert unknown.status_code == 404

            def scrape() -> str:
                return c.get("/metrics", headers={"Connection": "close"}).text

            # each worker hands its counts over every second (service.tally), and at once to
            # its own scrapes
            wait_for(
                lambda: _value(scrape(), "score_update_redis_seconds_count") == 41,
                10,
                "both workers' counts in a scrape",
            )
            for _ in range(4):  # whichever worker answers the scrape now, the sums are whole
                text = scrape()
                assert _accepted(text) == 40
                assert 'score_update_responses_total{status="404"} 1.0' in text
                assert "score_persister_lag_seconds" in text
                assert _value(text, 'score_update_duration_seconds_count{status="200"}') == 40
                assert _value(text, 'score_update_duration_seconds_count{status="404"}') == 1
                assert (
                    _value(text, 'score_update_duration_seconds_bucket{le="1.0",status="200"}')
                    == 40
                )
                assert 'score_update_duration_seconds_bucket{le="0.0005",status="200"}' in text
                assert _value(text, "score_update_redis_seconds_count") == 41  # the 404's too
    finally:
        stop_process(svc.process)
