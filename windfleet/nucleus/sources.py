"""Where a device runtime's deployments come from.

A *deployment source* is anything with the device-side API of the local
deployment service (``windfleet.cloud.local``'s ``LocalGreengrassV2``)::

    register_core_device(thing, thing_groups) -> None
    next_deployment(thing) -> dict | None        # shaped like get_deployment's response
    fetch_component(name, version) -> (recipe: dict, {uri: Path})   # Digest/Algorithm filled
    report_device_status(thing, deployment_id, status, reason=None, **extra) -> None
    get_deployment(deploymentId=...) -> dict     # optional: used to notice cancellation

:class:`DirectorySource` is the same API over a ``windfleet build`` layout: what
``greengrass-cli deployment create --recipeDir R --artifactDir A --merge N=V``
is to a real nucleus (a local deployment, no cloud).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import yaml

from .recipe import RecipeError, file_digest


class DirectorySource:
    """Deploy components from ``recipe_dir/<Name>-<Version>.yaml`` and
    ``artifact_dir/<Name>/<Version>/<file>`` (the build layout).

    ``components`` is ``{name: version}`` (``--merge``); ``update_config`` is
    greengrass-cli's ``--update-config`` shape ``{name: {"MERGE": {...}, "RESET": [...]}}``.
    The deployment id is a hash of its content, so re-running the same command
    against a device that already has it changes nothing.
    """

    def __init__(self, recipe_dir: str | Path, artifact_dir: str | Path, components: dict[str, str],
                 update_config: dict | None = None, failure_handling: str = "ROLLBACK",
                 timeout_seconds: int | None = None):
        self.recipe_dir, self.artifact_dir = Path(recipe_dir), Path(artifact_dir)
        self.components = dict(components)
        self.update_config = update_config or {}
        self.failure_handling = failure_handling
        self.timeout_seconds = timeout_seconds
        self.statuses: list[tuple[str, str, str | None]] = []  # (deployment id, status, reason)
        self._done: set[str] = set()
        self._canceled: set[str] = set()
        self._lock = threading.Lock()
        for name, version in self.components.items():
            if not self._recipe_path(name, version).is_file():
                raise RecipeError(f"no recipe {self._recipe_path(name, version)}")
        content = json.dumps([self.components, self.update_config, failure_handling], sort_keys=True)
        self.deployment_id = "local-" + hashlib.sha256(content.encode()).hexdigest()[:12]

    def _recipe_path(self, name: str, version: str) -> Path:
        return self.recipe_dir / f"{name}-{version}.yaml"

    def deployment(self) -> dict:
        components: dict[str, Any] = {}
        for name, version in self.components.items():
            spec: dict[str, Any] = {"componentVersion": version}
            if self.update_config.get(name):
                spec["configurationUpdate"] = configuration_update(self.update_config[name])
            components[name] = spec
        policies: dict[str, Any] = {"failureHandlingPolicy": self.failure_handling}
        if self.timeout_seconds:
            policies["componentUpdatePolicy"] = {"timeoutInSeconds": self.timeout_seconds, "action": "NOTIFY_COMPONENTS"}
        status = "CANCELED" if self.deployment_id in self._canceled else "ACTIVE"
        return {"deploymentId": self.deployment_id, "deploymentName": "local deployment",
                "targetArn": "local", "deploymentStatus": status, "components": components,
                "deploymentPolicies": policies}

    # -------------------------------------------------------------- device-side API
    def register_core_device(self, thing: str, thing_groups: list[str] | None = None) -> None:
        return None

    def next_deployment(self, thing: str) -> dict | None:
        with self._lock:
            if self.deployment_id in self._done:
                return None
        return self.deployment()

    def get_deployment(self, deploymentId: str) -> dict:  # noqa: N803 (boto3 kwarg name)
        return self.deployment()

    def cancel(self) -> None:
        self._canceled.add(self.deployment_id)

    def fetch_component(self, name: str, version: str) -> tuple[dict, dict[str, Path]]:
        path = self._recipe_path(name, version)
        try:
            recipe = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RecipeError(f"{path}: {exc}") from None
        paths: dict[str, Path] = {}
        for manifest in recipe.get("Manifests") or []:
            for artifact in manifest.get("Artifacts") or []:
                uri = artifact["Uri"]
                file = self.artifact_dir / name / version / uri.rsplit("/", 1)[-1]
                if not file.is_file():
                    raise RecipeError(f"{name}-{version}: artifact {file} missing")
                # What the service does on create_component_version.
                artifact.setdefault("Digest", file_digest(file))
                artifact.setdefault("Algorithm", "SHA-256")
                paths[uri] = file
        return recipe, paths

    def report_device_status(self, thing: str, deployment_id: str, status: str, reason: str | None = None,
                             **extra: Any) -> None:
        with self._lock:
            self.statuses.append((deployment_id, status, reason))
            if status not in ("IN_PROGRESS", "QUEUED"):
                self._done.add(deployment_id)


def configuration_update(update: dict) -> dict:
    """greengrass-cli's ``{"MERGE": {...}, "RESET": [...]}`` -> a deployment's ``configurationUpdate``."""
    return {k: v for k, v in (("merge", json.dumps(update["MERGE"]) if "MERGE" in update else None),
                              ("reset", update.get("RESET"))) if v is not None}


def local_service(home: str | Path | None = None):
    """The CLOUD area's local deployment service rooted at ``home`` (WINDFLEET_HOME)."""
    try:
        from windfleet.cloud.local import LocalGreengrassV2  # type: ignore[attr-defined]
    except ImportError as exc:
        raise RecipeError(f"the local deployment service is not available ({exc})") from None
    return LocalGreengrassV2(home)
