"""The model registry: SageMaker Model Registry on AWS, the local store otherwise.

::

    from windfleet.cloud.backends import Backend
    from windfleet.cloud.registry import Registry

    reg = Registry(Backend.local())
    pkg = reg.register("runs/model")        # -> {"version": 1, "status": "PendingManualApproval", ...}
    reg.list()                               # every version, oldest first
    reg.approve(1, "F1 0.94 vs 0.91", actor="alice")   # local: deploys at once; AWS: EventBridge -> Lambda
    reg.reject(2, "F1 below the bar", actor="bob")
    reg.get(1)["decisions"]                  # [{"status", "actor", "at", "reason"}], oldest first
    reg.card(reg.get(1))                     # the model card (model.json) from the artifact store

A package version is SageMaker's ``ModelPackageVersion`` (1, 2, ...).  It
becomes component version ``1.0.N`` (:mod:`.settings`).  ``approve`` and
``reject`` also accept the model card's own version string when it names
exactly one package.

What a package records: the ONNX file's sha256, the artifact locations and the
card's numeric metrics (``CustomerMetadataProperties``: ``onnx_sha256``,
``model_uri``, ``card_uri``, ``model_version``, ``metric:<name>``, headline metrics
first, at most :data:`MAX_METRIC_PROPERTIES`), and the
full metrics document in ``ModelMetrics.ModelQuality.Statistics``.  Artifacts
are uploaded to ``s3://<bucket>/models/<group>/<sha256[:16]>/`` (``evaluation.json``
too when the package has one: ``evaluation_uri``).

Decisions (the audit trail).  Every approve/reject -- and the approval handler's
refusal, as actor ``windfleet`` -- is recorded with the package itself:

* ``ApprovalDescription``: the latest decision's reason, verbatim (<= 1024 characters);
* ``CustomerMetadataProperties``: per decision ``decision:<n>`` = ``"<Status> <UTC time> <actor>"``
  and ``decision:<n>:reason`` = the reason.  SageMaker allows only letters, digits,
  spaces and ``_.:/=+-@`` in metadata values (at most 256 characters, 50 entries per
  package), so any other character is written as ``=XX`` per UTF-8 byte (``,`` ->
  ``=2C``; :func:`encode_value`), and a reason longer than a value holds is cut there
  (the full text of the latest one stays in ``ApprovalDescription``).  The last
  :data:`MAX_DECISIONS` decisions are kept in the metadata.

Lineage (a model retrained from captures: the card's ``lineage``, see
``training/capture.py``) takes up to :data:`MAX_LINEAGE_PROPERTIES` entries, the metrics
giving them room: ``lineage:parent`` (the parent model version), ``lineage:captures``
(``"<n objects> <their common prefix>"``), ``lineage:captures_sha256`` (sha256 of the
card's capture list, one URI per line, sorted: the full list is in the card),
``lineage:windows`` and ``lineage:turbines`` (ids separated by spaces, cut to fit).

``update_model_package`` merges ``CustomerMetadataProperties`` on AWS and in the local
store; moto replaces them, so :func:`set_approval` always sends the whole set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from windfleet import jsonlog
from windfleet.model_contract import CARD_FILE, MODEL_FILE, load_card

from . import settings
from .backends import Backend, split_s3_uri

log = logging.getLogger("windfleet.cloud.registry")

# CustomerMetadataProperties holds at most 50 entries: 6 for the package's record, at most
# 30 metrics less the lineage entries (at most MAX_LINEAGE_PROPERTIES), 2 per decision for the
# last MAX_DECISIONS decisions.
MAX_METRIC_PROPERTIES = 30
MAX_LINEAGE_PROPERTIES = 5
EVALUATION_FILE = "evaluation.json"  # training's full evaluation, uploaded beside the card when present
MAX_DECISIONS = 7
MAX_METADATA_VALUE = 256
MAX_DESCRIPTION = 1024  # ApprovalDescription
ACTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,63}$")
DEFAULT_ACTOR = "windfleet"  # automated decisions (the approval handler's refusals) and callers that name nobody
# headline metrics first, so the capped set keeps what an approver reads
_METRIC_ORDER = ("autoencoder.", "isolation_forest.", "pca.", "per_kind")
_DECISION_KEY = re.compile(r"^decision:(\d+)$")


class RegistryError(Exception):
    """A registry operation that cannot be done (unknown version, bad input); one-line message."""


def flat_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of the card's metrics as ``{"a.b": x}`` (bools and non-numbers dropped)."""
    out: dict[str, float] = {}
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            out.update(flat_metrics(value, f"{prefix}{key}."))
    elif isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
        out[prefix[:-1]] = float(metrics)
    return out


def metadata_char_ok(c: str) -> bool:
    """SageMaker's metadata pattern ``[\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]``, one character."""
    return c in "_.:/=+-@" or unicodedata.category(c)[0] in "LZN"


def encode_value(text: str) -> str:
    """Free text -> a metadata value SageMaker accepts: ASCII letters, digits, space and
    ``_.:/+-@`` stay; every other character becomes ``=XX`` per UTF-8 byte (``=`` too)."""
    out = []
    for c in text:
        if c.isascii() and (c.isalnum() or c in " _.:/+-@"):
            out.append(c)
        else:
            out.extend(f"={b:02X}" for b in c.encode())
    return "".join(out)


def decode_value(value: str) -> str:
    """The inverse of :func:`encode_value` (a malformed escape is kept as it is)."""
    return re.sub(r"(?:=[0-9A-F]{2})+", lambda m: bytes.fromhex(m.group(0).replace("=", "")).decode(
        "utf-8", "replace"), value)


ELLIPSIS = "\u2026"


def encode_capped(text: str, limit: int = MAX_METADATA_VALUE) -> str:
    """:func:`encode_value` of ``text``, cut between characters to fit ``limit``; a cut
    text ends with an ellipsis (itself encoded)."""
    out, size, mark = [], 0, encode_value(ELLIPSIS)
    for i, c in enumerate(text):
        e = encode_value(c)
        if size + len(e) > limit or (size + len(e) + len(mark) > limit and i < len(text) - 1):
            return "".join(out) + mark
        out.append(e)
        size += len(e)
    return "".join(out)


def check_actor(actor: str) -> str:
    """An actor name (letters, digits, space, ``_.@+-``; at most 64) or ValueError."""
    if not isinstance(actor, str) or not ACTOR_RE.match(actor):
        raise ValueError(f"actor {actor!r} must be 1-64 letters, digits, spaces or _.@+- (starting with a "
                         "letter or digit)")
    return actor


def decisions(meta: dict, description: str = "") -> list[dict]:
    """The decisions recorded in a package's metadata, oldest first:
    ``[{"n", "status", "at", "actor", "reason"}]``.  When the latest one's reason was cut
    to fit the metadata, its full text comes from ``ApprovalDescription``."""
    out = []
    for key, value in meta.items():
        m = _DECISION_KEY.match(key)
        if not m:
            continue
        status, _, rest = str(value).partition(" ")
        at, _, actor = rest.partition(" ")
        out.append({"n": int(m.group(1)), "status": status, "at": at, "actor": decode_value(actor),
                    "reason": decode_value(str(meta.get(f"{key}:reason", "")))})
    out.sort(key=lambda d: d["n"])
    if out and out[-1]["reason"].endswith(ELLIPSIS) and description.startswith(out[-1]["reason"][:-1]):
        out[-1]["reason"] = description
    return out


def record_decision(meta: dict, status: str, reason: str, actor: str, at: str) -> tuple[dict, list[str]]:
    """``meta`` plus one decision, trimmed to the last :data:`MAX_DECISIONS`; returns
    ``(new metadata, keys removed)``."""
    meta = dict(meta)
    numbers = sorted(int(m.group(1)) for k in meta if (m := _DECISION_KEY.match(k)))
    n = (numbers[-1] + 1) if numbers else 1
    meta[f"decision:{n}"] = f"{status} {at} {encode_value(actor)}"
    if reason:  # a metadata value is at least one character
        meta[f"decision:{n}:reason"] = encode_capped(reason)
    removed = []
    for old in numbers[: max(0, len(numbers) + 1 - MAX_DECISIONS)]:
        for key in (f"decision:{old}", f"decision:{old}:reason"):
            if meta.pop(key, None) is not None:
                removed.append(key)
    return meta, removed


def lineage_metadata(lineage: Any) -> dict[str, str]:
    """The card's ``lineage`` -> at most :data:`MAX_LINEAGE_PROPERTIES` metadata entries
    (module docstring); ``{}`` for a card without one."""
    if not isinstance(lineage, dict):
        return {}
    out = {}
    if lineage.get("parent"):
        out["lineage:parent"] = encode_capped(str(lineage["parent"]))
    captures = [str(c) for c in lineage.get("captures") or []]
    if captures:
        prefix = os.path.commonprefix(captures)
        prefix = prefix[: prefix.rfind("/") + 1] if len(captures) > 1 else captures[0]
        out["lineage:captures"] = encode_capped(f"{len(captures)} {prefix}")
        out["lineage:captures_sha256"] = hashlib.sha256("\n".join(sorted(captures)).encode()).hexdigest()
    if isinstance(lineage.get("capture_windows"), int):
        out["lineage:windows"] = str(lineage["capture_windows"])
    if lineage.get("turbines"):
        out["lineage:turbines"] = encode_capped(" ".join(map(str, lineage["turbines"])))
    return out


def lineage_info(meta: dict) -> dict | None:
    """A package's lineage entries -> ``{"parent", "captures" (count), "captures_prefix",
    "captures_sha256", "capture_windows", "turbines"}``; None when it has none."""
    if not any(k.startswith("lineage:") for k in meta):
        return None
    count, _, prefix = decode_value(meta.get("lineage:captures", "")).partition(" ")
    windows = meta.get("lineage:windows", "")
    return {
        "parent": decode_value(meta["lineage:parent"]) if meta.get("lineage:parent") else None,
        "captures": int(count) if count.isdigit() else None,
        "captures_prefix": prefix or None,
        "captures_sha256": meta.get("lineage:captures_sha256"),
        "capture_windows": int(windows) if windows.isdigit() else None,
        "turbines": decode_value(meta.get("lineage:turbines", "")).split(),
    }


def package_info(desc: dict) -> dict:
    """A ``describe_model_package`` response -> windfleet's registry entry."""
    meta = desc.get("CustomerMetadataProperties") or {}
    created = desc.get("CreationTime")
    metrics = {}
    for key, value in meta.items():
        if key.startswith("metric:"):
            name = decode_value(key[len("metric:"):])
            try:
                metrics[name] = float(value)
            except ValueError:
                metrics[name] = value
    return {
        "version": int(desc["ModelPackageVersion"]),
        "arn": desc["ModelPackageArn"],
        "group": desc["ModelPackageGroupName"],
        "status": desc["ModelApprovalStatus"],
        "model_version": decode_value(meta["model_version"]) if meta.get("model_version") else None,
        "component_version": settings.model_component_version(desc["ModelPackageVersion"]),
        "metrics": metrics,
        "sha256": meta.get("onnx_sha256"),
        "model_uri": meta.get("model_uri"),
        "card_uri": meta.get("card_uri"),
        "evaluation_uri": meta.get("evaluation_uri"),
        "data_fingerprint": decode_value(meta["data_fingerprint"]) if meta.get("data_fingerprint") else None,
        "description": desc.get("ApprovalDescription") or "",
        "decisions": decisions(meta, desc.get("ApprovalDescription") or ""),
        "lineage": lineage_info(meta),
        "created_at": created.astimezone(timezone.utc).isoformat() if isinstance(created, datetime) else created,
    }


def approval_event(desc: dict, region: str = "local", account: str = "000000000000") -> dict:
    """The EventBridge event SageMaker emits for a package's approval-state change."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "SageMaker Model Package State Change",
        "source": "aws.sagemaker",
        "account": account,
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [desc["ModelPackageArn"]],
        "detail": {
            "ModelPackageGroupName": desc["ModelPackageGroupName"],
            "ModelPackageVersion": desc["ModelPackageVersion"],
            "ModelPackageArn": desc["ModelPackageArn"],
            "ModelPackageName": desc["ModelPackageGroupName"],
            "ModelPackageStatus": desc.get("ModelPackageStatus", "Completed"),
            "ModelApprovalStatus": desc["ModelApprovalStatus"],
        },
    }


def utc_now() -> str:
    """The time a decision is recorded with: UTC, seconds, ``2026-11-30T10:31:49Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_approval(sm: Any, arn: str, status: str, description: str, actor: str = DEFAULT_ACTOR,
                 at: str | None = None) -> None:
    """``update_model_package``: the new status, ``description`` as ``ApprovalDescription``
    and the decision (status, time, actor, reason) added to ``CustomerMetadataProperties``.

    The whole property set is sent (the package's record plus the decisions): SageMaker
    merges it (a no-op for the unchanged keys), and an implementation that replaces it
    (moto does) cannot lose the sha256 the approval handler checks.
    """
    check_actor(actor)
    description = description[:MAX_DESCRIPTION]
    meta = sm.describe_model_package(ModelPackageName=arn).get("CustomerMetadataProperties") or {}
    meta, removed = record_decision(meta, status, description, actor, at or utc_now())
    kwargs: dict[str, Any] = {"ModelPackageArn": arn, "ModelApprovalStatus": status,
                              "ApprovalDescription": description, "CustomerMetadataProperties": meta}
    if removed:
        kwargs["CustomerMetadataPropertiesToRemove"] = removed
    sm.update_model_package(**kwargs)


class Registry:
    """Register, list, approve and reject model packages of one model package group."""

    def __init__(self, backend: Backend, group: str | None = None):
        self.backend = backend
        self.group = group or backend.model_group
        self.sm = backend.sagemaker
        self._json_cache: dict[str, dict] = {}
        self._size_cache: dict[str, int] = {}

    # -- group ---------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the model package group unless it exists (idempotent)."""
        try:
            self.sm.describe_model_package_group(ModelPackageGroupName=self.group)
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("ValidationException", "ResourceNotFound"):
                raise
        self.sm.create_model_package_group(
            ModelPackageGroupName=self.group,
            ModelPackageGroupDescription="windfleet turbine anomaly autoencoders (ONNX + model card)")

    # -- register ------------------------------------------------------------
    def register(self, model_dir: str | Path) -> dict:
        """Upload a model package directory and register it as PendingManualApproval."""
        model_dir = Path(model_dir)
        card = load_card(model_dir, verify=True)  # ModelPackageError: a one-line reason
        digest = card["onnx_sha256"]
        self.ensure_group()
        prefix = settings.MODEL_PREFIX.format(group=self.group, digest=digest[:16])
        s3, bucket = self.backend.s3, self.backend.bucket
        s3.put_object(Bucket=bucket, Key=prefix + MODEL_FILE, Body=(model_dir / MODEL_FILE).read_bytes(),
                      ContentType="application/octet-stream")
        s3.put_object(Bucket=bucket, Key=prefix + CARD_FILE, Body=(model_dir / CARD_FILE).read_bytes(),
                      ContentType="application/json")
        s3.put_object(Bucket=bucket, Key=prefix + "metrics.json", Body=json.dumps(card["metrics"]).encode(),
                      ContentType="application/json")
        evaluation = model_dir / EVALUATION_FILE
        if evaluation.is_file():
            s3.put_object(Bucket=bucket, Key=prefix + EVALUATION_FILE, Body=evaluation.read_bytes(),
                          ContentType="application/json")
        metadata = {
            "onnx_sha256": digest,
            "model_uri": self.backend.s3_uri(prefix + MODEL_FILE),
            "card_uri": self.backend.s3_uri(prefix + CARD_FILE),
            "model_version": encode_value(str(card["version"]))[:256],
            "data_fingerprint": encode_value(str(card["data_fingerprint"]))[:256],
        }
        if evaluation.is_file():
            metadata["evaluation_uri"] = self.backend.s3_uri(prefix + EVALUATION_FILE)
        lineage = lineage_metadata(card.get("lineage"))
        metadata.update(lineage)
        metrics = sorted(flat_metrics(card["metrics"]).items(),
                         key=lambda kv: next((i for i, p in enumerate(_METRIC_ORDER) if kv[0].startswith(p)),
                                             len(_METRIC_ORDER)))
        for name, value in metrics[:MAX_METRIC_PROPERTIES - len(lineage)]:
            metadata[f"metric:{encode_value(name)}"[:128]] = repr(round(value, 6))
        resp = self.sm.create_model_package(
            ModelPackageGroupName=self.group,
            ModelPackageDescription=f"windfleet anomaly model {card['version']}"[:1024],
            ModelApprovalStatus="PendingManualApproval",
            CustomerMetadataProperties=metadata,
            ModelMetrics={"ModelQuality": {"Statistics": {
                "ContentType": "application/json", "S3Uri": self.backend.s3_uri(prefix + "metrics.json")}}},
        )
        info = package_info(self.sm.describe_model_package(ModelPackageName=resp["ModelPackageArn"]))
        jsonlog.event(log, "model registered", version=info["version"], arn=info["arn"], sha256=digest)
        return info

    # -- read ----------------------------------------------------------------
    def _summaries(self) -> list[dict]:
        out, token = [], None
        while True:
            kwargs = {"ModelPackageGroupName": self.group, "SortBy": "CreationTime", "SortOrder": "Ascending",
                      "MaxResults": 100}
            if token:
                kwargs["NextToken"] = token
            try:
                page = self.sm.list_model_packages(**kwargs)
            except ClientError as exc:
                if exc.response["Error"]["Code"] in ("ValidationException", "ResourceNotFound"):
                    return []
                raise
            out.extend(page.get("ModelPackageSummaryList", []))
            token = page.get("NextToken")
            if not token:
                return out

    def list(self) -> list[dict]:
        """Every version of the group, oldest first (version, arn, status, metrics, sha256, created_at...)."""
        return [self.describe(s["ModelPackageArn"]) for s in self._summaries()]

    def describe(self, arn: str) -> dict:
        return package_info(self.sm.describe_model_package(ModelPackageName=arn))

    def resolve(self, version: int | str) -> str:
        """A package version (``3``, ``"3"``, ``"v3"``) or a card version -> the package ARN."""
        text = str(version).strip()
        number = text[1:] if text[:1] in ("v", "V") and text[1:].isdigit() else text
        summaries = self._summaries()
        if number.isdigit():
            for s in summaries:
                if int(s["ModelPackageVersion"]) == int(number):
                    return s["ModelPackageArn"]
        else:
            matches = [i["arn"] for i in map(lambda s: self.describe(s["ModelPackageArn"]), summaries)
                       if i["model_version"] == text]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise RegistryError(f"model version {text!r} names {len(matches)} packages in {self.group}; "
                                    "use the package version number")
        known = ", ".join(str(s["ModelPackageVersion"]) for s in summaries) or "none"
        raise RegistryError(f"no model package version {text!r} in group {self.group} (known: {known})")

    def get(self, version: int | str) -> dict:
        return self.describe(self.resolve(version))

    # -- artifacts -----------------------------------------------------------
    def read_json(self, uri: str | None) -> dict | None:
        """A JSON object from the artifact store (cached: the keys are content-addressed); None if unreadable."""
        if not uri:
            return None
        cached = self._json_cache.get(uri)  # content-addressed keys: a uri's object never changes
        if cached is None:
            bucket, key = split_s3_uri(uri)
            try:
                cached = json.loads(self.backend.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            except (ClientError, ValueError, OSError) as exc:
                jsonlog.event(log, "artifact unreadable", logging.WARNING, uri=uri, error=str(exc)[:200])
                return None
            if isinstance(cached, dict):
                self._json_cache[uri] = cached
        return cached if isinstance(cached, dict) else None

    def card(self, info: dict) -> dict | None:
        """The model card (``model.json``) of a registry entry, from the artifact store (None if unreadable)."""
        return self.read_json(info.get("card_uri"))

    def artifact_size(self, info: dict) -> int | None:
        """``model.onnx``'s size in bytes (None if the store cannot say)."""
        uri = info.get("model_uri")
        if not uri:
            return None
        if uri not in self._size_cache:
            bucket, key = split_s3_uri(uri)
            try:
                self._size_cache[uri] = int(self.backend.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
            except (ClientError, KeyError, ValueError, OSError):
                return None
        return self._size_cache[uri]

    def evaluation(self, info: dict) -> dict | None:
        """Training's ``evaluation.json`` of a registry entry, when it was registered with one."""
        return self.read_json(info.get("evaluation_uri"))

    # -- decide --------------------------------------------------------------
    def approve(self, version: int | str, reason: str = "approved with windfleet",
                actor: str = DEFAULT_ACTOR) -> dict:
        """Mark a version Approved, recording ``reason`` and ``actor``.  Locally the approval
        handler deploys it at once (``result["deployment"]``); on AWS the EventBridge rule
        invokes the Lambda."""
        check_actor(actor)
        arn = self.resolve(version)
        set_approval(self.sm, arn, "Approved", reason or "approved with windfleet", actor)
        desc = self.sm.describe_model_package(ModelPackageName=arn)
        info = package_info(desc)
        jsonlog.event(log, "model approved", version=info["version"], arn=arn, actor=actor, reason=reason)
        if self.backend.is_local:
            from .approval import handler

            info["deployment"] = handler(approval_event(desc), None, backend=self.backend, group=self.group)
            info = {**package_info(self.sm.describe_model_package(ModelPackageName=arn)),
                    "deployment": info["deployment"]}  # the handler may have refused it
        else:
            info["deployment"] = None  # EventBridge -> the approval Lambda
        return info

    def reject(self, version: int | str, reason: str = "", actor: str = DEFAULT_ACTOR) -> dict:
        """Mark a version Rejected with ``reason`` and ``actor`` (it is never deployed)."""
        check_actor(actor)
        arn = self.resolve(version)
        set_approval(self.sm, arn, "Rejected", reason or "rejected with windfleet", actor)
        jsonlog.event(log, "model rejected", arn=arn, reason=reason, actor=actor)
        return self.describe(arn)
