"""Logs: SCORE_LOG_FORMAT=json (one object a line, with the request's id), X-Request-ID
honoured and returned, SCORE_ACCESS_LOG, and a worker that summarises its flushes instead of
writing a line for each."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
from persist_support import submit
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from support import ROOT, start_service, stop_process

from persister.flush import Persister
from persister.jobs import FlushLog
from service.dev.servers import wait_for
from service.keys import KeySchema
from service.logs import JsonFormatter, RequestIdFilter
from service.request_id import RequestId
from service.settings import ConfigError, Settings

GENERATED = re.compile(r"^[0-9a-f]{24}$")


def _json_lines(text: str) -> list[dict[str, object]]:
    """Every line of `text`, each of which must be one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _app_logging_in_a_request(stream: io.StringIO) -> Starlette:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("test_logs.handler")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False

    async def hello(request: Request) -> PlainTextResponse:
        logger.info("serving %s", "hello", extra={"user_id": "alice"})
        return PlainTextResponse("hi")

    return Starlette(
        routes=[Route("/", hello)], middleware=[Middleware(RequestId, access_log=False)]
    )


def test_a_record_logged_in_a_request_carries_its_id_in_json() -> None:
    stream = io.StringIO()
    with TestClient(_app_logging_in_a_request(stream)) as c:
        given = c.get("/", headers={"X-Request-ID": "trace-42"})
        made = c.get("/")
    assert given.headers["x-request-id"] == "trace-42"
    assert GENERATED.match(made.headers["x-request-id"])
    first, second = _json_lines(stream.getvalue())
    assert first["request_id"] == "trace-42" and first["message"] == "serving hello"
    assert first["level"] == "INFO" and first["logger"] == "test_logs.handler"
    assert first["user_id"] == "alice"  # an `extra=` field is a field of its own
    assert second["request_id"] == made.headers["x-request-id"]


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "caf\u00e9"])
def test_an_insane_request_id_is_replaced(bad: str) -> None:
    with TestClient(_app_logging_in_a_request(io.StringIO())) as c:
        reply = c.get("/", headers={"X-Request-ID": bad.encode()})  # type: ignore[dict-item]
    assert GENERATED.match(reply.headers["x-request-id"])


def test_bad_log_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="SCORE_LOG_FORMAT"):
        Settings.from_env({**env, "SCORE_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="SCORE_ACCESS_LOG"):
        Settings.from_env({**env, "SCORE_ACCESS_LOG": "maybe"})
    refused = subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate"],
        env={**env, "SCORE_LOG_FORMAT": "yaml"}, cwd=ROOT, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "SCORE_LOG_FORMAT" in refused.stderr


def test_serve_writes_json_lines_and_an_access_log(
    env: dict[str, str], r: redis.Redis, add_users, token, tmp_path: Path
) -> None:
    (alice,) = add_users(count=1)
    r.mset(dict.fromkeys(KeySchema(1).ready_markers, "1"))
    log = tmp_path / "serve.log"
    json_env = {**env, "SCORE_LOG_FORMAT": "json", "SCORE_ACCESS_LOG": "1"}
    svc = start_service(json_env, log, "--workers", "2")
    try:
        reply = httpx.post(
            svc.base + "/api/v1/score",
            json={"user_id": alice, "score_increase": 1},
            headers={"Authorization": f"Bearer {token(alice)}", "X-Request-ID": "game-7"},
        )
        assert reply.status_code == 200 and reply.headers["x-request-id"] == "game-7"
        unknown = httpx.get(svc.base + "/nowhere")
        assert unknown.status_code == 404 and GENERATED.match(unknown.headers["x-request-id"])

        def accessed() -> dict[object, dict[str, object]]:
            lines = _json_lines(log.read_text())
            return {x["request_id"]: x for x in lines if x["logger"] == "score_service.access"}

        ids = {"game-7", unknown.headers["x-request-id"]}
        # written once the response is sent: it may follow the reply
        wait_for(lambda: ids <= accessed().keys(), 10, "the access log lines")
        by_id = accessed()
        score = by_id["game-7"]
        assert (score["method"], score["path"], score["status"]) == ("POST", "/api/v1/score", 200)
        assert isinstance(score["duration_ms"], float)
        missing = by_id[unknown.headers["x-request-id"]]
        assert (missing["path"], missing["status"]) == ("/nowhere", 404)
    finally:
        stop_process(svc.process)
    # every line is JSON, uvicorn's own in both worker processes included
    lines = _json_lines(log.read_text())
    started = [x for x in lines if x["message"] == "Application startup complete."]
    assert len(started) == 2 and all(x["logger"] == "uvicorn.error" for x in started)


def test_the_worker_logs_each_flush_at_debug_and_a_summary_at_most_every_10s(
    settings: Settings, r: redis.Redis, pg, add_users, caplog: pytest.LogCaptureFixture
) -> None:
    (alice,) = add_users(count=1)
    now = [1000.0]
    flush_log = FlushLog(10.0, clock=lambda: now[0])
    p = Persister(settings)
    caplog.set_level(logging.DEBUG, logger="persister.jobs")
    try:
        for _ in range(5):  # five flushes in a second: one summary
            submit(settings, r, alice, 1)
            flush_log.drained(p, p.drain(0))
            now[0] += 0.2
        now[0] += 10
        submit(settings, r, alice, 1)
        flush_log.drained(p, p.drain(0))
    finally:
        p.close()
    records = [x for x in caplog.records if x.name == "persister.jobs"]
    flushes = [x for x in records if x.message.startswith("partition 0: persisted")]
    summaries = [x for x in records if x.levelno == logging.INFO]
    assert len(flushes) == 6 and {x.levelno for x in flushes} == {logging.DEBUG}
    assert [x.message.split(" in the last")[0] for x in summaries] == [
        "persisted 1 events (1 new) in 1 batches",  # the first flush: due at once
        "persisted 5 events (5 new) in 5 batches",  # the four after it, and the one 10 s on
    ]


def test_the_worker_writes_json_lines(env: dict[str, str], r, pg, add_users, tmp_path) -> None:
    (alice,) = add_users(count=1)
    settings = Settings.for_stores(env)
    log = tmp_path / "worker.log"
    worker_env = {**env, "SCORE_LOG_FORMAT": "json", "SCORE_LOG_LEVEL": "debug"}
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=worker_env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "persister worker:" in log.read_text(), 30, "the worker to start")
        submit(settings, r, alice, 3)  # the sweep persists it within 2 s

        def summary() -> bool:
            return any(
                x["logger"] == "persister.jobs"
                and x["level"] == "INFO"
                and str(x["message"]).startswith("persisted ")
                for x in _json_lines(log.read_text())
            )

        wait_for(summary, 20, "the worker's summary line")
        worker.terminate()
        assert worker.wait(30) == 0
    finally:
        stop_process(worker)
    lines = _json_lines(log.read_text())  # every line: RQ's and ours
    flushes = [x for x in lines if str(x["message"]).startswith("partition 0: persisted")]
    assert flushes and all(x["level"] == "DEBUG" for x in flushes)
