"""Greengrass v2 deployments: model versions, the suite, and publishing components.

``deploy_model(backend, package_version, files)`` is what an approval does:

1. upload ``model.onnx`` + ``model.json`` to ``s3://<bucket>/com.windfleet.AnomalyModel/1.0.N/``;
2. create component version ``1.0.N`` from an inline recipe (artifact-only,
   ``Permission: Read: ALL`` so the detector can read it; the service fills the
   digests); an existing version (``ConflictException``) is reused;
3. poll ``describe_component`` until DEPLOYABLE (bounded, :mod:`.settings`);
4. read the thing group's latest deployment (``list_deployments(targetArn,
   historyFilter='LATEST_ONLY')`` + ``get_deployment``) and create a new one
   with that component set plus this one model version -- a new deployment
   REPLACES the target's set, so nothing else may be dropped.  Without a
   deployment yet, it is the group's first: the whole published suite.  If the
   latest deployment already carries this model version (a duplicate approval
   event) nothing is created.

Policies (rollback, update notification, rollout, abort, timeouts) come from
:mod:`.settings`.  ``deploy_suite`` is ``windfleet deploy``; ``publish`` is
``windfleet publish`` (``gdk component publish`` for every component of a
``windfleet build`` output).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any, Callable

import tenacity
from botocore.exceptions import ClientError

from windfleet import jsonlog, payloads
from windfleet.model_contract import CARD_FILE, MODEL_FILE

from . import settings
from .backends import Backend

log = logging.getLogger("windfleet.cloud.deployer")

PENDING_STATES = ("REQUESTED", "INITIATED")


class DeployError(Exception):
    """A deployment step that cannot succeed (component FAILED, nothing to deploy, ...)."""


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


# ---------------------------------------------------------------------------- components
def component_arn(backend: Backend, name: str, version: str | None = None, target_arn: str | None = None) -> str:
    """A component (version) ARN in the thing group's partition, region and account."""
    target_arn = target_arn or backend.thing_group_arn()
    _, partition, _, region, account, _ = target_arn.split(":", 5)
    arn = f"arn:{partition}:greengrass:{region}:{account}:components:{name}"
    return f"{arn}:versions:{version}" if version else arn


def model_recipe(version: str, uris: dict[str, str], card: dict | None = None,
                 package_arn: str | None = None, name: str = settings.MODEL_COMPONENT) -> dict:
    """The inline recipe of one ``com.windfleet.AnomalyModel`` version (artifact-only component);
    ``name`` ``settings.CANARY_COMPONENT`` gives the candidate the very same recipe under its own name."""
    card = card or {}
    return {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": name,
        "ComponentVersion": version,
        "ComponentType": "aws.greengrass.generic",
        "ComponentDescription": f"windfleet anomaly model {card.get('version', '?')} "
                                f"(onnx sha256 {str(card.get('onnx_sha256', '?'))[:12]})",
        "ComponentPublisher": settings.COMPONENT_PUBLISHER,
        "ComponentConfiguration": {"DefaultConfiguration": {
            "ModelVersion": str(card.get("version", "")),
            "OnnxSha256": str(card.get("onnx_sha256", "")),
            "ModelPackageArn": package_arn or "",
        }},
        # The same dependency and self-check as recipes/com.windfleet.AnomalyModel.yaml:
        # a model that fails its check goes BROKEN, so the deployment fails and rolls back.
        "ComponentDependencies": {settings.DETECTOR: {"VersionRequirement": ">=1.0.0", "DependencyType": "HARD"}},
        "Manifests": [{
            "Platform": {"os": "linux"},
            "Lifecycle": {
                "Setenv": {"PYTHONPATH": f"{{{settings.DETECTOR}:artifacts:decompressedPath}}/windfleet"},
                "Install": {"Timeout": 300, "Script": (
                    f'exec env PYTHONPATH="{{{settings.DETECTOR}:artifacts:decompressedPath}}/windfleet" '
                    f'"{{kernel:rootPath}}/work/{settings.DETECTOR}/venv/bin/python3" '
                    '-m windfleet.components.detector.check_model "{artifacts:path}"')},
            },
            "Artifacts": [{"Uri": uri, "Unarchive": "NONE", "Permission": {"Read": "ALL", "Execute": "NONE"}}
                          for uri in uris.values()],
        }],
    }


def upload(backend: Backend, name: str, version: str, files: dict[str, bytes]) -> dict[str, str]:
    """Put ``files`` under ``s3://<bucket>/<name>/<version>/``; returns ``{file name: uri}``."""
    prefix = settings.COMPONENT_PREFIX.format(name=name, version=version)
    uris = {}
    for filename, data in files.items():
        backend.s3.put_object(Bucket=backend.bucket, Key=prefix + filename, Body=data)
        uris[filename] = backend.s3_uri(prefix + filename)
    return uris


def create_component(backend: Backend, recipe: dict | bytes, *, fmt: str = "json") -> tuple[str, bool]:
    """``create_component_version``; returns ``(arn, created)`` -- an existing version is not an error."""
    gg = backend.greengrassv2
    if isinstance(recipe, dict):
        name, version = recipe["ComponentName"], recipe["ComponentVersion"]
        if fmt == "yaml":
            import yaml

            body = yaml.safe_dump(recipe, sort_keys=False).encode()
        else:
            body = json.dumps(recipe, indent=1).encode()
    else:
        raise TypeError("recipe must be a dict")
    try:
        resp = gg.create_component_version(inlineRecipe=body)
        return resp["arn"], True
    except ClientError as exc:
        if _code(exc) != "ConflictException":
            raise
        jsonlog.event(log, "component version exists", component=name, version=version)
        return component_arn(backend, name, version), False


def wait_deployable(backend: Backend, arn: str, *, interval: float = settings.COMPONENT_POLL_INTERVAL,
                    max_interval: float = settings.COMPONENT_POLL_MAX_INTERVAL,
                    timeout: float = settings.COMPONENT_POLL_TIMEOUT) -> dict:
    """Poll ``describe_component`` until DEPLOYABLE; DeployError if FAILED or still pending at ``timeout``."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda d: d["status"]["componentState"] in PENDING_STATES),
        wait=tenacity.wait_exponential(multiplier=interval, min=interval, max=max_interval),
        stop=tenacity.stop_after_delay(timeout),
        retry_error_callback=lambda state: state.outcome.result(),
        reraise=True,
    )
    desc = retrying(lambda: backend.greengrassv2.describe_component(arn=arn))
    state = desc["status"]["componentState"]
    if state != "DEPLOYABLE":
        detail = desc["status"].get("message") or json.dumps(desc["status"].get("errors") or {})
        raise DeployError(f"{arn} is {state}, not DEPLOYABLE: {detail}")
    return desc


def latest_versions(backend: Backend) -> dict[str, str]:
    """``{component name: latest version}`` of the account's own (PRIVATE) components."""
    out, token = {}, None
    while True:
        kwargs: dict[str, Any] = {"scope": "PRIVATE"}
        if token:
            kwargs["nextToken"] = token
        page = backend.greengrassv2.list_components(**kwargs)
        for c in page.get("components", []):
            out[c["componentName"]] = c["latestVersion"]["componentVersion"]
        token = page.get("nextToken")
        if not token:
            return out


# --------------------------------------------------------------------------- deployments
def latest_deployment(backend: Backend, target_arn: str) -> dict | None:
    """The target's latest deployment (``get_deployment`` shape), or None."""
    gg = backend.greengrassv2
    items = gg.list_deployments(targetArn=target_arn, historyFilter="LATEST_ONLY").get("deployments", [])
    items = [d for d in items if d.get("targetArn", target_arn) == target_arn]
    if not items:
        return None
    chosen = next((d for d in items if d.get("isLatestForTarget")), items[0])
    return gg.get_deployment(deploymentId=chosen["deploymentId"])


def group_things(backend: Backend, target_arn: str) -> list[str]:
    """Core devices of a deployment target (``list_core_devices``: on AWS, those that deployed it)."""
    if ":thing/" in target_arn:
        return [target_arn.rsplit("/", 1)[1]]
    things, token = [], None
    while True:
        kwargs: dict[str, Any] = {"thingGroupArn": target_arn}
        if token:
            kwargs["nextToken"] = token
        page = backend.greengrassv2.list_core_devices(**kwargs)
        things += [d["coreDeviceThingName"] for d in page.get("coreDevices", [])]
        token = page.get("nextToken")
        if not token:
            return things


def _installed_version(backend: Backend, thing: str, name: str) -> str | None:
    try:
        installed = backend.greengrassv2.list_installed_components(
            coreDeviceThingName=thing).get("installedComponents", [])
    except ClientError:
        return None
    return next((c.get("componentVersion") for c in installed if c.get("componentName") == name), None)


def installed_model(backend: Backend, target_arn: str) -> str | None:
    """The model version most of the target's devices run now (None: no device reports one)."""
    versions = collections.Counter(v for v in (_installed_version(backend, t, settings.MODEL_COMPONENT)
                                               for t in group_things(backend, target_arn)) if v)
    return versions.most_common(1)[0][0] if versions else None


def merge(components: dict, updates: dict[str, str]) -> dict:
    """The target's component set with ``updates`` (name -> version) applied; everything else kept."""
    merged = {name: dict(spec) for name, spec in components.items()}
    for name, version in updates.items():
        spec = merged.get(name, {})
        spec["componentVersion"] = version
        if name in (settings.MODEL_COMPONENT, settings.CANARY_COMPONENT):
            spec["configurationUpdate"] = dict(settings.MODEL_CONFIGURATION_UPDATE)
        merged[name] = spec
    return merged


def create_deployment(backend: Backend, target_arn: str, components: dict, name: str,
                      previous: dict | None = None) -> dict:
    """``create_deployment`` with windfleet's policies; a client token makes a retry idempotent."""
    token = uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(
        [target_arn, components, previous.get("deploymentId") if previous else None], sort_keys=True))
    return backend.greengrassv2.create_deployment(
        targetArn=target_arn,
        deploymentName=name,
        components=components,
        deploymentPolicies=settings.DEPLOYMENT_POLICIES,
        iotJobConfiguration=settings.IOT_JOB_CONFIGURATION,
        clientToken=str(token),
    )


def deploy_model(backend: Backend, package_version: int | str, files: dict[str, bytes], *,
                 package_arn: str | None = None, thing_group: str | None = None,
                 poll: dict | None = None, canary: Callable[[dict], dict | None] | None = None) -> dict:
    """Roll model package ``package_version`` (``files``: model.onnx, model.json) out to the thing group.

    Returns ``{"status": "deployed"|"unchanged", "componentVersion", "deploymentId", "targetArn",
    "componentCreated", "components"}``.  With ``canary`` and a fleet that runs a model already,
    the component version is created and ``canary(previous fleet deployment)`` is asked first:
    its dict is returned and the fleet left alone (promoting later is :func:`roll_out`), unless
    it returns None (then the fleet gets the model now).
    """
    version = settings.model_component_version(package_version)
    target = backend.thing_group_arn(thing_group)
    card = json.loads(files[CARD_FILE]) if CARD_FILE in files else {}
    uris = upload(backend, settings.MODEL_COMPONENT, version,
                  {MODEL_FILE: files[MODEL_FILE], CARD_FILE: files[CARD_FILE]})
    arn, created = create_component(backend, model_recipe(version, uris, card, package_arn))
    if not created:
        _check_same_model(backend, arn, card)
    wait_deployable(backend, arn, **(poll or {}))

    previous = latest_deployment(backend, target)
    result = {"componentVersion": version, "targetArn": target, "componentCreated": created}
    if previous is not None:
        current = (previous.get("components") or {}).get(settings.MODEL_COMPONENT, {}).get("componentVersion")
        if current == version:  # a duplicate approval event: already rolled out
            return {"status": "unchanged", "deploymentId": previous["deploymentId"],
                    "components": previous["components"], **result}
        staged = canary(previous) if canary is not None and current else None
        if staged is not None:
            return {**result, **staged}
        components = merge(previous.get("components") or {}, {settings.MODEL_COMPONENT: version})
    else:  # the group's first deployment: the whole published suite with this model
        available = latest_versions(backend)
        missing = [c for c in settings.SUITE if c not in available]
        if missing:
            jsonlog.event(log, "first deployment without unpublished components", logging.WARNING,
                          missing=missing)
        components = merge({}, {c: available[c] for c in settings.SUITE if c in available})
        components = merge(components, {settings.MODEL_COMPONENT: version})
    resp = create_deployment(backend, target, components, f"windfleet model {version}", previous)
    jsonlog.event(log, "deployment created", deployment=resp["deploymentId"], target=target,
                  model=version, previous=previous["deploymentId"] if previous else None)
    return {"status": "deployed", "deploymentId": resp["deploymentId"], "components": components, **result}


def roll_out(backend: Backend, component_version: str, thing_group: str | None = None) -> dict:
    """Merge an existing model component version into the thing group's latest deployment (a
    canary's promotion); ``status`` ``unchanged`` when the group runs it already."""
    target = backend.thing_group_arn(thing_group)
    previous = latest_deployment(backend, target)
    if previous is None:
        raise DeployError(f"{target} has no deployment to merge model {component_version} into")
    running = previous.get("components") or {}
    result = {"componentVersion": component_version, "targetArn": target}
    if running.get(settings.MODEL_COMPONENT, {}).get("componentVersion") == component_version:
        return {"status": "unchanged", "deploymentId": previous["deploymentId"], "components": running, **result}
    components = merge(running, {settings.MODEL_COMPONENT: component_version})
    resp = create_deployment(backend, target, components, f"windfleet model {component_version}", previous)
    jsonlog.event(log, "deployment created", deployment=resp["deploymentId"], target=target,
                  model=component_version, previous=previous["deploymentId"])
    return {"status": "deployed", "deploymentId": resp["deploymentId"], "components": components, **result}


def deploy_candidate(backend: Backend, package_version: int | str, files: dict[str, bytes], *,
                     canary_group: str, package_arn: str | None = None, poll: dict | None = None) -> dict:
    """Model package ``package_version`` as ``com.windfleet.AnomalyModelCandidate@1.0.N`` to the
    canary thing group, and nothing else: a device merges its groups' deployments, so canary
    devices keep the fleet's components and add the candidate.  Same return shape as
    :func:`deploy_model` (``status`` ``unchanged`` for a repeated event)."""
    version = settings.model_component_version(package_version)
    target = backend.thing_group_arn(canary_group)
    card = json.loads(files[CARD_FILE]) if CARD_FILE in files else {}
    uris = upload(backend, settings.CANARY_COMPONENT, version,
                  {MODEL_FILE: files[MODEL_FILE], CARD_FILE: files[CARD_FILE]})
    arn, created = create_component(backend, model_recipe(version, uris, card, package_arn,
                                                          name=settings.CANARY_COMPONENT))
    if not created:
        _check_same_model(backend, arn, card)
    wait_deployable(backend, arn, **(poll or {}))
    previous = latest_deployment(backend, target)
    running = (previous or {}).get("components") or {}
    result = {"componentVersion": version, "targetArn": target, "componentCreated": created}
    if running.get(settings.CANARY_COMPONENT, {}).get("componentVersion") == version:
        return {"status": "unchanged", "deploymentId": previous["deploymentId"], "components": running, **result}
    components = merge(running, {settings.CANARY_COMPONENT: version})
    resp = create_deployment(backend, target, components, f"windfleet canary {version}", previous)
    jsonlog.event(log, "canary deployment created", deployment=resp["deploymentId"], target=target, model=version)
    return {"status": "deployed", "deploymentId": resp["deploymentId"], "components": components, **result}


def withdraw_candidate(backend: Backend, canary_group: str) -> dict | None:
    """Revise the canary group's deployment without the candidate (its devices keep the fleet's
    model alone); None when the group's latest deployment has no candidate."""
    target = backend.thing_group_arn(canary_group)
    previous = latest_deployment(backend, target)
    running = (previous or {}).get("components") or {}
    if settings.CANARY_COMPONENT not in running:
        return None
    components = {n: spec for n, spec in running.items() if n != settings.CANARY_COMPONENT}
    resp = create_deployment(backend, target, components, "windfleet canary withdrawn", previous)
    jsonlog.event(log, "canary withdrawn", deployment=resp["deploymentId"], target=target)
    return {"deploymentId": resp["deploymentId"], "targetArn": target, "components": components}


def _check_same_model(backend: Backend, arn: str, card: dict) -> None:
    """An existing model component version must hold this very model (a repeated approval),
    never another one that happens to carry the same version (e.g. a hand-built bundle)."""
    recipe = json.loads(backend.greengrassv2.get_component(arn=arn, recipeOutputFormat="JSON")["recipe"])
    config = (recipe.get("ComponentConfiguration") or {}).get("DefaultConfiguration") or {}
    if config.get("OnnxSha256") != card.get("onnx_sha256"):
        raise DeployError(f"{arn} already exists with another model (OnnxSha256 "
                          f"{str(config.get('OnnxSha256'))[:12]}...); component versions 1.0.N are reserved "
                          "for model package N")


def capture_configuration(backend: Backend, capture: bool = True, endpoint: str | None = None) -> dict[str, dict]:
    """The suite configuration that switches data capture on (or off, ``capture=False``).

    On: the detector's ``capture: true`` and the forwarder's destination -- the backend's bucket,
    ``payloads.CAPTURE_PREFIX`` (the prefix the devices' token exchange role may write,
    :func:`windfleet.cloud.provision.device_policy`) and ``capture_endpoint`` ``endpoint``: empty
    (set explicitly, so an earlier endpoint does not linger) means AWS S3 with the device's token
    exchange credentials.  The local backend has no S3 a device can reach without ``windfleet
    cloud s3-endpoint``, so there ``endpoint`` (its URL) is required.
    """
    if not capture:
        return {settings.DETECTOR: {"capture": False}}
    if backend.is_local and not endpoint:
        raise DeployError("capture on the local backend needs the URL of `windfleet cloud s3-endpoint` "
                          "(--capture-endpoint)")
    return {settings.DETECTOR: {"capture": True},
            settings.FORWARDER: {"capture_bucket": backend.bucket, "capture_prefix": payloads.CAPTURE_PREFIX,
                                 "capture_endpoint": endpoint or ""}}


def _merged_update(update: dict | None, keys: dict) -> dict:
    """``configurationUpdate`` with ``keys`` merged (deeply) into the ``merge`` it already has: a
    device that joins the group later gets every key earlier suite deployments set."""
    def deep(old: dict, new: dict) -> dict:
        out = dict(old)
        for k, v in new.items():
            out[k] = deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    update = dict(update or {})
    update["merge"] = json.dumps(deep(json.loads(update.get("merge") or "{}"), keys), sort_keys=True)
    return update


def deploy_suite(backend: Backend, thing_group: str | None = None,
                 versions: dict[str, str] | None = None, configuration: dict[str, dict] | None = None,
                 capture: bool | None = None, capture_endpoint: str | None = None) -> dict:
    """``windfleet deploy``: the whole suite to a thing group (latest published versions).

    The model keeps the version the group's devices run (after a failed, rolled-back model
    deployment that is the last good one, not the latest deployment's), else the latest
    deployment's; never simply the latest published (it may be the model that failed).
    ``versions`` overrides any of them.
    ``configuration`` (component name -> keys) is merged into each component's
    ``configurationUpdate.merge`` (what earlier deployments set stays); later model deployments
    carry it forward.  ``capture`` True/False switches data capture on/off
    (:func:`capture_configuration`; ``configuration`` may still override its keys); None leaves it.
    """
    wanted = capture_configuration(backend, capture, capture_endpoint) if capture is not None else {}
    for name, keys in (configuration or {}).items():
        wanted[name] = {**wanted.get(name, {}), **keys}
    target = backend.thing_group_arn(thing_group)
    available = latest_versions(backend)
    previous = latest_deployment(backend, target)
    chosen = {c: available[c] for c in settings.SUITE if c in available}
    running = (previous or {}).get("components") or {}
    installed = installed_model(backend, target)
    if installed:
        chosen[settings.MODEL_COMPONENT] = installed
    elif settings.MODEL_COMPONENT in running:
        chosen[settings.MODEL_COMPONENT] = running[settings.MODEL_COMPONENT]["componentVersion"]
    chosen.update(versions or {})
    missing = [c for c in settings.SUITE if c not in chosen]
    if missing:
        raise DeployError(f"not published: {', '.join(missing)} (run `windfleet build` and `windfleet publish`)")
    components = merge(running, chosen)
    for name, keys in wanted.items():
        if name not in components:
            raise DeployError(f"configuration for {name}, which is not in the suite")
        components[name]["configurationUpdate"] = _merged_update(components[name].get("configurationUpdate"), keys)
    resp = create_deployment(backend, target, components, "windfleet suite", previous)
    jsonlog.event(log, "suite deployment created", deployment=resp["deploymentId"], target=target)
    return {"status": "deployed", "deploymentId": resp["deploymentId"], "targetArn": target,
            "components": components}


# ------------------------------------------------------------------------------ publishing
_RECIPE_NAME = re.compile(r"^(?P<name>.+)-(?P<version>\d+\.\d+\.\d+[^/]*)\.(?P<ext>yaml|yml|json)$")


def _recipe_get(d: dict, key: str) -> Any:
    return next((v for k, v in d.items() if isinstance(k, str) and k.lower() == key.lower()), None)


def read_build(build_dir: str | Path) -> list[tuple[dict, str, Path]]:
    """``greengrass-build/`` -> ``[(recipe, format, artifact dir)]`` (``R/<Name>-<Version>.yaml``,
    ``A/<Name>/<Version>/``), checked for consistency."""
    import yaml

    build_dir = Path(build_dir)
    recipes_dir = build_dir / "recipes"
    if not recipes_dir.is_dir():
        raise DeployError(f"{recipes_dir}: no recipes (run `windfleet build` first)")
    out = []
    for path in sorted(recipes_dir.iterdir()):
        m = _RECIPE_NAME.match(path.name)
        if not m:
            continue
        try:
            recipe = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DeployError(f"{path}: not a valid recipe ({exc})") from None
        if not isinstance(recipe, dict):
            raise DeployError(f"{path}: not a valid recipe (not a mapping)")
        name, version = _recipe_get(recipe, "ComponentName"), str(_recipe_get(recipe, "ComponentVersion"))
        if (name, version) != (m["name"], m["version"]):
            raise DeployError(f"{path}: file name says {m['name']}-{m['version']}, recipe says {name}-{version}")
        out.append((recipe, "json" if m["ext"] == "json" else "yaml", build_dir / "artifacts" / name / version))
    if not out:
        raise DeployError(f"{recipes_dir}: no <Name>-<Version>.yaml recipes (run `windfleet build` first)")
    return out


def publish(backend: Backend, build_dir: str | Path, *, poll: dict | None = None) -> list[dict]:
    """Upload every component's artifacts and create its version; an existing version is reported.

    Returns ``[{"component", "version", "arn", "status": "created"|"exists"}]``.
    """
    results = []
    for recipe, fmt, artifact_dir in read_build(build_dir):
        name, version = recipe["ComponentName"], str(recipe["ComponentVersion"])
        files = {p.relative_to(artifact_dir).as_posix(): p for p in sorted(artifact_dir.rglob("*"))
                 if p.is_file()} if artifact_dir.is_dir() else {}
        by_basename = {Path(k).name: k for k in files}
        prefix = settings.COMPONENT_PREFIX.format(name=name, version=version)
        for manifest in _recipe_get(recipe, "Manifests") or []:
            for artifact in _recipe_get(manifest, "Artifacts") or []:
                uri_key = next((k for k in artifact if k.lower() == "uri"), "Uri")
                uri = str(artifact.get(uri_key, ""))
                if uri.startswith(("docker:", "greengrass:")):
                    continue
                base = uri.rstrip("/").rsplit("/", 1)[-1]
                if base not in by_basename:
                    raise DeployError(f"{name}-{version}: artifact {uri} has no file {base} in {artifact_dir}")
                for k in [k for k in artifact if k.lower() in ("digest", "algorithm")]:
                    del artifact[k]  # the service computes them
                artifact[uri_key] = backend.s3_uri(prefix + by_basename[base])
        upload(backend, name, version, {rel: p.read_bytes() for rel, p in files.items()})
        arn, created = create_component(backend, recipe, fmt=fmt)
        if created:
            wait_deployable(backend, arn, **(poll or {}))
        results.append({"component": name, "version": version, "arn": arn,
                        "status": "created" if created else "exists"})
        jsonlog.event(log, "component published", component=name, version=version,
                      status=results[-1]["status"])
    return results


# ------------------------------------------------------------------------------ fleet view
def device_outcomes(backend: Backend, deployment_id: str) -> list[dict]:
    """Per-device outcome of a thing-group deployment: ``[{"thing", "status", "reason", "modified",
    "model_version"}]`` (``QUEUED``: not picked up yet; ``NOT_RECEIVED``: superseded before it was)."""
    gg = backend.greengrassv2
    things = group_things(backend, gg.get_deployment(deploymentId=deployment_id)["targetArn"])
    out = []
    for thing in things:
        effective = gg.list_effective_deployments(coreDeviceThingName=thing).get("effectiveDeployments", [])
        mine = next((e for e in effective if e["deploymentId"] == deployment_id), None)
        model = _installed_version(backend, thing, settings.MODEL_COMPONENT)
        out.append({
            "thing": thing,
            "status": mine["coreDeviceExecutionStatus"] if mine else "NOT_RECEIVED",
            "reason": (mine or {}).get("reason", ""),
            "modified": (mine or {}).get("modifiedTimestamp"),
            "model_version": model,
        })
    return out
