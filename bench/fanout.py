"""Fan-out: N WebSocket clients (in a separate process), a score posted, time until the last
client holds the new frame; and the server's memory per connection."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable

from bench.ledger import Ledger
from bench.procs import rss_bytes
from bench.stack import Stack
from service.dev.servers import ROOT

WS_PATH = "/api/v1/leaderboard/ws"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run(
    stack: Stack,
    levels: list[int],
    posts: int,
    ledger: Ledger,
    on_connected: Callable[[int], None] | None = None,
) -> dict[str, object]:
    """Connect `levels` clients in turn (cumulatively) and time `posts` broadcasts at each;
    `on_connected(clients)` runs once they are connected, before the posts."""
    assert stack.serve is not None
    user, token = stack.tokens_file.read_text().split("\n", 1)[0].split()
    ws = stack.base.replace("http://", "ws://") + WS_PATH
    workers = stack.serve.worker_pids()
    baseline = rss_bytes(workers)
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.fanout_client", "--ws", ws, "--posts", str(posts),
         "--levels", ",".join(map(str, levels)), "--user", user, "--token", token],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    results: dict[str, object] = {"levels": []}
    try:
        for line in child.stdout:
            record = json.loads(line)
            if record["event"] == "connected":
                grown = rss_bytes(workers) - baseline
                record["bytes_per_connection"] = grown / record["clients"]
                results[f"connected_{record['clients']}"] = record
                if on_connected is not None:
                    on_connected(record["clients"])
                child.stdin.write("go\n")
                child.stdin.flush()
            elif record["event"] == "level":
                ledger.add(record["acked"], record["in_doubt"])
                last = record.pop("last_ms")
                median = record.pop("median_ms")
                record |= {
                    "posts": len(last),
                    "last_p50_ms": statistics.median(last) if last else None,
                    "last_p99_ms": percentile(last, 0.99) if last else None,
                    "last_max_ms": max(last) if last else None,
                    "median_client_p50_ms": statistics.median(median) if median else None,
                    "bytes_per_connection": results[f"connected_{record['clients']}"][  # type: ignore[index]
                        "bytes_per_connection"
                    ],
                }
                results["levels"].append(record)  # type: ignore[attr-defined]
            elif record["event"] == "error":
                results["error"] = record["error"]
    finally:
        child.stdin.close()
        child.wait(60)
    return results
