"""The contract's smoke check against a normal install: the project's wheel in a clean venv.

`../shared/contract/run` installs the checkout, editable, into a venv of its own. This area
(run as `CONTRACT_AREAS=.ci/contract ../shared/contract/run wheel-smoke`) runs the same smoke
body with `score-service` taken from the venv named by SCORE_WHEEL_VENV, where `.ci/run`
installed the built wheel. The commands run in a temporary directory, so nothing of the
checkout is on their path: the Lua scripts and redis.conf must come from the wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

import area_smoke
import stack
from checks import run_area

VENV = Path(os.environ["SCORE_WHEEL_VENV"])


def installed_venv(self: stack.Stack) -> Path:
    return VENV


stack.Stack.venv = installed_venv  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(run_area("smoke (installed wheel)", area_smoke.body))
