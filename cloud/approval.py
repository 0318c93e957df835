"""The approval handler: a model package approved in the registry -> a Greengrass deployment.

On AWS it is the Lambda target of an EventBridge rule with :func:`event_pattern`
(``windfleet cloud provision`` wires it up; handler name
``windfleet.cloud.approval.handler``).  Locally :meth:`Registry.approve` calls
the same function in-process with the same event shape.

For an event it decides, in order:

- not a SageMaker model-package state change, another group, or a status other
  than ``Approved`` -> ``{"status": "ignored"}``;
- the package is no longer Approved when we look (approved, then rejected)
  -> ``ignored``;
- the artifact in the store does not match the sha256 recorded on the package
  (or the card's) -> ``{"status": "refused"}``: the package is set to
  ``Rejected`` with the reason, nothing is deployed;
- otherwise the deployer runs; a duplicate event finds the component version
  and the deployment already there -> ``{"status": "unchanged"}``;
- with the canary enabled for the model package group (:mod:`.canary`, the default)
  and a fleet that already runs a model, the candidate goes to the canary thing
  group only -> ``{"status": "canary"}``; the fleet gets it when the canary
  passes its gates.  Disabled (``windfleet canary configure --disable``, or
  ``canary=False`` from a local caller) or the fleet's first model: straight to
  the fleet as before.

It returns a dict (and logs it as one JSON line) rather than raising for a
refused package: a retry could not succeed, so Lambda should not retry it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from botocore.exceptions import ClientError

from windfleet import jsonlog
from windfleet.model_contract import CARD_FILE, MODEL_FILE

from . import canary as canary_mod
from . import deployer, settings
from .backends import Backend, lambda_backend, split_s3_uri
from .registry import set_approval

log = logging.getLogger("windfleet.cloud.approval")

SOURCE = "aws.sagemaker"
DETAIL_TYPE = "SageMaker Model Package State Change"


def event_pattern(group: str = settings.MODEL_GROUP) -> dict:
    """The EventBridge pattern matching an approval in ``group`` (DESIGN.md)."""
    return {
        "source": [SOURCE],
        "detail-type": [DETAIL_TYPE],
        "detail": {"ModelPackageGroupName": [group], "ModelApprovalStatus": ["Approved"]},
    }


EVENT_PATTERN = event_pattern()


def _read(backend: Backend, uri: str) -> bytes:
    bucket, key = split_s3_uri(uri)
    return backend.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _result(status: str, **fields: Any) -> dict:
    out = {"status": status, **fields}
    jsonlog.event(log, f"approval {status}", **fields)
    return out


def handler(event: dict, context: Any = None, *, backend: Backend | None = None,
            group: str | None = None, canary: bool | None = None) -> dict:
    """Lambda entry point (``handler(event, context)``); ``backend``/``group`` for local use and tests;
    ``canary`` overrides the group's canary setting (None: as configured)."""
    backend = backend or lambda_backend()
    group = group or backend.model_group
    detail = event.get("detail") if isinstance(event, dict) else None
    if (not isinstance(detail, dict) or event.get("source") != SOURCE
            or event.get("detail-type") != DETAIL_TYPE):
        return _result("ignored", reason="not a SageMaker model package state change")
    if detail.get("ModelPackageGroupName") != group:
        return _result("ignored", reason=f"group {detail.get('ModelPackageGroupName')!r} is not {group!r}")
    if detail.get("ModelApprovalStatus") != "Approved":
        return _result("ignored", reason=f"status {detail.get('ModelApprovalStatus')!r}")
    arn = detail.get("ModelPackageArn")
    if not arn:
        return _result("ignored", reason="event has no ModelPackageArn")

    desc = backend.sagemaker.describe_model_package(ModelPackageName=arn)
    if desc["ModelApprovalStatus"] != "Approved":  # a stale or out-of-order event
        return _result("ignored", arn=arn, reason=f"package is {desc['ModelApprovalStatus']} now")

    files, problem = _verified_artifacts(backend, desc)
    if problem:
        set_approval(backend.sagemaker, arn, "Rejected", f"refused by windfleet: {problem}")
        return _result("refused", arn=arn, reason=problem)

    hook = None
    config = canary_mod.load_config(backend, group)
    if config["enabled"] if canary is None else canary:
        def hook(previous: dict) -> dict | None:  # the fleet runs a model: the candidate goes to the canary first
            return canary_mod.start(backend, desc["ModelPackageVersion"], files, arn, config, group)
    outcome = deployer.deploy_model(backend, desc["ModelPackageVersion"], files, package_arn=arn, canary=hook)
    return _result(outcome.pop("status"), arn=arn, **outcome)


def _verified_artifacts(backend: Backend, desc: dict) -> tuple[dict[str, bytes], str | None]:
    """Fetch model.onnx + model.json and check them against the package's record."""
    meta = desc.get("CustomerMetadataProperties") or {}
    expected = meta.get("onnx_sha256")
    if not expected or not meta.get("model_uri") or not meta.get("card_uri"):
        return {}, "package records no onnx_sha256/model_uri/card_uri"
    try:
        onnx = _read(backend, meta["model_uri"])
        card_bytes = _read(backend, meta["card_uri"])
    except (ClientError, ValueError) as exc:
        return {}, f"artifact unavailable: {exc}"
    actual = hashlib.sha256(onnx).hexdigest()
    if actual != expected:
        return {}, f"model.onnx sha256 {actual[:12]}... does not match the recorded {expected[:12]}..."
    try:
        card = json.loads(card_bytes)
    except ValueError:
        return {}, "model.json is not valid JSON"
    if not isinstance(card, dict) or card.get("onnx_sha256") != expected:
        return {}, "model.json's onnx_sha256 does not match the recorded sha256"
    return {MODEL_FILE: onnx, CARD_FILE: card_bytes}, None
