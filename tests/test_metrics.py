"""/metrics: the hot path's responses are counted, and with several workers a scrape of any
one of them reports them all (Prometheus multiprocess mode)."""

from __future__ import annotations

import re

import httpx
from conftest import start_service, stop_process

from service.keys import KeySchema


def _accepted(text: str) -> float:
    m = re.search(r'^score_update_responses_total\{status="200"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


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
            for _ in range(4):  # whichever worker answers the scrape, the sums are whole
                text = c.get("/metrics", headers={"Connection": "close"}).text
                assert _accepted(text) == 40
                assert 'score_update_responses_total{status="404"} 1.0' in text
                assert "score_persister_lag_seconds" in text
    finally:
        stop_process(svc.process)
