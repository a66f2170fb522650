"""The soak's clients: players posting increments, with and without an Idempotency-Key, and an
operator's batch job posting admin adjustments, each retrying as a real client does.

- A keyed request is sent again with the same key after a timeout, a reset connection or a
  503, until it is acknowledged: only a 200 tells that it was applied, once.
- An unkeyed request whose outcome is unknown (a timeout, a reset, a 503: the Lua call may have
  run before the reply was lost) is recorded as uncertain, and the client sends the increment
  again as a new request (what a client without a key does; the first may count too).
- A request that never reached the service (connection refused) was not applied.
- Any other answer breaks the contract for these requests (they are well formed, for
  provisioned users, with valid tokens): it is recorded as a violation, with its body.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from service.auth import mint
from service.settings import Settings

from .ledger import Increment, Ledger

TIMEOUT_S = 5.0
TOKEN_TTL_S = 24 * 3600
NOT_SENT = "not sent"  # the request never reached the service: nothing was applied
UNKNOWN = "unknown"  # it may have been applied


@dataclass
class Stats:
    """Every answer, per endpoint, and every answer the contract does not allow."""

    answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: Counter[tuple[str, str]] = field(default_factory=Counter)
    bodies: list[str] = field(default_factory=list)  # the first few of each violation
    # when each kind of violation was seen (seconds since the start, as in timeline.log)
    seen: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            self.answers[endpoint, outcome] += 1

    def violation(self, endpoint: str, outcome: str, detail: str) -> None:
        with self._lock:
            at = time.monotonic() - self.t0
            self.violations[endpoint, outcome] += 1
            self.seen.setdefault((endpoint, outcome), []).append(at)
            if self.violations[endpoint, outcome] <= 5:
                self.bodies.append(f"at {at:.2f}s {endpoint} {outcome}: {detail[:400]}")

    def near(self, endpoint: str, outcome: str, moments: list[float], within: float) -> int:
        """How many of these violations came at most `within` seconds after one of
        `moments` (the FLUSHALLs: a wipe's aftermath tells one bug from another)."""
        with self._lock:
            times = self.seen.get((endpoint, outcome), [])
            return sum(any(0 <= t - m <= within for m in moments) for t in times)

    def when(self, endpoint: str, outcome: str) -> str:
        """The spells (gaps under a second joined) in which this violation was seen."""
        with self._lock:
            times = sorted(self.seen.get((endpoint, outcome), []))
        spells: list[list[float]] = []
        for t in times:
            if spells and t - spells[-1][1] < 1.0:
                spells[-1][1] = t
            else:
                spells.append([t, t])
        return ", ".join(f"{a:.2f}-{b:.2f}s" if b > a else f"{a:.2f}s" for a, b in spells[:12])


class Gate:
    """Lets the driver hold new client work and wait until none is in flight (before a
    FLUSHALL, which takes the increments the persister has not committed yet)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._inflight = 0

    def enter(self, stop: threading.Event) -> bool:
        """Start one unit of work (False: the soak is stopping)."""
        with self._cond:
            while not self._open and not stop.is_set():
                self._cond.wait(0.1)
            if stop.is_set():
                return False
            self._inflight += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Hold new work; True once nothing is in flight, False after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._open = False
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def reopen(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()


def classify(send: Callable[[], httpx.Response]) -> tuple[str, httpx.Response | None]:
    """(the outcome's name, the response): the name is the status code, or what went wrong."""
    try:
        reply = send()
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        return f"{NOT_SENT}: {type(exc).__name__}", None
    except httpx.TimeoutException as exc:
        return f"{UNKNOWN}: {type(exc).__name__}", None
    except httpx.TransportError as exc:  # reset, closed mid-reply
        return f"{UNKNOWN}: {type(exc).__name__}", None
    return str(reply.status_code), reply


@dataclass
class Shared:
    """What every client thread shares."""

    base: str
    settings: Settings
    ledger: Ledger
    stats: Stats
    gate: Gate
    seed: int
    stop: threading.Event = field(default_factory=threading.Event)
    # after `stop`, keyed requests still retry until acknowledged, but not past this
    give_up_at: float = math.inf
    _tokens: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def token(self, user: str, *, admin: bool = False) -> str:
        name = ("admin:" if admin else "") + user
        with self._lock:
            if name not in self._tokens:
                self._tokens[name] = mint(self.settings, user, admin=admin, ttl_s=TOKEN_TTL_S)
            return self._tokens[name]

    def pause(self, rng: random.Random) -> None:
        """A client's pause before it retries, cut short when the run stops (the retry is
        still sent: one in doubt always is)."""
        self.stop.wait(rng.uniform(0.05, 0.4))


class Player(threading.Thread):
    """One player client: increments for random provisioned users, keyed or not."""

    ENDPOINT = "POST /api/v1/score"

    def __init__(self, shared: Shared, index: int, keyed_share: float, pace_s: float) -> None:
        super().__init__(name=f"player-{index}", daemon=True)
        self.shared = shared
        self.index = index
        self.keyed_share = keyed_share
        self.pace_s = pace_s
        self.rng = random.Random(f"{shared.seed}/player/{index}")
        self.error: BaseException | None = None

    def run(self) -> None:
        s = self.shared
        n = 0
        try:
            with httpx.Client(base_url=s.base, timeout=TIMEOUT_S) as http:
                while s.gate.enter(s.stop):
                    try:
                        user = s.ledger.pick(self.rng)
                        delta = self.rng.randint(1, 100)
                        if self.rng.random() < self.keyed_share:
                            key = f"soak-{s.seed}-p{self.index}-{n}"
                            self._keyed(http, Increment(user, delta, key, "player"))
                        else:
                            self._unkeyed(http, Increment(user, delta, None, "player"))
                        n += 1
                    finally:
                        s.gate.leave()
                    s.stop.wait(self.rng.uniform(0, 2 * self.pace_s))  # pace; ends at stop
        except BaseException as exc:  # reported, never swallowed
            self.error = exc

    def _post(self, http: httpx.Client, inc: Increment) -> tuple[str, httpx.Response | None]:
        headers = {"Authorization": f"Bearer {self.shared.token(inc.user)}"}
        if inc.key is not None:
            headers["Idempotency-Key"] = inc.key
        body = {"user_id": inc.user, "score_increase": inc.delta}
        outcome, reply = classify(lambda: http.post("/api/v1/score", json=body, headers=headers))
        self.shared.stats.answer(self.ENDPOINT, outcome)
        return outcome, reply

    def _refused(self, outcome: str, reply: httpx.Response | None, inc: Increment) -> bool:
        """A definite answer the contract does not allow here: recorded. True if so."""
        if outcome in ("200", "503", "429") or reply is None:
            return False
        self.shared.stats.violation(
            self.ENDPOINT, outcome, f"user {inc.user} key {inc.key}: {reply.text}"
        )
        return True

    def _keyed(self, http: httpx.Client, inc: Increment) -> None:
        s = self.shared
        maybe_applied = False
        while True:
            outcome, reply = self._post(http, inc)
            if outcome == "200":
                s.ledger.acknowledged(inc)
                return
            if self._refused(outcome, reply, inc):
                break
            maybe_applied |= outcome == "503" or outcome.startswith(UNKNOWN)
            if time.monotonic() > s.give_up_at:
                break
            s.pause(self.rng)
        if maybe_applied:
            s.ledger.uncertain(inc)

    def _unkeyed(self, http: httpx.Client, inc: Increment) -> None:
        s = self.shared
        for _ in range(4):  # the first try and three retries, each a new increment
            outcome, reply = self._post(http, inc)
            if outcome == "200":
                s.ledger.acknowledged(inc)
                return
            if self._refused(outcome, reply, inc):
                return
            if outcome == "503" or outcome.startswith(UNKNOWN):
                s.ledger.uncertain(inc)
            if s.stop.is_set():
                return
            s.pause(self.rng)


class AdminAdjuster(threading.Thread):
    """An operator's batch job: POST /api/v1/admin/scores, each item with its own key, the
    whole batch sent again as it is after an outage (the contract says it may be)."""

    ENDPOINT = "POST /api/v1/admin/scores"

    def __init__(self, shared: Shared, pace_s: float) -> None:
        super().__init__(name="admin-adjuster", daemon=True)
        self.shared = shared
        self.pace_s = pace_s
        self.rng = random.Random(f"{shared.seed}/admin")
        self.error: BaseException | None = None

    def run(self) -> None:
        s = self.shared
        n = 0
        try:
            with httpx.Client(base_url=s.base, timeout=TIMEOUT_S) as http:
                while s.gate.enter(s.stop):
                    try:
                        items = [self._item(n, j) for j in range(self.rng.randint(1, 4))]
                        self._send(http, items)
                        n += 1
                    finally:
                        s.gate.leave()
                    s.stop.wait(self.rng.uniform(0, 2 * self.pace_s))  # pace; ends at stop
        except BaseException as exc:
            self.error = exc

    def _item(self, n: int, j: int) -> Increment:
        user = self.shared.ledger.pick(self.rng)
        # mostly bonuses; some penalties, which the service refuses below 0 (out_of_range)
        delta = self.rng.randint(1, 500) if self.rng.random() < 0.7 else -self.rng.randint(1, 80)
        return Increment(user, delta, f"soak-{self.shared.seed}-a{n}-{j}", "admin")

    def _send(self, http: httpx.Client, items: list[Increment]) -> None:
        s = self.shared
        body = {
            "adjustments": [
                {"user_id": i.user, "delta": i.delta, "idempotency_key": i.key} for i in items
            ]
        }
        headers = {"Authorization": f"Bearer {s.token('soak-operator', admin=True)}"}
        maybe_applied = False
        while True:
            outcome, reply = classify(
                lambda: http.post("/api/v1/admin/scores", json=body, headers=headers)
            )
            s.stats.answer(self.ENDPOINT, outcome)
            if outcome == "200" and reply is not None:
                self._results(items, reply.json()["results"], maybe_applied)
                return
            if outcome != "503" and reply is not None:
                s.stats.violation(self.ENDPOINT, outcome, reply.text)
                break
            maybe_applied |= outcome == "503" or outcome.startswith(UNKNOWN)
            if time.monotonic() > s.give_up_at:
                break
            s.pause(self.rng)
        if maybe_applied:
            for inc in items:
                s.ledger.uncertain(inc)

    def _results(
        self, items: list[Increment], results: list[dict[str, object]], retried: bool
    ) -> None:
        s = self.shared
        for inc, result in zip(items, results, strict=True):
            status = str(result["status"])
            s.stats.answer(self.ENDPOINT + " item", status)
            if status == "applied" or (status == "replayed" and retried):
                s.ledger.acknowledged(inc)
            elif status == "out_of_range" and inc.delta < 0:
                if retried:  # a lost first attempt would answer replayed, but be prudent
                    s.ledger.uncertain(inc)
            else:
                # replayed on the first attempt (a key of ours used before?), unknown_user for
                # a provisioned user, conflict: none of these can happen under the contract
                s.stats.violation(self.ENDPOINT + " item", status, f"{inc}: {result}")
                if retried:
                    s.ledger.uncertain(inc)
