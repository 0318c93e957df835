"""End to end (issue 15): capture -> upload -> ``train --from-capture`` -> register with lineage.

One gateway as a user runs it: ``windfleet device run`` (offline, a local deployment of the
four real components built from the session's ``model_dir``), its simulator reading one
turbine's voltage ``OFFSET`` ADC counts high from the start (a sensor recalibration, no
faults injected), capture on, the forwarder uploading to the local S3 endpoint with
credentials from the nucleus' token exchange service.  Once the forwarder's health says
captured windows of both turbines are uploaded, the gateway stops and the operator retrains:
``windfleet train --from-capture s3://<bucket>/captures/`` (a subprocess; a small simulated
mix), then registers the result and reads the lineage back from the registry.

``--include-flagged``: nothing was labelled and the parent alarms on the drifted but healthy
turbine, so its windows are exactly the flagged ones a retrain must learn.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.mqtt_fixtures import wait_until
from tests.test_capture import read_object
from tests.test_from_capture import OFFSET, VOLTAGE
from windfleet import model_contract as mc
from windfleet.build import build
from windfleet.cli import main
from windfleet.cloud.backends import Backend
from windfleet.cloud.local.s3_server import S3Endpoint
from windfleet.nucleus.fleet import (DETECTOR, FORWARDER, SIMULATOR, component_config, device_status,
                                     leftover_processes, stop_devices)

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(240)]

THING = "gw1"
STEADY, DRIFTED = f"{THING}-t00", f"{THING}-t01"
PER_TURBINE = 12  # captured windows per turbine in S3 before retraining (6 s of scoring)


status = device_status  # the runtime's status.json (components' states and their last health)


def health(root: Path, component: str) -> dict:
    return (status(root).get("components") or {}).get(component) or {}


def uploaded(home: Path, bucket: str) -> dict[str, list[dict]]:
    """Object URI -> its capture records, for every object the forwarder put in the local S3."""
    root = home / "s3" / bucket
    return {f"s3://{bucket}/{p.relative_to(root).as_posix()}": read_object(p.read_bytes())
            for p in sorted((root / "captures").rglob("*.jsonl.gz"))}


def per_turbine(objects: dict[str, list[dict]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for records in objects.values():
        for r in records:
            out.setdefault(r["turbine_id"], []).append(r)
    return out


def test_captured_drift_is_uploaded_retrained_from_and_registered_with_its_lineage(model_dir, tmp_path,
                                                                                     monkeypatch):
    home, root = tmp_path / "home", tmp_path / "device"
    monkeypatch.setenv("WINDFLEET_HOME", str(home))  # the nucleus' TES and the endpoint share its key
    backend = Backend.local(home)
    parent = mc.load_card(model_dir)
    components = build(tmp_path / "build", model_dir)
    root.mkdir()
    procs: dict[str, subprocess.Popen] = {}
    endpoint = S3Endpoint(home).start()
    try:
        config = component_config(2, 20.0, 0, 3600.0, health_interval=0.5, capture_endpoint=endpoint.url,
                                  capture_batch_interval=1.0)
        config[SIMULATOR]["MERGE"]["drift"] = [{"kind": "sensor_offset", "turbines": [1], "channel": "voltage",
                                                "offset": OFFSET, "start_s": 0}]
        # every scored window (2 per turbine per second at 20 Hz) rather than the default 2 % of normal ones
        config[DETECTOR]["MERGE"].update(capture_normal_fraction=1.0, capture_max_per_minute=600)
        config[FORWARDER]["MERGE"]["delivery"] = "nucleus"  # an offline gateway: no cloud to acknowledge telemetry
        args = [sys.executable, "-m", "windfleet.nucleus", "device", "run", "--thing", THING, "--root", str(root),
                "--recipe-dir", str(tmp_path / "build" / "recipes"),
                "--artifact-dir", str(tmp_path / "build" / "artifacts"),
                "--update-config", json.dumps(config), "--poll-interval", "0.5"]
        args += [a for name, version in components.items() for a in ("--merge", f"{name}={version}")]
        with open(root / "runtime.out", "ab") as out:
            procs[THING] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

        def enough() -> bool:
            assert procs[THING].poll() is None, (root / "runtime.out").read_text()[-3000:]
            counters = health(root, FORWARDER).get("counters") or {}
            if counters.get("capture_uploaded_windows", 0) < 2 * PER_TURBINE:
                return False
            got = per_turbine(uploaded(home, backend.bucket))
            return min(len(got.get(t, [])) for t in (STEADY, DRIFTED)) >= PER_TURBINE

        wait_until(enough, 120, interval=0.5, message="the forwarder's health reporting uploaded windows of both "
                                                      "turbines")
        ran = health(root, DETECTOR).get("model_version")
        forwarder = health(root, FORWARDER)["counters"]
    finally:
        stop_devices(procs, {THING: root})  # SIGTERM: the forwarder flushes its last partial batch
        endpoint.close()
    assert leftover_processes(root) == []  # the runtime and its components are gone
    assert ran == parent["version"] == "1.0.0"
    assert forwarder.get("capture_dropped", 0) == 0  # nothing lost to the spool's bound

    objects = uploaded(home, backend.bucket)
    windows = per_turbine(objects)
    assert set(windows) == {STEADY, DRIFTED}
    assert all(r["thing"] == THING and r["model_version"] == "1.0.0" and r["label"] is None
               for rs in windows.values() for r in rs)
    # the captured rows are raw model inputs: the drifted turbine's voltage sits far above what
    # the parent learnt (its training statistics), the steady turbine's does not
    mean, std = parent["statistics"]["mean"][VOLTAGE], parent["statistics"]["std"][VOLTAGE]
    volts = {t: float(np.mean([np.asarray(r["rows"])[:, VOLTAGE] for r in rs])) for t, rs in windows.items()}
    assert (volts[DRIFTED] - mean) / std > 5 > 3 > abs(volts[STEADY] - mean) / std, (volts, mean, std)
    assert volts[DRIFTED] - volts[STEADY] > OFFSET / 2
    assert sum(r["anomaly"] for r in windows[DRIFTED]) > len(windows[DRIFTED]) / 2  # why --include-flagged

    # the operator retrains from what the devices uploaded
    out = tmp_path / "retrained"
    train = subprocess.run(
        [sys.executable, "-m", "windfleet.cli", "train", "--from-capture", f"s3://{backend.bucket}/captures/",
         "--home", str(home), "--include-flagged", "--mix", "simulated", "--quick", "--hours", "0.05",
         "--epochs", "1", "--no-eval", "--version", "1.1.0", "--out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert train.returncode == 0, train.stderr[-3000:]
    card = mc.load_card(out)
    lineage = card["lineage"]
    assert lineage["parent"] == ran
    assert sorted(lineage["captures"]) == sorted(objects)
    assert lineage["capture_windows"] == sum(len(rs) for rs in windows.values()) > 0
    assert lineage["turbines"] == [STEADY, DRIFTED] and lineage["mixed_with"] == "simulated"
    assert json.loads(train.stdout.splitlines()[-1])["lineage"]["captures"] == len(objects)

    # register the parent (what the fleet ran) and the retrained model; read the lineage back
    runner = CliRunner()
    at = ["--home", str(home)]
    for package in (model_dir, out):
        res = runner.invoke(main, ["registry", "register", str(package), *at])
        assert res.exit_code == 0, res.output
    listed = json.loads(runner.invoke(main, ["registry", "list", "--json", *at]).stdout)
    listed = {i["model_version"]: i for i in listed}
    assert set(listed) == {"1.0.0", "1.1.0"} and not listed["1.0.0"]["lineage"]
    info = listed["1.1.0"]["lineage"]
    assert info["parent"] == "1.0.0" and info["captures"] == len(objects)
    assert info["capture_windows"] == lineage["capture_windows"] and DRIFTED in info["turbines"]
    assert info["captures_prefix"].startswith(f"s3://{backend.bucket}/captures/{THING}/")
    meta = backend.sagemaker.describe_model_package(ModelPackageName=listed["1.1.0"]["arn"])[
        "CustomerMetadataProperties"]
    assert meta["lineage:parent"] == "1.0.0" and meta["lineage:windows"] == str(lineage["capture_windows"])
    assert meta["lineage:captures_sha256"] == hashlib.sha256("\n".join(sorted(objects)).encode()).hexdigest()
    history = runner.invoke(main, ["registry", "history", "1.1.0", *at])
    assert history.exit_code == 0, history.output
    assert "parent 1.0.0" in history.stdout and f"{len(objects)} capture objects" in history.stdout
    assert DRIFTED in history.stdout
