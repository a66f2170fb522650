"""Load with Debian's `wrk` and bench/score.lua: throughput, latency percentiles, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "score.lua"
THREADS = 1  # one load-generator thread leaves the other core to the servers


@dataclass(frozen=True)
class WrkResult:
    label: str
    connections: int
    rps: float
    ok: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    timeouts: int
    duration_s: float
    paced_delay_ms: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def require_wrk() -> str:
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench: wrk not found: `apt-get install -y wrk` (Debian's wrk)")
    return found


def run(
    label: str,
    base: str,
    tokens_file: Path,
    connections: int,
    duration_s: float,
    *,
    delay_ms: float = 0.0,
) -> WrkResult:
    """`wrk` against POST {base}/api/v1/score for `duration_s` seconds."""
    env = dict(os.environ, BENCH_TOKENS=str(tokens_file), BENCH_DELAY_MS=f"{delay_ms:.3f}")
    args = [
        require_wrk(), "-t", str(THREADS), "-c", str(connections),
        "-d", f"{max(1, round(duration_s))}s", "--timeout", "5s", "-s", str(SCRIPT),
        f"{base}/api/v1/score",
    ]  # fmt: skip
    out = subprocess.run(
        args, check=False, env=env, capture_output=True, text=True, timeout=duration_s + 60
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result:\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = raw["duration_us"] / 1e6
    return WrkResult(
        label=label,
        connections=connections,
        rps=raw["requests"] / seconds,
        ok=raw["requests"] - raw["status"],
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        non_2xx=raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"],
        timeouts=raw["timeout"],
        duration_s=seconds,
        paced_delay_ms=delay_ms,
    )
