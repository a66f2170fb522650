"""`python -m soak --seconds 600 --seed N [--faults kill,proxy,...]` (tests/ on the path):
exit 0 when every guarantee held, 1 otherwise; the report says which and how to replay it."""

from __future__ import annotations

import argparse
import sys

from .driver import FAMILIES
from .run import SoakConfig, run_soak


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    p.add_argument("--seconds", type=float, default=600.0, help="how long the chaos runs")
    p.add_argument("--seed", type=int, default=1, help="drives every random choice")
    p.add_argument(
        "--faults",
        default=",".join(FAMILIES),
        help=f"comma-separated families to apply (default all: {','.join(FAMILIES)})",
    )
    p.add_argument("--players", type=int, default=3, help="player client threads")
    p.add_argument("--users", type=int, default=30, help="users provisioned at the start")
    p.add_argument("--partitions", type=int, default=2, help="SCORE_PARTITIONS")
    p.add_argument("--max-hold", type=float, default=4.0, help="longest a fault holds (s)")
    p.add_argument("--keep", action="store_true", help="keep logs and data when it passes")
    args = p.parse_args()
    families = {f.strip() for f in args.faults.split(",") if f.strip()}
    unknown = families - set(FAMILIES)
    if unknown:
        p.error(f"unknown fault families {sorted(unknown)}; known: {','.join(FAMILIES)}")
    config = SoakConfig(
        seconds=args.seconds, seed=args.seed, families=families, players=args.players,
        users=args.users, partitions=args.partitions, max_hold_s=args.max_hold, keep=args.keep,
    )  # fmt: skip
    result = run_soak(config)
    print(result.report, flush=True)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
