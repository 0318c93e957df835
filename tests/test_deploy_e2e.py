"""End to end on the local backend with real processes: three gateways (device runtimes on a real
Mosquitto) deployed from the local deployment service.

Approve v2 -> every gateway runs it and its scores say so; approve a deliberately broken v3 (an
ONNX file that is not a model, with a matching sha256 so only the device can catch it) -> every
gateway fails the deployment, rolls back to v2 and reports FAILED, and scores keep flowing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from windfleet import model_contract as mc
from windfleet.cloud import canary, deployer, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.registry import Registry

from tests.mqtt_fixtures import Process, TelemetryCollector, broker, wait_until  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

GROUP = "e2e-fleet"
# WINDFLEET_E2E_GATEWAYS=10 measures a bigger fleet (the default keeps CI on 2 cores reasonable)
THINGS = [f"gw{i:02d}" for i in range(1, int(os.environ.get("WINDFLEET_E2E_GATEWAYS", "3")) + 1)]
TURBINES = 2


@pytest.fixture
def runtimes():
    started: list[Process] = []
    yield started
    for p in started:  # SIGTERM lets the runtime stop its components; then make sure of it
        try:
            children = psutil.Process(p.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        p.terminate(timeout=40)
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def _outcomes(backend: Backend, deployment_id: str) -> dict[str, str]:
    return {o["thing"]: o["status"] for o in deployer.device_outcomes(backend, deployment_id)}


def _all(backend, deployment_id, statuses):
    out = _outcomes(backend, deployment_id)
    return len(out) == len(THINGS) and all(s in statuses for s in out.values()) and out


def _scores_since(collector: TelemetryCollector, thing: str, since: float) -> list[dict]:
    return [r["body"] for r in collector.records(thing, "score") if r["body"].get("ts", 0) >= since]


def _lost_windows(collector: TelemetryCollector) -> dict[str, int]:
    """Per turbine: windows missing between its first and last score (stride ``mc.STRIDE``)."""
    lost = {}
    for thing in THINGS:
        ends: dict[str, set[int]] = {}
        for r in collector.records(thing, "score"):
            ends.setdefault(r["body"]["turbine_id"], set()).add(r["body"]["window_end_seq"])
        for turbine, seqs in ends.items():
            expected = range(min(seqs), max(seqs) + 1, mc.STRIDE)
            lost[turbine] = len(set(expected) - seqs)
    return lost


@pytest.mark.fault
def test_approval_rolls_out_and_a_broken_model_rolls_back(broker, runtimes, tmp_path):  # noqa: F811
    from windfleet.build import build
    from windfleet.nucleus.fleet import component_config
    from windfleet.nucleus.sources import configuration_update

    from tests.detector_fixtures import build_model_package, edit_card

    home = tmp_path / "home"
    backend = Backend.local(home, thing_group=GROUP)
    components = build(tmp_path / "gb", build_model_package(tmp_path / "v1", "1.0.0"))
    deployer.publish(backend, tmp_path / "gb")
    config = component_config(TURBINES, 20.0, 1e9, 3600.0)
    suite = {name: {"componentVersion": version} for name, version in components.items()}
    for name, update in config.items():
        suite[name]["configurationUpdate"] = configuration_update(update)
    first = backend.greengrassv2.create_deployment(
        targetArn=backend.thing_group_arn(), deploymentName="suite", components=suite,
        deploymentPolicies=settings.DEPLOYMENT_POLICIES, iotJobConfiguration=settings.IOT_JOB_CONFIGURATION)

    collector = TelemetryCollector(broker)
    try:
        for thing in THINGS:
            user, password = broker.add_device(thing, TURBINES)
            env = {**os.environ, "WINDFLEET_BROKER_USER": user, "WINDFLEET_BROKER_PASSWORD": password,
                   "PYTHONUNBUFFERED": "1"}
            root = tmp_path / "devices" / thing
            root.mkdir(parents=True)
            runtimes.append(Process(["-m", "windfleet.nucleus", "device", "run", "--thing", thing, "--root", str(root),
                                     "--broker", broker.url, "--thing-group", GROUP, "--home", str(home),
                                     "--poll-interval", "0.5"], env, root / "runtime.out"))
        wait_until(lambda: _all(backend, first["deploymentId"], {"SUCCEEDED"}), timeout=300, interval=1,
                   message="every gateway runs the suite")

        reg = Registry(backend)
        canary.save_config(backend, {"enabled": False})  # straight to the fleet: tests/test_canary.py has the canary
        reg.register(build_model_package(tmp_path / "v2", "2.0.0", seed=1))
        t0 = time.time()
        v2 = reg.approve(1)["deployment"]
        assert v2["status"] == "deployed"
        wait_until(lambda: _all(backend, v2["deploymentId"], {"SUCCEEDED"}), timeout=300, interval=0.5,
                   message="every gateway reports v2")
        rollout_s = time.time() - t0
        for thing in THINGS:
            wait_until(lambda: any(r.get("model_version") == "2.0.0" for r in _scores_since(collector, thing, t0)),
                       timeout=120, interval=0.5, message=f"{thing} scores with v2")

        broken = build_model_package(tmp_path / "v3", "3.0.0", seed=2)
        (broken / mc.MODEL_FILE).write_bytes(b"this is not an ONNX graph")
        edit_card(broken, onnx_sha256=mc.sha256_file(broken / mc.MODEL_FILE), version="3.0.0")
        reg.register(broken)
        v3 = reg.approve(2)["deployment"]
        assert v3["status"] == "deployed"
        wait_until(lambda: _all(backend, v3["deploymentId"], {"FAILED"}), timeout=300, interval=0.5,
                   message="every gateway fails v3")
        after = time.time()
        for thing in THINGS:  # rolled back: still scoring, with v2
            wait_until(lambda: [r for r in _scores_since(collector, thing, after + 1)
                                if r.get("model_version") == "2.0.0"],
                       timeout=120, interval=0.5, message=f"{thing} scores with v2 after the rollback")
            assert not [r for r in _scores_since(collector, thing, after + 1) if r.get("model_version") == "3.0.0"]
            assert collector.gaps(thing) == []
        lost = _lost_windows(collector)
        (tmp_path / "figures.json").write_text(json.dumps({"approve_to_all_v2_s": rollout_s, "lost_windows": lost}))
        print(f"approve -> all {len(THINGS)} gateways on v2: {rollout_s:.1f} s; windows lost across "
              f"both swaps: {sum(lost.values())}")
        assert sum(lost.values()) == 0, lost
    finally:
        collector.close()
