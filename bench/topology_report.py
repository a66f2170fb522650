"""The "Topologies" section of the summary (bench/topologies.py's results): the write path on
each deployment, the Redis CPU an update costs and what it means per primary, the failovers."""

from __future__ import annotations

from typing import Any

NAMES = {
    "server": "one server",
    "tls": "one server, TLS",
    "sentinel": "Sentinel",
    "sentinel_wait1": "Sentinel, WAIT 1",
    "cluster": "Cluster",
}


AGAINST_ONE = {"tls/server": "TLS", "sentinel/server": "Sentinel", "cluster/server": "Cluster"}


def name(label: str) -> str:
    return NAMES.get(label, label)


def lines(t: dict[str, Any], correctness: dict[str, Any]) -> list[str]:
    """Markdown lines; `t` is results["topology"], `correctness` results["correctness"]."""
    out = ["", "#### Topologies", ""]
    out += _throughput(t) + _per_primary(t) + _failovers(t, correctness)
    for label, why in (t.get("not_started") or {}).items():
        out.append(f"\n{name(label)}: not started ({why}).")
    if t.get("error"):
        out.append(f"\ntopology: {t['error']}")
    return out


def _throughput(t: dict[str, Any]) -> list[str]:
    runs = t.get("throughput") or {}
    deployments = t.get("deployments") or {}
    if not deployments:
        return []
    out = [
        "Write path at 64 connections, side by side (medians over rounds). Redis CPU per applied "
        "update, microseconds, summed over the deployment's processes of each role:",
        "",
        "| deployment | REDIS_URL | partitions | req/s | p50 ms | p99 ms | errors | primaries "
        "| replicas | sentinels | service workers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, d in deployments.items():
        s = runs.get(label)
        if not s:
            continue
        cpu = s["cpu_us_per_update"]
        errors = s["non_2xx"] + s["socket_errors"] + s["timeouts"]
        out.append(
            f"| {name(label)} | `{d['redis_url']}` | {d['partitions']} | {s['rps']:,.0f} | "
            f"{s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {errors} | {_n(cpu.get('primaries'))} | "
            f"{_n(cpu.get('replicas'))} | {_n(cpu.get('sentinels'))} | "
            f"{_n(cpu.get('service workers'))} |"
        )
    return out + _costs(runs)


def _costs(runs: dict[str, Any]) -> list[str]:
    """What TLS, Sentinel, WAIT 1 and Cluster cost in throughput, round by round."""
    ratios = runs.get("ratios") or {}
    parts = [f"{what} {ratios[key]:.2f}x" for key, what in AGAINST_ONE.items() if key in ratios]
    out = [f"\nThroughput against one server: {', '.join(parts)}."] if parts else []
    plain, waiting = runs.get("sentinel"), runs.get("sentinel_wait1")
    if plain and waiting and "sentinel_wait1/sentinel" in ratios:
        out.append(
            f"\nThe cost of `WAIT 1` (SCORE_REDIS_MIN_REPLICAS=1, same Sentinel deployment): "
            f"{ratios['sentinel_wait1/sentinel']:.2f}x the throughput, p99 "
            f"{plain['p99_ms']:.2f} -> {waiting['p99_ms']:.2f} ms, p50 {plain['p50_ms']:.2f} -> "
            f"{waiting['p50_ms']:.2f} ms."
        )
    return out


def _per_primary(t: dict[str, Any]) -> list[str]:
    runs = t.get("throughput") or {}
    if not any(isinstance(s, dict) and s.get("primaries") for s in runs.values()):
        return []
    out = [
        "",
        "Per primary: Redis runs commands on one thread, so a primary with a core of its own "
        "takes at most 1e6 / (its CPU per update) updates/s; a deployment saturates when its "
        "first primary does, given each one's share of the updates. The cost is measured at the "
        "rate each primary got here: a primary's costs per batch (a write and an fsync of its "
        "AOF with `appendfsync always`, an event-loop wake-up) are shared by fewer updates at a "
        "third of the rate, so a cluster primary's cost per update is probably overstated, and its "
        "ceiling understated, against one server's:",
        "",
        "| deployment | primary | partitions | share of updates | CPU us per update on it | "
        "its ceiling, updates/s | deployment's ceiling, updates/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in runs.items():
        if label == "ratios" or not s.get("primaries"):
            continue
        for i, p in enumerate(s["primaries"]):
            whole = _n(s["ceiling_per_s"]) if i == 0 else ""
            out.append(
                f"| {name(label) if i == 0 else ''} | :{p['port']} | "
                f"{', '.join(map(str, p['partitions']))} | {p['share']:.0%} | "
                f"{_n(p['cpu_us_per_update'])} | {_n(p['ceiling_per_s'])} | {whole} |"
            )
    return out + _meaning(runs)


def _meaning(runs: dict[str, Any]) -> list[str]:
    server, cluster = runs.get("server"), runs.get("cluster")
    if not (server and cluster and server.get("ceiling_per_s") and cluster.get("ceiling_per_s")):
        return []
    loaded = [p for p in cluster["primaries"] if p["share"]]
    per = [p["cpu_us_per_update"] for p in loaded]
    shares = [p["share"] for p in loaded]
    replicas = cluster["cpu_us_per_update"].get("replicas")
    on_replicas = (
        f"; the replicas spend {replicas:.0f} us per update on their own cores" if replicas else ""
    )
    return [
        f"\nEach of the cluster's {len(loaded)} primaries serves {min(shares):.0%}-"
        f"{max(shares):.0%} of the updates and spends {min(per):.0f}-{max(per):.0f} us of CPU "
        f"on each (one server: {server['primaries'][0]['cpu_us_per_update']:.0f} us): with a "
        f"core each, their Redis ceiling is {_n(cluster['ceiling_per_s'])} updates/s against "
        f"{_n(server['ceiling_per_s'])} for one server "
        f"({cluster['ceiling_per_s'] / server['ceiling_per_s']:.1f}x){on_replicas}. Here every "
        "node, the service workers, the persisters and wrk share the machine's "
        "cores, so the wall-clock throughput above cannot show that gain: the service workers' "
        "CPU per update, not Redis's, bounds it."
    ]


def _failovers(t: dict[str, Any], correctness: dict[str, Any]) -> list[str]:
    failovers = t.get("failover") or {}
    if not failovers:
        return []
    out = [
        "",
        "Failover: the primary (Cluster: the one holding partition 0) SIGKILLed while keyed "
        "clients post, restarted after each repetition (it rejoins as a replica):",
        "",
        "| deployment | WAIT | kills | kill -> first acknowledged write, median s | max s | "
        "answers to the probes | acknowledged then lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, f in failovers.items():
        if "recovery_s" not in f:
            continue
        answers = ", ".join(
            f"{n:,} x {'no answer' if code == '0' else code}" for code, n in f["statuses"].items()
        )
        lost = (correctness.get(f"topology_{label}_users") or {}).get("lost", "-")
        missing = f" ({f['unrecovered']} not within the deadline)" if f["unrecovered"] else ""
        out.append(
            f"| {name(label)} | {f['min_replicas']} | {len(f['recovery_s'])}{missing} | "
            f"{_s(f['median_s'])} | {_s(f['max_s'])} | {answers} | {lost} |"
        )
    out += [f"\n{name(label)}: {f['error']}" for label, f in failovers.items() if f.get("error")]
    return out


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
