"""What one submit_score call costs Redis: `python -m bench.script_cost [SCRIPT.lua ...]`.

Starts a throwaway Redis with the project's redis.conf, provisions 10,000 users, sends 60,000
keyed increments (pipelined 64 at a time, as the service's auto-pipeline does), by EVALSHA
and, on Redis 7, as a Function by FCALL (what the service sends there), and prints Redis's
CPU per call (INFO cpu) and INFO commandstats: the call's own time and that of each command
the script calls. With paths, each script is measured in turn (alternate them and repeat to
compare two versions: the machine's own noise is about 10%).

`--stages`: the script cut short after each of its steps (the cut returns OK), cumulative,
as it is sent (FCALL on Redis 7): what each step adds. `--floor`: bench/floor_submit.lua,
only the increment and its event, for what any such script costs at the least.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

from service.dev.servers import RedisServer, redis_version
from service.keys import KeySchema
from service.scripts import LuaSource, Status, load, prepare_submit
from service.settings import Settings

USERS = 10_000
CALLS = 60_000
PIPELINE = 64
FLOOR = Path(__file__).with_name("floor_submit.lua")
STAGES = (
    ("arguments checked", "-- 0. A Redis that lost its data"),
    ("+ ready marker read", "-- 1. Rate limit:"),
    ("+ rate limit read (TIME, GET)", "-- 2. Idempotency:"),
    ("+ idempotency record read", "-- 3. The user must have been provisioned."),
    ("+ score read (ZSCORE)", "-- 4. Never round:"),
    ("+ range check", "-- Every check has passed:"),
    (
        "+ rate spent (SET), increment (ZADD), rank (ZCOUNT)",
        "if use_idempotency then\n  -- the rank",
    ),
    ("+ idempotency record (SET), event (XADD)", "local flush = 0\n"),
    ("+ flush request (SET NX)", "-- A member of the top N changed"),
)
_STOP = 'do return {0, 1, 1, 0, 0, 0, 0, ""} end -- bench.script_cost --stages\n'


def measure(body: str, label: str, calls: int = CALLS) -> None:
    """Measure `body` by EVALSHA, and as a Function where the Redis has them."""
    with tempfile.TemporaryDirectory(prefix="score-script-cost-") as directory:
        for how in ("EVALSHA", "FCALL"):
            if how == "FCALL" and redis_version() < (7,):
                print(f"{label} by FCALL: Redis {redis_version()} has no Functions")
                continue
            server = RedisServer(Path(directory) / how).start()
            try:
                _measure(server, body, f"{label} by {how}", calls, how)
            finally:
                server.stop()


def stages(body: str, calls: int = CALLS) -> None:
    """`body` cut short after each step (STAGES), then whole, as the service sends it."""
    how = "FCALL" if redis_version() >= (7,) else "EVALSHA"
    cuts = []
    for label, before in STAGES:
        if body.count(before) != 1:
            raise SystemExit(f"--stages: the script has no single line {before!r}: update STAGES")
        at = body.index(before)
        cuts.append((label, body[:at] + _STOP + body[at:]))
    with tempfile.TemporaryDirectory(prefix="score-script-cost-") as directory:
        for n, (label, cut) in enumerate([*cuts, ("whole script", body)]):
            server = RedisServer(Path(directory) / str(n)).start()
            try:
                _measure(server, cut, f"{label} by {how}", calls, how, detail=False)
            finally:
                server.stop()


def _measure(
    server: RedisServer, body: str, label: str, calls: int, how: str, *, detail: bool = True
) -> None:
    schema = KeySchema(1)
    partition = schema.all()[0]
    settings = Settings(redis_url=server.url, jwt_secret="s" * 40)
    chosen = random.Random(1)
    prepared = [
        prepare_submit(settings, schema, f"u{chosen.randrange(USERS):012d}", 1,
                       idempotency_key=f"k{n}")
        for n in range(calls)
    ]  # fmt: skip
    with server.client() as client:
        for start in range(0, USERS, 5000):
            client.zadd(
                partition.leaderboard, {f"u{i:012d}": 0 for i in range(start, start + 5000)}
            )
        client.set(partition.ready, "bench")  # the script refuses a Redis not yet rebuilt
        if how == "FCALL":
            target, library = LuaSource("submit_score", 7, body).function()
            client.function_load(library)
        else:
            target = client.script_load(body)
        client.config_resetstat()
        before = client.info("cpu")
        started = time.perf_counter()
        statuses: Counter[Status] = Counter()
        for i in range(0, calls, PIPELINE):
            pipe = client.pipeline(transaction=False)
            for call in prepared[i : i + PIPELINE]:
                pipe.execute_command(how, target, len(call.keys), *call.keys, *call.args)
            statuses.update(Status(int(reply[0])) for reply in pipe.execute())
        seconds = time.perf_counter() - started
        after = client.info("cpu")
        stats = client.info("commandstats")
    if set(statuses) != {Status.OK}:  # a refusal costs less: the number would flatter
        raise SystemExit(f"{label}: not every call was accepted: {dict(statuses)}")
    cpu_s = sum(after[k] - before[k] for k in ("used_cpu_sys", "used_cpu_user"))
    own = stats[f"cmdstat_{how.lower()}"]["usec_per_call"]
    print(f"{label}: {cpu_s / calls * 1e6:.1f} us of Redis CPU per call, {own:.2f} us in "
          f"{how} ({calls / seconds:,.0f} calls/s from one client)")  # fmt: skip
    if not detail:
        return
    for name, s in sorted(stats.items(), key=lambda kv: -float(kv[1]["usec"])):
        if s["calls"] >= calls:  # the script and the commands it calls, not INFO and CONFIG
            print(f"  {name.removeprefix('cmdstat_'):10} {s['calls'] / calls:4.1f} per call, "
                  f"{s['usec_per_call']:6.2f} us each")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scripts", nargs="*", type=Path, help="submit_score versions to compare")
    parser.add_argument("--stages", action="store_true", help="what each step of it costs")
    parser.add_argument("--floor", action="store_true", help="also the increment and event alone")
    args = parser.parse_args()
    if args.stages:
        stages(load("submit_score").body)
    elif not args.scripts:
        measure(load("submit_score").body, "lua/submit_score-7.lua")
    if args.floor:
        measure(FLOOR.read_text(), "bench/floor_submit.lua")
    for path in args.scripts:
        measure(path.read_text(), str(path))


if __name__ == "__main__":
    main()
