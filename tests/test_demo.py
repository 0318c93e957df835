"""``windfleet demo`` as a user runs it: a real process that starts Mosquitto, the dashboard and
the device runtimes, rolls a model out through a canary, stops a bad one at its canary, rolls a
corrupt one back, reports, and leaves nothing running.  Pre-trained packages (``--model-v1/--model-v2``) keep the training stages out of CI time;
training itself is tested in test_training.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from windfleet.nucleus.fleet import leftover_processes

from tests.test_detector_model import build_model_package

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

GATEWAYS, TURBINES = 2, 2


_leftovers = leftover_processes  # processes of a run still alive (should be none)


def _demo(work: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "windfleet.cli", "demo", "--gateways", str(GATEWAYS), "--turbines-per-gateway",
         str(TURBINES), "--duration", "6", "--anomaly-every", "10", "--model-v1", str(model_dir),
         "--model-v2", str(model_dir), "--work", str(work), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A package whose thresholds sit just above its errors on normal data (few alarms without an
    anomaly), so that v3 (thresholds x 0.02) alarming on normal data shows in the canary's gates."""
    return build_model_package(tmp_path_factory.mktemp("m") / "demo-model", "1.0.0", seed=0)


def test_demo_runs_the_lifecycle_and_stops_everything(model_dir, tmp_path):
    work, report_path = tmp_path / "work", tmp_path / "out" / "report.json"
    proc = _demo(work, model_dir, "--report", str(report_path))
    try:
        out, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    report = json.loads(report_path.read_text())

    assert report["readings_published"] > 0
    assert report["counters_source"] == "component logs (final totals)"
    # every reading published was scored, across two model swaps and a rollback
    assert report["readings_scored"] == report["readings_published"], report
    assert report["readings_dropped"] == {"malformed_dropped": 0, "queue_dropped": 0}
    assert report["telemetry_lost"] == 0 and report["telemetry_received"] > 0
    assert report["dashboard_store"]["telemetry_lost"] == 0 and report["dashboard_store"]["telemetry_received"] > 0
    assert report["anomalies_injected"] > 0
    assert report["precision"] is not None and report["recall"] is not None

    install, update = report["rollouts"]
    assert (install["version"], update["version"]) == ("1.0.1", "1.0.2")
    assert install["devices_on_version"] == update["devices_on_version"] == GATEWAYS
    assert update["readings_lost"] == 0 and update["seconds"] > 0
    # measured, not written: gaps in every turbine's scores plus windows missing before its first
    assert install["readings_lost"] == 0 and install["seconds"] > 0, install

    # v2 passed its canary (the same weights as v1 here: full agreement); v3 alarms on normal data and
    # was stopped there: no gateway outside the canary ever reported it installed
    promoted, aborted = report["canary"]
    assert (promoted["version"], promoted["verdict"], promoted["devices"]) == ("1.0.2", "promoted", 1), promoted
    assert promoted["agreement"] == 1.0 and promoted["candidate_alarm_rate"] == promoted["current_alarm_rate"]
    assert (aborted["version"], aborted["verdict"]) == ("1.0.3", "aborted"), aborted
    assert aborted["candidate_alarm_rate"] > aborted["current_alarm_rate"] and aborted["reason"]
    assert aborted["reached_outside_canary"] == [] and promoted["seconds"] > 0
    assert [r["version"] for r in report["rollouts"]] == ["1.0.1", "1.0.2"]  # only versions the fleet got

    (rollback,) = report["rollbacks"]
    assert rollback["version"] == "1.0.4" and rollback["devices_rolled_back"] == GATEWAYS
    assert "onnx" in rollback["reason"].lower() and rollback["readings_lost"] == 0
    assert set(report["model_version"].values()) == {"1.0.2"}  # still scoring with v2

    for line in ("Summary", "rollout 1.0.2 (update)", "canary 1.0.3", "rollback of 1.0.4", "dashboard: http://127.0.0.1:"):
        assert line in out
    assert _leftovers(work) == []

# --serve (the fleet stays up for the operator, Ctrl-C closes the books): tests/test_dashboard_fleet.py
