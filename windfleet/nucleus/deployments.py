"""Deployments on the local nucleus: prepare, switch, wait for health, roll back.

:class:`Deployments` is mixed into :class:`~.runtime.DeviceRuntime`.  It follows
the nucleus' ``DeploymentConfigMerger`` and ``DefaultActivator`` (developer guide,
"Deploy AWS IoT Greengrass components to devices" and "Update component
configurations"):

* everything is fetched and verified before anything running is touched;
* with ``componentUpdatePolicy`` NOTIFY_COMPONENTS (cloud deployments' default),
  components subscribed through SubscribeToComponentUpdates get a
  PreComponentUpdateEvent and may DeferComponentUpdate; the nucleus waits up to
  ``timeoutInSeconds`` for their replies, sleeps the longest ``recheckAfterMs``
  and asks again.  Local deployments never notify;
* a deployment succeeds when every component is RUNNING or FINISHED and fails
  only when one becomes BROKEN (ERRORED is a restart and more waiting);
* ``failureHandlingPolicy`` ROLLBACK restores the previous component set and
  configuration (cloud default); local deployments default to DO_NOTHING;
* after the update, with NOTIFY_COMPONENTS, subscribers get a PostComponentUpdateEvent;
* configuration of the ``aws.greengrass.Nucleus`` component in a deployment sets
  nucleus options (``interpolateComponentConfiguration``, ``mqtt.spooler``).

A device in several thing groups (``DefaultDeploymentTask``, ``DependencyResolver``,
``DeploymentService.persistGroupToRootComponents`` in aws-greengrass-nucleus, and the
developer guide's "Deploy components to devices": "If a core device is a member of multiple
thing groups, ... the core device runs the components from all deployments"):

* every deployment belongs to a group -- ``thinggroup/<name>`` or ``thing/<name>`` from its
  target, ``LOCAL_DEPLOYMENT`` for greengrass-cli -- and the device keeps, per group, the root
  components of that group's latest deployment (``GroupToRootComponents``, persisted);
* a deployment replaces its own group's roots only; the device runs the union with the roots
  of the other groups it still belongs to (a group the device left no longer counts; thing and
  local groups always do), so a component leaves only when no group still needs it;
* two groups that pin one component to different versions fail the deployment before
  anything changes ("version constraints conflict", as ``NoAvailableComponentVersionException``);
* the roots are recorded when the deployment succeeds, or fails without rollback.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any

from .atomic import write_json_atomic
from .recipe import RecipeError, default_configuration, dependencies, merge_configuration, select_manifest, \
    topological_order, version_satisfies

GOOD_STATES = ("RUNNING", "FINISHED")
FINAL_STATUSES = ("SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "REJECTED")
NUCLEUS = "aws.greengrass.Nucleus"
# Components the nucleus provides: a dependency on one needs no deployment of it.
BUILTIN = ("aws.greengrass.TokenExchangeService",)
LOCAL_GROUP = "LOCAL_DEPLOYMENT"  # DeploymentDocumentConverter.LOCAL_DEPLOYMENT_GROUP_NAME
THING_GROUP_PREFIX, THING_PREFIX = "thinggroup/", "thing/"


def deployment_group(deployment: dict) -> str:
    """The group a deployment's roots belong to: ``thinggroup/<name>``, ``thing/<name>`` or
    ``LOCAL_DEPLOYMENT`` (greengrass-cli and directory sources)."""
    target = str(deployment.get("targetArn") or "")
    for marker, prefix in ((":thinggroup/", THING_GROUP_PREFIX), (":thing/", THING_PREFIX)):
        if marker in target:
            return prefix + target.rsplit("/", 1)[1]
    return LOCAL_GROUP


class DeploymentAborted(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Deployments:
    """Deployment handling over the runtime's components (see the module docstring)."""

    # ================================================================ deployments
    def poll_once(self, stop: threading.Event | None = None) -> str | None:
        """Ask the source for a deployment and apply it; returns its final status."""
        try:
            deployment = self.source.next_deployment(self.thing)
        except Exception as exc:  # noqa: BLE001 - a down service must not stop the device
            self._event("deployment service unavailable", logging.WARNING, error=str(exc)[:200])
            return None
        if not deployment or deployment.get("deploymentId") in self.finished_deployments:
            return None
        return self.apply(deployment, stop)

    def _report(self, source: Any, deployment_id: str, status: str, reason: str | None = None) -> None:
        self.last_deployment = {"id": deployment_id, "status": status, "reason": reason, "ts": time.time()}
        if status in FINAL_STATUSES:
            self.finished_deployments[deployment_id] = status
        try:
            if source is not None and status in FINAL_STATUSES:
                # what now runs on the device (after a rollback: the old set)
                with self._lock:
                    running = {n: {"componentVersion": c.version, "lifecycleState": c.state}
                               for n, c in self.components.items()}
                source.report_device_status(self.thing, deployment_id, status, reason=reason, components=running)
            elif source is not None:
                source.report_device_status(self.thing, deployment_id, status, reason=reason)
        except Exception as exc:  # noqa: BLE001
            self._event("cannot report deployment status", logging.WARNING, error=str(exc)[:200])
        self._event("deployment status", deployment=deployment_id, status=status, reason=reason)

    def _canceled(self, source: Any, deployment_id: str) -> bool:
        getter = getattr(source, "get_deployment", None)
        if getter is None:
            return False
        try:
            return getter(deploymentId=deployment_id).get("deploymentStatus") == "CANCELED"
        except Exception:  # noqa: BLE001
            return False

    def apply(self, deployment: dict, stop: threading.Event | None = None, source: Any = None,
              local: bool = False) -> str:
        """Apply one deployment; returns its Greengrass status (also reported to ``source``).

        ``local`` is a greengrass-cli deployment: no component-update notifications,
        DO_NOTHING unless the request says ROLLBACK.
        """
        dep_id = deployment["deploymentId"]
        source = source if source is not None else self.source  # report to where it came from
        if deployment.get("deploymentStatus") == "CANCELED":
            self._report(source, dep_id, "CANCELED", "canceled before it was applied")
            return "CANCELED"
        policies = deployment.get("deploymentPolicies") or {}
        default_policy = "DO_NOTHING" if local else "ROLLBACK"
        rollback = (policies.get("failureHandlingPolicy") or default_policy).upper() == "ROLLBACK"
        update_policy = policies.get("componentUpdatePolicy") or {}
        notify = not local and (update_policy.get("action") or "NOTIFY_COMPONENTS") == "NOTIFY_COMPONENTS"
        deadline = time.monotonic() + self.settings.deployment_timeout
        self._report(source, dep_id, "IN_PROGRESS")
        with self._lock:
            previous = ({n: c.version for n, c in self.components.items()}, copy.deepcopy(self.configuration))
        try:
            versions, recipes, configs, roots = self._prepare(deployment, source)
        except Exception as exc:  # noqa: BLE001 - any problem here fails the deployment, not the device
            reason = str(exc) if isinstance(exc, RecipeError) else f"{type(exc).__name__}: {exc}"
            self._report(source, dep_id, "FAILED", reason)  # nothing was changed on the device
            return "FAILED"
        try:
            if notify:
                self._notify_pre_update(dep_id, float(update_policy.get("timeoutInSeconds")
                                                      or self.settings.update_timeout), stop)
            self._switch(versions, recipes, configs)
            self._gate(source, dep_id, versions, configs, deadline, stop)
        except DeploymentAborted as abort:
            status, reason = abort.status, abort.reason
            if status == "INTERRUPTED":
                # Not an outcome: the persisted set is still the previous one and the
                # deployment is applied again when the runtime next starts (as the nucleus resumes).
                self._event("deployment interrupted by shutdown", deployment=dep_id)
                return "IN_PROGRESS"
            if rollback or status == "CANCELED":
                reason = self._rollback(previous, reason)
            else:
                with self._lock:
                    self.group_roots = roots  # DO_NOTHING: the device keeps the new, failed set
                    self._save_state()
            self._report(source, dep_id, status, reason)
            if notify:
                self._notify_post_update(dep_id)
            return status
        with self._lock:
            self.group_roots = roots
        self._report(source, dep_id, "SUCCEEDED")
        with self._lock:
            self._save_state()
        if notify:
            self._notify_post_update(dep_id)
        return "SUCCEEDED"

    # ------------------------------------------------------------ component-update notifications
    def _notify_pre_update(self, dep_id: str, timeout: float, stop: threading.Event | None) -> None:
        """PreComponentUpdateEvent to every subscriber; wait for replies up to ``timeout``; honour
        the longest DeferComponentUpdate, then ask again (UpdateSystemPolicyService)."""
        while True:
            with self._lock:
                watchers = {n: list(s) for n, s in self.update_watchers.items()}
                if not watchers:
                    return
                self.pending_update = {"deploymentId": dep_id, "replies": {}}
            for streams in watchers.values():
                for stream in streams:
                    stream.send({"preUpdateEvent": {"deploymentId": dep_id, "isGgcRestarting": False}})
            start = time.monotonic()
            while time.monotonic() - start < timeout:
                with self._lock:
                    if set(self.pending_update["replies"]) >= set(watchers):
                        break
                if stop is not None and stop.is_set():
                    raise DeploymentAborted("INTERRUPTED", "the device runtime is stopping")
                self.tick()
                time.sleep(0.05)
            with self._lock:
                replies, self.pending_update = self.pending_update["replies"], None
            delay = max(replies.values(), default=0) / 1000.0
            if delay <= 0:
                return
            self._event("deployment deferred by a component", deployment=dep_id, seconds=delay)
            wake = start + delay
            while time.monotonic() < wake:
                if stop is not None and stop.is_set():
                    raise DeploymentAborted("INTERRUPTED", "the device runtime is stopping")
                self.tick()
                time.sleep(0.05)

    def _notify_post_update(self, dep_id: str) -> None:
        with self._lock:
            watchers = [s for streams in self.update_watchers.values() for s in streams]
        for stream in watchers:
            stream.send({"postUpdateEvent": {"deploymentId": dep_id}})

    # ------------------------------------------------------------ local deployments (greengrass-cli)
    def apply_local(self, deployment_id: str, stop: threading.Event | None = None) -> str:
        """Apply a CreateLocalDeployment request: the running set plus/minus its root components."""
        from .sources import DirectorySource, configuration_update

        with self._lock:
            record = self.local_deployments[deployment_id]
            record["status"] = "IN_PROGRESS"
            # the local group's roots at their running versions (DeploymentService: LOCAL_DEPLOYMENT);
            # a device without recorded groups (state from before groups were kept) counts its whole set
            local_roots = self.group_roots.get(LOCAL_GROUP, {}) if self.group_roots else self.components
            current = {n: self.components[n].version for n in local_roots if n in self.components}
        request = record["request"]
        add = dict(request.get("rootComponentVersionsToAdd") or {})
        remove = set(request.get("rootComponentsToRemove") or [])
        configuration = request.get("componentToConfiguration") or {}
        try:
            source = DirectorySource(request.get("recipeDirectoryPath") or self.root / "packages" / "recipes",
                                     request.get("artifactsDirectoryPath") or self.root / "packages" / "artifacts",
                                     add, configuration)
        except RecipeError as exc:
            with self._lock:
                record.update(status="FAILED", reason=str(exc))
            return "FAILED"
        wanted = {n: v for n, v in {**current, **add}.items() if n not in remove}
        components: dict[str, dict] = {}
        for name, version in wanted.items():
            components[name] = {"componentVersion": version}
            if configuration.get(name):
                components[name]["configurationUpdate"] = configuration_update(configuration[name])
        for name in set(configuration) - set(wanted):  # e.g. aws.greengrass.Nucleus options
            components[name] = {"configurationUpdate": configuration_update(configuration[name])}
        document = {"deploymentId": deployment_id, "components": components,
                    "deploymentPolicies": {"failureHandlingPolicy": record["failureHandlingPolicy"]}}
        status = self.apply(document, stop, source=source, local=True)
        with self._lock:
            record["status"] = "SUCCEEDED" if status == "SUCCEEDED" else ("IN_PROGRESS" if status == "IN_PROGRESS"
                                                                          else "FAILED")
            if status not in ("SUCCEEDED", "IN_PROGRESS"):
                record["reason"] = (self.last_deployment or {}).get("reason")
                record["detailed"] = ("FAILED_ROLLBACK_COMPLETE" if record["failureHandlingPolicy"] == "ROLLBACK"
                                      else "FAILED_ROLLBACK_NOT_REQUESTED")
        return status

    def _membership(self, source: Any) -> set[str] | None:
        """``thinggroup/<name>`` of every group the device belongs to now (ListThingGroupsForCoreDevice),
        or None when the source cannot say (the nucleus then keeps its persisted groups)."""
        lister = getattr(source, "list_thing_groups_for_core_device", None)
        if lister is None:
            return None
        try:
            groups = lister(coreDeviceThingName=self.thing).get("thingGroups", [])
        except Exception as exc:  # noqa: BLE001 - as the nucleus: fall back to what it knew
            self._event("cannot list thing groups", logging.WARNING, error=str(exc)[:200])
            return None
        return {THING_GROUP_PREFIX + g["thingGroupName"] for g in groups}

    def _group_versions(self, deployment: dict, own: dict[str, str], source: Any
                        ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """The union of ``own`` (this deployment's roots) with the other groups' roots, and the
        roots to record; RecipeError when two groups pin one component to different versions."""
        group = deployment_group(deployment)
        members = self._membership(source)
        roots = {g: dict(r) for g, r in self.group_roots.items()
                 if g != group and (members is None or g in members or not g.startswith(THING_GROUP_PREFIX))}
        roots[group] = dict(own)
        versions: dict[str, str] = {}
        wanted: dict[str, dict[str, str]] = {}
        for g, components in roots.items():
            for name, version in components.items():
                wanted.setdefault(name, {})[g] = version
        for name, by_group in sorted(wanted.items()):
            if len(set(by_group.values())) > 1:
                raise RecipeError(
                    f"No version of {name} satisfies every group: the version constraints conflict, revise "
                    f"deployments to resolve the conflict. Component {name} version constraints: "
                    + ", ".join(f"{g} requires ={v}" for g, v in sorted(by_group.items())) + ".")
            versions[name] = next(iter(by_group.values()))
        return versions, roots

    def _prepare(self, deployment: dict, source: Any = None
                 ) -> tuple[dict[str, str], dict[str, dict], dict[str, dict], dict[str, dict[str, str]]]:
        """Fetch and verify everything, merge configuration: nothing running is touched.

        Returns the versions to run (every group's roots), their recipes and configuration,
        and the group roots to record once the deployment is through."""
        specs = dict(deployment.get("components") or {})
        configs = {}
        nucleus = specs.pop(NUCLEUS, None)
        if nucleus is not None:  # nucleus options only: this runtime is the nucleus
            configs[NUCLEUS] = merge_configuration({}, self.configuration.get(NUCLEUS),
                                                   nucleus.get("configurationUpdate"))
        elif NUCLEUS in self.configuration:
            configs[NUCLEUS] = copy.deepcopy(self.configuration[NUCLEUS])
        own = {name: str(spec["componentVersion"]) for name, spec in specs.items() if "componentVersion" in spec}
        specs = {name: specs[name] for name in own}
        if self.group_roots or not self.components:
            versions, roots = self._group_versions(deployment, own, source)
        else:  # state from before groups were recorded: this deployment defines the set, as it did
            versions, roots = dict(own), {deployment_group(deployment): dict(own)}
        recipes = {name: (self._download(name, version, source) if name in own
                          else self._stored_recipe(name, version) or self._download(name, version, source))
                   for name, version in versions.items()}
        for name, recipe in recipes.items():
            select_manifest(recipe, self.platform)
            for dep, _kind in dependencies(recipe).items():
                requirement = (recipe.get("ComponentDependencies") or {})[dep].get("VersionRequirement")
                if dep in BUILTIN and dep not in versions:
                    continue  # served by the nucleus itself (see .tes)
                if dep not in versions:
                    raise RecipeError(f"{name} depends on {dep}, which the deployment does not contain")
                if not version_satisfies(versions[dep], requirement):
                    raise RecipeError(f"{name} needs {dep} {requirement}, deployment has {versions[dep]}")
        topological_order({n: dependencies(r) for n, r in recipes.items()})
        for name, recipe in recipes.items():
            update = specs[name].get("configurationUpdate") if name in specs else None
            configs[name] = merge_configuration(default_configuration(recipe), self.configuration.get(name), update)
        return versions, recipes, configs, roots

    def _switch(self, versions: dict[str, str], recipes: dict[str, dict], configs: dict[str, dict]) -> None:
        """Make the running set ``versions``: stop what goes or changes, start what is new."""
        with self._lock:
            old_configs, self.configuration = self.configuration, configs
            self.authorizer.interpolate = bool(self._nucleus_option("interpolateComponentConfiguration", False))
            self.apply_nucleus_options()
            for name in versions:
                self.authorizer.set_component(name, configs.get(name))
            new = {n: self._resolve(versions, recipes, configs, n) for n in versions}
            changed = {n for n, c in new.items()
                       if n not in self.components or self.components[n].signature() != c.signature()
                       or self.components[n].state == "BROKEN"}
            # HARD dependents restart with their dependency (transitively).
            grew = True
            while grew:
                grew = False
                for n, c in new.items():
                    if n not in changed and any(d in changed and k == "HARD" for d, k in c.deps.items()):
                        changed.add(n)
                        grew = True
            removed = [n for n in self.components if n not in new]
            self._stop_all(removed + [n for n in changed if n in self.components])
            for name in versions:
                write_json_atomic(self.config_path(name), configs[name])
            for name in removed:
                del self.components[name]
                self.authorizer.remove_component(name)
                self.ipc.revoke(name)
                self.svcuids.pop(name, None)
            for name in changed:
                self.components[name] = new[name]
            self._event("deployment switching", start=sorted(changed), stop=sorted(removed), versions=versions)
        for name in versions:
            paths = _changed_paths(old_configs.get(name) or {}, configs.get(name) or {})
            if paths:
                self._config_changed(name, paths)

    def _gate(self, source: Any, dep_id: str, versions: dict[str, str], configs: dict[str, dict], deadline: float,
              stop: threading.Event | None) -> None:
        """Wait until every component is RUNNING or FINISHED (for ``stable_seconds``); raise
        DeploymentAborted(FAILED when one is BROKEN | TIMED_OUT | CANCELED) otherwise."""
        s = self.settings
        start = time.monotonic()
        gate_deadline = min(deadline, start + s.health_timeout)
        next_cancel_check = 0.0
        while True:
            self.tick()
            now = time.monotonic()
            if stop is not None and stop.is_set():
                raise DeploymentAborted("INTERRUPTED", "the device runtime is stopping")
            if now >= next_cancel_check:
                next_cancel_check = now + 0.5
                if self._canceled(source, dep_id):
                    raise DeploymentAborted("CANCELED", "deployment canceled")
            waiting = []
            with self._lock:
                for name in versions:
                    c = self.components[name]
                    if c.state == "BROKEN":
                        raise DeploymentAborted("FAILED", f"{name} is BROKEN: {c.reason}")
                    if c.state not in GOOD_STATES or c.good_since is None or now - c.good_since < s.stable_seconds:
                        waiting.append(f"{name} is {c.state}")
            if not waiting:
                return
            if now >= gate_deadline:
                raise DeploymentAborted("TIMED_OUT", "health gate timed out: " + "; ".join(waiting))
            time.sleep(0.1)

    def _rollback(self, previous: tuple[dict[str, str], dict[str, dict]], reason: str) -> str:
        versions, configs = previous
        self._event("rolling back", logging.WARNING, reason=reason, to=versions)
        try:
            recipes = {n: self._stored_recipe(n, v) for n, v in versions.items()}
            missing = [n for n, r in recipes.items() if r is None]
            if missing:
                raise RecipeError(f"previous recipes missing: {missing}")
            self._switch(versions, recipes, configs)
            deadline = time.monotonic() + self.settings.rollback_timeout
            while time.monotonic() < deadline:
                self.tick()
                with self._lock:
                    states = {n: self.components[n].state for n in versions}
                if all(st in GOOD_STATES or st == "BROKEN" for st in states.values()):
                    break
                time.sleep(0.1)
            with self._lock:
                self._save_state()
            return f"{reason}; rolled back"
        except (RecipeError, OSError) as exc:
            return f"{reason}; rollback failed: {exc}"


def _changed_paths(old: Any, new: Any, prefix: list[str] | None = None) -> list[list[str]]:
    """Key paths of the leaves that differ (what ConfigurationUpdateEvents name)."""
    prefix = prefix or []
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[list[str]] = []
        for key in sorted(set(old) | set(new)):
            out += _changed_paths(old.get(key), new.get(key), prefix + [key])
        return out
    return [] if old == new else [prefix]
