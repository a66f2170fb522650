"""Progress of long operator commands: a live line on a terminal, only the summary elsewhere,
as real processes; and an import of many users in constant memory."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import psycopg
import redis
from persist_support import cli, submit

from service.progress import Meter
from service.settings import Settings

# `score-service ARGS`, then its peak resident memory (KiB) as the last line on stderr
MEASURED = (
    "import resource, sys\n"
    "from service.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`score-service ARGS` with stderr on a pseudo-terminal: (exit code, stdout, what the
    terminal showed)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    shown = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process has exited, closing the terminal
            break
        if not data:
            break
        shown += data
    os.close(master)
    assert process.stdout is not None
    with process.stdout:
        out = process.stdout.read().decode()
    return process.wait(60), out, shown.decode(errors="replace")


def user_file(path: Path, count: int, width: int = 12) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            f.write(f"{'p' * (width - 8)}{i:08d}\n")
    return path


def test_on_a_terminal_the_commands_show_their_progress(
    env: dict[str, str], settings: Settings, r: redis.Redis, tmp_path: Path
) -> None:
    path = user_file(tmp_path / "users.txt", 3000)
    code, out, shown = on_a_terminal(env, "users", "import", str(path))
    assert code == 0, shown
    assert "\rusers: users provisioned " in shown and "/3,000 (" in shown, shown
    assert out.startswith("users: 3000 created, 0 already existed, in "), out
    submit(settings, r, "pppp00000000", 5)

    code, out, shown = on_a_terminal(env, "rebuild")
    assert code == 0, shown
    assert "\rrebuild: users filled " in shown, shown
    assert out.startswith("rebuilt Redis from Postgres: 3000 users, 1 increments"), out

    code, out, shown = on_a_terminal(env, "reconcile")
    assert code == 0, shown
    assert "\rreconcile: users checked " in shown and "/3,000 (" in shown, shown
    assert out.startswith("reconcile: checked 3000 users"), out


def test_off_a_terminal_only_the_summary_is_printed(
    env: dict[str, str], r: redis.Redis, tmp_path: Path
) -> None:
    path = user_file(tmp_path / "users.txt", 3000)
    for args in (("users", "import", str(path)), ("rebuild",), ("reconcile",)):
        out = cli(env, *args)
        assert out.returncode == 0, out.stderr
        assert "\r" not in out.stderr and "\x1b" not in out.stderr, out.stderr
        for word in ("provisioned", "filled", "checked"):
            assert word not in out.stderr, out.stderr
        summary = out.stdout.strip().splitlines()[0]
        assert " in " in summary and "/s" in summary, summary


def test_a_meter_draws_nothing_off_a_terminal_and_erases_its_line_on_one() -> None:
    quiet = io.StringIO()
    with Meter("job", quiet) as meter:
        meter.expect("rows", 10)
        meter("rows", 5)
    assert quiet.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    with Meter("job", terminal) as meter:
        meter.expect("rows", 10)
        meter("rows", 5)
        meter("errors", 1)  # within REFRESH_S of the first: not drawn again
    drawn = terminal.getvalue()
    assert drawn.startswith("\rjob: rows 5/10 (") and "s left)" in drawn, drawn
    assert "errors" not in drawn and drawn.endswith("\r\x1b[K")


def test_an_import_of_200000_users_streams_its_file(
    env: dict[str, str], r: redis.Redis, pg: psycopg.Connection, tmp_path: Path
) -> None:
    """The file is read in chunks of 10,000: the import of 200,000 users of 100 characters
    (20 MB of ids) takes hardly more memory than that of 1,000."""

    def peak_kib(path: Path) -> int:
        out = subprocess.run(
            [sys.executable, "-c", MEASURED, "users", "import", str(path)],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return int(out.stderr.strip().splitlines()[-1])

    small = peak_kib(user_file(tmp_path / "small.txt", 1000, width=100))
    large_file = user_file(tmp_path / "large.txt", 200_000, width=100)
    large = peak_kib(large_file)
    row = pg.execute("SELECT count(*) FROM users").fetchone()
    assert row is not None and row[0] == 200_000  # the small file's ids are among the large's
    assert large - small < 16 * 1024, (small, large)  # KiB; reading it whole took 34 MB more
