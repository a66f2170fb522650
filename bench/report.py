"""The run's outputs: the targets checked, a Markdown summary, PNG plots, the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from bench import topology_report


@dataclass(frozen=True)
class Check:
    name: str
    measured: float | None
    target: str
    ok: bool | None  # None: not measured in this run
    unit: str = ""

    def row(self) -> str:
        value = "n/a" if self.measured is None else f"{self.measured:,.2f}{self.unit}"
        verdict = {True: "met", False: "**missed**", None: "not measured"}[self.ok]
        return f"| {self.name} | {value} | {self.target} | {verdict} |"


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _level(results: dict[str, Any], clients: int) -> dict[str, Any] | None:
    for level in _get(results, "fanout", "levels") or []:
        if level["clients"] == clients:
            return level  # type: ignore[no-any-return]
    return None


def _check(name: str, value: float | None, target: str, ok: Any, unit: str = "") -> Check:
    return Check(name, value, target, None if value is None else bool(ok(value)), unit)


def checks(r: dict[str, Any]) -> list[Check]:
    """Every target of the issue, against this run's numbers."""
    paced = {p["fraction_asked"]: p for p in _get(r, "paced") or []}
    half = paced.get(0.5)
    f1k, f5k = _level(r, 1000), _level(r, 5000)
    scale = _get(r, "scale", "summary") or {}
    s10k, s1m = scale.get("10k@64"), scale.get("1M@64")
    correct = _get(r, "correctness") or {}
    checks_ok = [v.get("ok") for v in correct.values() if isinstance(v, dict) and "ok" in v]
    ours = _get(r, "write_path", "cpu", "ours", "cpu_us_per_request") or {}
    bare = _get(r, "write_path", "cpu", "bare", "cpu_us_per_request") or {}
    workers = ours.get("service workers"), bare.get("bare workers")
    return [
        _check("write path / bare Starlette (best runs)",
               _get(r, "write_path", "ratios", "ours/bare"), ">= 0.5x", lambda v: v >= 0.5, "x"),
        _check("service workers' CPU per request / bare workers'",
               workers[0] / workers[1] if all(workers) else None, "<= 1.5x",  # type: ignore[operator]
               lambda v: v <= 1.5, "x"),
        _check("Redis CPU per update (write path, 64 connections)", ours.get("redis"), "<= 20 us",
               lambda v: v <= 20, " us"),
        _check("persister + Postgres CPU per update (the same run)",
               ours["persister"] + ours["postgres"] if "postgres" in ours else None, "<= 20 us",
               lambda v: v <= 20, " us"),
        _check("one primary's ceiling (redis-benchmark, submit, pipeline 16)",
               _get(r, "redis_ceiling", "pipeline_16", "rps"), ">= 50,000/s",
               lambda v: v >= 50_000, "/s"),
        _check("write path / naive Postgres-only (best runs)",
               _get(r, "write_path", "ratios", "ours/naive"), ">= 5x", lambda v: v >= 5, "x"),
        _check("p99 at half the max rate (paced)", half["p99_ms"] if half else None, "< 5 ms",
               lambda v: v < 5, " ms"),
        _check("p99 saturated, 64 connections",
               _get(r, "write_path", "summary", "ours@64", "p99_ms"), "< 15 ms",
               lambda v: v < 15, " ms"),
        _check("appendfsync always / everysec", _get(r, "durability", "always/everysec"), ">= 0.8x",
               lambda v: v >= 0.8, "x"),
        _check("fan-out, last of 1,000 clients, p99", f1k["last_p99_ms"] if f1k else None,
               "< 50 ms", lambda v: v < 50, " ms"),
        _check("fan-out, last of 5,000 clients, p99", f5k["last_p99_ms"] if f5k else None,
               "< 150 ms", lambda v: v < 150, " ms"),
        _check("server memory per WebSocket", (f5k or f1k or {}).get("bytes_per_connection"),
               "< 40 KB", lambda v: v < 40_000, " B"),
        _check("persister drain rate", _get(r, "persister", "drain", "events_per_s"),
               ">= 50,000 events/s", lambda v: v >= 50_000, "/s"),
        _check("persister lag p99 at max write rate", _get(r, "persister", "lag", "lag_p99_ms"),
               "< 1,000 ms", lambda v: v < 1000, " ms"),
        _check("p50 with 1M users / with 10k users",
               s1m["best_p50_ms"] / s10k["best_p50_ms"] if s1m and s10k else None, "<= 1.2x",
               lambda v: v <= 1.2, "x"),
        *_failover_checks(r),
        Check("correctness (Redis = acknowledged; Postgres = Redis)", None, "exact",
              all(checks_ok) if checks_ok else None),
    ]  # fmt: skip


FAILOVER_TARGET_S = 15.0


def _failover_checks(r: dict[str, Any]) -> list[Check]:
    """Writes come back by themselves after a primary's death: the slowest repetition."""
    out = []
    for label, f in (_get(r, "topology", "failover") or {}).items():
        if "recovery_s" not in f:
            continue
        ok = not f["unrecovered"] and f["max_s"] is not None and f["max_s"] < FAILOVER_TARGET_S
        out.append(Check(f"failover, {topology_report.name(label)}: kill to first write (max)",
                         f["max_s"], "< 15 s (aim < 5 s)", ok, " s"))  # fmt: skip
    return out


def machine() -> dict[str, object]:
    def version(args: list[str]) -> str:
        try:
            out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": version(["redis-server", "--version"]),
        "postgres": version(["postgres", "--version"]),
        "wrk": version(["wrk", "--version"]),
    }


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(r: dict[str, Any]) -> str:
    """The summary: targets first, then the numbers behind them."""
    m = r["machine"]
    lines = [
        f"Run {r['started']} on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB "
        f"(load generator on the same machine); {r['settings']['workers']} service workers, "
        f"{r['settings']['duration_s']:.0f} s per load run, {r['settings']['rounds']} rounds.",
        "",
        "| target | measured | bar | result |",
        "|---|---|---|---|",
        *(c.row() for c in checks(r)),
    ]
    summary = _get(r, "write_path", "summary")
    if summary:
        lines += ["", "Write path (`POST /api/v1/score`, wrk, medians over rounds):", "",
                  "| server @ connections | req/s | best req/s | p50 ms | p90 ms | p99 ms | max ms "
                  "| errors |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, s in summary.items():
            errors = s["non_2xx"] + s["socket_errors"] + s["timeouts"]
            lines.append(
                f"| {key} | {s['rps']:,.0f} | {s['best_rps']:,.0f} | {_ms(s['p50_ms'])} | "
                f"{_ms(s['p90_ms'])} | "
                f"{_ms(s['p99_ms'])} | {_ms(s['max_ms'])} | {errors} |"
            )
    for p in _get(r, "paced") or []:
        if p is (_get(r, "paced") or [None])[0]:
            lines += ["", "Paced (64 connections):", "",
                      "| asked | achieved req/s | of max | p50 ms | p99 ms | max ms |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
        lines.append(
            f"| {p['fraction_asked']:.0%} | {p['rps']:,.0f} | {p['fraction_of_max']:.0%} | "
            f"{_ms(p['p50_ms'])} | {_ms(p['p99_ms'])} | {_ms(p['max_ms'])} |"
        )
    ceiling = _get(r, "redis_ceiling") or {}
    how = ceiling.get("how", "EVALSHA")  # runs before 2026-12-03 measured EVALSHA only
    for name, c in ceiling.items():
        if isinstance(c, dict):
            lines.append(
                f"\nRedis alone, submit script by {how} ({name.replace('_', ' ')}, "
                f"{c['connections']} conn.): {c['rps']:,.0f} calls/s, p50 {c['p50_ms']} ms."
            )
    durability = _get(r, "durability", "summary") or {}
    for mode, s in durability.items():
        lines.append(f"\nappendfsync {mode}: {s['rps']:,.0f} req/s, p99 {_ms(s['p99_ms'])} ms.")
    for mode, s in (_get(r, "durability", "paced at half the max") or {}).items():
        lines.append(
            f"\nappendfsync {mode}, paced at half the max rate: {s['rps']:,.0f} req/s, p50 "
            f"{_ms(s['p50_ms'])} ms, p99 {_ms(s['p99_ms'])} ms."
        )
    for level in _get(r, "fanout", "levels") or []:
        lines.append(
            f"\nFan-out to {level['clients']:,} clients: last client p50 "
            f"{_ms(level['last_p50_ms'])} ms, p99 {_ms(level['last_p99_ms'])} ms over "
            f"{level['posts']} posts ({level['missing']} frames missing); "
            f"{level['bytes_per_connection'] / 1000:.1f} KB server memory per connection."
        )
    drain, lag = _get(r, "persister", "drain"), _get(r, "persister", "lag")
    if drain and "events_per_s" in drain:
        lines.append(
            f"\nPersister: drained a backlog of {drain['backlog']:,} events "
            f"({drain['committed_to_postgres']:,} rows committed) at "
            f"{drain['events_per_s']:,.0f} events/s ({drain['events_per_s_including_startup']:,.0f}"
            f"/s counting the worker's start)."
        )
        cpu = drain.get("cpu_us_per_event") or {}
        if cpu:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
            lines.append(f"CPU per drained event (microseconds): {parts}.")
    if lag and "lag_p99_ms" in lag:
        lines.append(
            f"\nPersister lag with the write path at {lag['write']['rps']:,.0f} req/s: "
            f"p50 {lag['lag_p50_ms']:.0f} ms, p99 {lag['lag_p99_ms']:.0f} ms, "
            f"max {lag['lag_max_ms']:.0f} ms ({lag['samples']} samples)."
        )
    for label, s in (_get(r, "scale", "summary") or {}).items():
        lines.append(
            f"\nScale, {label}: {s['rps']:,.0f} req/s, p50 {_ms(s['p50_ms'])} ms "
            f"(best run {_ms(s['best_p50_ms'])} ms)."
        )
    lines += _cpu_lines(r)
    if _get(r, "topology"):
        lines += topology_report.lines(r["topology"], _get(r, "correctness") or {})
    lines += _correctness_lines(r)
    for key in ("write_path", "paced", "durability", "redis_ceiling", "fanout", "persister",
                "scale"):  # fmt: skip
        note = _get(r, key, "error") or _get(r, key, "skipped")
        if note:
            lines.append(f"\n{key}: {note}")
    return "\n".join(lines) + "\n"


def _cpu_lines(r: dict[str, Any]) -> list[str]:
    cpu = _get(r, "write_path", "cpu") or {}
    if not cpu:
        return []
    lines = ["", "CPU per request at 64 connections (microseconds, all cores):", "",
             "| server | req/s | by process |", "|---|---|---|"]  # fmt: skip
    for label, c in cpu.items():
        if "cpu_us_per_request" not in c:  # a measurement that failed: its error is in the JSON
            continue
        parts = ", ".join(f"{k} {v:.0f}" for k, v in c["cpu_us_per_request"].items())
        lines.append(f"| {label} | {c['rps']:,.0f} | {parts} |")
    ours, bare = (
        cpu.get("ours", {}).get("cpu_us_per_request"),
        cpu.get("bare", {}).get("cpu_us_per_request"),
    )
    if ours and bare:
        # With every core busy, throughput is inversely proportional to CPU per request.
        others = ours["total"] - ours["service workers"]
        bound = bare["total"] / (bare.get("bare workers", 0) + others)
        lines.append(
            f"\nWith the cores saturated, throughput goes as 1 / CPU per request. The processes "
            f"besides our workers (Redis, persister, Postgres, load generator) already spend "
            f"{others:.0f} us per request: even workers as cheap as the bare app's would give "
            f"at most {bound:.2f}x the bare app here; ours spend "
            f"{ours['service workers'] - bare.get('bare workers', 0):.0f} us more than its "
            "workers. "
            f"CPU per request puts ours at {bare['total'] / ours['total']:.2f}x the bare app, a "
            f"ratio other load on the machine does not blur."
        )
    floor = cpu.get("floor", {}).get("cpu_us_per_request")
    if floor and bare and bare.get("bare workers"):
        lines.append(
            f"\nThe bare app waiting on Redis once per request (a PING through the service's "
            f"auto-pipeline) spends {floor['floor workers']:.0f} us per request in its workers, "
            f"{floor['floor workers'] / bare['bare workers']:.2f}x the bare app's, before any of "
            f"the hot path's own work (and with Starlette's router and middleware, which our hot "
            f"path skips)."
        )
    return lines


def _correctness_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    for name, c in (_get(r, "correctness") or {}).items():
        lost = f", {c['lost']:,} lost by a failover without WAIT" if "lost" in c else ""
        if "users" in c:
            lines.append(
                f"\nCorrectness ({name}): {c['users']} keyed users, acknowledged "
                f"{c['acknowledged']:,} (+ at most {c['in_doubt']:,} in doubt), Redis "
                f"{c['redis_total']:,}, Postgres {c['postgres_total']:,}{lost}, "
                f"{c['users_wrong']} users wrong: {'ok' if c['ok'] else 'WRONG'}."
            )
        elif "redis_total" in c and "acknowledged" in c:
            lines.append(
                f"\nCorrectness ({name}): Redis total {c['redis_total']:,}, acknowledged "
                f"{c['acknowledged']:,} (+ at most {c['in_doubt']:,} in doubt){lost}: "
                f"{'ok' if c['ok'] else 'WRONG'}."
            )
        elif "postgres_total" in c:
            lines.append(
                f"\nCorrectness ({name}): Postgres total {c['postgres_total']:,} = Redis "
                f"{c['redis_total']:,}, {c['users_differing']} users differ, ledger of "
                f"{c['events']:,} events sums to {c['events_sum']:,}: "
                f"{'ok' if c['ok'] else 'WRONG'}."
            )
        elif c.get("skipped") or c.get("error"):
            lines.append(f"\nCorrectness ({name}): {c.get('skipped') or c.get('error')}")
    return lines


def plots(r: dict[str, Any], directory: Path) -> list[Path]:
    """Latency against throughput per concurrency; fan-out latency against clients."""
    written = []
    summary = _get(r, "write_path", "summary") or {}
    if summary:
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, marker in (("ours", "o"), ("bare", "s"), ("naive", "^")):
            points = sorted(
                (int(k.split("@")[1]), s) for k, s in summary.items() if k.startswith(label + "@")
            )
            if not points:
                continue
            xs = [s["rps"] for _, s in points]
            line = ax.plot(
                xs, [s["p99_ms"] for _, s in points], marker=marker, label=f"{label} p99"
            )
            ax.plot(xs, [s["p50_ms"] for _, s in points], marker=marker, linestyle=":",
                    color=line[0].get_color(), label=f"{label} p50")  # fmt: skip
            for c, s in points:
                ax.annotate(f"c={c}", (s["rps"], s["p99_ms"]), fontsize=7)
        paced = _get(r, "paced") or []
        if paced:
            ax.plot([p["rps"] for p in paced], [p["p99_ms"] for p in paced], marker="x",
                    label="ours p99, paced")  # fmt: skip
        ax.set(xlabel="throughput (req/s)", ylabel="latency (ms)", yscale="log",
               title="POST /api/v1/score: latency against throughput")  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        path = directory / "latency-throughput.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    levels = _get(r, "fanout", "levels") or []
    if levels:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [lv["clients"] for lv in levels]
        ax.plot(xs, [lv["last_p50_ms"] for lv in levels], marker="o", label="last client, p50")
        ax.plot(xs, [lv["last_p99_ms"] for lv in levels], marker="o", label="last client, p99")
        ax.set(xlabel="WebSocket clients", ylabel="post to frame (ms)",
               title="Fan-out: post to last client")  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = directory / "fanout.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
