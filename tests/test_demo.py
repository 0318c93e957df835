"""``windfleet demo`` as a user runs it: a real process that starts Mosquitto, the dashboard and
the device runtimes, rolls a model out through a canary, stops a bad one at its canary, rolls a
corrupt one back, flags a drifting turbine, retrains from the captured windows and clears the
flag with the retrained model, reports, and leaves nothing running.  Pre-trained packages (``--model-v1/--model-v2``) keep the training stages out of CI time;
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

from windfleet import model_contract as mc
from windfleet.nucleus.fleet import leftover_processes


pytestmark = [pytest.mark.slow, pytest.mark.e2e]

GATEWAYS, TURBINES = 2, 3  # gw02-t01 drifts


_leftovers = leftover_processes  # processes of a run still alive (should be none)


def _demo(work: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "windfleet.cli", "demo", "--gateways", str(GATEWAYS), "--turbines-per-gateway",
         str(TURBINES), "--duration", "6", "--anomaly-every", "20", "--model-v1", str(model_dir),
         "--model-v2", str(model_dir), "--work", str(work), "--retrain-hours", "0.5", "--retrain-epochs", "6",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    """A small ``windfleet train`` package (3 turbines across the wind envelope x 0.5 h, 6 epochs):
    thresholds calibrated on held-out turbines, so the current model raises few false alarms all
    demo long and v3 alarming on normal data shows in the canary's gates; its card carries the
    drift reference training builds.  (The session's ``model_dir``, trained on one 8 m/s turbine
    for 15 minutes, alarms on most windows once the simulated weather moves on.)"""
    from windfleet.training.pipeline import train_simulated

    out = tmp_path_factory.mktemp("m") / "demo-model"
    train_simulated(out, seed=1, turbines=3, hours=0.5, epochs=6, evaluate=False, progress=False, log=lambda *_: None)
    assert "drift" in json.loads((out / mc.CARD_FILE).read_text())
    return out


def test_demo_runs_the_lifecycle_and_stops_everything(demo_model, tmp_path):
    work, report_path = tmp_path / "work", tmp_path / "out" / "report.json"
    proc = _demo(work, demo_model, "--report", str(report_path))
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

    install, update, retrained = report["rollouts"]
    assert (install["version"], update["version"]) == ("1.0.1", "1.0.2")
    assert install["devices_on_version"] == update["devices_on_version"] == GATEWAYS
    assert update["readings_lost"] == 0 and update["seconds"] > 0
    # measured, not written: gaps in every turbine's scores plus windows missing before its first
    assert install["readings_lost"] == 0 and install["seconds"] > 0, install

    # v2 passed its canary (the same weights as v1 here: full agreement); v3 alarms on normal data and
    # was stopped there: no gateway outside the canary ever reported it installed
    promoted, aborted, _ = report["canary"]
    assert (promoted["version"], promoted["verdict"], promoted["devices"]) == ("1.0.2", "promoted", 1), promoted
    assert promoted["agreement"] == 1.0 and promoted["candidate_alarm_rate"] == promoted["current_alarm_rate"]
    assert (aborted["version"], aborted["verdict"]) == ("1.0.3", "aborted"), aborted
    assert aborted["candidate_alarm_rate"] > aborted["current_alarm_rate"] and aborted["reason"]
    assert aborted["reached_outside_canary"] == [] and promoted["seconds"] > 0
    # only versions the fleet got: v5 was retrained from the captures and passed its canary
    assert [r["version"] for r in report["rollouts"]] == ["1.0.1", "1.0.2", "1.0.5"]
    assert report["canary"][2]["version"] == "1.0.5" and report["canary"][2]["verdict"] == "promoted"

    (rollback,) = report["rollbacks"]
    assert rollback["version"] == "1.0.4" and rollback["devices_rolled_back"] == GATEWAYS
    assert "onnx" in rollback["reason"].lower() and rollback["readings_lost"] == 0

    # drift: turbine t01 of each gateway but the canary's reads its voltage 60 counts high from 30 s
    # in; exactly those are flagged, their windows are captured to S3, v5 learns them (lineage) and
    # the flag clears
    drifted = [f"gw{g:02d}-t01" for g in range(2, GATEWAYS + 1)]
    assert report["drift_flagged_turbines"] == drifted, report["drift"]
    assert all(f == ["voltage"] or "voltage" in f for f in report["drift"]["flagged_features"].values())
    assert report["captured_windows"] >= 20 * GATEWAYS
    assert report["retrained_version"] == "1.0.5"
    assert retrained["devices_on_version"] == GATEWAYS and retrained["readings_lost"] == 0
    lineage = report["drift"]["lineage"]
    assert lineage["parent"] in ("1.0.1", "1.0.2") and lineage["capture_windows"] > 0
    assert set(drifted) <= set(lineage["turbines"]) and lineage["capture_objects"] > 0
    assert report["drift_cleared"] is True, report["drift"]
    assert set(report["model_version"].values()) == {"1.0.5"}  # scoring with the retrained model

    for line in ("Summary", "rollout 1.0.2 (update)", "canary 1.0.3", "rollback of 1.0.4", "drift flagged on",
                 "retrained from captures", "dashboard: http://127.0.0.1:"):
        assert line in out
    assert _leftovers(work) == []

# --serve (the fleet stays up for the operator, Ctrl-C closes the books): tests/test_dashboard_fleet.py
