"""A component written only against the Greengrass SDK, deployed with the greengrass-cli verbs.

Nothing here knows windfleet: the recipe is a plain Greengrass recipe with an artifact
``Uri``, the script uses ``awsiot.greengrasscoreipc.clientv2`` alone, and the deployment
goes through ``windfleet device deployment create`` (greengrass-cli's flags, over IPC with
the CLI token). It must connect, round-trip pub/sub, be denied outside its policy, and read
its configuration -- as on a real core device (developer guide, "Develop AWS IoT Greengrass
components", "Use the AWS IoT Greengrass CLI", "Authorize components to perform IPC
operations").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from windfleet.nucleus.fleet import leftover_processes

pytestmark = pytest.mark.slow

NAME = "com.example.EchoOwner"
SCRIPT = '''
import json, os, sys, time
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import JsonMessage, PublishMessage

client = GreengrassCoreIPCClientV2()
thing = os.environ["AWS_IOT_THING_NAME"]
out = {"thing": thing, "ggc_version": os.environ.get("GGC_VERSION"), "region": os.environ.get("AWS_REGION")}
out["config"] = client.get_configuration().value
topic = "example/%s/echo" % thing
got = []
try:
    client.subscribe_to_topic(topic=topic, on_stream_event=lambda e: got.append(e.json_message.message))
    client.publish_to_topic(topic=topic, publish_message=PublishMessage(json_message=JsonMessage(message={"n": 1})))
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        time.sleep(0.05)
    out["echo"] = got
except Exception as exc:
    out["echo_error"] = type(exc).__name__
try:
    client.publish_to_topic(topic="example/someone-else/echo",
                            publish_message=PublishMessage(json_message=JsonMessage(message={"n": 2})))
    out["denied"] = None
except Exception as exc:
    out["denied"] = type(exc).__name__
print("RESULT " + json.dumps(out), flush=True)
time.sleep(3600)
'''


def _recipe(version: str, resource: str) -> dict:
    return {
        "RecipeFormatVersion": "2020-01-25", "ComponentName": NAME, "ComponentVersion": version,
        "ComponentPublisher": "example",
        "ComponentConfiguration": {"DefaultConfiguration": {
            "greeting": "default",
            "accessControl": {"aws.greengrass.ipc.pubsub": {f"{NAME}:pubsub:1": {
                "policyDescription": "its own echo topic",
                "operations": ["aws.greengrass#PublishToTopic", "aws.greengrass#SubscribeToTopic"],
                "resources": [resource]}}}}},
        "Manifests": [{"Platform": {"os": "linux"},
                       "Lifecycle": {"Run": "python3 -u {artifacts:path}/echo.py"},
                       "Artifacts": [{"Uri": f"s3://example-bucket/{NAME}/{version}/echo.py"}]}],
    }


@pytest.fixture
def nucleus(tmp_path):
    root = tmp_path / "root"
    out = (tmp_path / "runtime.out").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "windfleet.nucleus", "device", "run", "--thing", "tp1",
                             "--root", str(root)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (root / "cli_ipc_info").is_dir() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (root / "cli_ipc_info").is_dir(), (tmp_path / "runtime.out").read_text()[-2000:]
    yield root
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    out.close()
    assert not leftover_processes([proc.pid])


def _cli(root: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "windfleet.cli", "device", *args, "--root", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _layout(tmp_path: Path, version: str, resource: str) -> tuple[Path, Path]:
    recipes, artifacts = tmp_path / "recipes", tmp_path / "artifacts"
    recipes.mkdir(exist_ok=True)
    (recipes / f"{NAME}-{version}.yaml").write_text(yaml.safe_dump(_recipe(version, resource)))
    art = artifacts / NAME / version
    art.mkdir(parents=True, exist_ok=True)
    (art / "echo.py").write_text(SCRIPT)
    return recipes, artifacts


def _deploy(root: Path, recipes: Path, artifacts: Path, version: str, config: dict) -> str:
    out = _cli(root, "deployment", "create", "--recipeDir", str(recipes), "--artifactDir", str(artifacts),
               "--merge", f"{NAME}={version}", "--update-config", json.dumps(config))
    match = re.fullmatch(r"Local deployment submitted! Deployment Id: (\S+)\n", out)
    assert match, out
    deployment_id = match.group(1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = _cli(root, "deployment", "status", "-i", deployment_id)
        if status.startswith(f"{deployment_id}: SUCCEEDED") or ": FAILED" in status:
            return status
        time.sleep(0.3)
    pytest.fail(f"deployment {deployment_id} did not finish: {status}")


def _result(root: Path, version: str) -> dict:
    log = root / "logs" / f"{NAME}.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [ln for ln in (log.read_text() if log.exists() else "").splitlines() if ln.startswith("RESULT ")]
        if len(lines) >= int(version.split(".")[-1]) + 1:
            return json.loads(lines[-1][len("RESULT "):])
        time.sleep(0.2)
    pytest.fail(f"no result in {log}: {log.read_text() if log.exists() else '(no log)'}")


def test_sdk_only_component_deploys_connects_and_is_held_to_its_policy(nucleus, tmp_path):
    recipes, artifacts = _layout(tmp_path, "1.0.0", "example/*/echo")  # no recipe variable: any nucleus
    status = _deploy(nucleus, recipes, artifacts, "1.0.0", {NAME: {"MERGE": {"greeting": "hello"}}})
    assert status.startswith(f"{status.split(':')[0]}: SUCCEEDED"), status
    result = _result(nucleus, "1.0.0")
    assert result["thing"] == "tp1" and result["ggc_version"] and result["region"]
    assert result["config"]["greeting"] == "hello"               # its merged configuration, over IPC
    assert result["echo"] == [{"n": 1}]                           # pub/sub round trip
    # "example/*/echo" covers the other topic too: the policy is what it says, nothing more...
    assert result["denied"] is None
    listing = _cli(nucleus, "component", "list")
    assert listing.startswith("Components currently running in Greengrass:\n")
    assert f"Component Name: {NAME}\n    Version: 1.0.0\n    State: RUNNING\n" in listing
    details = _cli(nucleus, "component", "details", "--name", NAME)
    assert '"greeting": "hello"' in details

    # ...while a policy naming its own topic only denies the other one.  The running
    # configuration (accessControl included) wins over a new version's defaults, so the
    # narrower policy takes a RESET, as on a real nucleus ("Update component configurations").
    recipes, artifacts = _layout(tmp_path, "1.0.1", "example/tp1/echo")
    _deploy(nucleus, recipes, artifacts, "1.0.1", {NAME: {"RESET": ["/accessControl"]}})
    result = _result(nucleus, "1.0.1")
    assert result["echo"] == [{"n": 1}] and result["denied"] == "UnauthorizedError"
    assert result["config"]["greeting"] == "hello"  # kept across versions, as the nucleus keeps it

    # the rest of greengrass-cli's verbs, with its output
    listed = _cli(nucleus, "deployment", "list")
    assert listed.count("Deployment ID: ") == 2 and "Status: SUCCEEDED" in listed and "Created on: " in listed
    pid = _pid(nucleus)
    assert _cli(nucleus, "component", "restart", "--names", NAME) == ""
    _wait(lambda: _pid(nucleus) not in (None, pid), "a new process after restart")
    assert _cli(nucleus, "component", "stop", "--names", NAME) == ""
    _wait(lambda: "State: FINISHED" in _cli(nucleus, "component", "details", "-n", NAME), "stopped")
    bad = subprocess.run([sys.executable, "-m", "windfleet.cli", "device", "component", "restart", "--root",
                          str(nucleus), "--names", "com.example.Nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "ResourceNotFoundError" in bad.stderr and len(bad.stderr.splitlines()) == 1


def _pid(root: Path) -> int | None:
    try:
        return json.loads((root / "status.json").read_text())["components"][NAME]["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _wait(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_thing_name_in_access_control_needs_the_nucleus_option(nucleus, tmp_path):
    """`{iot:thingName}` in accessControl is literal text unless the nucleus option
    interpolateComponentConfiguration is true (developer guide, "Recipe variables": "AWS IoT
    Greengrass Core software v2.6.0 and later ... interpolateComponentConfiguration")."""
    recipes, artifacts = _layout(tmp_path, "1.0.0", "example/{iot:thingName}/echo")
    _deploy(nucleus, recipes, artifacts, "1.0.0", {})
    assert _result(nucleus, "1.0.0")["echo_error"] == "UnauthorizedError"   # stock nucleus: no match

    recipes, artifacts = _layout(tmp_path, "1.0.1", "example/{iot:thingName}/echo")
    _deploy(nucleus, recipes, artifacts, "1.0.1",
            {"aws.greengrass.Nucleus": {"MERGE": {"interpolateComponentConfiguration": True}}})
    result = _result(nucleus, "1.0.1")
    assert result["echo"] == [{"n": 1}] and result["denied"] == "UnauthorizedError"
