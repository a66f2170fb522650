"""schemathesis against a real `score-service serve` (uvicorn, real Redis and Postgres): every
operation of /openapi.json, with its documented examples, its coverage cases and a bounded
number of generated ones, valid and invalid, checked for no 5xx, no status the document does
not list, the documented content type and a body that fits its schema.

Deterministic: a fixed seed, derandomized generation, no example database. schemathesis runs
as its own command (`schemathesis run`), with tests/schemathesis_hooks.py for the tokens: its
pytest integration (`schemathesis.pytest.from_fixture`, 4.32) fails under pytest 9.2. It tests
every operation but GET /openapi.json, the document it loads and checks itself."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)
TESTS = Path(__file__).resolve().parent
CONFIG = """
seed = 20261202
max-stream-events = 1  # the SSE stream never ends: its first event is enough
request-timeout = 10
workers = 1

[generation]
mode = "all"
deterministic = true
database = "none"
max-examples = 50  # per operation: about 15 s in all
"""


def test_every_operation_keeps_to_the_document(
    service: Any, add_users: Callable[..., list[str]], env: dict[str, str], tmp_path: Path
) -> None:
    add_users("player-1", "player-2")  # the users the document's examples name
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    run = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
            service.base + "/openapi.json",
            "--phases", "examples,coverage,fuzzing",
            "--checks", CHECKS,
            "--suppress-health-check", "all",
        ],
        env={**env, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(TESTS)},
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
