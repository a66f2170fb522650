"""The wrk scenarios: write path against its baselines, paced latency, durability, data scale.

Every comparison runs side by side in the same run, alternating in rounds, so that a noisy
machine slows both sides of a ratio alike; ratios are taken per round, then the median.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import redis

from bench import wrk
from bench.cpu import CpuMeter
from bench.ledger import Ledger

CONCURRENCIES = (16, 64, 256)
SATURATED = 64
PACED_FRACTIONS = (0.25, 0.5, 0.75)
WARMUP_S = 2.0
WARMUP_TOKEN_USES = 6  # per token, across workers: most tokens reach every worker
MAX_WARMUP_S = 15.0
CALIBRATE_S = 2.0


@dataclass(frozen=True)
class Target:
    label: str
    base: str
    tokens: Path
    ledger: Ledger | None  # the service's increments are counted; the baselines' are not
    errors_in_doubt: bool = False
    """A non-2xx answer may have been applied: a 503 after WAIT found too few replicas."""


def load(
    target: Target, connections: int, duration_s: float, delay_ms: float = 0.0
) -> wrk.WrkResult:
    """One wrk run; its acknowledged and in-doubt increments go to the target's ledger."""
    result = wrk.run(
        target.label, target.base, target.tokens, connections, duration_s, delay_ms=delay_ms
    )
    if target.ledger is not None:
        in_doubt = connections + result.timeouts + result.socket_errors
        if target.errors_in_doubt:
            in_doubt += result.non_2xx
        target.ledger.add(result.ok, in_doubt)
    return result


def warm(target: Target) -> None:
    """Fill token caches and connection pools: every token used a few times by each worker."""
    tokens = sum(1 for _ in target.tokens.open())
    first = load(target, SATURATED, WARMUP_S)
    needed = WARMUP_TOKEN_USES * tokens - first.ok
    if needed > 0 and first.rps > 0:
        load(target, SATURATED, min(MAX_WARMUP_S, needed / first.rps))


def summarise(runs: list[wrk.WrkResult]) -> dict[str, float | int]:
    """Medians over rounds (errors summed, max of max)."""
    return {
        "rps": statistics.median(r.rps for r in runs),
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p90_ms": statistics.median(r.p90_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "max_ms": max(r.max_ms for r in runs),
        "best_rps": max(r.rps for r in runs),
        "best_p50_ms": min(r.p50_ms for r in runs),
        "non_2xx": sum(r.non_2xx for r in runs),
        "socket_errors": sum(r.socket_errors for r in runs),
        "timeouts": sum(r.timeouts for r in runs),
        "rounds": len(runs),
    }


def ratio(a: list[wrk.WrkResult], b: list[wrk.WrkResult]) -> float:
    """Median over rounds of a's throughput over b's, round by round."""
    return statistics.median(x.rps / y.rps for x, y in zip(a, b, strict=True) if y.rps)


def compare(
    targets: list[Target], concurrencies: tuple[int, ...], duration_s: float, rounds: int
) -> dict[str, object]:
    """Each target at each concurrency, interleaved round by round."""
    for t in targets:
        warm(t)
    by: dict[tuple[str, int], list[wrk.WrkResult]] = defaultdict(list)
    for _ in range(rounds):
        for c in concurrencies:
            for t in targets:
                by[t.label, c].append(load(t, c, duration_s))
    summary = {f"{label}@{c}": summarise(runs) for (label, c), runs in by.items()}
    first = targets[0].label
    # Other load on the machine only ever slows a run down, so each side's best run is the
    # steadiest estimate of its capacity; the round-by-round medians are kept beside it.
    best = {t.label: max(r.rps for c in concurrencies for r in by[t.label, c]) for t in targets}
    ratios = {f"{first}/{t.label}": best[first] / best[t.label] for t in targets[1:]}
    ratios |= {
        f"{first}/{t.label}@{c} median": ratio(by[first, c], by[t.label, c])
        for t in targets[1:]
        for c in concurrencies
    }
    return {
        "runs": [r.as_dict() for runs in by.values() for r in runs],
        "summary": summary,
        "ratios": ratios,
        "best_rps": best,
    }


def paced(target: Target, max_rps: float, duration_s: float) -> list[dict[str, object]]:
    """Fixed fractions of the maximum rate (wrk's delay()): the latency a player feels."""
    out = []
    for fraction in PACED_FRACTIONS:
        r = load_at(target, fraction * max_rps, duration_s)
        out.append(r.as_dict() | {"fraction_asked": fraction, "fraction_of_max": r.rps / max_rps})
    return out


def load_at(target: Target, rate: float, duration_s: float) -> wrk.WrkResult:
    """A load of about `rate` requests per second over SATURATED connections."""
    # Each connection waits for its reply, then pauses (closed loop): aim the pause at the
    # period minus about a millisecond of service time, then correct it by what a short
    # probe achieved.
    delay = max(0.0, SATURATED / rate * 1000 - 1.0)
    probe = load(target, SATURATED, CALIBRATE_S, delay_ms=delay)
    if probe.rps > 0:
        delay = max(0.0, delay + (SATURATED / rate - SATURATED / probe.rps) * 1000)
    return load(target, SATURATED, duration_s, delay_ms=delay)


def durability(
    target: Target, client: redis.Redis, duration_s: float, rounds: int, half_rps: float
) -> dict[str, object]:
    """The write path with `appendfsync always` (redis.conf) and with `everysec`, alternated:
    saturated, and paced at `half_rps` (what the disk's flush adds to a player's latency)."""
    by: dict[str, list[wrk.WrkResult]] = defaultdict(list)
    configured = client.config_get("appendfsync")["appendfsync"]
    try:
        for _ in range(rounds):
            for mode in ("always", "everysec"):
                client.config_set("appendfsync", mode)
                by[mode].append(load(target, SATURATED, duration_s))
                if half_rps > 0:  # else the write path answered nothing: no rate to pace at
                    by[f"{mode}, paced"].append(load_at(target, half_rps, duration_s))
    finally:
        client.config_set("appendfsync", configured)
    saturated = {mode: by[mode] for mode in ("always", "everysec")}
    return {
        "summary": {mode: summarise(runs) for mode, runs in saturated.items()},
        "paced at half the max": {
            mode: summarise(by[f"{mode}, paced"])
            for mode in ("always", "everysec")
            if by[f"{mode}, paced"]
        },
        "always/everysec": max(r.rps for r in by["always"]) / max(r.rps for r in by["everysec"]),
        "always/everysec median": ratio(by["always"], by["everysec"]),
    }


def cpu_breakdown(target: Target, trees: dict[str, int], duration_s: float) -> dict[str, object]:
    """One saturated run, with the CPU each process tree spent per request."""
    meter = CpuMeter(trees)
    meter.start()
    r = load(target, SATURATED, duration_s)
    return {"rps": r.rps, "cpu_us_per_request": meter.per_request_us(r.ok + r.non_2xx)}
