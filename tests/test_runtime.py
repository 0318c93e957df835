"""The local device runtime with real processes (stand-in components, see test_runtime_helpers)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.mqtt_fixtures import wait_until
from tests.test_runtime_helpers import (
    FAST, RuntimeThread, deployment, events, health_acl, make_component, state_of, status,
)
from windfleet.nucleus import recipe as R
from windfleet.nucleus.runtime import DeviceRuntime
from windfleet.nucleus.sources import DirectorySource

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def started(tmp_path):
    """start(runtime) -> RuntimeThread, stopped at teardown whatever happens."""
    threads = []

    def start(runtime):
        t = RuntimeThread(runtime)
        threads.append(t)
        return t

    yield start
    for t in threads:
        t.stop()


def source(build: Path, components: dict, **kw) -> DirectorySource:
    return DirectorySource(build / "recipes", build / "artifacts", components, **kw)


# ------------------------------------------------------------------ pure recipe semantics
def test_interpolation_forms_and_direct_dependencies_only(tmp_path):
    ctx = R.Context("com.x.A", "gw1", tmp_path,
                    artifacts_path=lambda n: tmp_path / "art" / n, decompressed_path=lambda n: tmp_path / "unz" / n,
                    work_path=lambda n: tmp_path / "work" / n,
                    configuration=lambda n: {"com.x.A": {"a": {"b": 5}, "s": "txt"}, "com.x.Dep": {"p": [1]},
                                             "com.x.Other": {"p": 2}}[n],
                    direct_dependencies=["com.x.Dep"])
    text = ("{artifacts:path} {artifacts:decompressedPath}/z/ {configuration:/a/b} {configuration:/s} "
            "{configuration:/a} {work:path} {kernel:rootPath} {iot:thingName} {com.x.Dep:configuration:/p} "
            "{com.x.Dep:artifacts:path} {com.x.Dep:artifacts:decompressedPath} {com.x.Other:artifacts:path} "
            "${SHELL_VAR} {configuration:/missing}")
    out = ctx.interpolate(text).split()
    assert out[:8] == [f"{tmp_path}/art/com.x.A", f"{tmp_path}/unz/com.x.A/z/", "5", "txt", '{"b":5}',
                       f"{tmp_path}/work/com.x.A", str(tmp_path), "gw1"]
    assert out[8:11] == ["[1]", f"{tmp_path}/art/com.x.Dep", f"{tmp_path}/unz/com.x.Dep"]
    # Not a direct dependency, a shell variable and a missing key are left as written.
    assert out[11:] == ["{com.x.Other:artifacts:path}", "${SHELL_VAR}", "{configuration:/missing}"]
    assert set(ctx.unresolved) == {"{com.x.Other:artifacts:path}", "{configuration:/missing}"}


def test_configuration_merge_reset_and_persistence_semantics():
    defaults = {"turbines": 5, "rate": {"hz": 20, "batch": 10}, "kinds": ["a", "b"], "new": 1}
    current = {"turbines": 8, "rate": {"hz": 10, "batch": 10}, "kinds": ["a", "b"]}
    # The device's values win over the new version's defaults; new keys appear.
    assert R.merge_configuration(defaults, current) == {"turbines": 8, "rate": {"hz": 10, "batch": 10},
                                                        "kinds": ["a", "b"], "new": 1}
    merged = R.merge_configuration(defaults, current, {"reset": ["/rate/hz"], "merge": '{"kinds": ["c"], "x": {"y": 1}}'})
    assert merged == {"turbines": 8, "rate": {"hz": 20, "batch": 10}, "kinds": ["c"], "new": 1, "x": {"y": 1}}
    assert R.merge_configuration(defaults, current, {"reset": [""]}) == defaults
    with pytest.raises(R.RecipeError):
        R.merge_configuration(defaults, None, {"merge": "{not json"})


def test_manifest_selection_first_match_and_catch_all():
    recipe = {"ComponentName": "c", "Manifests": [
        {"Platform": {"os": "linux", "architecture": "aarch64"}, "Name": "arm64"},
        {"Platform": {"os": "linux", "architecture": "/amd64|x86/"}, "Name": "x86"},
        {"Platform": {"os": "linux"}, "Name": "any"}]}
    pick = lambda arch: R.select_manifest(recipe, {"os": "linux", "architecture": arch})["Name"]  # noqa: E731
    assert (pick("aarch64"), pick("amd64"), pick("arm")) == ("arm64", "x86", "any")
    with pytest.raises(R.RecipeError):
        R.select_manifest(recipe, {"os": "windows", "architecture": "amd64"})
    assert R.version_satisfies("1.4.0", ">=1.0.0 <2.0.0") and not R.version_satisfies("2.0.0", "^1.0.0")
    with pytest.raises(R.RecipeError, match="cycle"):
        R.topological_order({"a": ["b"], "b": ["a"]})


# ------------------------------------------------------------------ real processes
def test_layout_logs_variables_and_configuration(tmp_path, started):
    build, root = tmp_path / "build", tmp_path / "dev"
    make_component(build, "com.t.Dep", "1.0.0", config={"shared": "from-dep"})
    make_component(build, "com.t.App", "2.1.0",
                   run='run --art "{artifacts:path}" --unz "{artifacts:decompressedPath}/bundle/" '
                       '--work "{work:path}" --root "{kernel:rootPath}" --thing "{iot:thingName}" '
                       '--cfg "{configuration:/greeting}" --dep "{com.t.Dep:configuration:/shared}" '
                       '--depart "{com.t.Dep:artifacts:path}"',
                   deps={"com.t.Dep": {"VersionRequirement": "^1.0.0", "DependencyType": "SOFT"}},
                   config={"greeting": "hello", "nested": {"a": 1, "b": 2}},
                   lifecycle={"Setenv": {"SETENV_WORK": "{work:path}"}})
    src = source(build, {"com.t.Dep": "1.0.0", "com.t.App": "2.1.0"},
                 update_config={"com.t.App": {"MERGE": {"nested": {"b": 3}}}})
    rt = DeviceRuntime("gw-lay", root, src, settings=FAST)
    started(rt)
    wait_until(lambda: deployment(root).get("status") == "SUCCEEDED", 30, message="deployment")

    assert (root / "packages/recipes/com.t.App-2.1.0.yaml").is_file()
    assert (root / "packages/artifacts/com.t.App/2.1.0/standin.py").is_file()
    unz = root / "packages/artifacts-unarchived/com.t.App/2.1.0/bundle"
    assert (unz / "bundle/hello.txt").read_text() == "hello from com.t.App 2.1.0"
    stored = yaml.safe_load((root / "packages/recipes/com.t.App-2.1.0.yaml").read_text())
    assert all(a.get("Digest") and a["Algorithm"] == "SHA-256" for a in stored["Manifests"][0]["Artifacts"])

    log = root / "logs" / "com.t.App.log"
    wait_until(lambda: log.exists() and "to stderr" in log.read_text(), message="component log")
    line = json.loads(log.read_text().splitlines()[0])
    a = line["args"]
    assert a["--art"] == str(root / "packages/artifacts/com.t.App/2.1.0")
    assert a["--unz"] == str(unz) + "/"
    assert a["--work"] == str(root / "work/com.t.App") and (root / "work/com.t.App").is_dir()
    assert (a["--root"], a["--thing"], a["--cfg"], a["--dep"]) == (str(root), "gw-lay", "hello", "from-dep")
    assert a["--depart"] == str(root / "packages/artifacts/com.t.Dep/1.0.0")
    # The merged configuration, as the component reads it over IPC (GetConfiguration).
    assert line["config"] == {"greeting": "hello", "nested": {"a": 1, "b": 3}}
    # What the nucleus sets for every lifecycle step (developer guide, "Component environment variables").
    env = line["env"]
    assert env["SETENV_WORK"] == a["--work"] and env["AWS_IOT_THING_NAME"] == "gw-lay"
    assert env["AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"] == str(rt.ipc.path)
    assert env["SVCUID"] and env["AWS_REGION"] and env["GGC_VERSION"]
    dep_log = root / "logs" / "com.t.Dep.log"
    wait_until(lambda: dep_log.exists() and "standin started" in dep_log.read_text(), message="dependency log")
    dep_env = json.loads(dep_log.read_text().splitlines()[0])["env"]
    assert dep_env["SVCUID"] != env["SVCUID"]  # one identity per component
    assert json.loads(dep_log.read_text().splitlines()[0])["config"] == {"shared": "from-dep"}
    runtime_log = [json.loads(x) for x in (root / "logs/greengrass.log").read_text().splitlines()]
    assert any(e["msg"] == "deployment status" and e["status"] == "SUCCEEDED" for e in runtime_log)


@pytest.mark.fault
def test_kill_9_restarts_and_three_crashes_make_broken(tmp_path, started):
    build, root = tmp_path / "build", tmp_path / "dev"
    make_component(build, "com.t.Steady", "1.0.0")
    make_component(build, "com.t.Crashy", "1.0.0", run="crash")
    rt = DeviceRuntime("gw-crash", root, source(build, {"com.t.Steady": "1.0.0"}), settings=FAST)
    started(rt)
    wait_until(lambda: deployment(root).get("status") == "SUCCEEDED", 30, message="deployment")
    pid = wait_until(lambda: status(root)["components"]["com.t.Steady"]["pid"])
    wait_until(lambda: any(e["what"] == "start" and e["pid"] == pid for e in events(root)), message="started")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: status(root)["components"]["com.t.Steady"]["restarts"] == 1
               and state_of(root, "com.t.Steady") == "RUNNING", message="restart after kill -9")
    new_pid = status(root)["components"]["com.t.Steady"]["pid"]
    assert new_pid != pid
    wait_until(lambda: any(e["what"] == "start" and e["pid"] == new_pid for e in events(root)), message="new process")

    # A component that always crashes: ERRORED -> restarted, third error -> BROKEN, deployment FAILED
    # and (ROLLBACK) the device goes back to the previous set.
    crash = DirectorySource(build / "recipes", build / "artifacts", {"com.t.Steady": "1.0.0", "com.t.Crashy": "1.0.0"})
    rt.source = crash
    wait_until(lambda: deployment(root).get("id") == crash.deployment_id
               and deployment(root)["status"] == "FAILED", 40, message="failed deployment")
    starts = [e for e in events(root) if e["component"] == "com.t.Crashy" and e["what"] == "start"]
    assert len(starts) == 3
    assert "com.t.Crashy is BROKEN" in deployment(root)["reason"]
    assert deployment(root)["reason"].endswith("rolled back")
    assert "com.t.Crashy" not in status(root)["components"]
    assert state_of(root, "com.t.Steady") == "RUNNING"
    assert [s for _, s, _ in crash.statuses] == ["IN_PROGRESS", "FAILED"]


def test_dependency_order_and_hard_dependents_restart(tmp_path, started):
    build, root = tmp_path / "build", tmp_path / "dev"
    make_component(build, "com.t.Base", "1.0.0")
    make_component(build, "com.t.Base", "1.1.0")
    make_component(build, "com.t.Hard", "1.0.0", deps={"com.t.Base": {"VersionRequirement": ">=1.0.0"}})
    make_component(build, "com.t.Soft", "1.0.0",
                   deps={"com.t.Base": {"VersionRequirement": ">=1.0.0", "DependencyType": "SOFT"}})
    # Install of the top component sees its dependency's process (started before it, not after).
    make_component(build, "com.t.Top", "1.0.0", deps={"com.t.Hard": {"VersionRequirement": "1.0.0"}},
                   install={"Script": "for i in $(seq 100); do grep -q com.t.Hard {kernel:rootPath}/events.log "
                                      "&& exit 0; sleep 0.1; done; exit 1", "Timeout": 15})
    comps = {"com.t.Top": "1.0.0", "com.t.Soft": "1.0.0", "com.t.Hard": "1.0.0", "com.t.Base": "1.0.0"}
    rt = DeviceRuntime("gw-dep", root, source(build, comps), settings=FAST)
    started(rt)
    wait_until(lambda: deployment(root).get("status") == "SUCCEEDED", 30, message="deployment")
    # The order the runtime launched Run steps in (Greengrass: RUNNING once Run is launched).
    order = [e["component"] for e in map(json.loads, (root / "logs/greengrass.log").read_text().splitlines())
             if e["msg"] == "component running"]
    assert order.index("com.t.Base") < order.index("com.t.Hard") < order.index("com.t.Top")
    assert order.index("com.t.Base") < order.index("com.t.Soft")
    assert status(root)["restarts"] == 0  # Top's Install found Hard running the first time

    before = len(events(root))
    update = source(build, {**comps, "com.t.Base": "1.1.0"})
    rt.source = update
    wait_until(lambda: deployment(root).get("id") == update.deployment_id
               and deployment(root)["status"] == "SUCCEEDED", 30, message="second deployment")
    restarted = {e["component"] for e in events(root)[before:] if e["what"] == "start"}
    # HARD dependents restart with their dependency (transitively); SOFT ones do not.
    assert restarted == {"com.t.Base", "com.t.Hard", "com.t.Top"}


def _model(version: str, broken: bool = False) -> dict[str, bytes]:
    card = {"version": version, "broken": broken}
    return {"model.json": json.dumps(card).encode(), "model.onnx": b"onnx-" + version.encode()}


# The model component's Install validates its own package (as com.windfleet.AnomalyModel runs
# check_model): a bad one exits 1, so the component errors, and on the third error is BROKEN.
CHECK_MODEL = ("python3 -c \"import json, sys; card = json.load(open('{artifacts:path}/model.json')); "
               "print('model', card['version'], 'broken' if card['broken'] else 'ok'); "
               "sys.exit(1 if card['broken'] else 0)\"")


@pytest.mark.fault
def test_a_broken_component_fails_the_deployment_and_rollback_restores_the_previous_set(tmp_path, started):
    build, root = tmp_path / "build", tmp_path / "dev"
    # The detector stand-in reports (over IPC pub/sub) the ModelVersion of the model component's
    # configuration; the model HARD-depends on it and validates itself in Install.
    make_component(build, "com.t.Detector", "1.0.0", run="health --follow com.t.Model",
                   config={"accessControl": health_acl("com.t.Detector")})
    for version, broken in (("1.0.0", False), ("2.0.0", False), ("3.0.0", True)):
        make_component(build, "com.t.Model", version, run=None, files=_model(version, broken),
                       deps={"com.t.Detector": {"VersionRequirement": ">=1.0.0", "DependencyType": "HARD"}},
                       config={"ModelVersion": version}, install={"Script": CHECK_MODEL, "Timeout": 10})

    def model(version: str) -> DirectorySource:
        # RESET: the model's configuration is the new version's own (as windfleet's deployer does)
        return source(build, {"com.t.Detector": "1.0.0", "com.t.Model": version},
                      update_config={"com.t.Model": {"RESET": [""]}})

    def detector() -> dict:
        return status(root)["components"]["com.t.Detector"]

    rt = DeviceRuntime("gw-gate", root, model("1.0.0"), settings=FAST)
    started(rt)
    wait_until(lambda: deployment(root).get("status") == "SUCCEEDED", 40, message="v1")
    assert state_of(root, "com.t.Model") == "FINISHED"  # no Run: installed and done
    # the health the stand-in publishes over IPC reaches the nucleus' status
    wait_until(lambda: detector().get("model_version") == "1.0.0", 20, message="detector reports v1")
    pid = detector()["pid"]

    v2 = model("2.0.0")
    rt.source = v2
    wait_until(lambda: deployment(root)["id"] == v2.deployment_id
               and deployment(root)["status"] == "SUCCEEDED", 40, message="v2")
    wait_until(lambda: detector().get("model_version") == "2.0.0", 20, message="detector follows v2")
    assert detector()["pid"] == pid and detector()["restarts"] == 0  # a new model does not restart it

    v3 = model("3.0.0")
    rt.source = v3
    wait_until(lambda: deployment(root)["id"] == v3.deployment_id
               and deployment(root)["status"] == "FAILED", 40, message="v3 fails")
    reason = deployment(root)["reason"]
    assert "com.t.Model is BROKEN: install exited with 1" in reason and reason.endswith("rolled back")
    model_log = (root / "logs" / "com.t.Model.log").read_text()
    assert model_log.count("model 3.0.0 broken") == 3  # three errors, then BROKEN
    assert [s for _, s, _ in v3.statuses] == ["IN_PROGRESS", "FAILED"]
    # ROLLBACK: the previous set and configuration, persisted
    assert status(root)["components"]["com.t.Model"]["version"] == "2.0.0"
    wait_until(lambda: state_of(root, "com.t.Model") == "FINISHED", 20, message="v2 reinstalled")
    assert json.loads((root / "config/runtime.json").read_text())["components"]["com.t.Model"] == "2.0.0"
    assert json.loads((root / "config/runtime.json").read_text())["configuration"]["com.t.Model"] == \
        {"ModelVersion": "2.0.0"}
    wait_until(lambda: detector().get("model_version") == "2.0.0", 20, message="detector back on v2")
    assert detector()["pid"] == pid and state_of(root, "com.t.Detector") == "RUNNING"


@pytest.mark.fault
def test_errored_via_update_state_restarts_the_component_and_three_make_it_broken(tmp_path, started):
    build, root = tmp_path / "build", tmp_path / "dev"
    make_component(build, "com.t.Base", "1.0.0")
    make_component(build, "com.t.Flaky", "1.0.0", run="run --errors 2")   # ERRORED twice, then RUNNING
    make_component(build, "com.t.Sulky", "1.0.0", run="run --errors 99")  # ERRORED at every start
    # Long enough that the ERRORED reports come while the deployment is still waiting.
    rt = DeviceRuntime("gw-err", root, source(build, {"com.t.Base": "1.0.0"}),
                       settings=dataclasses.replace(FAST, stable_seconds=4))
    started(rt)
    wait_until(lambda: deployment(root).get("status") == "SUCCEEDED", 30, message="base")

    flaky = source(build, {"com.t.Base": "1.0.0", "com.t.Flaky": "1.0.0"})
    rt.source = flaky
    wait_until(lambda: deployment(root)["id"] == flaky.deployment_id
               and deployment(root)["status"] in ("SUCCEEDED", "FAILED", "TIMED_OUT"), 40, message="flaky")
    assert deployment(root)["status"] == "SUCCEEDED"  # ERRORED is a restart, not a failure
    reports = [e for e in events(root) if e["component"] == "com.t.Flaky" and e["what"].startswith("reported")]
    assert [(e["what"], e["start"]) for e in reports] == [("reported ERRORED", 1), ("reported ERRORED", 2),
                                                          ("reported RUNNING", 3)]
    starts = [e["pid"] for e in events(root) if e["component"] == "com.t.Flaky" and e["what"] == "start"]
    assert len(set(starts)) == 3  # each ERRORED report killed the process and started a new one
    flaky_status = status(root)["components"]["com.t.Flaky"]
    assert flaky_status["state"] == "RUNNING" and flaky_status["restarts"] == 2
    assert flaky_status["pid"] == starts[-1]
    runtime_log = [json.loads(x) for x in (root / "logs/greengrass.log").read_text().splitlines()]
    assert [e["reason"] for e in runtime_log if e["msg"] == "component errored; restarting"
            and e["component"] == "com.t.Flaky"] == ["reported ERRORED"] * 2

    sulky = source(build, {"com.t.Base": "1.0.0", "com.t.Flaky": "1.0.0", "com.t.Sulky": "1.0.0"})
    rt.source = sulky
    wait_until(lambda: deployment(root)["id"] == sulky.deployment_id
               and deployment(root)["status"] == "FAILED", 40, message="sulky fails")
    reason = deployment(root)["reason"]
    assert "com.t.Sulky is BROKEN: reported ERRORED" in reason and reason.endswith("rolled back")
    assert sum(e["component"] == "com.t.Sulky" and e["what"] == "reported ERRORED" for e in events(root)) == 3
    assert set(status(root)["components"]) == {"com.t.Base", "com.t.Flaky"}
    assert state_of(root, "com.t.Flaky") == "RUNNING" and status(root)["components"]["com.t.Flaky"]["pid"] == starts[-1]


@pytest.mark.fault
def test_timeouts_and_cancel(tmp_path, started):
    build, root = tmp_path / "build", tmp_path / "dev"
    make_component(build, "com.t.Base", "1.0.0")
    # A component whose Startup never ends (within its Timeout): it stays STARTING and the
    # deployment times out waiting for it to be RUNNING.
    make_component(build, "com.t.Silent", "1.0.0", run=None,
                   lifecycle={"Startup": {"Script": "sleep 60", "Timeout": 50}})
    # An Install that hangs: killed at its Timeout each time -> BROKEN -> FAILED.
    make_component(build, "com.t.Hang", "1.0.0", install={"Script": "sleep 60", "Timeout": 1})
    # An Install slow enough to cancel.
    make_component(build, "com.t.Slow", "1.0.0", install={"Script": "sleep 60", "Timeout": 50})
    rt = DeviceRuntime("gw-time", root, source(build, {"com.t.Base": "1.0.0"}), settings=FAST)
    started(rt)
    wait_until(lambda: deployment(root).get("status") == "SUCCEEDED", 30, message="base")

    rt.settings = dataclasses.replace(FAST, health_timeout=3)
    silent = source(build, {"com.t.Base": "1.0.0", "com.t.Silent": "1.0.0"})
    rt.source = silent
    wait_until(lambda: deployment(root)["id"] == silent.deployment_id
               and deployment(root)["status"] == "TIMED_OUT", 40, message="health timeout")
    reason = deployment(root)["reason"]
    assert "com.t.Silent is STARTING" in reason and reason.endswith("rolled back")
    assert set(status(root)["components"]) == {"com.t.Base"}
    rt.settings = FAST

    hang = source(build, {"com.t.Base": "1.0.0", "com.t.Hang": "1.0.0"})
    rt.source = hang
    wait_until(lambda: deployment(root)["id"] == hang.deployment_id
               and deployment(root)["status"] == "FAILED", 40, message="install timeouts")
    assert "com.t.Hang is BROKEN: install timed out" in deployment(root)["reason"]

    slow = source(build, {"com.t.Base": "1.0.0", "com.t.Slow": "1.0.0"})
    rt.source = slow
    wait_until(lambda: state_of(root, "com.t.Slow") == "NEW" and deployment(root)["status"] == "IN_PROGRESS",
               20, message="slow install under way")
    slow.cancel()
    wait_until(lambda: deployment(root)["status"] == "CANCELED", 20, message="canceled")
    assert set(status(root)["components"]) == {"com.t.Base"} and state_of(root, "com.t.Base") == "RUNNING"
    assert not any(e["component"] in ("com.t.Hang", "com.t.Slow", "com.t.Silent") for e in events(root))


@pytest.mark.fault
def test_digest_mismatch_fails_before_touching_the_device(tmp_path, started):
    build, root = tmp_path / "build", tmp_path / "dev"
    make_component(build, "com.t.Base", "1.0.0")
    make_component(build, "com.t.Base", "2.0.0")
    rt = DeviceRuntime("gw-dig", root, source(build, {"com.t.Base": "1.0.0"}), settings=FAST)
    started(rt)
    wait_until(lambda: deployment(root).get("status") == "SUCCEEDED", 30, message="v1")

    class Tampering(DirectorySource):
        def fetch_component(self, name, version):
            recipe, paths = super().fetch_component(name, version)
            for path in paths.values():   # the artifact changes after the service computed its digest
                path.write_bytes(path.read_bytes() + b"\n# tampered")
            return recipe, paths

    bad = Tampering(build / "recipes", build / "artifacts", {"com.t.Base": "2.0.0"})
    rt.source = bad
    wait_until(lambda: deployment(root)["id"] == bad.deployment_id
               and deployment(root)["status"] == "FAILED", 20, message="digest failure")
    assert "does not match its digest" in deployment(root)["reason"]
    assert status(root)["components"]["com.t.Base"]["version"] == "1.0.0"
    assert status(root)["components"]["com.t.Base"]["restarts"] == 0


def test_device_run_cli_survives_restart_with_its_configuration(tmp_path):
    """`windfleet device run` as a real process: SIGTERM stops components; a restart
    brings back the same set and configuration without re-applying the deployment."""
    build, root = tmp_path / "build", tmp_path / "dev"
    make_component(build, "com.t.App", "1.0.0", config={"turbines": 5})
    cmd = [sys.executable, "-m", "windfleet.nucleus", "device", "run", "--thing", "gw-cli", "--root", str(root),
           "--recipe-dir", str(build / "recipes"), "--artifact-dir", str(build / "artifacts"),
           "--merge", "com.t.App=1.0.0", "--update-config", json.dumps({"com.t.App": {"MERGE": {"turbines": 9}}})]

    def run_once():
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_until(lambda: deployment(root).get("status") == "SUCCEEDED" and proc.poll() is None, 30,
                       message="device running")
            wait_until(lambda: any(e["what"] == "start" for e in events(root)[n_before:]), message="component start")
            return proc
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise

    n_before = 0
    proc = run_once()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]
    assert events(root)[-1]["what"] == "stop"  # the component got SIGTERM and exited cleanly
    assert json.loads(rt_config(root))["turbines"] == 9

    n_before = len(events(root))
    cmd[cmd.index("--update-config") + 1] = json.dumps({"com.t.App": {"MERGE": {"turbines": 9}}})
    proc = run_once()
    try:
        assert json.loads(rt_config(root))["turbines"] == 9
        # what the restarted component itself read over IPC (GetConfiguration)
        def started_lines():
            return [json.loads(x) for x in (root / "logs/com.t.App.log").read_text().splitlines()
                    if "standin started" in x]
        wait_until(lambda: len(started_lines()) == 2, message="second start read its configuration")
        assert all(x["config"] == {"turbines": 9} for x in started_lines())
        log = (root / "logs/greengrass.log").read_text()
        assert log.count('"status": "SUCCEEDED"') == 1  # the same deployment was not applied twice
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def rt_config(root: Path) -> str:
    return (root / "config/components/com.t.App.json").read_text()
