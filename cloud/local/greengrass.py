"""``LocalGreengrassV2``: a local Greengrass v2 deployment service.

Cloud side -- the same method names, keyword arguments and response shapes as
``boto3.client("greengrassv2")`` for the subset windfleet uses:
``create_component_version(inlineRecipe=...)``, ``describe_component(arn=)``,
``get_component(arn=, recipeOutputFormat=)``, ``list_components``,
``list_component_versions(arn=)``, ``delete_component``, ``create_deployment``,
``get_deployment``, ``list_deployments(targetArn=, historyFilter=)``,
``cancel_deployment``, ``list_effective_deployments(coreDeviceThingName=)``,
``list_core_devices(thingGroupArn=)``, ``get_core_device``,
``list_installed_components``.  Errors are botocore ``ClientError`` with the
service's codes (``ConflictException`` for an existing component version,
``ResourceNotFoundException``, ``ValidationException``).

As the service does, ``create_component_version`` fills ``Digest`` (base64 of
the artifact's SHA-256) and ``Algorithm: SHA-256`` into every artifact of every
manifest; an artifact missing from the store leaves the version ``FAILED``
with the reason in ``status.errors``, otherwise it is ``DEPLOYABLE`` at once.
A new deployment for a target makes the previous one ``INACTIVE``
(``isLatestForTarget`` false).  The IoT job abort criteria of a deployment
are enforced as devices report (the deployment is ``CANCELED`` once they
are met); rollout rates are not modelled -- every device may start at once.

Device side -- what IoT jobs and the Greengrass data plane do for a real
nucleus; the local device runtime calls exactly these (stable API):

``register_core_device(thing, thing_groups) -> dict``
    Create or update the core device and add it to ``thing_groups`` (names or
    ARNs) -- as the Greengrass installer's ``--thing-group-name`` does, it never
    removes a membership (the cloud may have added the device to a canary group).
    Returns ``get_core_device``'s shape.

``list_thing_groups_for_core_device(coreDeviceThingName) -> {"thingGroups": [...]}``
    The device's groups (the data plane's ListThingGroupsForCoreDevice, which the
    nucleus asks on every deployment to drop the roots of groups it has left).

``next_deployment(thing) -> dict | None``
    The oldest ``ACTIVE`` latest-for-target deployment for the thing or one of
    its groups that this device has not finished (no terminal status reported;
    an ``IN_PROGRESS`` one is returned again so a restarted device resumes it) --
    IoT jobs hand a device its queued job executions oldest first.
    Shape: ``get_deployment``'s response.  Poll it; a deployment that gets
    cancelled while applying shows ``deploymentStatus == 'CANCELED'`` in
    ``get_deployment``.

Membership, as ``boto3.client("iot")`` names it (the local backend has no IoT
client): ``add_thing_to_thing_group(thingGroupName=, thingName=)``,
``remove_thing_from_thing_group(thingGroupName=, thingName=)``,
``list_things_in_thing_group(thingGroupName=)``.

``fetch_component(name, version) -> (recipe, {uri: Path})``
    The stored recipe as a dict (PascalCase keys as submitted, ``Digest`` and
    ``Algorithm`` filled per artifact) and, for every ``s3://`` artifact URI,
    the local file holding it.  Treat the files as read-only: copy them into
    the device's ``packages/artifacts`` and verify the digest there.
    ``ResourceNotFoundException`` for an unknown version.

``report_device_status(thing, deployment_id, status, reason=None, components=None)``
    ``status`` is a Greengrass execution status: QUEUED, IN_PROGRESS,
    SUCCEEDED, FAILED, TIMED_OUT, CANCELED, REJECTED (COMPLETED accepted).
    ``components`` optionally maps component name -> version (or to
    ``{"componentVersion": ..., "lifecycleState": ...}``): what now runs on the
    device (after a rollback: the old set); ``list_installed_components``
    returns it.  It shows up in ``list_effective_deployments``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from windfleet.nucleus.recipe import file_digest as artifact_digest  # one definition of the digest

from .errors import client_error, exceptions_namespace
from .s3 import LocalS3, split_uri
from .store import Store

ACCOUNT = "000000000000"
REGION = "local"
MAX_RECIPE_BYTES = 16_000
SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
DEVICE_STATUSES = ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "REJECTED",
                   "COMPLETED")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "REJECTED", "COMPLETED"})
FAILURE_TYPES = {"FAILED": {"FAILED"}, "REJECTED": {"REJECTED"}, "TIMED_OUT": {"TIMED_OUT"},
                 "ALL": {"FAILED", "REJECTED", "TIMED_OUT"}}


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


def _semver_key(version: str) -> tuple:
    core = version.split("+")[0].split("-")[0]
    return tuple(int(p) for p in core.split(".")) + (0 if "-" in version.split("+")[0] else 1,)


def _get(d: dict, key: str, default: Any = None) -> Any:
    """Recipe keys are case-insensitive in Greengrass."""
    for k, v in d.items():
        if isinstance(k, str) and k.lower() == key.lower():
            return v
    return default


def _no_empty(d: dict) -> dict:
    """The service omits empty strings (its shapes have a minimum length of 1)."""
    return {k: v for k, v in d.items() if v != ""}


def thing_arn(thing: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}"


def thing_group_arn(group: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/{group}"


def component_arn(name: str, version: str | None = None) -> str:
    arn = f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:{name}"
    return f"{arn}:versions:{version}" if version else arn


def _parse_component_arn(arn: str, operation: str, versioned: bool = True) -> tuple[str, str | None]:
    m = re.match(r"^arn:aws:greengrass:[^:]*:[^:]*:components:([^:]+)(?::versions:([^:]+))?$", arn or "")
    if not m or (versioned and not m.group(2)):
        raise client_error("ValidationException", f"invalid component ARN {arn!r}", operation)
    return m.group(1), m.group(2)


def _group_name(group: str) -> str:
    return group.rsplit("/", 1)[1] if group.startswith("arn:") else group


class LocalGreengrassV2:
    def __init__(self, store: Store | str | Path | None = None, s3: LocalS3 | None = None):
        """``store``: a Store or its home directory (default ``$WINDFLEET_HOME`` or ``~/.windfleet``)."""
        self.store = store if isinstance(store, Store) else Store(store)
        self.s3 = s3 or LocalS3(store)
        self.exceptions = exceptions_namespace("ConflictException", "ResourceNotFoundException",
                                               "ValidationException")

    # ====================================================================== components
    def create_component_version(self, inlineRecipe: bytes | str | None = None, tags: dict | None = None,
                                 clientToken: str | None = None, **kwargs: Any) -> dict:
        op = "CreateComponentVersion"
        if inlineRecipe is None:
            raise client_error("ValidationException", "inlineRecipe is required (lambdaFunction is not "
                               "supported locally)", op)
        raw = inlineRecipe.encode() if isinstance(inlineRecipe, str) else bytes(inlineRecipe)
        if len(raw) > MAX_RECIPE_BYTES:
            raise client_error("ValidationException", f"recipe is {len(raw)} bytes, over {MAX_RECIPE_BYTES}", op)
        try:
            recipe = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise client_error("ValidationException", f"recipe is neither JSON nor YAML: {exc}", op) from None
        if not isinstance(recipe, dict):
            raise client_error("ValidationException", "recipe must be a mapping", op)
        name, version = _get(recipe, "ComponentName"), str(_get(recipe, "ComponentVersion", ""))
        if not name or not isinstance(name, str):
            raise client_error("ValidationException", "recipe has no ComponentName", op)
        if not SEMVER.match(version):
            raise client_error("ValidationException", f"ComponentVersion {version!r} is not semver", op)
        if _get(recipe, "RecipeFormatVersion") is None:
            raise client_error("ValidationException", "recipe has no RecipeFormatVersion", op)

        errors: dict[str, str] = {}
        for manifest in _get(recipe, "Manifests") or []:
            for artifact in _get(manifest, "Artifacts") or []:
                uri = _get(artifact, "Uri") or ""
                if not uri.startswith("s3://"):
                    continue
                try:
                    path = self.s3.path(*split_uri(uri))
                except Exception as exc:
                    errors[uri] = str(exc)
                    continue
                if not path.is_file():
                    errors[uri] = "artifact not found in the artifact store"
                    continue
                artifact["Digest"] = artifact_digest(path)
                artifact["Algorithm"] = "SHA-256"
        state = "FAILED" if errors else "DEPLOYABLE"
        message = "; ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "Created successfully"
        now = time.time()
        with self.store.tx() as db:
            if db.execute("SELECT 1 FROM components WHERE name=? AND version=?", (name, version)).fetchone():
                raise client_error("ConflictException", f"Component {name} version {version} already exists", op)
            db.execute("INSERT INTO components VALUES (?,?,?,?,?,?,?)",
                       (name, version, json.dumps(recipe), state, message, json.dumps(errors), now))
        return {"arn": component_arn(name, version), "componentName": name, "componentVersion": version,
                "creationTimestamp": _ts(now),
                "status": {"componentState": state, "message": message, "errors": errors}}

    def _component(self, arn: str, op: str):
        name, version = _parse_component_arn(arn, op)
        with self.store.read() as db:
            row = db.execute("SELECT * FROM components WHERE name=? AND version=?", (name, version)).fetchone()
        if row is None:
            raise client_error("ResourceNotFoundException", f"Component {name} version {version} not found", op)
        return row

    @staticmethod
    def _platforms(recipe: dict) -> list[dict]:
        out = []
        for manifest in _get(recipe, "Manifests") or []:
            platform = _get(manifest, "Platform") or {}
            attrs = {str(k): str(v) for k, v in platform.items()}
            out.append({"name": "/".join(attrs.values()) or "all", "attributes": attrs})
        return out

    def describe_component(self, arn: str) -> dict:
        row = self._component(arn, "DescribeComponent")
        recipe = json.loads(row["recipe"])
        return _no_empty({
            "arn": arn, "componentName": row["name"], "componentVersion": row["version"],
            "creationTimestamp": _ts(row["created"]),
            "publisher": _get(recipe, "ComponentPublisher", ""),
            "description": _get(recipe, "ComponentDescription", ""),
            "status": _no_empty({"componentState": row["state"], "message": row["message"] or "",
                                 "errors": json.loads(row["errors"] or "{}")}),
            "platforms": self._platforms(recipe),
            "tags": {},
        })

    def get_component(self, arn: str, recipeOutputFormat: str = "JSON") -> dict:
        row = self._component(arn, "GetComponent")
        recipe = json.loads(row["recipe"])
        if recipeOutputFormat == "YAML":
            body = yaml.safe_dump(recipe, sort_keys=False).encode()
        else:
            body = json.dumps(recipe, indent=2).encode()
        return {"recipeOutputFormat": recipeOutputFormat, "recipe": body, "tags": {}}

    def list_components(self, scope: str = "PRIVATE", maxResults: int = 100, nextToken: str | None = None,
                        **_: Any) -> dict:
        with self.store.read() as db:
            rows = db.execute("SELECT * FROM components WHERE state != 'FAILED'").fetchall()
        latest: dict[str, Any] = {}
        for row in rows:
            cur = latest.get(row["name"])
            if cur is None or _semver_key(row["version"]) > _semver_key(cur["version"]):
                latest[row["name"]] = row
        items = []
        for name in sorted(latest):
            row = latest[name]
            recipe = json.loads(row["recipe"])
            items.append({"arn": component_arn(name), "componentName": name, "latestVersion": _no_empty({
                "arn": component_arn(name, row["version"]), "componentVersion": row["version"],
                "creationTimestamp": _ts(row["created"]),
                "description": _get(recipe, "ComponentDescription", ""),
                "publisher": _get(recipe, "ComponentPublisher", ""),
                "platforms": self._platforms(recipe)})})
        return self._page(items, "components", maxResults, nextToken)

    def list_component_versions(self, arn: str, maxResults: int = 100, nextToken: str | None = None) -> dict:
        name, _ = _parse_component_arn(arn, "ListComponentVersions", versioned=False)
        with self.store.read() as db:
            rows = db.execute("SELECT version FROM components WHERE name=?", (name,)).fetchall()
        versions = sorted((r["version"] for r in rows), key=_semver_key, reverse=True)
        items = [{"componentName": name, "componentVersion": v, "arn": component_arn(name, v)} for v in versions]
        return self._page(items, "componentVersions", maxResults, nextToken)

    def delete_component(self, arn: str) -> dict:
        name, version = _parse_component_arn(arn, "DeleteComponent")
        self._component(arn, "DeleteComponent")
        with self.store.tx() as db:
            db.execute("DELETE FROM components WHERE name=? AND version=?", (name, version))
        return {}

    @staticmethod
    def _page(items: list, key: str, max_results: int, token: str | None) -> dict:
        start = int(token or 0)
        out: dict = {key: items[start:start + max_results]}
        if start + max_results < len(items):
            out["nextToken"] = str(start + max_results)
        return out

    # ===================================================================== deployments
    def create_deployment(self, targetArn: str, deploymentName: str | None = None,
                          components: dict | None = None, iotJobConfiguration: dict | None = None,
                          deploymentPolicies: dict | None = None, parentTargetArn: str | None = None,
                          tags: dict | None = None, clientToken: str | None = None) -> dict:
        op = "CreateDeployment"
        if not re.match(r"^arn:aws:iot:[^:]*:[^:]*:(thing|thinggroup)/.+$", targetArn or ""):
            raise client_error("ValidationException", f"targetArn {targetArn!r} is not a thing or thing group ARN",
                               op)
        components = components or {}
        for name, spec in components.items():
            version = spec.get("componentVersion") if isinstance(spec, dict) else None
            if not version:
                raise client_error("ValidationException", f"{name}: componentVersion is required", op)
            merge = (spec.get("configurationUpdate") or {}).get("merge")
            if merge is not None:
                try:
                    json.loads(merge)
                except (TypeError, ValueError):
                    raise client_error("ValidationException", f"{name}: configurationUpdate.merge must be a "
                                       "JSON string", op) from None
        now = time.time()
        with self.store.tx() as db:
            if clientToken:
                row = db.execute("SELECT id FROM deployments WHERE client_token=? AND target_arn=?",
                                 (clientToken, targetArn)).fetchone()
                if row:
                    return self._created(row["id"])
            for name, spec in components.items():
                row = db.execute("SELECT state FROM components WHERE name=? AND version=?",
                                 (name, spec["componentVersion"])).fetchone()
                if row is None:
                    raise client_error("ResourceNotFoundException",
                                       f"Component {name} version {spec['componentVersion']} not found", op)
                if row["state"] != "DEPLOYABLE":
                    raise client_error("ValidationException", f"Component {name} version "
                                       f"{spec['componentVersion']} is {row['state']}, not DEPLOYABLE", op)
            revision = db.execute("SELECT COUNT(*) FROM deployments WHERE target_arn=?", (targetArn,)).fetchone()[0] + 1
            deployment_id = str(uuid.uuid4())
            body = {"components": components, "iotJobConfiguration": iotJobConfiguration or {},
                    "deploymentPolicies": deploymentPolicies or {}, "tags": tags or {}}
            if parentTargetArn:
                body["parentTargetArn"] = parentTargetArn
            db.execute("UPDATE deployments SET status='INACTIVE' WHERE target_arn=? AND status='ACTIVE'",
                       (targetArn,))
            db.execute("INSERT INTO deployments VALUES (?,?,?,?,?,?,?,?)",
                       (deployment_id, targetArn, deploymentName or f"Deployment for {targetArn.rsplit('/', 1)[1]}",
                        json.dumps(body), "ACTIVE", revision, clientToken, now))
        return self._created(deployment_id)

    @staticmethod
    def _created(deployment_id: str) -> dict:
        job = f"local-{deployment_id}"
        return {"deploymentId": deployment_id, "iotJobId": job,
                "iotJobArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:job/{job}"}

    def _latest_ids(self, db) -> set[str]:
        rows = db.execute("SELECT id, target_arn FROM deployments ORDER BY created, rowid").fetchall()
        latest = {}
        for r in rows:
            latest[r["target_arn"]] = r["id"]
        return set(latest.values())

    def _deployment(self, row, latest: set[str]) -> dict:
        body = json.loads(row["body"])
        created = self._created(row["id"])
        out = {
            "targetArn": row["target_arn"], "revisionId": str(row["revision"]), "deploymentId": row["id"],
            "deploymentName": row["name"], "deploymentStatus": row["status"],
            "iotJobId": created["iotJobId"], "iotJobArn": created["iotJobArn"],
            "components": body["components"], "deploymentPolicies": body["deploymentPolicies"],
            "iotJobConfiguration": body["iotJobConfiguration"], "creationTimestamp": _ts(row["created"]),
            "isLatestForTarget": row["id"] in latest, "tags": body.get("tags", {}),
        }
        if body.get("parentTargetArn"):
            out["parentTargetArn"] = body["parentTargetArn"]
        return out

    def get_deployment(self, deploymentId: str) -> dict:
        with self.store.read() as db:
            row = db.execute("SELECT * FROM deployments WHERE id=?", (deploymentId,)).fetchone()
            if row is None:
                raise client_error("ResourceNotFoundException", f"Deployment {deploymentId} not found",
                                   "GetDeployment")
            return self._deployment(row, self._latest_ids(db))

    def list_deployments(self, targetArn: str | None = None, historyFilter: str = "LATEST_ONLY",
                         parentTargetArn: str | None = None, maxResults: int = 50,
                         nextToken: str | None = None) -> dict:
        if historyFilter not in ("ALL", "LATEST_ONLY"):
            raise client_error("ValidationException", f"historyFilter {historyFilter!r}", "ListDeployments")
        with self.store.read() as db:
            rows = db.execute("SELECT * FROM deployments ORDER BY created DESC, rowid DESC").fetchall()
            latest = self._latest_ids(db)
        items = []
        for row in rows:
            if targetArn and row["target_arn"] != targetArn:
                continue
            if historyFilter == "LATEST_ONLY" and row["id"] not in latest:
                continue
            full = self._deployment(row, latest)
            items.append({k: full[k] for k in ("targetArn", "revisionId", "deploymentId", "deploymentName",
                                               "creationTimestamp", "deploymentStatus", "isLatestForTarget")})
        return self._page(items, "deployments", maxResults, nextToken)

    def cancel_deployment(self, deploymentId: str) -> dict:
        with self.store.tx() as db:
            row = db.execute("SELECT status FROM deployments WHERE id=?", (deploymentId,)).fetchone()
            if row is None:
                raise client_error("ResourceNotFoundException", f"Deployment {deploymentId} not found",
                                   "CancelDeployment")
            if row["status"] != "ACTIVE":
                raise client_error("ConflictException", f"Deployment {deploymentId} is {row['status']}",
                                   "CancelDeployment")
            db.execute("UPDATE deployments SET status='CANCELED' WHERE id=?", (deploymentId,))
        return {"message": f"Deployment {deploymentId} canceled"}

    # ===================================================================== core devices
    def _device(self, db, thing: str, op: str):
        row = db.execute("SELECT * FROM core_devices WHERE thing=?", (thing,)).fetchone()
        if row is None:
            raise client_error("ResourceNotFoundException", f"Core device {thing} not found", op)
        return row

    def _device_health(self, db, thing: str) -> str:
        row = db.execute("SELECT status FROM device_status WHERE thing=? ORDER BY modified DESC LIMIT 1",
                         (thing,)).fetchone()
        return "UNHEALTHY" if row and row["status"] in ("FAILED", "TIMED_OUT", "REJECTED") else "HEALTHY"

    def get_core_device(self, coreDeviceThingName: str) -> dict:
        with self.store.read() as db:
            row = self._device(db, coreDeviceThingName, "GetCoreDevice")
            status = self._device_health(db, coreDeviceThingName)
        import platform

        return {"coreDeviceThingName": row["thing"], "coreVersion": "windfleet-local", "platform": "linux",
                "architecture": platform.machine() or "unknown", "status": status, "lastStatusUpdateTimestamp": _ts(row["seen"]),
                "tags": {}}

    def list_core_devices(self, thingGroupArn: str | None = None, status: str | None = None,
                          maxResults: int = 100, nextToken: str | None = None, **_: Any) -> dict:
        with self.store.read() as db:
            rows = db.execute("SELECT * FROM core_devices ORDER BY thing").fetchall()
            items = []
            for row in rows:
                if thingGroupArn and _group_name(thingGroupArn) not in json.loads(row["groups"]):
                    continue
                health = self._device_health(db, row["thing"])
                if status and health != status:
                    continue
                items.append({"coreDeviceThingName": row["thing"], "status": health,
                              "lastStatusUpdateTimestamp": _ts(row["seen"])})
        return self._page(items, "coreDevices", maxResults, nextToken)

    def list_installed_components(self, coreDeviceThingName: str, maxResults: int = 100,
                                  nextToken: str | None = None, **_: Any) -> dict:
        with self.store.read() as db:
            row = self._device(db, coreDeviceThingName, "ListInstalledComponents")
        items = []
        for name, spec in sorted(json.loads(row["components"] or "{}").items()):
            spec = spec if isinstance(spec, dict) else {"componentVersion": spec}
            items.append({"componentName": name, "componentVersion": spec.get("componentVersion"),
                          "lifecycleState": spec.get("lifecycleState", "RUNNING"),
                          "isRoot": name in spec.get("roots", [name]),
                          "lastStatusChangeTimestamp": _ts(row["seen"])})
        return self._page(items, "installedComponents", maxResults, nextToken)

    def _targets(self, row) -> list[str]:
        return [thing_arn(row["thing"])] + [thing_group_arn(g) for g in json.loads(row["groups"])]

    def list_effective_deployments(self, coreDeviceThingName: str, maxResults: int = 100,
                                   nextToken: str | None = None) -> dict:
        now = time.time()
        with self.store.read() as db:
            device = self._device(db, coreDeviceThingName, "ListEffectiveDeployments")
            targets = self._targets(device)
            reports = {r["deployment_id"]: r for r in db.execute(
                "SELECT * FROM device_status WHERE thing=?", (coreDeviceThingName,)).fetchall()}
            latest = self._latest_ids(db)
            marks = ",".join("?" * len(targets))
            rows = db.execute(f"SELECT * FROM deployments WHERE target_arn IN ({marks}) "
                              "ORDER BY created DESC, rowid DESC", targets).fetchall()
        items = []
        for row in rows:
            report = reports.get(row["id"])
            if report is None and not (row["id"] in latest and row["status"] == "ACTIVE"):
                continue  # never reached this device and never will
            body = json.loads(row["body"])
            item = {"deploymentId": row["id"], "deploymentName": row["name"],
                    "iotJobId": self._created(row["id"])["iotJobId"],
                    "iotJobArn": self._created(row["id"])["iotJobArn"], "targetArn": row["target_arn"],
                    "creationTimestamp": _ts(row["created"])}
            if report is None:
                item.update(coreDeviceExecutionStatus="QUEUED", modifiedTimestamp=_ts(row["created"]))
            else:
                status, reason = report["status"], report["reason"]
                timeout = (body["iotJobConfiguration"].get("timeoutConfig") or {}).get("inProgressTimeoutInMinutes")
                if status == "IN_PROGRESS" and timeout and now - report["modified"] > timeout * 60:
                    status, reason = "TIMED_OUT", f"no result within {timeout} minutes"
                item.update(coreDeviceExecutionStatus=status, modifiedTimestamp=_ts(report["modified"]))
                if reason:
                    item["reason"] = reason
                    if status in ("FAILED", "TIMED_OUT", "REJECTED"):
                        item["statusDetails"] = {"errorStack": [reason], "errorTypes": [status]}
            items.append(item)
        return self._page(items, "effectiveDeployments", maxResults, nextToken)

    # ============================================================ device-side API
    def register_core_device(self, thing: str, thing_groups: list[str] | tuple[str, ...] = ()) -> dict:
        """Create/update core device ``thing`` as a member of ``thing_groups`` (names or ARNs)."""
        if not thing or "/" in thing:
            raise client_error("ValidationException", f"invalid thing name {thing!r}", "RegisterCoreDevice")
        now = time.time()
        with self.store.tx() as db:
            row = db.execute("SELECT groups FROM core_devices WHERE thing=?", (thing,)).fetchone()
            groups = sorted({_group_name(g) for g in thing_groups} | set(json.loads(row["groups"]) if row else []))
            db.execute("INSERT INTO core_devices (thing, groups, registered, seen) VALUES (?,?,?,?) "
                       "ON CONFLICT(thing) DO UPDATE SET groups=excluded.groups, seen=excluded.seen",
                       (thing, json.dumps(groups), now, now))
        return self.get_core_device(thing)

    def _set_membership(self, thing: str, group: str, member: bool, op: str) -> dict:
        if not group or "/" in group:
            raise client_error("ValidationException", f"invalid thing group name {group!r}", op)
        with self.store.tx() as db:
            groups = set(json.loads(self._device(db, thing, op)["groups"]))
            groups = groups | {group} if member else groups - {group}
            db.execute("UPDATE core_devices SET groups=? WHERE thing=?", (json.dumps(sorted(groups)), thing))
        return {}

    def add_thing_to_thing_group(self, thingGroupName: str, thingName: str, **_: Any) -> dict:
        """IoT's AddThingToThingGroup for a registered core device."""
        return self._set_membership(thingName, thingGroupName, True, "AddThingToThingGroup")

    def remove_thing_from_thing_group(self, thingGroupName: str, thingName: str, **_: Any) -> dict:
        """IoT's RemoveThingFromThingGroup."""
        return self._set_membership(thingName, thingGroupName, False, "RemoveThingFromThingGroup")

    def list_things_in_thing_group(self, thingGroupName: str, maxResults: int = 100,
                                   nextToken: str | None = None, **_: Any) -> dict:
        """IoT's ListThingsInThingGroup over the registered core devices: ``{"things": [name, ...]}``."""
        with self.store.read() as db:
            rows = db.execute("SELECT thing, groups FROM core_devices ORDER BY thing").fetchall()
        things = [r["thing"] for r in rows if thingGroupName in json.loads(r["groups"])]
        return self._page(things, "things", maxResults, nextToken)

    def list_thing_groups_for_core_device(self, coreDeviceThingName: str, **_: Any) -> dict:
        """``{"thingGroups": [{"thingGroupName": ...}]}`` of a core device (device-side API)."""
        with self.store.read() as db:
            row = self._device(db, coreDeviceThingName, "ListThingGroupsForCoreDevice")
        return {"thingGroups": [{"thingGroupName": g} for g in json.loads(row["groups"])]}

    def next_deployment(self, thing: str) -> dict | None:
        """The deployment this device should apply now, or None (see the module docstring)."""
        with self.store.tx() as db:
            device = self._device(db, thing, "NextDeployment")
            db.execute("UPDATE core_devices SET seen=? WHERE thing=?", (time.time(), thing))
        with self.store.read() as db:
            targets = self._targets(device)
            latest = self._latest_ids(db)
            marks = ",".join("?" * len(targets))
            rows = db.execute(f"SELECT * FROM deployments WHERE target_arn IN ({marks}) AND status='ACTIVE' "
                              "ORDER BY created, rowid", targets).fetchall()
            done = {r["deployment_id"] for r in db.execute(
                "SELECT deployment_id, status FROM device_status WHERE thing=?", (thing,)).fetchall()
                if r["status"] in TERMINAL}
            for row in rows:
                if row["id"] in latest and row["id"] not in done:
                    return self._deployment(row, latest)
        return None

    def fetch_component(self, name: str, version: str) -> tuple[dict, dict[str, Path]]:
        """``(recipe with digests, {artifact uri: local file})`` for one component version."""
        row = self._component(component_arn(name, version), "FetchComponent")
        if row["state"] != "DEPLOYABLE":
            raise client_error("ValidationException", f"Component {name} version {version} is {row['state']}",
                               "FetchComponent")
        recipe = json.loads(row["recipe"])
        paths: dict[str, Path] = {}
        for manifest in _get(recipe, "Manifests") or []:
            for artifact in _get(manifest, "Artifacts") or []:
                uri = _get(artifact, "Uri") or ""
                if uri.startswith("s3://") and uri not in paths:
                    path = self.s3.path(*split_uri(uri), operation="FetchComponent")
                    if not path.is_file():
                        raise client_error("ResourceNotFoundException", f"artifact {uri} is missing from the "
                                           "artifact store", "FetchComponent")
                    paths[uri] = path
        return recipe, paths

    def report_device_status(self, thing: str, deployment_id: str, status: str, reason: str | None = None,
                             components: dict | None = None) -> None:
        """Record this device's execution status for a deployment (Greengrass status names)."""
        op = "ReportDeviceStatus"
        if status not in DEVICE_STATUSES:
            raise client_error("ValidationException", f"status {status!r} is not one of {DEVICE_STATUSES}", op)
        now = time.time()
        with self.store.tx() as db:
            self._device(db, thing, op)
            dep = db.execute("SELECT * FROM deployments WHERE id=?", (deployment_id,)).fetchone()
            if dep is None:
                raise client_error("ResourceNotFoundException", f"Deployment {deployment_id} not found", op)
            db.execute("INSERT INTO device_status VALUES (?,?,?,?,?,?) ON CONFLICT(thing, deployment_id) DO "
                       "UPDATE SET status=excluded.status, reason=excluded.reason, modified=excluded.modified",
                       (thing, deployment_id, status, reason, now, now))
            db.execute("UPDATE core_devices SET seen=? WHERE thing=?", (now, thing))
            if components is not None:
                db.execute("UPDATE core_devices SET components=? WHERE thing=?", (json.dumps(components), thing))
            if dep["status"] != "ACTIVE" or status not in TERMINAL:
                return
            if dep["target_arn"] == thing_arn(thing):  # a deployment to one device ends with it
                db.execute("UPDATE deployments SET status=? WHERE id=?",
                           ("COMPLETED" if status in ("SUCCEEDED", "COMPLETED") else "FAILED", deployment_id))
                return
            self._maybe_abort(db, dep)

    @staticmethod
    def _maybe_abort(db, dep) -> None:
        """IoT job abort criteria: cancel the rest of the rollout once enough devices failed."""
        criteria = (json.loads(dep["body"])["iotJobConfiguration"].get("abortConfig") or {}).get("criteriaList") or []
        if not criteria:
            return
        statuses = [r["status"] for r in db.execute("SELECT status FROM device_status WHERE deployment_id=?",
                                                     (dep["id"],)).fetchall() if r["status"] in TERMINAL]
        for c in criteria:
            failed = sum(1 for s in statuses if s in FAILURE_TYPES.get(c["failureType"], set()))
            if (len(statuses) >= c["minNumberOfExecutedThings"]
                    and 100.0 * failed / len(statuses) >= c["thresholdPercentage"]):
                db.execute("UPDATE deployments SET status='CANCELED' WHERE id=?", (dep["id"],))
                return
