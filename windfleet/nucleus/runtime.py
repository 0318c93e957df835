"""The local nucleus of one gateway: lifecycle, IPC, the device's IoT Core connection.

:class:`DeviceRuntime` keeps a Greengrass-shaped root directory::

    root/
      ipc.socket                                         (Greengrass IPC, see .ipc)
      cli_ipc_info/user-<uid>                            (greengrass-cli's token and socket)
      packages/recipes/<Name>-<Version>.yaml            (with Digest/Algorithm as fetched)
      packages/artifacts/<Name>/<Version>/<file>
      packages/artifacts-unarchived/<Name>/<Version>/<zip stem>/...
      work/<Name>/                                       ({work:path}, the component's own)
      logs/<Name>.log                                    (the component's stdout + stderr)
      logs/greengrass.log                                (the runtime's JSON lines)
      config/runtime.json                                (deployed set + configuration, persisted)
      config/components/<Name>.json                      (each component's configuration, to read)
      status.json                                        (states, restarts, last deployment)

and does what the nucleus does with it: selects manifests, substitutes recipe
variables, merges configuration, runs Install / Startup / Run / Shutdown as
process groups in dependency order with the nucleus' environment (socket,
SVCUID, thing name, region), restarts an ERRORED component (a failed step, or
UpdateState ERRORED; three errors within ``error_window`` -> BROKEN), restarts
HARD dependents whose dependency stops running, serves IPC (:mod:`.ipc`,
:mod:`.operations`, :mod:`.authorization`), holds the one IoT Core connection
(:mod:`.iotcore`), and applies deployments (:mod:`.deployments`).

Lifecycle runs on one thread: :meth:`DeviceRuntime.tick` advances every
component's state machine without blocking, and long waits (a deployment's
health gate) keep calling it, so crashed components are restarted meanwhile.
IPC requests arrive on connection threads and take the runtime lock only where
they change lifecycle state.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from windfleet import jsonlog, payloads, topics

from .authorization import Authorizer
from .ipc import CLI_CLIENT, IpcServer
from .iotcore import DEFAULT_KEEPALIVE_S, DEFAULT_SPOOL_BYTES, IotCoreConnection
from .atomic import write_json_atomic
from .deployments import GOOD_STATES, NUCLEUS, DeploymentAborted, Deployments
from .operations import IpcOperations
from . import tes as token_exchange
from .recipe import (
    Context, RecipeError, default_configuration, dependencies, device_platform, merge_configuration,
    select_manifest, topological_order, verify_digest, version_satisfies,
)

# Another nucleus' IPC variables (this runtime started from a component) never leak into ours.
_STRIP_ENV = ("SVCUID", "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH",
              "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
_SUDO_DELETES = ("PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LD_PRELOAD")
# A component that depends on the token exchange service gets its credentials from there only,
# as on a device (the nucleus' service account holds no AWS keys): never from this shell's.
_AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
GGC_VERSION = "2.14.0"   # the nucleus version whose behaviour this runtime copies
_MAX_SOCKET_PATH = 100   # sun_path holds 108 bytes


@dataclass
class Settings:
    """Runtime knobs (Greengrass defaults where it has one)."""

    install_timeout: float = 120.0     # a step's Timeout overrides it
    startup_timeout: float = 120.0
    shutdown_timeout: float = 15.0
    stop_grace: float = 10.0           # SIGTERM -> SIGKILL
    restart_backoff: float = 1.0       # before restarting an ERRORED component
    broken_after: int = 3              # errors within error_window -> BROKEN
    error_window: float = 3600.0
    poll_interval: float = 2.0         # deployment source polling
    deployment_timeout: float = 900.0  # a whole deployment, install included
    health_timeout: float = 120.0      # components RUNNING after a deployment
    stable_seconds: float = 0.0        # ... and staying so for this long (the nucleus: 0)
    update_timeout: float = 60.0       # NOTIFY_COMPONENTS default timeoutInSeconds
    rollback_timeout: float = 300.0


@dataclass
class Component:
    """One deployed component version and its process state."""

    name: str
    version: str
    recipe: dict
    lifecycle: dict
    deps: dict[str, str]
    env: dict[str, str]
    work: Path
    log_path: Path
    state: str = "NEW"
    phase: str | None = None            # install | startup | run
    proc: subprocess.Popen | None = None
    pgids: set = field(default_factory=set)
    step_deadline: float | None = None
    not_before: float = 0.0
    errors: collections.deque = field(default_factory=collections.deque)
    restarts: int = 0
    reason: str | None = None
    started_at: float = 0.0             # wall clock of the current process start
    good_since: float | None = None     # monotonic time it last became RUNNING/FINISHED
    reported: dict = field(default_factory=dict)
    verify: Callable[[], str | None] | None = None
    pending_error: str | None = None    # UpdateState(ERRORED) / RestartComponent, handled by the next tick
    stop_requested: bool = False        # StopComponent

    def signature(self) -> str:
        """What, if changed, means the process must restart (as the nucleus compares
        the interpolated lifecycle)."""
        return json.dumps([self.version, self.lifecycle], sort_keys=True)

    def status(self) -> dict:
        out = {"version": self.version, "state": self.state, "restarts": self.restarts,
               "errors": len(self.errors), "pid": self.proc.pid if self.proc else None,
               "pgids": sorted(self.pgids)}
        if self.reason:
            out["reason"] = self.reason
        for key in ("model_version", "counters"):
            if key in self.reported:
                out[key] = self.reported[key]
        if self.reported.get("state"):
            out["reported_state"] = self.reported["state"]
            if self.reported.get("reason"):
                out["reported_reason"] = self.reported["reason"]
        return out


class DeviceRuntime(Deployments, IpcOperations):
    """The nucleus of one gateway.

    :param thing: the core device's thing name (``{iot:thingName}``).
    :param root: its root directory (``{kernel:rootPath}``).
    :param source: a deployment source (see :mod:`.sources`), or None.
    :param broker: ``host:port`` of the MQTT broker standing in for IoT Core (``cloud_broker``
        overrides it); the nucleus holds the device's one connection to it, with ``broker_user`` /
        ``broker_password`` (the device's account).  Neither: the device runs offline.
    """

    def __init__(self, thing: str, root: str | Path, source: Any = None, *, broker: str | None = None,
                 broker_user: str | None = None, broker_password: str | None = None,
                 cloud_broker: str | None = None, thing_groups: list[str] | None = None,
                 settings: Settings | None = None, platform: dict | None = None,
                 extra_env: dict[str, str] | None = None, credentials_home: str | Path | None = None):
        topics.validate_thing(thing)  # ValueError before anything is created under root
        for name in thing_groups or []:
            topics.validate_thing(name, "thing group")
        self.thing, self.root, self.source = thing, Path(root).resolve(), source
        self.broker, self.broker_user, self.broker_password = broker, broker_user, broker_password
        self.cloud_broker = cloud_broker
        self.thing_groups = thing_groups or []
        self.settings = settings or Settings()
        self.platform = platform or device_platform()
        self.extra_env = extra_env or {}
        # the token exchange service (.tes), started for the first component that depends on it
        self.credentials_home = credentials_home
        self.tes: token_exchange.TokenExchangeServer | None = None
        self.components: dict[str, Component] = {}
        self.restart_counts: collections.Counter = collections.Counter()  # across deployments
        self.configuration: dict[str, dict] = {}
        self.finished_deployments: dict[str, str] = {}
        self.last_deployment: dict | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.iot: IotCoreConnection | None = None
        self.authorizer = Authorizer(thing, interpolate=False)
        self.ipc = IpcServer(self._socket_path(), self)
        self.svcuids: dict[str, str] = {}
        self.config_watchers: list[tuple] = []
        self.config_modified: dict[str, float] = {}
        self.update_watchers: dict[str, Any] = {}
        self.pending_update: dict | None = None
        self.local_deployments: dict[str, dict] = {}
        self.local_queue: collections.deque = collections.deque()
        self._last_status = ""
        for sub in ("packages/recipes", "packages/artifacts", "packages/artifacts-unarchived", "work", "logs",
                    "config/components"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.log = logging.getLogger(f"windfleet.nucleus.{thing}")
        for old in [h for h in self.log.handlers if isinstance(h, logging.FileHandler)]:
            self.log.removeHandler(old)  # an earlier runtime of this thing in this process
            old.close()
        self._log_handler = logging.FileHandler(self.root / "logs" / "greengrass.log")
        self._log_handler.setFormatter(jsonlog.JsonFormatter())
        self.log.addHandler(self._log_handler)
        self.log.setLevel(logging.INFO)
        self._load_state()

    def _socket_path(self) -> Path:
        """``<root>/ipc.socket``, or a short path it links to when the root is too deep for sun_path."""
        path = self.root / "ipc.socket"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        import hashlib
        short = Path("/tmp") / f"wf-ipc-{hashlib.sha256(str(self.root).encode()).hexdigest()[:12]}" / "ipc.socket"
        return short

    def _nucleus_option(self, key: str, default: Any = None) -> Any:
        return (self.configuration.get(NUCLEUS) or {}).get(key, default)

    # ================================================================ persistence
    @property
    def state_path(self) -> Path:
        return self.root / "config" / "runtime.json"

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    def config_path(self, name: str) -> Path:
        return self.root / "config" / "components" / f"{name}.json"

    def _load_state(self) -> None:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            state = {}
        self._persisted_set: dict[str, str] = state.get("components", {})
        self.configuration = state.get("configuration", {})
        self.finished_deployments = state.get("deployments", {})
        self.last_deployment = state.get("last_deployment")
        # per deployment group (``thinggroup/<name>``, ``thing/<name>``, ``LOCAL_DEPLOYMENT``) the root
        # components of its latest deployment, as the nucleus' GroupToRootComponents (see .deployments)
        self.group_roots: dict[str, dict[str, str]] = state.get("groups", {})

    def _save_state(self) -> None:
        write_json_atomic(self.state_path, {
            "components": {n: c.version for n, c in self.components.items()},
            "configuration": self.configuration, "deployments": self.finished_deployments,
            "last_deployment": self.last_deployment, "groups": self.group_roots,
        })

    def _event(self, msg: str, level: int = logging.INFO, **fields: Any) -> None:
        jsonlog.event(self.log, msg, level, thing=self.thing, **fields)

    # ================================================================ packages
    def artifacts_path(self, name: str, version: str) -> Path:
        return self.root / "packages" / "artifacts" / name / version

    def decompressed_path(self, name: str, version: str) -> Path:
        return self.root / "packages" / "artifacts-unarchived" / name / version

    def recipe_path(self, name: str, version: str) -> Path:
        return self.root / "packages" / "recipes" / f"{name}-{version}.yaml"

    def _stored_recipe(self, name: str, version: str) -> dict | None:
        path = self.recipe_path(name, version)
        return yaml.safe_load(path.read_text()) if path.is_file() else None

    def _verify_artifacts(self, recipe: dict, manifest: dict) -> str | None:
        """None when every artifact of the manifest is present and matches its digest."""
        name, version = recipe["ComponentName"], str(recipe["ComponentVersion"])
        for artifact in manifest.get("Artifacts") or []:
            file = self.artifacts_path(name, version) / artifact["Uri"].rsplit("/", 1)[-1]
            if not file.is_file():
                return f"artifact {file.name} missing"
            digest = artifact.get("Digest")
            if digest and not verify_digest(file, digest, artifact.get("Algorithm", "SHA-256")):
                return f"artifact {file.name} does not match its digest"
        return None

    def _download(self, name: str, version: str, source: Any = None) -> dict:
        """Fetch a component version into packages/ and verify it (idempotent)."""
        source = source if source is not None else self.source
        recipe = self._stored_recipe(name, version)
        if recipe is not None:
            problem = self._verify_artifacts(recipe, select_manifest(recipe, self.platform))
            if problem is None:
                return recipe
        if source is None:
            raise RecipeError(f"{name}-{version} is not on this device and there is no deployment source")
        recipe, files = source.fetch_component(name, version)
        manifest = select_manifest(recipe, self.platform)
        art_dir = self.artifacts_path(name, version)
        art_dir.mkdir(parents=True, exist_ok=True)
        for artifact in manifest.get("Artifacts") or []:
            uri = artifact["Uri"]
            if uri not in files:
                raise RecipeError(f"{name}-{version}: the service returned no file for {uri}")
            dest = art_dir / uri.rsplit("/", 1)[-1]
            tmp = dest.with_name(dest.name + ".part")
            shutil.copyfile(files[uri], tmp)
            digest = artifact.get("Digest")
            if not digest:
                raise RecipeError(f"{name}-{version}: artifact {dest.name} has no Digest")
            if not verify_digest(tmp, digest, artifact.get("Algorithm", "SHA-256")):
                tmp.unlink()
                raise RecipeError(f"{name}-{version}: artifact {dest.name} does not match its digest")
            perm = artifact.get("Permission") or {}
            mode = 0o644 if str(perm.get("Read", "OWNER")).upper() == "ALL" else 0o600
            if str(perm.get("Execute", "NONE")).upper() == "ALL":
                mode |= 0o111
            elif str(perm.get("Execute", "NONE")).upper() == "OWNER":
                mode |= 0o100
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
            if str(artifact.get("Unarchive", "NONE")).upper() == "ZIP":
                target = self.decompressed_path(name, version) / dest.stem
                if target.exists():
                    shutil.rmtree(target)
                try:
                    with zipfile.ZipFile(dest) as zf:
                        zf.extractall(target)
                except zipfile.BadZipFile as exc:
                    raise RecipeError(f"{name}-{version}: {dest.name}: {exc}") from None
        self.recipe_path(name, version).write_text(yaml.safe_dump(recipe, sort_keys=False, width=1000))
        return recipe

    # ================================================================ resolution
    def _resolve(self, versions: dict[str, str], recipes: dict[str, dict], configs: dict[str, dict],
                 name: str) -> Component:
        recipe = recipes[name]
        version = versions[name]
        manifest = select_manifest(recipe, self.platform)
        deps = dependencies(recipe)
        ctx = Context(
            name, self.thing, self.root,
            artifacts_path=lambda n: self.artifacts_path(n, versions[n]),
            decompressed_path=lambda n: self.decompressed_path(n, versions[n]),
            work_path=lambda n: self.root / "work" / n,
            configuration=lambda n: configs.get(n, {}),
            direct_dependencies=[d for d in deps if d in versions],
        )
        lifecycle = ctx.interpolate_tree(copy.deepcopy(manifest.get("Lifecycle") or {}))
        if ctx.unresolved:
            self._event("recipe variables left unresolved", logging.WARNING, component=name,
                        variables=sorted(set(ctx.unresolved)))
        work = self.root / "work" / name
        svcuid = self.svcuids.get(name) or self.ipc.issue_token(name)
        self.svcuids[name] = svcuid
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        # What the nucleus sets for every lifecycle step (developer guide, "Component environment variables").
        env = {
            "AWS_IOT_THING_NAME": self.thing, "AWS_REGION": region, "AWS_DEFAULT_REGION": region,
            "GGC_VERSION": GGC_VERSION, "SVCUID": svcuid,
            "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": str(self.ipc.path),
            "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH": str(self.ipc.path),
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": svcuid,
            # python3 in a recipe means this runtime's interpreter (the project's venv locally).
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        if token_exchange.COMPONENT in deps:
            env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = self._tes_uri()
        env.update(self.extra_env)
        setenv = lifecycle.get("Setenv") or lifecycle.get("setenv") or {}
        if isinstance(setenv, dict):
            env.update({k: str(v) for k, v in setenv.items()})
        component = Component(name, version, recipe, lifecycle, deps, env, work,
                              self.root / "logs" / f"{name}.log")
        component.verify = lambda r=recipe, m=manifest: self._verify_artifacts(r, m)
        return component

    def _tes_uri(self) -> str:
        """The token exchange service's URI (``aws.greengrass.TokenExchangeService`` is built in:
        served by this runtime, as the real one is by the nucleus)."""
        if self.tes is None:
            from .authorization import TES_OPERATION, TOKEN_EXCHANGE

            self.tes = token_exchange.TokenExchangeServer(
                token_exchange.CredentialAuthority(self.credentials_home),
                principal_of=lambda token: next((n for n, t in self.svcuids.items() if t == token), None),
                authorized=lambda name: self.authorizer.is_authorized(name, TOKEN_EXCHANGE, TES_OPERATION, None),
            ).start()
            self._event("token exchange service started", uri=self.tes.uri)
        return self.tes.uri

    # ================================================================ processes
    def _step(self, component: Component, key: str) -> tuple[str, float | None, dict] | None:
        """(script, timeout, extra env) of a lifecycle step, or None if absent/skipped."""
        step = next((v for k, v in component.lifecycle.items() if k.lower() == key.lower()), None)
        if step is None:
            return None
        if isinstance(step, str):
            return step, None, {}
        skip = str(step.get("SkipIf") or step.get("Skipif") or "").strip()
        if skip:
            kind, _, arg = skip.partition(" ")
            arg = arg.strip()
            if (kind.lower() == "onpath" and shutil.which(arg)) or (kind.lower() == "exists" and Path(arg).exists()):
                return None
        timeout = step.get("Timeout")
        setenv = step.get("Setenv") or {}
        return str(step.get("Script", "")), float(timeout) if timeout is not None else None, \
            {k: str(v) for k, v in setenv.items()}

    def _launch(self, component: Component, script: str, env_extra: dict) -> subprocess.Popen:
        component.work.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
        env.update(component.env)
        env.update(env_extra)
        # The nucleus runs each step through `sudo -E -u <user>`, and sudo deletes these even
        # with -E (sudoers env_delete; nucleus UnixPlatform.SudoDecorator): a recipe that relies
        # on Setenv PYTHONPATH works here only if it works on a device.
        for name in _SUDO_DELETES:
            env.pop(name, None)
        if token_exchange.COMPONENT in component.deps:
            for name in _AWS_KEYS:
                env.pop(name, None)
        with open(component.log_path, "ab") as log:
            proc = subprocess.Popen(["sh", "-c", script], cwd=component.work, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        component.pgids.add(proc.pid)
        return proc

    @staticmethod
    def _signal_groups(component: Component, sig: int) -> None:
        for pgid in list(component.pgids):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                component.pgids.discard(pgid)
            except PermissionError:
                component.pgids.discard(pgid)

    @staticmethod
    def _alive(component: Component) -> bool:
        if component.proc is not None and component.proc.poll() is None:
            return True
        for pgid in list(component.pgids):
            try:
                os.killpg(pgid, 0)
                return True
            except OSError:
                component.pgids.discard(pgid)
        return False

    def _kill(self, component: Component) -> None:
        self._signal_groups(component, signal.SIGKILL)
        if component.proc is not None:
            try:
                component.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        component.proc, component.phase, component.step_deadline = None, None, None
        component.pgids.clear()

    def _error(self, component: Component, reason: str) -> None:
        now = time.monotonic()
        was_install = component.phase == "install"
        self._kill(component)
        component.errors.append(now)
        while component.errors and now - component.errors[0] > self.settings.error_window:
            component.errors.popleft()
        component.reason, component.good_since = reason, None
        if len(component.errors) >= self.settings.broken_after:
            component.state = "BROKEN"
            self._event("component broken", logging.ERROR, component=component.name, reason=reason,
                        errors=len(component.errors))
            return
        component.state = "ERRORED"
        self._event("component errored; restarting", logging.WARNING, component=component.name, reason=reason,
                    errors=len(component.errors))
        component.restarts += 1
        self.restart_counts[component.name] += 1
        component.state = "NEW" if was_install else "INSTALLED"
        component.not_before = now + self.settings.restart_backoff

    @staticmethod
    def _last_words(component: Component, limit: int = 300) -> str:
        """``": <last line the step printed>"``, so a deployment's failure reason says why."""
        try:
            with open(component.log_path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
                lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return f": {lines[-1][:limit]}" if lines else ""

    def _deps_ready(self, component: Component) -> bool:
        """HARD dependencies RUNNING or FINISHED; a SOFT one never makes it wait
        (nucleus GreengrassService.dependencyReady)."""
        for dep, kind in component.deps.items():
            other = self.components.get(dep)
            if kind == "HARD" and other is not None and other.state not in GOOD_STATES:
                return False
        return True

    def _hard_dependency_down(self, component: Component) -> str | None:
        """The HARD dependency whose state, while ``component`` is STARTING or RUNNING, makes the
        nucleus restart it (GreengrassService.createDependencyListener)."""
        if component.state not in ("STARTING", "RUNNING"):
            return None
        for dep, kind in component.deps.items():
            other = self.components.get(dep)
            if kind == "HARD" and other is not None and other.state not in GOOD_STATES + ("STOPPING",):
                return dep
        return None

    def _advance(self, component: Component) -> None:
        """One non-blocking step of a component's lifecycle state machine."""
        now = time.monotonic()
        s = self.settings
        if component.stop_requested:
            component.stop_requested = False
            self._stop_component(component)
            return
        if component.state in ("BROKEN", "FINISHED", "STOPPING"):
            return
        down = self._hard_dependency_down(component)
        if down is not None:
            self._event("restarting: a HARD dependency is not running", component=component.name, dependency=down)
            self._stop_component(component)
            component.state, component.good_since = "INSTALLED", None
            return
        if component.pending_error is not None:
            reason, component.pending_error = component.pending_error, None
            if component.state in ("STARTING", "RUNNING"):
                self._error(component, reason)
                return
        if component.proc is not None:
            rc = component.proc.poll()
            if component.step_deadline is not None and rc is None and now > component.step_deadline:
                self._error(component, f"{component.phase} timed out")
                return
            if rc is None:
                return
            phase, pid, component.proc = component.phase, component.proc.pid, None
            component.phase, component.step_deadline = None, None
            if phase == "install":
                component.pgids.discard(pid)
                if rc != 0:
                    component.phase = "install"
                    self._error(component, f"install exited with {rc}{self._last_words(component)}")
                    return
                component.state = "INSTALLED"
            elif phase == "startup":
                if rc != 0:
                    component.phase = "startup"
                    self._error(component, f"startup exited with {rc}{self._last_words(component)}")
                    return
                component.state, component.good_since = "RUNNING", now
                self._event("component running", component=component.name, version=component.version)
                return
            elif phase == "run":
                if rc == 0:
                    component.state, component.good_since = "FINISHED", now
                    self._signal_groups(component, signal.SIGKILL)  # nothing may outlive a finished Run
                    component.pgids.clear()
                    self._event("component finished", component=component.name)
                else:
                    self._error(component, f"run exited with {rc if rc > 0 else f'signal {-rc}'}"
                                           f"{self._last_words(component)}")
                return
        if now < component.not_before or not self._deps_ready(component):
            return
        if component.state == "NEW":
            if component.verify is not None:
                problem = component.verify()
                if problem:
                    component.state, component.reason = "BROKEN", problem
                    self._event("component broken", logging.ERROR, component=component.name, reason=problem)
                    return
                component.verify = None  # verified once per deployment / runtime start
            step = self._step(component, "Install")
            if step is None:
                component.state = "INSTALLED"
            else:
                script, timeout, env = step
                component.proc = self._launch(component, script, env)
                component.phase = "install"
                component.step_deadline = now + (timeout or s.install_timeout)
                return
        if component.state == "INSTALLED":
            component.reported = {}
            component.started_at = time.time()
            startup = self._step(component, "Startup")
            run = self._step(component, "Run")
            if startup is not None:
                script, timeout, env = startup
                component.proc = self._launch(component, script, env)
                component.phase, component.state = "startup", "STARTING"
                component.step_deadline = now + (timeout or s.startup_timeout)
            elif run is not None:
                script, timeout, env = run
                component.proc = self._launch(component, script, env)
                component.phase, component.state = "run", "RUNNING"
                component.good_since = now
                self._event("component running", component=component.name, version=component.version,
                            pid=component.proc.pid)
            else:
                component.state, component.good_since = "FINISHED", now

    def _stop_component(self, component: Component) -> None:
        """Shutdown step, then SIGTERM to every process group, SIGKILL after a grace."""
        if component.pgids or component.proc is not None:
            component.state = "STOPPING"
            shutdown = self._step(component, "Shutdown")
            if shutdown is not None:
                script, timeout, env = shutdown
                proc = self._launch(component, script, env)
                try:
                    proc.wait(timeout or self.settings.shutdown_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                component.pgids.discard(proc.pid)
            self._signal_groups(component, signal.SIGTERM)
            deadline = time.monotonic() + self.settings.stop_grace
            while time.monotonic() < deadline and self._alive(component):
                time.sleep(0.05)
        self._kill(component)
        component.state = "FINISHED" if component.state == "STOPPING" else component.state
        self._event("component stopped", component=component.name, version=component.version)

    def _stop_all(self, names: list[str]) -> None:
        order = topological_order({n: self.components[n].deps for n in self.components})
        for name in reversed(order):
            if name in names:
                self._stop_component(self.components[name])

    # ================================================================ health
    def _on_health(self, topic: str, data: bytes) -> None:  # an IPC connection's thread
        try:
            body = payloads.validate_health(payloads.decode(data))
        except payloads.MalformedPayload:
            return
        component = self.components.get(body["component"])  # no lock: see operations._config_of
        if component is None or body.get("ts", 0) < component.started_at - 1.0:
            return  # unknown, or from a previous process of it
        component.reported = {k: body[k] for k in ("state", "model_version", "reason", "counters", "ts")
                              if k in body}

    # ================================================================ requests from IPC
    def report_state(self, component: Component, state: str) -> None:
        """UpdateState: ERRORED from STARTING/RUNNING restarts the component (Lifecycle.reportState);
        a RUNNING report from RUNNING resets its error count."""
        if state == "ERRORED" and component.state in ("STARTING", "RUNNING"):
            component.pending_error = "reported ERRORED"
        elif state == "RUNNING" and component.state == "STARTING" and component.phase == "startup":
            pass  # Startup's exit code decides
        elif state == "RUNNING" and component.state == "RUNNING":
            component.errors.clear()

    def request_restart(self, name: str) -> bool:
        """RestartComponent: a BROKEN component stays BROKEN (only a deployment revives it)."""
        component = self.components[name]
        if component.state in ("BROKEN", "NEW"):
            return False
        self._kill(component)
        component.state, component.good_since = "INSTALLED", None
        component.not_before = 0.0
        self._event("component restart requested", component=name)
        return True

    def request_stop_component(self, name: str) -> None:
        self.components[name].stop_requested = True

    def _start_ipc(self) -> None:
        self.ipc.start()
        if self.ipc.path != self.root / "ipc.socket":
            link = self.root / "ipc.socket"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(self.ipc.path)
        # What greengrass-cli reads (aws-greengrass-cli CLIService.generateCliIpcInfoForClient).
        info = self.root / "cli_ipc_info"
        info.mkdir(exist_ok=True)
        write_json_atomic(info / f"user-{os.getuid()}", {
            "cli_auth_token": self.ipc.issue_token(CLI_CLIENT), "domain_socket_path": str(self.ipc.path)})
        os.chmod(info / f"user-{os.getuid()}", 0o600)
        self._unsubscribe_health = self.ipc.local_subscribe(topics.health(self.thing), self._on_health)
        if self.cloud_broker or self.broker:
            self.iot = IotCoreConnection(self.thing, self.cloud_broker or self.broker, self.broker_user,
                                         self.broker_password)
            self.apply_nucleus_options()
            self.iot.start()

    def apply_nucleus_options(self) -> None:
        """``aws.greengrass.Nucleus`` configuration ``mqtt.spooler`` and ``mqtt.keepAliveTimeoutMs``
        -> the IoT Core connection.
        ``storageType: Disk`` needs the aws.greengrass.DiskSpooler plugin, which this nucleus does
        not run: like the nucleus without the plugin, it keeps spooling in memory."""
        spooler = ((self._nucleus_option("mqtt") or {}).get("spooler") or {}) if isinstance(
            self._nucleus_option("mqtt"), dict) else {}
        if self.iot is None:
            return
        try:
            self.iot.max_bytes = int(spooler.get("maxSizeInBytes", DEFAULT_SPOOL_BYTES))
        except (TypeError, ValueError):
            self._event("ignoring mqtt.spooler.maxSizeInBytes", logging.WARNING, value=spooler.get("maxSizeInBytes"))
        self.iot.keep_qos0_when_offline = bool(spooler.get("keepQos0WhenOffline", False))
        # mqtt.keepAliveTimeoutMs: how soon a silently dead link (a partition) is noticed.
        keepalive_ms = (self._nucleus_option("mqtt") or {}).get("keepAliveTimeoutMs") if isinstance(
            self._nucleus_option("mqtt"), dict) else None
        try:
            self.iot.set_keepalive(DEFAULT_KEEPALIVE_S if keepalive_ms is None else round(int(keepalive_ms) / 1000))
        except (TypeError, ValueError):
            self._event("ignoring mqtt.keepAliveTimeoutMs", logging.WARNING, value=keepalive_ms)
        if str(spooler.get("storageType", "Memory")).lower() == "disk":
            self._event("mqtt.spooler.storageType Disk needs aws.greengrass.DiskSpooler; spooling in memory",
                        logging.WARNING)

    # ================================================================ loop
    def tick(self) -> None:
        """Advance every component once; write status.json when it changed."""
        with self._lock:
            order = topological_order({n: c.deps for n, c in self.components.items()})
            for name in order:
                self._advance(self.components[name])
            self._write_status()

    def status(self) -> dict:
        with self._lock:
            components = {n: {**c.status(), "restarts": self.restart_counts[n]} for n, c in self.components.items()}
            return {"thing": self.thing, "components": components, "deployment": self.last_deployment,
                    "restarts": sum(self.restart_counts.values()), "groups": self.group_roots}

    def _write_status(self) -> None:
        status = self.status()
        text = json.dumps(status, sort_keys=True, default=str)
        if text != self._last_status:
            self._last_status = text
            write_json_atomic(self.status_path, {**status, "ts": time.time()})

    def start(self) -> None:
        """Connect health, start the persisted component set (Install runs again: idempotent)."""
        self._start_ipc()
        if self.source is not None:
            try:
                self.source.register_core_device(self.thing, self.thing_groups)
            except Exception as exc:  # noqa: BLE001 - the service may come later
                self._event("cannot register with the deployment service", logging.WARNING, error=str(exc))
        if self._persisted_set:
            recipes = {}
            for name, version in self._persisted_set.items():
                recipe = self._stored_recipe(name, version)
                if recipe is None:
                    self._event("persisted component missing from packages", logging.ERROR, component=name)
                    continue
                recipes[name] = recipe
            versions = {n: self._persisted_set[n] for n in recipes}
            with self._lock:
                self.authorizer.interpolate = bool(self._nucleus_option("interpolateComponentConfiguration", False))
                for name in recipes:
                    self.authorizer.set_component(name, self.configuration.get(name))
                for name in topological_order({n: dependencies(r) for n, r in recipes.items()}):
                    self.components[name] = self._resolve(versions, recipes, self.configuration, name)
                    write_json_atomic(self.config_path(name), self.configuration.get(name, {}))
        self._event("runtime started", root=str(self.root), components=self._persisted_set)

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set (or :meth:`request_stop`): supervise, poll deployments."""
        stop = stop or self._stop
        self.start()
        next_poll = 0.0
        try:
            while not stop.is_set() and not self._stop.is_set():
                self.tick()
                if self.local_queue:
                    self.apply_local(self.local_queue.popleft(), stop)
                if self.source is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.settings.poll_interval
                    self.poll_once(stop)
                stop.wait(0.1)
        finally:
            self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        with self._lock:
            self._stop_all(list(self.components))
            self._write_status()
        self.ipc.close()
        if self.tes is not None:
            self.tes.close()
            self.tes = None
        if self.iot is not None:
            self.iot.close()
            self.iot = None
        self._event("runtime stopped")
        self.log.removeHandler(self._log_handler)
        self._log_handler.close()
