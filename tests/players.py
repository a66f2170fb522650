"""Players for the fault tests: threads posting increments with Idempotency-Keys, retrying a
503 with the same key, and a client-side ledger of every acknowledged increment."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import httpx

from service.auth import mint
from service.settings import Settings

RETRY_FOR_S = 60.0
"""A player gives up on a key (and the test fails: status 0) after retrying it this long."""


class Players:
    """Threads posting increments with Idempotency-Keys, retrying a 503 with the same key; a
    ledger of what was acknowledged, and every status seen."""

    def __init__(self, base: str, settings: Settings, users: list[str]) -> None:
        self.base, self.settings, self.users = base, settings, users
        self.ledger: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._last_ok = 0.0
        self._threads = [threading.Thread(target=self._play, args=(k,)) for k in range(4)]

    def __enter__(self) -> Players:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join()

    def acknowledged(self) -> int:
        with self._lock:
            return self.statuses[200]

    def last_acknowledged_at(self) -> float:
        """time.monotonic() of the newest 200."""
        with self._lock:
            return self._last_ok

    def _play(self, k: int) -> None:
        mine = self.users[k::4]
        with httpx.Client(base_url=self.base, timeout=10) as http:
            i = 0
            while not self.stop.is_set():
                user, delta, key = mine[i % len(mine)], 1 + i % 7, uuid.uuid4().hex
                i += 1
                headers = {
                    "Authorization": f"Bearer {mint(self.settings, user)}",
                    "Idempotency-Key": key,
                }
                give_up = time.monotonic() + RETRY_FOR_S
                while True:  # to the end, even when stopping: an unanswered key may have counted
                    if time.monotonic() > give_up:
                        with self._lock:
                            self.statuses[0] += 1
                        return
                    try:
                        resp = http.post(
                            "/api/v1/score",
                            json={"user_id": user, "score_increase": delta},
                            headers=headers,
                        )
                    except httpx.HTTPError:  # the service itself is gone: the test says so
                        with self._lock:
                            self.statuses[0] += 1
                        return
                    with self._lock:
                        self.statuses[resp.status_code] += 1
                    if resp.status_code == 200:
                        with self._lock:
                            self.ledger[user] += delta
                            self._last_ok = time.monotonic()
                        break
                    if resp.status_code != 503:  # never a 500, never a 4xx: the test fails
                        return
                    self.stop.wait(0.05)  # a client's pause before its retry (short at the end)
