"""`score-service`: the one command operators use. The only module that knows both the
service and the persister: it wires the persister's rebuild and flush into the app."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import msgspec

from service import logs
from service.models import UserId
from service.settings import ConfigError, Settings, log_format

log = logging.getLogger("score_service")


def app_from_env() -> object:
    """The ASGI app for uvicorn (`factory=True`), configured from the environment."""
    from service.app import create_app

    settings = Settings.from_env()
    app = create_app(settings, **persister_hooks(settings))
    # What is imported and built by now lives as long as the worker: move it out of the
    # garbage collector's reach. Otherwise every full collection walks it again under load,
    # and those pauses were the write path's p99 (about 40 ms instead of 14 ms at 64
    # connections, see bench/).
    gc.freeze()
    return app


def persister_hooks(settings: Settings) -> dict[str, Any]:
    """The persister's side of the app: rebuild an empty Redis, request flushes."""
    from persister import wiring

    return wiring.hooks(settings)


GRACEFUL_TIMEOUT_S = 5
KEEP_ALIVE_S = 5


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.connections import refuse_evicting_redis
    from service.http_protocol import HttpProtocol
    from service.supervisor import Supervisor

    settings = Settings.from_env()  # fail fast, in the parent, with one clear line
    refuse_evicting_redis(settings)
    check_layout(settings)
    with contextlib.ExitStack() as cleanup:
        if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # workers share their metrics through files: any worker's /metrics has them all
            metrics_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="score-"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        config = uvicorn.Config(
            "service.cli:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="uvloop",
            http=HttpProtocol,  # httptools, a response in one write (service/http_protocol.py)
            # websockets-sansio: protocol pings with a pong deadline, a message size limit, and a
            # transport the live leaderboard can reach to write its pre-framed frames to
            # (service/live/subscribers.py). No permessage-deflate: a zlib context per connection
            # costs tens of KB and compresses every frame once per client instead of once.
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            ws_ping_interval=settings.live_ping_interval_s,
            ws_ping_timeout=settings.live_ping_interval_s,
            ws_max_size=settings.live_max_message_bytes,
            lifespan="on",
            access_log=False,  # uvicorn's: ours is SCORE_ACCESS_LOG (service/request_id.py)
            server_header=False,  # names the server software to anyone; a header less to send
            # After SIGTERM's grace period (service/live/going_away.py): requests in flight get this
            # long to finish; then they are cancelled.
            timeout_graceful_shutdown=GRACEFUL_TIMEOUT_S,
            # An idle keep-alive connection is closed after this long (uvicorn's default).
            timeout_keep_alive=KEEP_ALIVE_S,
            # X-Forwarded-For / -Proto only from the proxies we are told to trust; without any,
            # not even from 127.0.0.1 (uvicorn's default), so the live leaderboard's
            # per-address limit counts the real peer.
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=list(settings.trusted_proxies) or None,
            # applied again in each worker process: uvicorn's lines in our format too
            log_config=logs.config(_log_level(), settings.log_format),
            log_level=_log_level().lower(),
        )
        if args.workers > 1:
            Supervisor(config, sockets=[config.bind_socket()]).run()
        else:
            uvicorn.Server(config).run()
    return 0


def check_layout(settings: Settings) -> None:
    """Before serving: LayoutMismatch (exit 2) when SCORE_PARTITIONS is not the deployment's
    layout; on its first start, record it. A store that is not reachable yet is not refused:
    the service checks the layout again when it makes Redis ready."""
    import psycopg
    import redis

    from persister.layout import ensure

    try:
        ensure(settings, changing_to_mine=True)  # then 503 until the change is done
    except (psycopg.OperationalError, redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("cannot check the partition layout yet (%s); the service will", exc)


def cmd_migrate(args: argparse.Namespace) -> int:
    import psycopg

    from persister.layout import write_postgres
    from persister.schema import migrate
    from service.layout import layout_of

    settings = Settings.for_stores()
    with psycopg.connect(settings.database_url, connect_timeout=10) as conn:
        applied = migrate(conn)
        conn.autocommit = True
        # a new deployment records its layout now (an existing one keeps its own)
        recorded = write_postgres(conn, layout_of(settings), replace=False)
    print(f"migrated: applied {applied}" if applied else "schema is up to date")
    if recorded != layout_of(settings):
        print(
            f"note: the deployment's layout is {recorded.describe()}, SCORE_PARTITIONS is "
            f"{settings.partitions}: the services will refuse to start until they agree"
        )
    return 0


def read_user_ids(values: Sequence[str]) -> list[str]:
    """Validated user ids: a bad one stops everything before anything is written."""
    ids: list[str] = []
    for value in values:
        try:
            ids.append(msgspec.convert(value, UserId))
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid user id {value!r}: {exc}") from None
    return ids


def id_lines(lines: Iterable[str]) -> Iterator[str]:
    """The user ids of an id file, one per line (a CSV's first column), as it is read; '#'
    comments and blank lines skipped."""
    for line in lines:
        value = line.split(",")[0].strip()
        if value and not value.startswith("#"):
            yield value


@contextlib.contextmanager
def open_id_file(name: str) -> Iterator[tuple[IO[str], int]]:
    """The id file (stdin for '-', spooled to a temporary file so it can be read twice) and
    its number of ids, every one validated, all read in constant memory: a bad id stops
    everything before anything is written."""
    with contextlib.ExitStack() as stack:
        try:
            if name == "-":
                file: IO[str] = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))
                for line in sys.stdin:
                    file.write(line)
                file.seek(0)
            else:
                file = stack.enter_context(Path(name).open(encoding="utf-8"))
            count = 0
            for value in id_lines(file):
                read_user_ids([value])
                count += 1
            file.seek(0)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read user ids from {name}: {exc}") from None
        yield file, count


def cmd_users(args: argparse.Namespace) -> int:
    import time

    import psycopg

    from persister.layout import ensure
    from service.connections import check_redis, sync_redis
    from service.keys import KeySchema
    from service.progress import Meter, rate
    from service.users import provision_all

    began = time.monotonic()
    settings = Settings.for_stores()
    with contextlib.ExitStack() as stack:
        if args.action == "import":
            file, total = stack.enter_context(open_id_file(args.file))
            ids: Iterable[str] = id_lines(file)
        else:
            ids = read_user_ids(args.ids)
            total = len(ids)
        client = sync_redis(settings)
        stack.callback(client.close)
        check_redis(client)
        ensure(settings)
        meter = stack.enter_context(Meter("users"))
        meter.expect("users provisioned", total)
        conn = stack.enter_context(psycopg.connect(settings.database_url, connect_timeout=10))
        schema = KeySchema(settings.partitions)
        created, seen = provision_all(conn, client, schema, settings.top_n, ids, meter)
    seconds = time.monotonic() - began
    print(
        f"users: {created} created, {seen - created} already existed, in {seconds:.1f}s "
        f"({rate(seen, seconds)})"
    )
    return 0


def cmd_partitions(args: argparse.Namespace) -> int:
    import psycopg
    import redis

    from persister.locks import PersisterBusy
    from persister.repartition import ChangeIncomplete, change, render, show

    settings = Settings.for_stores()
    if args.action != "set":
        print(render(show(settings)))
        return 0
    try:
        done = change(settings, args.count, say=lambda line: print(line, flush=True))
    except (ChangeIncomplete, PersisterBusy, psycopg.OperationalError, redis.RedisError) as exc:
        print(
            f"score-service: the change to {args.count} partition(s) is not finished: {exc}. "
            f"The services answer 503 until `score-service partitions set {args.count}` "
            "is run again (it resumes)",
            file=sys.stderr,
        )
        return 1
    if done is not None:
        print(
            f"partitions: {done.before.partitions} -> {done.after.partitions} in "
            f"{done.seconds:.1f}s; {done.rebuilt.users} users rebuilt, {done.drained} increments "
            f"drained into Postgres. Restart every service and worker with "
            f"SCORE_PARTITIONS={done.after.partitions}: until then they answer 503 (workers stop)"
        )
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from service.auth import mint
    from service.dev.quickstart import DEV_HS256_FILE

    (user_id,) = read_user_ids([args.user_id])
    env = dict(os.environ)
    dev_secret = Path(".data") / DEV_HS256_FILE
    if (
        not (env.get("SCORE_JWT_SECRET") or env.get("SCORE_JWT_PRIVATE_KEY"))
        and dev_secret.is_file()
    ):
        # `make run` keeps its secret there: a new shell in the checkout mints tokens it accepts
        env["SCORE_JWT_SECRET"] = dev_secret.read_text().strip()
    print(mint(Settings.from_env(env), user_id, admin=args.admin, ttl_s=args.ttl))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from service.dev.quickstart import run_dev

    return run_dev(Path(args.data), port=args.port, demo=args.demo, redis_kind=args.redis)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="score-service", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="quickstart: own Redis and Postgres, web and worker")
    dev.add_argument("--demo", action="store_true", help="also play simulated traffic")
    dev.add_argument("--port", type=int, default=8000, help="HTTP port (another if taken)")
    dev.add_argument("--data", default=".data", help="where the dev servers keep their data")
    dev.add_argument(
        "--redis",
        choices=("server", "sentinel", "cluster"),
        default="server",
        help="the Redis to start when REDIS_URL is unset: one server (default), Sentinel "
        "(1 primary, 2 replicas, 3 sentinels) or Cluster (3 primaries, 3 replicas)",
    )
    dev.set_defaults(func=cmd_dev)

    serve = sub.add_parser("serve", help="the HTTP and WebSocket service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="worker processes")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="create or upgrade the Postgres schema")
    migrate.set_defaults(func=cmd_migrate)

    users = sub.add_parser("users", help="provision users in Postgres and Redis")
    users_sub = users.add_subparsers(dest="action", required=True)
    add = users_sub.add_parser("add", help="provision the given user ids")
    add.add_argument("ids", nargs="+", metavar="ID")
    imp = users_sub.add_parser("import", help="provision one user id per line of FILE ('-': stdin)")
    imp.add_argument("file", metavar="FILE")
    users.set_defaults(func=cmd_users)

    partitions = sub.add_parser(
        "partitions",
        help="show the partition layout and each partition's backlog; `set N` changes it",
        description="Show the recorded partition layout, or change it safely (`set N`): refuse "
        "writes, drain every events stream into Postgres, record the new layout, rebuild Redis.",
    )
    partitions_sub = partitions.add_subparsers(dest="action")
    set_count = partitions_sub.add_parser("set", help="change the number of partitions")
    set_count.add_argument("count", type=int, metavar="N")
    partitions.set_defaults(func=cmd_partitions)

    token = sub.add_parser("token", help="mint a token (dev secret or SCORE_JWT_PRIVATE_KEY)")
    token.add_argument("user_id", metavar="ID")
    token.add_argument("--admin", action="store_true", help="grant the admin API")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)

    for name, register in extra_commands():
        register(sub.add_parser(name))
    return p


def extra_commands() -> list[tuple[str, Callable[[argparse.ArgumentParser], None]]]:
    """The persister's commands (worker, rebuild, reconcile)."""
    from persister import commands

    return commands.COMMANDS


def _log_level() -> str:
    return os.environ.get("SCORE_LOG_LEVEL", "INFO").upper()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        logs.configure(_log_level(), log_format(os.environ))
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"score-service: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
