"""The ceiling of the hot path's data layer: `redis-benchmark` running the project's own
submit script as the service sends it (a Function by FCALL on Redis 7, EVALSHA before)
against a Redis with the project's redis.conf.

redis-benchmark draws every `__rand_int__` independently, so the rate-limit key may belong to
another user than the increment: the script does the same work either way.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

import redis

from bench.stack import user_id
from service.dev.servers import RedisServer, redis_version
from service.keys import KeySchema
from service.scripts import load, prepare_submit
from service.settings import Settings

USERS = 10_000


def submit_command(how: str, target: str, settings: Settings) -> list[str]:
    """FCALL (`target` the function) or EVALSHA (`target` the sha) of submit_score for a
    random provisioned user (`u` + 12 digits), built by the service's own prepare_submit."""
    user = "u__rand_int__"
    call = prepare_submit(settings, KeySchema(1), user, 1)
    args = [str(a) for a in call.args]
    args[2] = "e-__rand_int__"  # the event id (ARGV[3]): any non-empty string here
    return [how, target, str(len(call.keys)), *call.keys, *args]


def load_submit(client: redis.Redis) -> tuple[str, str]:
    """Load submit_score the way the service runs it on this Redis: (command, target)."""
    if redis_version() >= (7,):  # the server RedisServer started: redis_binary()'s
        name, library = load("submit_score").function()
        client.function_load(library, replace=True)
        return "FCALL", name
    return "EVALSHA", client.script_load(load("submit_score").body)


def run(
    directory: Path, settings: Settings, duration_s: float, connections: int = 64
) -> dict[str, object]:
    """Requests/s and latency of the submit script, one call per round trip and pipelined."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"error": "redis-benchmark not found (Debian package redis-tools)"}
    server = RedisServer(directory).start()
    try:
        client = redis.Redis(port=server.port)
        partition = KeySchema(1).all()[0]
        for start in range(0, USERS, 5000):
            client.zadd(partition.leaderboard, {user_id(i): 0 for i in range(start, start + 5000)})
        client.set(partition.ready, "bench")  # the script refuses a Redis not yet rebuilt
        how, target = load_submit(client)
        command = submit_command(how, target, settings)
        reply = client.execute_command(
            *(a.replace("__rand_int__", "000000000001") for a in command)
        )
        if int(reply[0]) != 0:
            return {"error": f"submit_score did not accept the bench call: {reply!r}"}
        client.close()
        results: dict[str, object] = {"how": how}
        for pipeline, expected_rps in ((1, 50_000), (16, 150_000)):
            count = max(10_000, int(expected_rps * duration_s))
            args = [
                binary, "-p", str(server.port), "-c", str(connections), "-n", str(count),
                "-r", str(USERS), "-P", str(pipeline), "--csv", *command,
            ]  # fmt: skip
            out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
            row = list(csv.DictReader(io.StringIO(out.stdout)))[-1]
            results[f"pipeline_{pipeline}"] = {
                "rps": float(row["rps"]),
                "p50_ms": float(row["p50_latency_ms"]),
                "p99_ms": float(row["p99_latency_ms"]),
                "connections": connections,
            }
        return results
    finally:
        server.stop()
