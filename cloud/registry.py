"""The model registry: SageMaker Model Registry on AWS, the local store otherwise.

::

    from windfleet.cloud.backends import Backend
    from windfleet.cloud.registry import Registry

    reg = Registry(Backend.local())
    pkg = reg.register("runs/model")        # -> {"version": 1, "status": "PendingManualApproval", ...}
    reg.list()                               # every version, oldest first
    reg.approve(1)                           # local: deploys at once; AWS: EventBridge -> Lambda deploys
    reg.reject(2, "F1 below the bar")

A package version is SageMaker's ``ModelPackageVersion`` (1, 2, ...).  It
becomes component version ``1.0.N`` (:mod:`.settings`).  ``approve`` and
``reject`` also accept the model card's own version string when it names
exactly one package.

What a package records: the ONNX file's sha256, the artifact locations and the
card's numeric metrics (``CustomerMetadataProperties``: ``onnx_sha256``,
``model_uri``, ``card_uri``, ``model_version``, ``metric:<name>``), and the
full metrics document in ``ModelMetrics.ModelQuality.Statistics``.  Artifacts
are uploaded to ``s3://<bucket>/models/<group>/<sha256[:16]>/``.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from windfleet import jsonlog
from windfleet.model_contract import CARD_FILE, MODEL_FILE, load_card

from . import settings
from .backends import Backend

log = logging.getLogger("windfleet.cloud.registry")

MAX_METRIC_PROPERTIES = 40  # CustomerMetadataProperties holds at most 50 entries


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


def package_info(desc: dict) -> dict:
    """A ``describe_model_package`` response -> windfleet's registry entry."""
    meta = desc.get("CustomerMetadataProperties") or {}
    created = desc.get("CreationTime")
    metrics = {}
    for key, value in meta.items():
        if key.startswith("metric:"):
            try:
                metrics[key[len("metric:"):]] = float(value)
            except ValueError:
                metrics[key[len("metric:"):]] = value
    return {
        "version": int(desc["ModelPackageVersion"]),
        "arn": desc["ModelPackageArn"],
        "group": desc["ModelPackageGroupName"],
        "status": desc["ModelApprovalStatus"],
        "model_version": meta.get("model_version"),
        "component_version": settings.model_component_version(desc["ModelPackageVersion"]),
        "metrics": metrics,
        "sha256": meta.get("onnx_sha256"),
        "model_uri": meta.get("model_uri"),
        "card_uri": meta.get("card_uri"),
        "description": desc.get("ApprovalDescription") or "",
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


def set_approval(sm: Any, arn: str, status: str, description: str) -> None:
    """``update_model_package`` that keeps the package's CustomerMetadataProperties.

    The properties are sent again unchanged: SageMaker merges them (a no-op), and
    an implementation that replaces them (moto does) cannot lose the sha256 the
    approval handler checks.
    """
    meta = sm.describe_model_package(ModelPackageName=arn).get("CustomerMetadataProperties") or {}
    kwargs: dict[str, Any] = {"ModelPackageArn": arn, "ModelApprovalStatus": status,
                              "ApprovalDescription": description[:1024]}
    if meta:
        kwargs["CustomerMetadataProperties"] = meta
    sm.update_model_package(**kwargs)


class Registry:
    """Register, list, approve and reject model packages of one model package group."""

    def __init__(self, backend: Backend, group: str | None = None):
        self.backend = backend
        self.group = group or backend.model_group
        self.sm = backend.sagemaker

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
        metadata = {
            "onnx_sha256": digest,
            "model_uri": self.backend.s3_uri(prefix + MODEL_FILE),
            "card_uri": self.backend.s3_uri(prefix + CARD_FILE),
            "model_version": str(card["version"])[:256],
            "data_fingerprint": str(card["data_fingerprint"])[:256],
        }
        for name, value in list(flat_metrics(card["metrics"]).items())[:MAX_METRIC_PROPERTIES]:
            metadata[f"metric:{name}"[:128]] = repr(round(value, 6))
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

    # -- decide --------------------------------------------------------------
    def approve(self, version: int | str, description: str = "approved with windfleet") -> dict:
        """Mark a version Approved.  Locally the approval handler deploys it at once
        (``result["deployment"]``); on AWS the EventBridge rule invokes the Lambda."""
        arn = self.resolve(version)
        set_approval(self.sm, arn, "Approved", description)
        desc = self.sm.describe_model_package(ModelPackageName=arn)
        info = package_info(desc)
        jsonlog.event(log, "model approved", version=info["version"], arn=arn)
        if self.backend.is_local:
            from .approval import handler

            info["deployment"] = handler(approval_event(desc), None, backend=self.backend, group=self.group)
            info = {**package_info(self.sm.describe_model_package(ModelPackageName=arn)),
                    "deployment": info["deployment"]}  # the handler may have refused it
        else:
            info["deployment"] = None  # EventBridge -> the approval Lambda
        return info

    def reject(self, version: int | str, reason: str = "") -> dict:
        """Mark a version Rejected with ``reason`` (it is never deployed)."""
        arn = self.resolve(version)
        set_approval(self.sm, arn, "Rejected", reason or "rejected with windfleet")
        jsonlog.event(log, "model rejected", arn=arn, reason=reason)
        return self.describe(arn)
