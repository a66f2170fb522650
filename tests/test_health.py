"""/readyz reports the persister (live workers, lag), and `score-service worker --check` tells a
process manager whether this host's worker is alive."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import redis
from support import ROOT, stop_process

from persister import heartbeat
from service.dev.servers import wait_for
from service.keys import PERSISTER_WORKERS, KeySchema
from service.persister_lag import HEARTBEAT_FRESH_S


def _persister(client) -> tuple[str, dict[str, object], str]:
    body = client.get("/readyz").json()
    return body["status"], body["persister"], body["detail"]


def test_healthz_and_readyz_with_a_live_worker(client, r: redis.Redis) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    heartbeat.beat(r, "elsewhere:1")
    wait_for(lambda: _persister(client)[0] == "ready", 5, "ready with a live worker")
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["redis"] == "ok" and body["postgres"] == "ok" and body["detail"] == ""
    assert body["persister"] == {"workers": 1, "lag_seconds": 0.0}


def test_no_live_worker_is_degraded_but_ready(client, r: redis.Redis) -> None:
    seconds, _ = r.time()
    stale_ms = (seconds - HEARTBEAT_FRESH_S - 5) * 1000  # a worker that stopped beating
    r.zadd(PERSISTER_WORKERS, {"gone:1": stale_ms})
    ready = client.get("/readyz")
    assert ready.status_code == 200  # the hot path does not need the persister
    status, persister, detail = _persister(client)
    assert status == "degraded"
    assert persister["workers"] == 0
    assert "no persister worker" in detail


def test_a_lag_past_the_threshold_is_degraded(client, r: redis.Redis) -> None:
    heartbeat.beat(r, "elsewhere:1")
    seconds, _ = r.time()
    events = KeySchema(1).all()[0].events
    r.xadd(events, {"e": "x"}, id=f"{(seconds - 60) * 1000}-0")  # waiting for a minute
    wait_for(lambda: "behind" in _persister(client)[2], 5, "degraded by the lag")
    status, persister, detail = _persister(client)
    assert status == "degraded" and persister["workers"] == 1
    assert 59 <= float(persister["lag_seconds"]) <= 120  # type: ignore[arg-type]
    assert "behind (SCORE_PERSISTER_LAG_DEGRADED_S=30)" in detail


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--check"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_worker_check_follows_a_real_worker(env, r: redis.Redis, pg, tmp_path: Path) -> None:
    heartbeat.beat(r, "another-host:1")  # another host's worker does not make this one healthy
    none = _check(env)
    assert none.returncode == 1, none.stdout + none.stderr
    assert "no persister worker on" in none.stdout
    log = tmp_path / "worker.log"
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: _check(env).returncode == 0, 30, "the worker's heartbeat")
        assert f"healthy: {socket.gethostname()}:{worker.pid}" in _check(env).stdout
        worker.terminate()
        assert worker.wait(30) == 0
        # a worker that stops says so: unhealthy at once, not after the heartbeat's freshness
        gone = _check(env)
        assert gone.returncode == 1, gone.stdout
        assert r.zscore(PERSISTER_WORKERS, f"{socket.gethostname()}:{worker.pid}") is None
    finally:
        stop_process(worker)
