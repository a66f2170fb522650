"""Logging for every `score-service` command: text or JSON lines (SCORE_LOG_FORMAT), each
record carrying the id of the request it was logged for.

One configuration (`config`) serves the CLI (`configure`) and uvicorn, which applies it again
in each worker process it starts (`serve --workers N`): uvicorn's own loggers then write
through the same handler and format as ours.
"""

from __future__ import annotations

import logging
import logging.config
import time
from contextvars import ContextVar
from typing import Any

import msgspec

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
"""The id of the request being served (set by service.request_id); "" outside a request."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The attributes every LogRecord has: anything else on a record came through `extra=`
# and goes into the JSON object as a field of its own.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "request_id", "taskName"}
)
_encoder = msgspec.json.Encoder(enc_hook=repr)  # an `extra=` value JSON cannot hold: its repr


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (`%(request_id)s`, the JSON field)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id when
    there is one, any `extra=` fields, and the traceback as `exc_info`."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return _encoder.encode(line).decode()


def config(level: str, log_format: str) -> dict[str, Any]:
    """A logging.config.dictConfig for `level` (debug, info, ...) and `log_format` (text,
    json): one handler on stderr, at the root; uvicorn's loggers propagate to it."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"level": level.upper(), "handlers": ["default"]},
        "loggers": {
            # uvicorn's defaults give these handlers of their own; ours replace them
            name: {"handlers": [], "propagate": True, "level": level.upper()}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure(level: str, log_format: str) -> None:
    """Configure this process's logging (see `config`)."""
    logging.config.dictConfig(config(level, log_format))
