"""Stand-in components and runtime fixtures for the runtime, fleet and build tests.

No tests here.  A stand-in is a tiny recipe whose artifact ``standin.py`` talks to the
nucleus over Greengrass IPC only (``GreengrassCoreIPCClientV2(executor=None)`` with the
SVCUID and socket the nucleus gave it, as every component now does).  It records what it
saw (argv, environment, its configuration read with GetConfiguration) in
``{kernel:rootPath}/events.log`` and its component log, and then behaves as told:

* ``run``: until SIGTERM;
* ``crash``: exit 3;
* ``health --follow NAME``: publish health messages (``windfleet.topics.health``) over
  IPC pub/sub naming as ``model_version`` the ``ModelVersion`` of component NAME's
  configuration, read with GetConfiguration every round (as the detector follows the
  model component); the component needs an accessControl policy to publish there
  (:func:`health_acl`);
* ``--errors N`` (with ``run`` or ``health``): the first N starts of the component report
  ERRORED with UpdateState (then keep running), later starts report RUNNING.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import zipfile
from pathlib import Path

import yaml

from windfleet import topics
from windfleet.nucleus.fleet import device_status
from windfleet.nucleus.runtime import DeviceRuntime, Settings

STANDIN = r'''
import json, os, signal, sys, time
name, version, root, mode = sys.argv[1:5]
args = dict(zip(sys.argv[5::2], sys.argv[6::2]))
def event(what, **extra):
    with open(os.path.join(root, "events.log"), "a") as fh:
        fh.write(json.dumps({"t": time.time(), "component": name, "what": what, "pid": os.getpid(), **extra}) + "\n")
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))  # before "start": a test may stop it right after
event("start")
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import BinaryMessage, PublishMessage, ReportedLifecycleState
from windfleet import payloads, topics
ipc = GreengrassCoreIPCClientV2(executor=None)   # AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT + SVCUID
T = 10  # seconds; a nucleus that never answers fails the stand-in instead of hanging it
cfg = ipc.get_configuration_async().result(T).value
print(json.dumps({"msg": "standin started", "mode": mode, "args": args, "config": cfg,
                  "env": {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "SVCUID", "GGC_", "SETENV_"))}}),
      flush=True)
print("to stderr", file=sys.stderr, flush=True)
if mode == "crash":
    sys.exit(3)
if "--errors" in args:
    counter = os.path.join(os.getcwd(), "standin-starts")   # cwd is {work:path}
    starts = (int(open(counter).read()) if os.path.exists(counter) else 0) + 1
    open(counter, "w").write(str(starts))
    state = "ERRORED" if starts <= int(args["--errors"]) else "RUNNING"
    ipc.update_state_async(state=getattr(ReportedLifecycleState, state)).result(T)
    event("reported " + state, start=starts)
thing = os.environ["AWS_IOT_THING_NAME"]
while not stop:
    if mode == "health":
        model = ipc.get_configuration_async(component_name=args["--follow"]).result(T).value.get("ModelVersion")
        msg = payloads.health(thing, name, version, "RUNNING", time.time(), {}, model_version=model)
        ipc.publish_to_topic_async(topic=topics.health(thing), publish_message=PublishMessage(
            binary_message=BinaryMessage(message=payloads.encode(msg)))).result(T)
    time.sleep(0.3)
event("stop")
ipc.close()
'''

def health_acl(name: str) -> dict:
    """The ``accessControl`` a stand-in ``name`` in ``health`` mode needs to publish its health
    (a policy as in the real recipes: `*` for the thing level)."""
    return {"aws.greengrass.ipc.pubsub": {f"{name}:pubsub:1": {
        "policyDescription": "publish health", "operations": ["aws.greengrass#PublishToTopic"],
        "resources": [topics.health("*")]}}}


FAST = Settings(install_timeout=20, restart_backoff=0.2, poll_interval=0.2, stable_seconds=0.5,
                health_timeout=20, stop_grace=3, shutdown_timeout=3, deployment_timeout=60, rollback_timeout=30)


def make_component(build: Path, name: str, version: str, run: str | None = "run", *, install: str | dict | None = None,
                   deps: dict | None = None, config: dict | None = None, lifecycle: dict | None = None,
                   files: dict[str, bytes] | None = None, platforms: list | None = None) -> Path:
    """Write a stand-in component into a build layout (``build/recipes``, ``build/artifacts``).

    ``run`` is the Run script's tail after ``exec python3 {artifacts:path}/standin.py``
    (None: no Run; the stand-in gets its name, version and ``{kernel:rootPath}`` first);
    ``files`` are extra NONE artifacts (name -> bytes).  Every
    component also has ``bundle.zip`` (Unarchive ZIP) holding ``bundle/hello.txt``.
    """
    art = build / "artifacts" / name / version
    art.mkdir(parents=True, exist_ok=True)
    (build / "recipes").mkdir(parents=True, exist_ok=True)
    artifacts = []
    if run is not None:
        (art / "standin.py").write_text(STANDIN)
        with zipfile.ZipFile(art / "bundle.zip", "w") as zf:
            zf.writestr("bundle/hello.txt", f"hello from {name} {version}")
        artifacts += [{"Uri": f"s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/{f}",
                       "Unarchive": "ZIP" if f.endswith(".zip") else "NONE"} for f in ("standin.py", "bundle.zip")]
    for fname, data in (files or {}).items():
        (art / fname).write_bytes(data)
        artifacts.append({"Uri": f"s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/{fname}",
                          "Permission": {"Read": "ALL"}})
    life = dict(lifecycle or {})
    if run is not None:
        life["Run"] = f'exec python3 "{{artifacts:path}}/standin.py" {name} {version} "{{kernel:rootPath}}" {run}'
    if install is not None:
        life["Install"] = install
    recipe = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
              "ComponentPublisher": "tests",
              "ComponentConfiguration": {"DefaultConfiguration": config or {}},
              "Manifests": [{"Platform": p, **({"Lifecycle": life} if life else {}), "Artifacts": artifacts}
                            for p in (platforms or [{"os": "linux"}])]}
    if deps:
        recipe["ComponentDependencies"] = deps
    path = build / "recipes" / f"{name}-{version}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def events(root: Path) -> list[dict]:
    path = Path(root) / "events.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


status = device_status  # the runtime's status.json, {} until written


def state_of(root: Path, name: str) -> str | None:
    return status(root).get("components", {}).get(name, {}).get("state")


class RuntimeThread:
    """A DeviceRuntime serving on a background thread; ``stop()`` stops it and
    kills anything left (so a failing test leaves no process behind)."""

    def __init__(self, runtime: DeviceRuntime):
        self.runtime = runtime
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=runtime.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        for component in list(self.runtime.components.values()):
            for pgid in list(component.pgids):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except OSError:
                    pass


def deployment(root: Path) -> dict:
    """The device's last deployment record in status.json ({} before the first)."""
    return status(root).get("deployment") or {}
