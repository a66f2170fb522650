"""Where the hot path's time goes: `python -m bench.profile`.

Starts the main stack, loads POST /api/v1/score with wrk and records one service worker with
py-spy (sampling, non-blocking: the worker is not paused). Writes a flame graph and the
collapsed stacks under bench/results/, and prints the functions that take the most time,
inclusive and self.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import fanout, wrk
from bench.ledger import Ledger
from bench.run import RESULTS, raise_open_files_limit
from bench.stack import build_stack, make_keys
from service.dev.servers import PostgresServer


def _function(frame: str) -> str:
    """`name (path/to/file.py:123)` -> `name (file.py)`: lines of one function count as one."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0].rstrip(')')})"


def top_functions(collapsed: Path, count: int) -> str:
    """The `count` frames with most samples, inclusive and self, as a text table."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        samples = int(n)
        frames = [_function(f) for f in stack.split(";")]
        total += samples
        for frame in set(frames):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    rows = [f"{total} samples", "", "inclusive:"]
    rows += [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(count)]
    rows += ["", "self:"]
    rows += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(count)]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--hold", action="store_true", help="keep the stack up until Ctrl-C")
    p.add_argument("--what", choices=["hotpath", "fanout"], default="hotpath")
    p.add_argument("--clients", type=int, default=1000, help="WebSocket clients (fanout)")
    args = p.parse_args()
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("py-spy not found: pip install -e '.[bench]'")
    raise_open_files_limit()
    root = Path(tempfile.mkdtemp(prefix="score-profile-"))
    pg = PostgresServer(root / "postgres").start()
    stack = None
    try:
        keys = make_keys(root / "keys")
        stack = build_stack("main", root, pg, keys, users=10_000, token_users=2000, workers=2)
        assert stack.serve is not None
        if args.hold:
            print(f"{stack.base}  tokens: {stack.tokens_file}  redis: {stack.redis_url}")
            print(f"workers: {stack.serve.worker_pids()}  persister: {stack.worker is not None}")
            while True:
                time.sleep(3600)
        first, second = stack.serve.worker_pids()[:2]
        RESULTS.mkdir(exist_ok=True)
        collapsed = root / f"profile-{args.what}.txt"
        spy = [py_spy, "record", "--duration", str(args.duration), "--rate", "250"]
        spy.append("--nonblocking")
        recorders: list[subprocess.Popen[bytes]] = []

        def record(_: object = None) -> None:
            # one worker as collapsed stacks (for the table), the other as a flame graph
            recorders.append(
                subprocess.Popen([*spy, "-p", str(first), "--format", "raw", "-o", str(collapsed)])
            )
            recorders.append(
                subprocess.Popen(
                    [*spy, "-p", str(second), "-o", str(RESULTS / f"profile-{args.what}.svg")]
                )
            )

        if args.what == "hotpath":
            wrk.run("warmup", stack.base, stack.tokens_file, args.connections, 2)
            record()
            loaded: object = wrk.run(
                "profiled", stack.base, stack.tokens_file, args.connections, args.duration
            )
        else:
            posts = int(args.duration / 0.1) + 10  # a post every 50-150 ms
            loaded = fanout.run(stack, [args.clients], posts, Ledger(), on_connected=record)
        for recorder in recorders:
            recorder.wait(args.duration + 30)
        table = top_functions(collapsed, 40)
        (RESULTS / f"profile-{args.what}-top.txt").write_text(f"{loaded}\n\n{table}\n")
        print(loaded, table, sep="\n\n")
    except KeyboardInterrupt:
        pass
    finally:
        if stack is not None:
            stack.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
