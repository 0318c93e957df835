"""Running ``windfleet demo`` as a user does, for tests/test_demo.py and
tests/test_dashboard_fleet.py (the ``demo_model`` package they run it on is a session
fixture in conftest.py, trained once for every xdist worker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from windfleet.nucleus.fleet import leftover_processes

GATEWAYS, TURBINES = 2, 3  # gw02-t01 drifts

leftovers = leftover_processes  # processes of a run still alive (should be none)


def run_demo(work: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    """``windfleet demo`` on a small fleet with ``model_dir`` as v1 and v2 (no training stages),
    in its own process group (kill it with ``os.killpg``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "windfleet.cli", "demo", "--gateways", str(GATEWAYS), "--turbines-per-gateway",
         str(TURBINES), "--duration", "6", "--model-v1", str(model_dir), "--model-v2", str(model_dir),
         "--work", str(work), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
