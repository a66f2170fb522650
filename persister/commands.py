"""The persister's CLI commands, registered into `score-service` by service.cli."""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: list[tuple[str, Callable[[argparse.ArgumentParser], None]]] = []
