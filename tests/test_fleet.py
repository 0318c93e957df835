"""`windfleet fleet run`: the report's arithmetic, the orchestration with stand-ins, and
the whole suite end to end (real Mosquitto, real runtimes, the four real components)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mqtt_fixtures import wait_until
from tests.test_runtime_helpers import make_component
from windfleet import payloads, topics
from windfleet.nucleus.fleet import FleetCollector, anomaly_schedule, leftover_processes, run_fleet

pytestmark = pytest.mark.timeout(240)


leftovers = leftover_processes


def tele(thing: str, seq: int, records: list[dict]) -> bytes:
    return payloads.encode(payloads.telemetry(thing, seq, time.time(), records))


def score(tid: str, end: int, anomaly: bool) -> dict:
    s = payloads.score(tid, time.time(), "1.0.0", end, {"rps": 2.0 if anomaly else 0.5}, {"rps": 1.0})
    return {"type": "score", "body": s}


def test_collector_counts_gaps_duplicates_and_scores_against_labels():
    c = FleetCollector(window=100)
    for seq in (1, 2, 4, 4, 7):  # 3, 5, 6 lost; one duplicate
        c.handle(topics.telemetry("gw1"), tele("gw1", seq, []))
    c.handle(topics.telemetry("gw2"), tele("gw2", 1, [score("gw2-t00", 199, True), score("gw2-t00", 299, True),
                                                      score("gw2-t00", 599, False), score("gw2-t00", 899, True),
                                                      score("gw2-t00", 1099, True), score("gw2-t00", 1399, False)]))
    c.handle(topics.labels("gw2-t00"), payloads.encode(payloads.label("gw2-t00", "stuck_sensor", 150, 650, 0.9)))
    c.handle(topics.labels("gw2-t00"), payloads.encode(payloads.label("gw2-t00", "overspeed", 2000, 2100, 0.9)))
    c.handle(topics.telemetry("gw1"), b"{not json")
    health = payloads.health("gw2", "com.windfleet.AnomalyDetector", "1.0.0", "RUNNING", time.time(),
                             {"readings_scored": 40, "malformed_dropped": 3}, model_version="1.0.0")
    c.handle(topics.health("gw2"), payloads.encode(health))
    summary = c.telemetry_summary()
    assert summary["gw1"] == {"received": 4, "lost": 3, "first_seq": 1, "last_seq": 7}
    assert c.duplicates == 1 and c.malformed == 1
    d = c.detection()
    # windows ending 199, 299, 599 overlap [150, 650): 2 flagged (TP), 599 missed (FN); 899 starts in the
    # turbine's recovery (payloads.LABEL_RECOVERY_SAMPLES after 650): neither; 1099 flagged (FP)
    assert (d["true_positives"], d["false_negatives"], d["false_positives"], d["true_negatives"]) == (2, 1, 1, 1)
    assert d["precision"] == pytest.approx(2 / 3, abs=1e-4) and d["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert d["episode_recall"] == 0.5
    assert c.counter("com.windfleet.AnomalyDetector", "readings_scored") == 40
    assert c.malformed_dropped() == 3


def test_anomaly_schedule_is_staggered_and_covers_the_run():
    sched = anomaly_schedule(turbines=4, seconds=100, every=20, warmup=10)
    by_turbine = {t: [e for e in sched if e["turbine"] == t] for t in range(4)}
    assert [e["start_s"] for e in by_turbine[0]] == [10, 30, 50, 70, 90]
    assert by_turbine[1][0]["start_s"] == 15
    assert len({e["kind"] for e in sched}) > 3 and all(e["duration_s"] == 10 for e in sched)
    assert anomaly_schedule(3, 100, 0) == []


def test_fleet_orchestration_with_stand_ins_stops_everything(tmp_path):
    build = tmp_path / "build"
    make_component(build, "com.t.A", "1.0.0")
    make_component(build, "com.t.B", "1.0.0", deps={"com.t.A": {"VersionRequirement": "*"}})
    work = tmp_path / "work"
    report = run_fleet(gateways=2, turbines_per_gateway=2, duration=2, report_path=tmp_path / "r.json",
                       broker="127.0.0.1:0", work_dir=work, build_dir=build,
                       components={"com.t.A": "1.0.0", "com.t.B": "1.0.0"}, drain_seconds=0)
    assert json.loads((tmp_path / "r.json").read_text()) == report
    for key in ("readings_published", "readings_scored", "telemetry_received", "telemetry_lost",
                "malformed_dropped", "component_restarts", "model_version", "precision", "recall"):
        assert key in report
    assert report["gateways"] == 2 and set(report["per_gateway"]) == {"gw01", "gw02"}
    for g in report["per_gateway"].values():
        assert g["deployment"]["status"] == "SUCCEEDED"
        assert g["states"] == {"com.t.A": "FINISHED", "com.t.B": "FINISHED"}  # stopped cleanly
    assert report["component_restarts"] == 0 and report["telemetry_received"] == 0
    assert leftovers(work) == []


@pytest.mark.slow
def test_fleet_run_end_to_end_with_ctrl_c(tmp_path):
    """Two gateways with the real suite; Ctrl-C once telemetry with labelled anomalies
    flows: the report is written, nothing is lost, every process is gone."""
    # the components must import: a broken one is a failure, not a skip
    import windfleet.components.detector.main  # noqa: F401
    import windfleet.components.forwarder.main  # noqa: F401
    import windfleet.components.simulator.main  # noqa: F401
    from tests.detector_fixtures import build_model_package

    model = build_model_package(tmp_path / "model", "1.0.0")
    work, report_path = tmp_path / "work", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "windfleet.nucleus", "fleet", "run", "--gateways", "2",
           "--turbines-per-gateway", "2", "--duration", "600", "--model", str(model), "--report", str(report_path),
           "--work", str(work), "--broker", "127.0.0.1:0", "--anomaly-every", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        def telemetry_with_scores() -> bool:
            # the forwarders' spools hold what was sent; wait until both gateways sent a few messages
            return all((work / "devices" / t / "logs" / "com.windfleet.LogForwarder.log").exists()
                       for t in ("gw01", "gw02")) and _running_for(work) > 15
        wait_until(telemetry_with_scores, 180, interval=0.5, message="fleet running for a while")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(report_path.read_text())
    assert report["interrupted"] is True
    assert report["telemetry_received"] > 0 and report["telemetry_lost"] == 0
    assert report["readings_published"] > 0 and report["readings_scored"] > 0
    assert report["model_version"] == {"gw01": "1.0.0", "gw02": "1.0.0"}
    assert report["component_restarts"] == 0
    assert report["detection"]["windows_scored_seen"] > 0 and report["detection"]["episodes_labelled"] > 0
    assert report["recall"] is not None
    for g in report["per_gateway"].values():
        assert g["deployment"]["status"] == "SUCCEEDED"
    assert leftovers(work) == []


def _running_for(work: Path) -> float:
    """Seconds since the last gateway's deployment succeeded (0 before)."""
    times = []
    for thing in ("gw01", "gw02"):
        try:
            dep = json.loads((work / "devices" / thing / "status.json").read_text()).get("deployment") or {}
        except (OSError, ValueError):
            return 0.0
        if dep.get("status") != "SUCCEEDED":
            return 0.0
        times.append(dep["ts"])
    return time.time() - max(times)
