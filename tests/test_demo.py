"""``windfleet demo`` as a user runs it: a real process that starts Mosquitto, the dashboard and
the device runtimes, rolls a model out through a canary, stops a bad one at its canary, rolls a
corrupt one back, flags a drifting turbine, retrains from the captured windows and clears the
flag with the retrained model, reports, and leaves nothing running.  A pre-trained package
(``--model-v1/--model-v2``, conftest's ``demo_model``) keeps the training stages out of CI time;
training itself is tested in test_training.py.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.demo_fixtures import GATEWAYS, leftovers, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_demo_runs_the_lifecycle_and_stops_everything(demo_model, tmp_path):
    work, report_path = tmp_path / "work", tmp_path / "out" / "report.json"
    proc = run_demo(work, demo_model, "--report", str(report_path))
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
    assert leftovers(work) == []

# --serve (the fleet stays up for the operator, Ctrl-C closes the books): tests/test_dashboard_fleet.py
