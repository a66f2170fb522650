"""The benchmark's failover timing (bench/failover.py) in a short form: one SIGKILL of the
primary of a real Sentinel deployment, a handful of users. Nothing timed is asserted (`make
bench` reports the times); the shape of the result and the probes' ledger are."""

from __future__ import annotations

import contextlib
from pathlib import Path

from support import Servers

from bench import failover
from bench.correctness import correctness
from bench.ledger import Ledger
from bench.stack import build_stack, make_keys
from service.dev.topologies import LocalSentinel


def test_a_failover_is_timed_and_every_probed_increment_counts_once(
    servers: Servers, tmp_path: Path
) -> None:
    deployment = LocalSentinel(tmp_path / "sentinel")
    with contextlib.ExitStack() as running:  # stopped in reverse order, whatever fails
        running.callback(deployment.stop)
        deployment.start()
        stack = build_stack(
            "failover", tmp_path, servers.postgres, make_keys(tmp_path / "keys"),
            users=20, token_users=1, workers=1, redis_url=deployment.url,
            extra_env={"SCORE_REDIS_MIN_REPLICAS": "1"},
        )  # fmt: skip
        running.callback(stack.stop)
        results, ledgers = failover.time_failovers(
            failover.of_sentinel(deployment), {"probe": stack}, repetitions=1
        )
        timed, users = results["probe"], ledgers["probe"]
        assert "error" not in timed, timed
        assert timed["unrecovered"] == 0
        assert [type(s) for s in timed["recovery_s"]] == [float]
        assert timed["median_s"] == timed["max_s"] == timed["recovery_s"][0]
        assert set(timed["statuses"]) <= {"200", "503"}, timed["statuses"]
        assert sum(users.acknowledged.values()) == timed["statuses"]["200"]

        ledger = Ledger()
        ledger.add(sum(users.acknowledged.values()), sum(users.in_doubt.values()))
        verdicts = correctness(stack, ledger, users=users)
        assert verdicts.keys() == {"redis", "postgres", "users"}
        assert all(v["ok"] for v in verdicts.values()), verdicts
