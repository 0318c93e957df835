"""The canary end to end on the local backend with real device runtimes (two gateways, one in
the canary group), plus the pure gates.

The devices are real :class:`DeviceRuntime` nuclei polling the local deployment service; the
components are small stand-ins (the detector is a sleeping process whose Install lays out the
venv python the model recipe's self-check calls, as a stand-in that accepts any model), so the
test checks the Greengrass mechanics: which component versions each device runs.  The
detector's shadow statistics are written here -- health payloads with a ``shadow`` object
ingested into the local telemetry store -- so that the gates see exact figures.  With the real
detector: ``tests/test_demo.py`` (real runtimes, simulator and detector scoring two real models
in shadow; the gates promote one and abort the other) and ``tests/test_detector_shadow.py``.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from windfleet import payloads
from windfleet.cloud import canary, deployer, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.ingest import TelemetryStore
from windfleet.cloud.registry import Registry
from windfleet.cloud.testing import fake_model_dir
from windfleet.nucleus.runtime import DeviceRuntime

from tests.mqtt_fixtures import wait_until
from tests.test_runtime_helpers import FAST, RuntimeThread, status

FLEET = "fleet"
THINGS = ("gw-1", "gw-2")

# A detector stand-in: Install makes the venv python the model recipe's self-check runs (it
# accepts any model); Run sleeps until the nucleus stops it.
DETECTOR_INSTALL = ("mkdir -p venv/bin && printf '#!/bin/sh\\nexit 0\\n' > venv/bin/python3 "
                    "&& chmod +x venv/bin/python3")


def _detector_build(path, version="1.0.0"):
    recipe = {"RecipeFormatVersion": "2020-01-25", "ComponentName": settings.DETECTOR, "ComponentVersion": version,
              "ComponentPublisher": "tests", "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {
                  "Install": DETECTOR_INSTALL, "Run": "exec sleep 600"}}]}
    (path / "recipes").mkdir(parents=True, exist_ok=True)
    (path / "recipes" / f"{settings.DETECTOR}-{version}.yaml").write_text(yaml.safe_dump(recipe))
    return path


def shadow(candidate: str, current: str, windows: int, current_alarms: int, candidate_alarms: int,
           both: int, errors: int = 0, infer_p99: float = 2.0) -> dict:
    model = {"score_p50": 0.1, "score_p90": 0.2, "score_p99": 0.4, "infer_ms_p50": 1.0}
    return payloads.shadow_stats(
        candidate, current, since=time.time() - 60, windows=windows,
        current={**model, "alarms": current_alarms, "alarm_rate": current_alarms / windows, "infer_ms_p99": 2.0},
        candidate={**model, "alarms": candidate_alarms, "alarm_rate": candidate_alarms / windows,
                   "infer_ms_p99": infer_p99},
        either_flagged=current_alarms + candidate_alarms - both, both_flagged=both, labelled_episodes=4,
        current_detected=3, candidate_detected=3, errors=errors, clean_windows=windows // 2)


def _report(store: TelemetryStore, thing: str, seq: int, stats: dict) -> None:
    """What the detector's health payload will carry (simulated: see the module docstring)."""
    body = payloads.health(thing, settings.DETECTOR, "1.0.0", "RUNNING", time.time(), {"windows": stats["windows"]},
                           model_version=stats["current_version"], shadow=stats)
    assert store.ingest(payloads.encode(payloads.telemetry(thing, seq, time.time(),
                                                           [{"type": "health", "body": body}]))) == "stored"


def _running(root) -> dict[str, str]:
    return {n: c.get("version") for n, c in status(root).get("components", {}).items()}


def _has(root, versions: dict[str, str | None]) -> bool:
    run = _running(root)
    return all(run.get(n) == v for n, v in versions.items())


@pytest.fixture
def fleet(tmp_path):
    backend = Backend.local(tmp_path / "home", thing_group=FLEET)
    deployer.publish(backend, _detector_build(tmp_path / "gb"))
    roots, threads = {}, []
    for thing in THINGS:
        roots[thing] = tmp_path / "devices" / thing
        rt = DeviceRuntime(thing, roots[thing], backend.greengrassv2, thing_groups=[FLEET], settings=FAST)
        threads.append(RuntimeThread(rt))
    wait_until(lambda: len(backend.greengrassv2.list_core_devices(
        thingGroupArn=backend.thing_group_arn())["coreDevices"]) == 2, message="both gateways registered")
    yield backend, roots
    for t in threads:
        t.stop()


@pytest.mark.slow
def test_candidate_reaches_only_the_canary_then_is_promoted_or_aborted(fleet, tmp_path):
    """A gateway in two thing groups runs the union of both groups' latest deployments, as the
    real nucleus does: aws-greengrass-nucleus ``DefaultDeploymentTask.getNonTargetGroupToRootPackagesMap``
    (the other groups' root components from ``GroupToRootComponents``), ``DependencyResolver``
    (conflicting versions fail), and the developer guide, "Deploy AWS IoT Greengrass components to
    devices": "If a core device is a member of multiple thing groups ... the core device runs the
    components from all deployments"."""
    backend, roots = fleet
    gg = backend.greengrassv2
    reg = Registry(backend)
    m = settings.MODEL_COMPONENT
    c = settings.CANARY_COMPONENT

    # v1: the fleet's first model goes straight to the fleet (there is nothing to compare with)
    reg.register(fake_model_dir(tmp_path / "v1", "1.0.0"))
    first = reg.approve(1)["deployment"]
    assert first["status"] == "deployed"
    for thing in THINGS:
        wait_until(lambda: _has(roots[thing], {m: "1.0.1", settings.DETECTOR: "1.0.0"}), timeout=30,
                   message=f"{thing} runs v1")
    canary.save_config(backend, {"devices": 1, "min_seconds": 0, "min_windows": 100})

    # v2: approval starts a canary on one gateway; only it gets the candidate component, beside
    # the fleet's model (its two groups' deployments merged)
    reg.register(fake_model_dir(tmp_path / "v2", "2.0.0"))
    started = reg.approve(2)["deployment"]
    assert started["status"] == "canary" and started["devices"] == ["gw-1"], started
    wait_until(lambda: _has(roots["gw-1"], {m: "1.0.1", c: "1.0.2", settings.DETECTOR: "1.0.0"}), timeout=30,
               message="gw-1 runs the model and the candidate")
    wait_until(lambda: status(roots["gw-1"]).get("groups") == {  # the nucleus' GroupToRootComponents
        "thinggroup/fleet": {settings.DETECTOR: "1.0.0", m: "1.0.1"}, "thinggroup/fleet-canary": {c: "1.0.2"}},
        timeout=10, message="gw-1 records each group's roots")
    assert c not in _running(roots["gw-2"])
    assert reg.approve(2)["deployment"]["status"] == "unchanged"  # a repeated event

    store = TelemetryStore(backend.home / "telemetry.sqlite")
    assert canary.status(backend)["verdict"] == "wait"  # nothing reported yet
    _report(store, "gw-1", 0, shadow("2.0.0", "1.0.0", 50, 1, 1, 1))
    waiting = canary.status(backend)
    assert waiting["verdict"] == "wait" and "50 of 100 windows" in waiting["reason"]
    _report(store, "gw-1", 1, shadow("2.0.0", "1.0.0", 400, 4, 5, 4))
    promoted = canary.step(backend)
    assert promoted["verdict"] == "promote" and promoted["action"]["status"] == "promoted", promoted
    assert promoted["devices"]["gw-1"]["candidate_alarm_rate"] == pytest.approx(5 / 400)
    for thing in THINGS:  # the candidate is now the model everywhere, and the canary holds nothing
        wait_until(lambda: _has(roots[thing], {m: "1.0.2", c: None}), timeout=30, message=f"{thing} runs v2")
    assert canary.load_state(backend)["status"] == "promoted"

    # v3 alarms on normal data: stopped at the canary, never reaches gw-2, package Rejected
    reg.register(fake_model_dir(tmp_path / "v3", "3.0.0"))
    assert reg.approve(3)["deployment"]["status"] == "canary"
    wait_until(lambda: _has(roots["gw-1"], {m: "1.0.2", c: "1.0.3"}), timeout=30, message="gw-1 gets v3 as candidate")
    _report(store, "gw-1", 2, shadow("3.0.0", "2.0.0", 400, 4, 300, 4))
    aborted = canary.step(backend)
    assert aborted["verdict"] == "abort" and "candidate alarm rate 0.7500" in aborted["reason"], aborted
    wait_until(lambda: _has(roots["gw-1"], {m: "1.0.2", c: None}), timeout=30,
               message="gw-1 back to the current model alone")
    info = reg.get(3)
    assert info["status"] == "Rejected" and "candidate alarm rate 0.7500" in info["description"]
    assert _has(roots["gw-2"], {m: "1.0.2", c: None})
    canary_arn = backend.thing_group_arn("fleet-canary")
    assert all(d["targetArn"] != canary_arn
               for d in gg.list_effective_deployments(coreDeviceThingName="gw-2")["effectiveDeployments"])
    state = canary.load_state(backend)
    assert state["status"] == "aborted" and state["candidate_alarm_rate"] == pytest.approx(0.75)

    # two groups pinning one component to different versions: the deployment fails, nothing changes
    # (DependencyResolver: "the version constraints conflict")
    gg.create_component_version(inlineRecipe=json.dumps({
        "RecipeFormatVersion": "2020-01-25", "ComponentName": settings.DETECTOR, "ComponentVersion": "1.0.1",
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": "exec sleep 600"}}]}))
    pinned = gg.create_deployment(targetArn="arn:aws:iot:local:000000000000:thing/gw-2",
                                  components={settings.DETECTOR: {"componentVersion": "1.0.1"}})["deploymentId"]
    outcome = wait_until(lambda: next((e for e in gg.list_effective_deployments(coreDeviceThingName="gw-2")[
        "effectiveDeployments"] if e["deploymentId"] == pinned and e["coreDeviceExecutionStatus"] != "QUEUED"
        and e["coreDeviceExecutionStatus"] != "IN_PROGRESS"), None), timeout=30, message="gw-2 refuses the pin")
    assert outcome["coreDeviceExecutionStatus"] == "FAILED" and "conflict" in outcome["reason"]
    assert _has(roots["gw-2"], {settings.DETECTOR: "1.0.0", m: "1.0.2"})
    store.close()


# ------------------------------------------------------------------------------ pure gates
CONFIG = {**settings.CANARY_DEFAULTS, "min_seconds": 60, "min_windows": 100}


def test_gates_wait_then_promote_or_abort_with_the_measured_reason():
    good = shadow("2", "1", 500, 5, 6, 5)
    assert canary.evaluate({"a": good}, ["a", "b"], CONFIG, 120)["verdict"] == "wait"  # b silent
    assert canary.evaluate({"a": good}, ["a"], CONFIG, 10)["reason"] == "10 of 60 s observed"
    out = canary.evaluate({"a": good, "b": good}, ["a", "b"], CONFIG, 120)
    assert out["verdict"] == "promote" and all(g["passed"] for g in out["gates"])
    assert out["candidate_alarm_rate"] == pytest.approx(12 / 1000) and out["agreement"] == pytest.approx(10 / 12)

    noisy = canary.evaluate({"a": shadow("2", "1", 500, 5, 400, 5)}, ["a"], CONFIG, 120)
    assert noisy["verdict"] == "abort" and noisy["reason"].startswith("candidate alarm rate 0.8000 vs limit 0.0300")
    slow = canary.evaluate({"a": shadow("2", "1", 500, 5, 5, 5, infer_p99=80.0)}, ["a"], CONFIG, 120)
    assert slow["verdict"] == "abort" and "inference p99 80.00 ms" in slow["reason"]
    broken = canary.evaluate({"a": shadow("2", "1", 5, 0, 0, 0, errors=2)}, ["a"], CONFIG, 1)
    assert broken["verdict"] == "abort" and "2 candidate scoring errors" in broken["reason"]  # at once

    blind = shadow("2", "1", 500, 5, 5, 5)
    blind["candidate_detected"] = 1  # misses episodes the current model catches
    out = canary.evaluate({"a": blind}, ["a"], CONFIG, 120)
    assert out["verdict"] == "abort" and "candidate recall 0.250 vs current 0.750 on 4" in out["reason"]


def test_a_model_that_flags_everything_passes_the_alarm_rate_gate_where_anomalies_are_frequent_but_not_the_false_alarm_gate():
    """The demo's fleet is anomalous most of the time: a current model alarming on 65 % of
    windows lets a candidate that flags all of them through ``alarm rate <= 2 x current``; the
    false-alarm rate on windows outside labelled episodes does not."""
    flags_all = shadow("2", "1", 1000, 650, 1000, 650)
    flags_all.update(clean_windows=300)
    flags_all["current"]["false_alarms"], flags_all["candidate"]["false_alarms"] = 6, 300
    out = canary.evaluate({"a": flags_all}, ["a"], CONFIG, 120)
    gates = {g["gate"]: g for g in out["gates"]}
    assert gates["alarm_rate"]["passed"] and gates["recall"]["passed"]
    assert not gates["false_alarm_rate"]["passed"] and gates["false_alarm_rate"]["measured"] == 1.0
    # limit: (1.5 x 6 + 2 x sqrt(6)) / 300 + 0.005
    assert out["verdict"] == "abort" and "candidate false-alarm rate 1.0000 vs limit 0.0513 on 300" in out["reason"]
    # over a few dozen clean windows, one or two more false alarms are counting noise, not a worse model
    few = shadow("2", "1", 110, 80, 80, 80)
    few.update(clean_windows=27)
    few["current"]["false_alarms"], few["candidate"]["false_alarms"] = 3, 6
    assert canary.evaluate({"a": few}, ["a"], CONFIG, 120)["verdict"] == "promote"
    few["candidate"]["false_alarms"] = 26
    assert canary.evaluate({"a": few}, ["a"], CONFIG, 120)["verdict"] == "abort"
    better = shadow("2", "1", 1000, 650, 600, 600)
    better.update(clean_windows=300)
    better["current"]["false_alarms"], better["candidate"]["false_alarms"] = 6, 1
    assert canary.evaluate({"a": better}, ["a"], CONFIG, 120)["verdict"] == "promote"
    # no labels (a real fleet): not applicable, the other gates decide
    no_labels = shadow("2", "1", 500, 5, 6, 5)
    no_labels.update(clean_windows=0, labelled_episodes=0, current_detected=0, candidate_detected=0)
    unlabelled = canary.evaluate({"a": no_labels}, ["a"], CONFIG, 120)
    assert next(g for g in unlabelled["gates"] if g["gate"] == "false_alarm_rate")["measured"] is None


def test_a_failing_gate_aborts_without_waiting_for_clean_windows_but_a_promotion_waits_for_them():
    """The clean windows (outside labelled episodes and the recovery after them) come slowly on a
    fleet with frequent faults: they are the false-alarm gate's evidence only."""
    flags_all = shadow("2", "1", 200, 70, 200, 70)
    flags_all.update(clean_windows=5)
    out = canary.evaluate({"a": flags_all}, ["a"], CONFIG, 120)
    assert out["verdict"] == "abort" and "candidate alarm rate 1.0000" in out["reason"]
    assert "false-alarm" not in out["reason"]  # not judged on 5 windows
    good = shadow("2", "1", 200, 70, 70, 70)
    good.update(clean_windows=5)
    waiting = canary.evaluate({"a": good}, ["a"], CONFIG, 120)
    assert waiting["verdict"] == "wait" and f"5 of {CONFIG['min_clean_windows']} windows outside" in waiting["reason"]
    good.update(clean_windows=CONFIG["min_clean_windows"])
    assert canary.evaluate({"a": good}, ["a"], CONFIG, 120)["verdict"] == "promote"


def test_canary_size_by_count_or_percent():
    assert canary.canary_size(10, {"devices": 2}) == 2
    assert canary.canary_size(10, {"devices": 2, "percent": 25}) == 3
    assert canary.canary_size(2, {"devices": 5}) == 1  # never the whole fleet
    assert canary.canary_size(1, {"devices": 1}) == 1


def test_shadow_contract_validates_and_round_trips_through_metrics():
    stats = shadow("2.0.0", "1.0.0", 200, 2, 3, 2)
    assert payloads.validate_shadow(json.loads(payloads.encode(stats))) == stats
    for bad in ({**stats, "agreement": 1.5}, {**stats, "windows": -1}, {**stats, "candidate": {}},
                {k: v for k, v in stats.items() if k != "candidate_version"}):
        with pytest.raises(payloads.MalformedPayload):
            payloads.validate_shadow(bad)
    data = canary.shadow_metric_data("gw-1", stats, time.time())
    assert {d["MetricName"] for d in data} == set(canary.METRICS)
    old = {k: v for k, v in stats.items() if k != "clean_windows"}  # a detector from before the false-alarm gate
    old["current"] = {k: v for k, v in stats["current"].items() if k != "false_alarms"}
    assert payloads.validate_shadow(old) is old
    assert {d["MetricName"] for d in canary.shadow_metric_data("gw-1", old)} == \
        set(canary.METRICS) - {"CleanWindows", "CurrentFalseAlarms"}
    assert all(d["Dimensions"] == [{"Name": "Thing", "Value": "gw-1"}, {"Name": "CandidateVersion", "Value": "2.0.0"}]
               for d in data)


def test_cli_configure_status_and_errors(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from windfleet.cli import main

    monkeypatch.setenv("WINDFLEET_HOME", str(tmp_path / "home"))
    for var in ("WINDFLEET_BUCKET", "WINDFLEET_THING_GROUP", "WINDFLEET_MODEL_GROUP", "WINDFLEET_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    run = CliRunner().invoke
    out = run(main, ["canary", "configure", "--percent", "10", "--set", "min_seconds=30", "--set", "min_agreement=0.8"])
    assert out.exit_code == 0, out.output
    config = json.loads(out.output)
    assert (config["percent"], config["min_seconds"], config["min_agreement"], config["enabled"]) == (10, 30, 0.8, True)
    status_out = run(main, ["canary", "status"])
    assert status_out.exit_code == 0 and json.loads(status_out.output)["reason"] == "no canary is running"
    for args, message in ((["canary", "abort"], "no canary is running"),
                          (["canary", "configure", "--set", "nonsense=1"], "unknown canary settings: nonsense")):
        result = run(main, args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
