"""Run components under a real local nucleus and talk to them over Greengrass IPC.

Components only speak Greengrass IPC (``windfleet.components.bus.ipc``), so a test that
feeds a component or listens to it does what a stand-in component would: it connects
to the nucleus' socket with ``GreengrassCoreIPCClientV2`` and an SVCUID of its own.

:class:`Nucleus` is a :class:`~windfleet.nucleus.runtime.DeviceRuntime` serving on a
thread of the test process (its root in ``tmp_path``, its one MQTT connection to an
IoT Core stand-in Mosquitto).  It deploys like ``greengrass-cli deployment create``
(:meth:`Nucleus.deploy`) and hands out test principals::

    n = Nucleus("gw1", tmp_path / "device", broker=broker, credentials=broker.add_device("gw1", 2))
    n.deploy(build_dir, {"com.windfleet.LogForwarder": "1.0.0"}, {"com.windfleet.LogForwarder": {"MERGE": {...}}})
    detector = n.publisher("com.windfleet.AnomalyDetector", recipe_access_control(DETECTOR))
    local = n.watcher("tests.Observer", "windfleet/devices/gw1/health")

A principal gets its policies with ``runtime.authorizer.set_component(name, {"accessControl":
...})`` and its token from ``runtime.ipc.issue_token(name)`` -- what the nucleus does for a
deployed component -- so the real authorization applies to the test's calls too.

Local pub/sub keeps no queue (developer guide, "Publish/subscribe local messages"): what is
published while nobody subscribes is dropped.  Tests therefore wait for a component's first
health message (published after it subscribed) before feeding it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import awsiot.greengrasscoreipc
import yaml
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import BinaryMessage, PublishMessage

from windfleet.nucleus.runtime import DeviceRuntime, Settings

from tests.mqtt_fixtures import REPO, wait_until
from tests.test_runtime_helpers import RuntimeThread

CALL_TIMEOUT = 30.0
OBSERVER = "tests.Observer"


def recipe_access_control(component: str) -> dict:
    """The ``accessControl`` the project's own recipe gives ``component`` (so a stand-in for it
    may do exactly what the real one may)."""
    recipe = yaml.safe_load((REPO / "recipes" / f"{component}.yaml").read_text())
    return recipe["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]


def subscribe_policy(name: str, *resources: str) -> dict:
    return {"aws.greengrass.ipc.pubsub": {f"{name}:pubsub:1": {
        "policyDescription": "test observer", "operations": ["aws.greengrass#SubscribeToTopic"],
        "resources": list(resources)}}}


def read_log(path: Path) -> list[dict]:
    """JSON lines of a log file (other lines skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


class Publisher:
    """A stand-in component publishing on local pub/sub.  :meth:`publish` returns once the
    nucleus answered, i.e. after it handed the message to every current subscriber."""

    def __init__(self, client: GreengrassCoreIPCClientV2):
        self.client = client

    def publish(self, topic: str, payload: bytes) -> None:
        message = PublishMessage(binary_message=BinaryMessage(message=payload))
        self.client.publish_to_topic_async(topic=topic, publish_message=message).result(CALL_TIMEOUT)


class Watcher:
    """A stand-in component subscribed to local topics: ``(topic, payload, arrival)`` in
    arrival order (events run on the connection's thread: ``executor=None``)."""

    def __init__(self, client: GreengrassCoreIPCClientV2, *topics: str):
        self.client = client
        self._lock = threading.Lock()
        self.messages: list[tuple[str, bytes, float]] = []
        for topic in topics:
            fut, _op = client.subscribe_to_topic_async(topic=topic, on_stream_event=self._on_event)
            fut.result(CALL_TIMEOUT)

    def _on_event(self, event) -> None:
        msg = event.binary_message or event.json_message
        if msg is None:
            return
        data = msg.message if event.binary_message is not None else json.dumps(msg.message).encode()
        topic = getattr(getattr(msg, "context", None), "topic", None) or ""
        with self._lock:
            self.messages.append((topic, bytes(data or b""), time.monotonic()))

    def snapshot(self, topic: str | None = None) -> list[tuple[str, bytes, float]]:
        with self._lock:
            return [m for m in self.messages if topic is None or m[0] == topic]

    def json(self, topic: str | None = None) -> list[dict]:
        out = []
        for _, data, _ in self.snapshot(topic):
            try:
                out.append(json.loads(data))
            except ValueError:
                pass
        return out


class Nucleus:
    """A DeviceRuntime serving on a background thread (see the module docstring).

    :param broker: the IoT Core stand-in (a :class:`~windfleet.nucleus.broker.Broker`) and
        ``credentials`` this thing's account on it, as ``windfleet device run --broker`` gets them.
    """

    def __init__(self, thing: str, root: Path, *, broker: Any = None, credentials: tuple[str, str] | None = None,
                 settings: Settings | None = None):
        self.thing, self.root = thing, Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        user, password = credentials or (None, None)
        self.runtime = DeviceRuntime(thing, self.root, broker=broker.url if broker else None, broker_user=user,
                                     broker_password=password,
                                     settings=settings or Settings(restart_backoff=0.5, stop_grace=30))
        self.clients: list[GreengrassCoreIPCClientV2] = []
        self.serving = RuntimeThread(self.runtime)
        info = self.root / "cli_ipc_info" / f"user-{os.getuid()}"
        wait_until(lambda: info.is_file() and self.runtime.ipc.path.exists(), 15, message="the nucleus' IPC socket")
        data = json.loads(info.read_text())
        self.socket, self._cli_token = data["domain_socket_path"], data["cli_auth_token"]
        self._cli: GreengrassCoreIPCClientV2 | None = None
        if broker is not None:
            wait_until(lambda: self.runtime.iot is not None and self.runtime.iot.connected, 15,
                       message="the nucleus' IoT Core connection")

    # ------------------------------------------------------------ IPC clients
    def client(self, token: str) -> GreengrassCoreIPCClientV2:
        c = GreengrassCoreIPCClientV2(client=awsiot.greengrasscoreipc.connect(ipc_socket=self.socket, authtoken=token,
                                                                               timeout=10),
                                      executor=None)
        self.clients.append(c)
        return c

    def cli(self) -> GreengrassCoreIPCClientV2:
        """The client greengrass-cli uses (token from ``<root>/cli_ipc_info``)."""
        if self._cli is None:
            self._cli = self.client(self._cli_token)
        return self._cli

    def principal(self, name: str, access_control: dict) -> str:
        """Give ``name`` these policies (as a deployment does for a component); its SVCUID."""
        rt = self.runtime
        with rt._lock:
            rt.authorizer.set_component(name, {"accessControl": access_control})
        return rt.ipc.issue_token(name)

    def publisher(self, name: str, access_control: dict) -> Publisher:
        return Publisher(self.client(self.principal(name, access_control)))

    def watcher(self, *topics: str, name: str = OBSERVER) -> Watcher:
        return Watcher(self.client(self.principal(name, subscribe_policy(name, *topics))), *topics)

    # ------------------------------------------------------------ deployments (greengrass-cli)
    def deploy(self, build_dir: Path, components: dict[str, str], configuration: dict | None = None,
               failure_handling: str | None = None, wait: bool = True, timeout: float = 120.0) -> str:
        """``greengrass-cli deployment create --recipeDir --artifactDir --merge --update-config``;
        with ``wait`` it must reach SUCCEEDED."""
        cli = self.cli()
        resp = cli.create_local_deployment_async(
            root_component_versions_to_add=components, component_to_configuration=configuration,
            recipe_directory_path=str(Path(build_dir) / "recipes"),
            artifacts_directory_path=str(Path(build_dir) / "artifacts"),
            failure_handling_policy=failure_handling).result(CALL_TIMEOUT)
        if wait:
            status = self.wait_deployment(resp.deployment_id, timeout)
            assert status == "SUCCEEDED", f"deployment {status}: {self.deployment_reason(resp.deployment_id)}; " \
                                          f"{self.runtime.status()['components']}"
        return resp.deployment_id

    def deployment_status(self, deployment_id: str) -> str:
        with self.runtime._lock:
            return self.runtime.local_deployments[deployment_id]["status"]

    def deployment_reason(self, deployment_id: str) -> str | None:
        with self.runtime._lock:
            return self.runtime.local_deployments[deployment_id].get("reason")

    def wait_deployment(self, deployment_id: str, timeout: float = 120.0) -> str:
        """The deployment's final status as greengrass-cli ``deployment status`` reports it."""
        cli = self.cli()

        def final():
            st = cli.get_local_deployment_status_async(deployment_id=deployment_id).result(CALL_TIMEOUT)
            status = str(st.deployment.status)
            return status if status in ("SUCCEEDED", "FAILED") else None
        return wait_until(final, timeout, interval=0.2, message=f"deployment {deployment_id} finished")

    # ------------------------------------------------------------ components
    def component(self, name: str) -> dict:
        return self.runtime.status()["components"].get(name) or {}

    def log(self, name: str) -> list[dict]:
        return read_log(self.root / "logs" / f"{name}.log")

    def kill9(self, name: str) -> int:
        """``kill -9`` of the component's process group (sh -> exec python); returns the pid."""
        pid = self.component(name)["pid"]
        os.killpg(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 60.0) -> int:
        """The runtime restarted ``name`` after a crash: RUNNING in a new process; its pid."""
        wait_until(lambda: self.component(name).get("state") == "RUNNING"
                   and self.component(name).get("pid") not in (None, old_pid), timeout, interval=0.05,
                   message=f"{name} restarted by the runtime")
        return self.component(name)["pid"]

    # ------------------------------------------------------------ teardown
    def stop(self) -> None:
        for c in self.clients:
            try:
                c.close(executor_wait=False)
            except Exception:  # noqa: BLE001 - a dead connection is fine here
                pass
        self.serving.stop(timeout=90)  # and kills only what this nucleus started
