"""Recipe semantics the nucleus applies: manifests, variables, configuration, order.

Pure functions, no processes: easy to test and shared by the runtime and tests.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import platform
import re
from pathlib import Path
from typing import Any, Callable, Iterable

# Greengrass names architectures its own way (armv7l -> arm, x86_64 -> amd64).
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "aarch64", "arm64": "aarch64",
         "armv7l": "arm", "armv6l": "arm", "armv8l": "arm", "i686": "x86", "i386": "x86"}


class RecipeError(ValueError):
    """A recipe the runtime cannot use (one-line reason)."""


def device_platform() -> dict[str, str]:
    """This machine's platform attributes as Greengrass matches them."""
    machine = platform.machine().lower()
    return {"os": platform.system().lower(), "architecture": _ARCH.get(machine, machine)}


def _platform_matches(wanted: dict | None, device: dict[str, str]) -> bool:
    for key, value in (wanted or {}).items():
        value = str(value)
        if value in ("*", "all") or (key == "os" and value == "all"):
            continue
        actual = device.get(key.lower(), device.get(key, ""))
        if len(value) > 1 and value.startswith("/") and value.endswith("/"):
            if not re.fullmatch(value[1:-1], actual):
                return False
        elif value.lower() != actual.lower():
            return False
    return True


def select_manifest(recipe: dict, device: dict[str, str] | None = None) -> dict:
    """The first manifest whose Platform matches (Greengrass: first match wins)."""
    device = device or device_platform()
    for manifest in recipe.get("Manifests") or []:
        if _platform_matches(manifest.get("Platform"), device):
            return manifest
    raise RecipeError(f"{recipe.get('ComponentName')}: no manifest matches platform {device}")


def dependencies(recipe: dict) -> dict[str, str]:
    """Direct dependencies: ``{name: 'HARD'|'SOFT'}`` (HARD is the default)."""
    deps = recipe.get("ComponentDependencies") or {}
    return {name: str((spec or {}).get("DependencyType", "HARD")).upper() for name, spec in deps.items()}


def default_configuration(recipe: dict) -> dict:
    """DefaultConfiguration, ``accessControl`` included: the nucleus keeps the policies in the
    component's configuration (GetConfiguration returns them) and authorizes from there."""
    return copy.deepcopy((recipe.get("ComponentConfiguration") or {}).get("DefaultConfiguration") or {})


# ------------------------------------------------------------------ semver ranges
def _semver_key(version: str) -> tuple:
    main = re.split(r"[-+]", version, maxsplit=1)[0]
    parts = [int(p) for p in main.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def version_satisfies(version: str, requirement: str | None) -> bool:
    """npm-style requirement subset Greengrass uses: space-separated comparators
    (``>=1.0.0 <2.0.0``), ``^x.y.z``, ``~x.y.z``, a bare version, or ``*``."""
    requirement = (requirement or "*").strip()
    have = _semver_key(version)
    for term in requirement.split():
        if term in ("*", "x"):
            continue
        m = re.fullmatch(r"(>=|<=|>|<|=|\^|~)?v?(\d+(?:\.\d+){0,2})", term)
        if not m:
            raise RecipeError(f"unsupported version requirement {requirement!r}")
        op, want = m.group(1) or "=", _semver_key(m.group(2))
        ok = {
            ">=": have >= want, "<=": have <= want, ">": have > want, "<": have < want, "=": have == want,
            "^": have >= want and have[0] == want[0] and (want[0] > 0 or have[1] == want[1]),
            "~": have >= want and have[:2] == want[:2],
        }[op]
        if not ok:
            return False
    return True


# ------------------------------------------------------------------ configuration
def json_pointer_get(doc: Any, pointer: str) -> Any:
    """RFC 6901 lookup; KeyError when absent."""
    if pointer in ("", "/"):
        return doc
    for raw in pointer.lstrip("/").split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, list):
            doc = doc[int(token)]
        elif isinstance(doc, dict) and token in doc:
            doc = doc[token]
        else:
            raise KeyError(pointer)
    return doc


def _pointer_tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.lstrip("/").split("/")] if pointer.strip("/") else []


def deep_merge(base: dict, update: dict) -> dict:
    """Merge ``update`` into a copy of ``base``: objects merge key by key, anything
    else (lists included, as in Greengrass) is replaced."""
    result = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def merge_configuration(
    defaults: dict, current: dict | None, update: dict | None = None
) -> dict:
    """The configuration a deployment leaves a component with, as the nucleus does it.

    ``current`` (what the device had, persisted) wins over the new version's
    ``defaults`` (new keys appear, set values stay); then ``update['reset']``
    (JSON pointers; ``""`` = everything) puts values back to their defaults
    (or removes them), then ``update['merge']`` (a dict or a JSON string) is merged.
    """
    update = update or {}
    config = deep_merge(defaults, current or {})
    for pointer in update.get("reset") or []:
        tokens = _pointer_tokens(pointer)
        if not tokens:
            config = copy.deepcopy(defaults)
            continue
        parent = config
        for token in tokens[:-1]:
            parent = parent.get(token) if isinstance(parent, dict) else None
            if parent is None:
                break
        if not isinstance(parent, dict):
            continue
        try:
            parent[tokens[-1]] = copy.deepcopy(json_pointer_get(defaults, pointer))
        except (KeyError, IndexError, ValueError):
            parent.pop(tokens[-1], None)
    merge = update.get("merge")
    if isinstance(merge, str):
        try:
            merge = json.loads(merge) if merge.strip() else {}
        except ValueError as exc:
            raise RecipeError(f"configurationUpdate.merge is not JSON: {exc}") from None
    if merge:
        if not isinstance(merge, dict):
            raise RecipeError("configurationUpdate.merge must be a JSON object")
        config = deep_merge(config, merge)
    return config


# ------------------------------------------------------------------ variables
# {ns:key} or {Component:ns:key}; ns restricted so shell ${VAR} and JSON braces are left alone.
_VAR = re.compile(r"\{(?:([A-Za-z0-9][\w.-]*):)?(artifacts|configuration|work|kernel|iot):([^{}\s]*)\}")


def _stringify(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


class Context:
    """What a component's recipe variables resolve to on this device."""

    def __init__(
        self,
        name: str,
        thing: str,
        root: Path,
        artifacts_path: Callable[[str], Path],
        decompressed_path: Callable[[str], Path],
        work_path: Callable[[str], Path],
        configuration: Callable[[str], dict],
        direct_dependencies: Iterable[str],
    ):
        self.name, self.thing, self.root = name, thing, Path(root)
        self._artifacts, self._decompressed, self._work = artifacts_path, decompressed_path, work_path
        self._configuration = configuration
        self.direct_dependencies = set(direct_dependencies)
        self.unresolved: list[str] = []

    def _lookup(self, component: str, ns: str, key: str) -> str | None:
        if ns == "artifacts" and key == "path":
            return str(self._artifacts(component))
        if ns == "artifacts" and key == "decompressedPath":
            return str(self._decompressed(component))
        if ns == "configuration":
            try:
                return _stringify(json_pointer_get(self._configuration(component), key))
            except (KeyError, IndexError, ValueError):
                return None
        if component != self.name:
            return None  # work/kernel/iot have no cross-component form
        if ns == "work" and key == "path":
            return str(self._work(component))
        if ns == "kernel" and key == "rootPath":
            return str(self.root)
        if ns == "iot" and key == "thingName":
            return self.thing
        return None

    def interpolate(self, text: str) -> str:
        """Substitute every recipe variable in ``text``.  Unknown variables and
        cross-component references to anything but a direct dependency stay as
        written (as the nucleus leaves them) and are listed in ``unresolved``."""

        def repl(m: re.Match) -> str:
            component = m.group(1) or self.name
            if component != self.name and component not in self.direct_dependencies:
                self.unresolved.append(m.group(0))
                return m.group(0)
            value = self._lookup(component, m.group(2), m.group(3))
            if value is None:
                self.unresolved.append(m.group(0))
                return m.group(0)
            return value

        return _VAR.sub(repl, text)

    def interpolate_tree(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.interpolate(value)
        if isinstance(value, dict):
            return {k: self.interpolate_tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.interpolate_tree(v) for v in value]
        return value


# ------------------------------------------------------------------ order
def topological_order(graph: dict[str, Iterable[str]]) -> list[str]:
    """Names ordered so every dependency comes before its dependents (stable by
    name); RecipeError on a cycle.  Dependencies outside ``graph`` are ignored."""
    deps = {n: sorted(d for d in graph[n] if d in graph) for n in graph}
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            raise RecipeError(f"dependency cycle: {' -> '.join(path + [node])}")
        state[node] = 1
        for dep in deps[node]:
            visit(dep, path + [node])
        state[node] = 2
        order.append(node)

    for node in sorted(deps):
        visit(node, [])
    return order


# ------------------------------------------------------------------ digests
def verify_digest(path: Path, digest: str, algorithm: str = "SHA-256") -> bool:
    """Check a file against a recipe's ``Digest`` (base64 as the service writes it;
    hex accepted too)."""
    if algorithm.upper().replace("_", "-") not in ("SHA-256", "SHA256"):
        raise RecipeError(f"unsupported digest algorithm {algorithm!r}")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    raw = h.digest()
    return digest in (base64.b64encode(raw).decode(), raw.hex())


def file_digest(path: Path) -> str:
    """The service's form of an artifact digest: base64 SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return base64.b64encode(h.digest()).decode()


# ------------------------------------------------------------------ access control
# IPC services and the operations each authorizes (AWS IoT Greengrass IPC docs).
IPC_OPERATIONS = {
    "aws.greengrass.ipc.pubsub": {"aws.greengrass#PublishToTopic", "aws.greengrass#SubscribeToTopic", "*"},
    "aws.greengrass.ipc.mqttproxy": {"aws.greengrass#PublishToIoTCore", "aws.greengrass#SubscribeToIoTCore", "*"},
}


def access_control_problems(recipes: Iterable[dict]) -> list[str]:
    """What is wrong with the recipes' ``accessControl`` (the GDK schema does not
    model it): unknown services or operations, policy ids not unique across all
    components, MQTT wildcards (``+``/``#``) in local pub/sub resources (only ``*``
    is a wildcard there), empty resource lists.  ``[]`` means fine."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    for recipe in recipes:
        name = recipe.get("ComponentName", "?")
        conf = (recipe.get("ComponentConfiguration") or {}).get("DefaultConfiguration") or {}
        for service, policies in (conf.get("accessControl") or {}).items():
            if service not in IPC_OPERATIONS:
                problems.append(f"{name}: unknown IPC service {service!r}")
                continue
            for policy_id, policy in (policies or {}).items():
                if policy_id in seen:
                    problems.append(f"{name}: policy id {policy_id!r} also used by {seen[policy_id]}")
                seen[policy_id] = name
                if not policy_id.startswith(f"{name}:"):
                    problems.append(f"{name}: policy id {policy_id!r} should start with the component name")
                ops = policy.get("operations") or []
                resources = policy.get("resources") or []
                if not ops:
                    problems.append(f"{name}: {policy_id} has no operations")
                if not resources:
                    problems.append(f"{name}: {policy_id} has no resources")
                for op in ops:
                    if op not in IPC_OPERATIONS[service]:
                        problems.append(f"{name}: {policy_id}: {op!r} is not an operation of {service}")
                for res in resources:
                    if service == "aws.greengrass.ipc.pubsub" and ("+" in res or "#" in res):
                        problems.append(f"{name}: {policy_id}: pubsub resource {res!r} uses an MQTT wildcard")
                    if res == "*" and "*" in ops:
                        problems.append(f"{name}: {policy_id}: grants everything on {service}")
    return problems
