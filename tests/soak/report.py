"""The soak's report: the seed, what was injected and how often, every answer per endpoint and
status, the ledger, the errors the processes logged, and the verdict."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .check import Verdict
from .clients import Stats
from .ledger import Ledger

WIPE_WINDOW_S = 3.0
_ERROR = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) ")


def unhandled(log: Path) -> list[str]:
    """The exceptions the service did not handle (each a 500, whether or not the client was
    still there to read it): the last line of each one's traceback."""
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    found = []
    for i, line in enumerate(lines):
        if "Exception in ASGI application" in line:
            end = i + 2
            while end < len(lines) and (lines[end].startswith(" ") or not lines[end].strip()):
                end += 1
            last = lines[end] if end < len(lines) else line
            found.append(re.sub(r"0x[0-9a-f]+", "0x...", last)[:300])  # one kind, one count
    return found


def logged_errors(log: Path) -> Counter[str]:
    """ERROR lines and the last line of each traceback in a process's log, by text."""
    found: Counter[str] = Counter()
    if not log.exists():
        return found
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = i + 1
            while end < len(lines) and (lines[end].startswith(" ") or not lines[end].strip()):
                end += 1
            if end < len(lines):
                found["traceback: " + re.sub(r"0x[0-9a-f]+", "0x...", lines[end])[:300]] += 1
        elif _ERROR.match(line):
            # drop the timestamp so that repeats count together
            found[re.sub(r"^\S+ \S+ ", "", line)[:300]] += 1
    return found


def render(
    *,
    seed: int,
    seconds: float,
    families: set[str],
    injected: Counter[str],
    stats: Stats,
    ledger: Ledger,
    notes: list[str],
    failures: list[str],
    wipes: list[float],
    verdict: Verdict | None,
    directory: Path,
    replay: str,
) -> str:
    out: list[str] = []
    add = out.append
    add(f"chaos soak: seed {seed}, {seconds:.0f}s, faults {','.join(sorted(families))}")
    add("")
    add("injected:")
    for what, n in sorted(injected.items()):
        add(f"  {n:6d}  {what}")
    add("")
    add("answers (endpoint, status or what went wrong):")
    for (endpoint, outcome), n in sorted(stats.answers.items()):
        add(f"  {n:8d}  {endpoint}  {outcome}")
    add("")
    add("ledger:")
    for what, n in sorted(ledger.summary().items()):
        add(f"  {n:8d}  {what}")
    add(f"  {len(ledger.users):8d}  users provisioned")
    if verdict is not None:
        add(
            f"  checked {verdict.checked_users} users ({verdict.exact_users} exactly, the rest "
            f"within their uncertain increments), {verdict.keys_checked} keys; Postgres total "
            f"{verdict.postgres_total}"
        )
    if stats.violations:
        add("")
        add("answers the contract does not allow:")
        for (endpoint, outcome), n in sorted(stats.violations.items()):
            near = stats.near(endpoint, outcome, wipes, WIPE_WINDOW_S)
            add(
                f"  {n:6d}  {endpoint}  {outcome}  ({near} within {WIPE_WINDOW_S:.0f}s after a "
                f"FLUSHALL)  at {stats.when(endpoint, outcome)}"
            )
        add("  first bodies:")
        out.extend(f"    {body}" for body in stats.bodies[:20])
    for name in ("serve.log", "worker.log"):
        errors = logged_errors(directory / name)
        if errors:
            add("")
            add(f"errors logged in {name}:")
            for text, n in errors.most_common(12):
                add(f"  {n:6d}  {text}")
    if notes:
        add("")
        add(f"operator notes ({len(notes)}; not failures by themselves):")
        out.extend(f"  {note[:300]}" for note in notes[:15])
    add("")
    if failures:
        add(f"FAILED ({len(failures)}):")
        out.extend(f"  - {failure}" for failure in failures)
        add(f"replay: {replay}")
        add(f"logs: {directory}")
    else:
        add("PASSED: Postgres = the ledger, Redis = Postgres, reconcile clean, no 500")
    return "\n".join(out)
