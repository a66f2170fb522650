"""Hundreds of concurrent increments to one user, over HTTP against a real `score-service serve`
(two worker processes), sum exactly: each request sees a distinct state of the score."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from support import start_service, stop_process

from service.keys import KeySchema

REQUESTS = 200
IN_FLIGHT = 32  # requests in flight at once (more only queues inside the client's pool)


async def test_concurrent_increments_to_one_user_sum_exactly(
    env, r, add_users, token, tmp_path: Path
) -> None:
    (alice,) = add_users(count=1)
    svc = start_service(env, tmp_path / "serve.log", "--workers", "2")
    try:
        headers = {"Authorization": f"Bearer {token(alice)}"}
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        in_flight = asyncio.Semaphore(IN_FLIGHT)
        async with httpx.AsyncClient(base_url=svc.base, timeout=30, limits=limits) as client:

            async def increment(delta: int) -> tuple[int, int]:
                body = {"user_id": alice, "score_increase": delta}
                async with in_flight:
                    resp = await client.post("/api/v1/score", json=body, headers=headers)
                assert resp.status_code == 200, resp.text
                return resp.json()["new_score"], delta

            results = await asyncio.gather(*(increment(1 + i % 7) for i in range(REQUESTS)))
            user = (await client.get(f"/api/v1/users/{alice}")).json()
    finally:
        stop_process(svc.process)

    # Ordered by the score they produced, the replies form one chain: each request added its
    # own delta to exactly the score the previous one left.
    total = 0
    for new_score, delta in sorted(results):
        assert new_score == total + delta
        total = new_score
    assert total == sum(1 + i % 7 for i in range(REQUESTS))
    assert user["score"] == total
    keys = KeySchema(1).for_user(alice)
    assert r.zscore(keys.leaderboard, alice) == -total
    assert r.xlen(keys.events) == REQUESTS
