"""Stand-in components and runtime fixtures for the runtime, fleet and build tests.

No tests here.  A stand-in is a tiny recipe whose artifact ``standin.py`` records
what it saw (argv, env, configuration) in ``{kernel:rootPath}/events.log`` and its
component log, and then behaves as told: ``run`` (until SIGTERM), ``crash``
(exit 3), ``health`` (publish health messages over MQTT with the model version
found in ``--model-dir``; a model card with ``"broken": true`` makes it report
ERRORED with a reason, as the detector does for a model failing its self-test).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import zipfile
from pathlib import Path

import yaml

from windfleet.nucleus.runtime import DeviceRuntime, Settings

STANDIN = r'''
import json, os, signal, sys, time
mode = sys.argv[1]
args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
name = os.environ["WINDFLEET_COMPONENT"]
root = os.environ["WINDFLEET_KERNEL_ROOT"]
cfg = json.load(open(os.environ["WINDFLEET_CONFIG_FILE"]))
def event(what):
    with open(os.path.join(root, "events.log"), "a") as fh:
        fh.write(json.dumps({"t": time.time(), "component": name, "what": what, "pid": os.getpid()}) + "\n")
event("start")
print(json.dumps({"msg": "standin started", "mode": mode, "args": args, "config": cfg,
                  "env": {k: v for k, v in os.environ.items() if k.startswith(("WINDFLEET_", "AWS_IOT", "SETENV_"))}}),
      flush=True)
print("to stderr", file=sys.stderr, flush=True)
if mode == "crash":
    sys.exit(3)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
client = None
if mode == "health":
    import paho.mqtt.client as mqtt
    from windfleet import payloads, topics
    host, port = os.environ["WINDFLEET_BROKER"].rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}")
    client.username_pw_set(os.environ["WINDFLEET_BROKER_USER"], os.environ["WINDFLEET_BROKER_PASSWORD"])
    client.connect(host, int(port))
    client.loop_start()
    card = json.load(open(os.path.join(args["--model-dir"], "model.json")))
    state, extra = "RUNNING", {"model_version": card["version"]}
    if card.get("broken"):
        state, extra = "ERRORED", {"model_version": card["version"], "reason": "model self-test failed"}
    thing = os.environ["WINDFLEET_THING"]
while not stop:
    if client is not None:
        msg = payloads.health(thing, name, os.environ["WINDFLEET_COMPONENT_VERSION"], state, time.time(), {}, **extra)
        client.publish(topics.health(thing), payloads.encode(msg), qos=1)
    time.sleep(0.3)
event("stop")
'''

FAST = Settings(install_timeout=20, restart_backoff=0.2, poll_interval=0.2, stable_seconds=0.5,
                health_timeout=20, stop_grace=3, shutdown_timeout=3, deployment_timeout=60, rollback_timeout=30)


def make_component(build: Path, name: str, version: str, run: str | None = "run", *, install: str | dict | None = None,
                   deps: dict | None = None, config: dict | None = None, lifecycle: dict | None = None,
                   files: dict[str, bytes] | None = None, platforms: list | None = None) -> Path:
    """Write a stand-in component into a build layout (``build/recipes``, ``build/artifacts``).

    ``run`` is the Run script's tail after ``exec python3 {artifacts:path}/standin.py``
    (None: no Run); ``files`` are extra NONE artifacts (name -> bytes).  Every
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
        life["Run"] = f'exec python3 "{{artifacts:path}}/standin.py" {run}'
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


def status(root: Path) -> dict:
    try:
        return json.loads((Path(root) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


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

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        for component in list(self.runtime.components.values()):
            for pgid in list(component.pgids):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except OSError:
                    pass


def deployment(root: Path) -> dict:
    """The device's last deployment record in status.json ({} before the first)."""
    return status(root).get("deployment") or {}
