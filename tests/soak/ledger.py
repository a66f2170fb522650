"""The clients' ledger: what each user's score must be, from what the clients were told.

An increment the service acknowledged (200, or an adjustment `applied`/`replayed`) must be in
Postgres exactly once. An increment whose outcome the client cannot know (a timeout, a reset
connection, a 503 that may have come after the Lua call ran) may have been applied once or not
at all: it is *uncertain*. A keyed increment is retried with its key until acknowledged, so it
ends acknowledged unless the soak gave up on it; an unkeyed one that was uncertain stays so (the
client's retry is a new increment of its own). Keys are unique, so a key identifies one
increment: Postgres's ledger must hold each acknowledged key once, each uncertain key at most
once, and no other key of ours.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Increment:
    user: str
    delta: int
    key: str | None  # None: sent without an Idempotency-Key
    source: str  # "player" or "admin"


@dataclass
class Bounds:
    """What a user's score may be: exactly `acked` plus any subset of the uncertain ones."""

    acked: int = 0
    uncertain_up: int = 0  # sum of uncertain positive deltas
    uncertain_down: int = 0  # sum of uncertain negative deltas (<= 0)

    @property
    def low(self) -> int:
        return self.acked + self.uncertain_down

    @property
    def high(self) -> int:
        return self.acked + self.uncertain_up


@dataclass
class Ledger:
    """Thread-safe: every client thread records into it."""

    users: list[str] = field(default_factory=list)  # provisioned: their provisioning returned
    bounds: dict[str, Bounds] = field(default_factory=dict)
    acked_keys: dict[str, Increment] = field(default_factory=dict)
    uncertain_keys: dict[str, Increment] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def provisioned(self, user_ids: list[str]) -> None:
        with self._lock:
            for user in user_ids:
                if user not in self.bounds:
                    self.users.append(user)
                    self.bounds[user] = Bounds()

    def pick(self, rng: random.Random) -> str:
        """A provisioned user: new ones get increments too, from the moment they exist."""
        with self._lock:
            return rng.choice(self.users)

    def acknowledged(self, inc: Increment) -> None:
        with self._lock:
            self.bounds.setdefault(inc.user, Bounds()).acked += inc.delta
            if inc.key is not None:
                assert inc.key not in self.acked_keys, inc.key
                self.acked_keys[inc.key] = inc
            self.counts[f"{inc.source} {'keyed' if inc.key else 'unkeyed'} acknowledged"] += 1

    def uncertain(self, inc: Increment) -> None:
        with self._lock:
            bounds = self.bounds.setdefault(inc.user, Bounds())
            if inc.delta > 0:
                bounds.uncertain_up += inc.delta
            else:
                bounds.uncertain_down += inc.delta
            if inc.key is not None:
                self.uncertain_keys[inc.key] = inc
            self.counts[f"{inc.source} {'keyed' if inc.key else 'unkeyed'} uncertain"] += 1

    def summary(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)
