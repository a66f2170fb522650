"""The partition layout's two records, in Postgres (`score_layout`) and Redis (`score:layout`),
and the check every partition-aware command makes before it touches a partition.

- First start wins: a deployment with no record takes the layout of the first process that
  checks (INSERT ... ON CONFLICT DO NOTHING in Postgres, then SET NX in Redis with Postgres's
  value), so two processes first-starting with different counts cannot both record theirs:
  the second reads the first's and refuses.
- Postgres is the source of truth: a Redis without the record (new, wiped) gets it back from
  Postgres. Two records that disagree are refused (an interrupted `partitions set` leaves them
  so; running it again repairs them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import psycopg
import redis

from persister.flush import BACKOFF
from service.connections import failed_again, sync_redis
from service.keys import KeySchema
from service.layout import (
    CHANGE_COMMAND,
    Layout,
    LayoutMismatch,
    decode,
    encode,
    layout_of,
    normalized,
)
from service.layout import problem as layout_problem
from service.redis_errors import is_outage
from service.settings import ConfigError, Settings

log = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[object, ...]]
KEY = KeySchema(1).layout  # the same for every count

_COLUMNS = "version, partitions, changing_from, changing_from_version"
_SELECT = f"SELECT {_COLUMNS} FROM score_layout"  # noqa: S608 - constants only
_INSERT = f"INSERT INTO score_layout ({_COLUMNS}) VALUES (%s, %s, %s, %s) ON CONFLICT (id) "  # noqa: S608


def read_postgres(conn: Conn) -> Layout | None:
    """The layout Postgres records, or None."""
    try:
        row = conn.execute(_SELECT).fetchone()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        raise ConfigError(
            "Postgres has no partition layout table: run `score-service migrate` first"
        ) from None
    if row is None:
        return None
    version, partitions, changing_from, from_version = row
    assert isinstance(version, int) and isinstance(partitions, int)
    assert changing_from is None or isinstance(changing_from, int)
    assert from_version is None or isinstance(from_version, int)
    return normalized(Layout(partitions, version, changing_from, from_version))


def write_postgres(conn: Conn, layout: Layout, *, replace: bool) -> Layout:
    """Record `layout` in Postgres: only if nothing is recorded yet, unless `replace`; the
    layout recorded afterwards."""
    conflict = (
        "DO UPDATE SET version = excluded.version, partitions = excluded.partitions,"
        " changing_from = excluded.changing_from,"
        " changing_from_version = excluded.changing_from_version, updated_at = now()"
        if replace
        else "DO NOTHING"
    )
    with conn.transaction():
        conn.execute(
            _INSERT + conflict,
            (layout.version, layout.partitions, layout.changing_from, layout.changing_from_version),
        )
    recorded = read_postgres(conn)
    assert recorded is not None
    return recorded


def read_redis(client: redis.Redis) -> Layout | None:
    """The layout Redis records, or None."""
    raw = client.get(KEY)
    return None if raw is None else decode(raw)


def write_redis(client: redis.Redis, layout: Layout, *, replace: bool) -> Layout:
    """Record `layout` in Redis: only if nothing is recorded yet, unless `replace`; the layout
    recorded afterwards."""
    client.set(KEY, encode(layout), nx=not replace)
    recorded = read_redis(client)
    if recorded is None:  # deleted meanwhile (a wipe): nothing to compare against
        return layout
    return recorded


def agreed(conn: Conn, client: redis.Redis, proposed: Layout) -> Layout:
    """The layout both stores record, after recording `proposed` where neither records one
    (and copying Postgres's into a Redis without one); LayoutMismatch when they disagree."""
    in_redis = read_redis(client)
    in_postgres = write_postgres(conn, in_redis or proposed, replace=False)
    if in_redis is None:
        in_redis = write_redis(client, in_postgres, replace=False)
    if in_redis != in_postgres:
        raise LayoutMismatch(
            f"the partition layout recorded in Redis ({in_redis.describe()}) is not Postgres's "
            f"({in_postgres.describe()}): run `{CHANGE_COMMAND} {in_postgres.partitions}` to "
            "make Redis follow Postgres"
        )
    return in_postgres


def ensure(settings: Settings, *, changing_to_mine: bool = False) -> Layout:
    """Check that this process's SCORE_PARTITIONS is the deployment's layout, recording it if
    this is the deployment's first start; LayoutMismatch (a ConfigError: exit code 2) naming
    both counts and the command that changes it, otherwise. `changing_to_mine`: a change to
    this process's count that is still running is accepted too (a long-running process started
    early waits for it, refusing writes meanwhile)."""
    client = sync_redis(settings)
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5, autocommit=True) as conn:
            recorded = agreed(conn, client, layout_of(settings))
    finally:
        client.close()
    if changing_to_mine and recorded.changing and recorded.partitions == settings.partitions:
        return recorded
    why = layout_problem(recorded, settings)
    if why is not None:
        raise LayoutMismatch(why)
    return recorded


def ensure_waiting(settings: Settings) -> Layout:
    """`ensure`, waiting out an outage of either store and a layout change in progress (a
    worker started meanwhile); LayoutMismatch for another count. With Postgres down, Redis's
    record is enough: the worker starts, and its events wait in Redis as usual."""
    failures = 0
    while True:
        try:
            return ensure(settings, changing_to_mine=True)
        except psycopg.OperationalError as exc:
            recorded = _recorded_quietly(settings)
            if recorded is not None and layout_problem(recorded, settings) is None:
                log.warning("Postgres is unavailable: the partition layout checked in Redis only")
                return recorded
            why = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        except redis.RedisError as exc:  # down, a cluster being formed, a failover...
            if not is_outage(exc):
                raise
            why = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        except LayoutMismatch as exc:
            recorded = _recorded_quietly(settings)
            if recorded is None or not recorded.changing:
                raise
            why = str(exc)
        failures = failed_again(failures)
        delay = BACKOFF.compute(failures)
        log.warning("cannot check the partition layout yet (%s); again in %.1fs", why, delay)
        time.sleep(delay)


def _recorded_quietly(settings: Settings) -> Layout | None:
    """Redis's record, or None if Redis cannot give it now."""
    try:
        with contextlib.closing(sync_redis(settings)) as client:
            return read_redis(client)
    except (redis.RedisError, LayoutMismatch):
        return None


def changed(client: redis.Redis, settings: Settings) -> str | None:
    """Why this process must stop using partitions now (Redis records a completed change to
    another layout), or None. A change in progress, or a missing record, is not a reason."""
    recorded = read_redis(client)
    if recorded is None or recorded.changing:
        return None
    return layout_problem(recorded, settings)


def stop_on_change(
    settings: Settings, stop: threading.Event, changed_: threading.Event, interval_s: float
) -> None:
    """For a long-running worker: poll Redis's record until `stop`; once the layout has been
    changed to another count, log why, set `changed_` and SIGTERM this process (RQ's warm
    shutdown: a running flush ends first). Restarted with the new count, it runs again."""
    client = sync_redis(settings)
    try:
        while not stop.wait(interval_s):
            try:
                why = changed(client, settings)
            except (redis.RedisError, LayoutMismatch) as exc:
                log.debug("could not read the partition layout: %s", exc)
                continue
            if why is not None:
                log.error("stopping: %s", why)
                changed_.set()
                os.kill(os.getpid(), signal.SIGTERM)
                return
    finally:
        client.close()
