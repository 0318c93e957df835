"""``LocalSageMaker``: the SageMaker Model Registry subset windfleet uses.

Model package groups and versioned model packages with ``ModelApprovalStatus``
(``PendingManualApproval`` | ``Approved`` | ``Rejected``),
``CustomerMetadataProperties`` and ``ModelMetrics``.  ARNs look like the
service's (``arn:aws:sagemaker:local:000000000000:model-package/<group>/<N>``);
unknown packages and groups raise ``ValidationException`` as SageMaker does.

``CustomerMetadataProperties`` are checked as the service checks them (at most 50
entries; keys 1-128 and values 1-256 characters of letters, digits, spaces and
``_.:/=+-@``), so what the local store accepts AWS accepts too;
``update_model_package`` merges them and removes ``CustomerMetadataPropertiesToRemove``,
as SageMaker does.  The approval decisions live there (:mod:`windfleet.cloud.registry`).
"""

from __future__ import annotations

import json
import time
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import client_error, exceptions_namespace
from .store import Store

ACCOUNT = "000000000000"
REGION = "local"
APPROVAL_STATUSES = ("PendingManualApproval", "Approved", "Rejected")
MAX_METADATA_ENTRIES = 50


def _metadata_text_ok(text: Any, limit: int) -> bool:
    return (isinstance(text, str) and 1 <= len(text) <= limit
            and all(c in "_.:/=+-@" or unicodedata.category(c)[0] in "LZN" for c in text))


def check_metadata(metadata: dict, operation: str) -> None:
    """SageMaker's constraints on ``CustomerMetadataProperties`` (ValidationException)."""
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise client_error("ValidationException", f"CustomerMetadataProperties holds {len(metadata)} entries; "
                           f"at most {MAX_METADATA_ENTRIES}", operation)
    for key, value in metadata.items():
        if not _metadata_text_ok(key, 128) or not _metadata_text_ok(value, 256):
            raise client_error("ValidationException", f"CustomerMetadataProperties entry {key!r}: {value!r} fails "
                               "the pattern [\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]* (keys 1-128, values 1-256 chars)",
                               operation)


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


class LocalSageMaker:
    def __init__(self, store: Store | str | Path | None = None):
        self.store = store if isinstance(store, Store) else Store(store)
        self.exceptions = exceptions_namespace("ValidationException", "ResourceNotFoundException")

    # -- ARNs ----------------------------------------------------------------
    @staticmethod
    def package_arn(group: str, version: int) -> str:
        return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{group}/{version}"

    @staticmethod
    def group_arn(group: str) -> str:
        return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package-group/{group}"

    def _parse_package(self, name: str, operation: str) -> tuple[str, int]:
        # Accept the ARN (what windfleet passes) like the service does.
        try:
            resource = name.split(":", 5)[5] if name.startswith("arn:") else name
            kind, group, version = resource.split("/")
            assert kind == "model-package"
            return group, int(version)
        except Exception:
            raise client_error("ValidationException", f"Model package {name} not found", operation) from None

    # -- groups --------------------------------------------------------------
    def create_model_package_group(self, ModelPackageGroupName: str,
                                   ModelPackageGroupDescription: str = "", **_: Any) -> dict:
        with self.store.tx() as db:
            if db.execute("SELECT 1 FROM model_package_groups WHERE name=?", (ModelPackageGroupName,)).fetchone():
                raise client_error("ValidationException", "Model Package Group already exists: "
                                   + self.group_arn(ModelPackageGroupName), "CreateModelPackageGroup")
            db.execute("INSERT INTO model_package_groups VALUES (?,?,?)",
                       (ModelPackageGroupName, ModelPackageGroupDescription, time.time()))
        return {"ModelPackageGroupArn": self.group_arn(ModelPackageGroupName)}

    def describe_model_package_group(self, ModelPackageGroupName: str) -> dict:
        with self.store.read() as db:
            row = db.execute("SELECT * FROM model_package_groups WHERE name=?", (ModelPackageGroupName,)).fetchone()
        if row is None:
            raise client_error("ValidationException", f"ModelPackageGroup {self.group_arn(ModelPackageGroupName)} "
                               "does not exist.", "DescribeModelPackageGroup")
        return {"ModelPackageGroupName": row["name"], "ModelPackageGroupArn": self.group_arn(row["name"]),
                "ModelPackageGroupDescription": row["description"] or "", "CreationTime": _ts(row["created"]),
                "ModelPackageGroupStatus": "Completed", "CreatedBy": {"UserProfileName": "windfleet-local"}}

    def list_model_package_groups(self, **_: Any) -> dict:
        with self.store.read() as db:
            rows = db.execute("SELECT * FROM model_package_groups ORDER BY created").fetchall()
        return {"ModelPackageGroupSummaryList": [
            {"ModelPackageGroupName": r["name"], "ModelPackageGroupArn": self.group_arn(r["name"]),
             "CreationTime": _ts(r["created"]), "ModelPackageGroupStatus": "Completed"} for r in rows]}

    def delete_model_package_group(self, ModelPackageGroupName: str) -> dict:
        with self.store.tx() as db:
            if db.execute("SELECT 1 FROM model_packages WHERE grp=?", (ModelPackageGroupName,)).fetchone():
                raise client_error("ConflictException", "group still holds model packages", "DeleteModelPackageGroup")
            db.execute("DELETE FROM model_package_groups WHERE name=?", (ModelPackageGroupName,))
        return {}

    # -- packages ------------------------------------------------------------
    def create_model_package(self, ModelPackageGroupName: str, ModelPackageDescription: str = "",
                             ModelApprovalStatus: str = "PendingManualApproval",
                             CustomerMetadataProperties: dict | None = None,
                             ModelMetrics: dict | None = None, **_: Any) -> dict:
        if ModelApprovalStatus not in APPROVAL_STATUSES:
            raise client_error("ValidationException", f"bad ModelApprovalStatus {ModelApprovalStatus!r}",
                               "CreateModelPackage")
        check_metadata(CustomerMetadataProperties or {}, "CreateModelPackage")
        now = time.time()
        with self.store.tx() as db:
            if not db.execute("SELECT 1 FROM model_package_groups WHERE name=?", (ModelPackageGroupName,)).fetchone():
                raise client_error("ValidationException", f"Model Package Group {ModelPackageGroupName} does not "
                                   "exist", "CreateModelPackage")
            last = db.execute("SELECT MAX(version) FROM model_packages WHERE grp=?",
                              (ModelPackageGroupName,)).fetchone()[0]
            version = (last or 0) + 1
            db.execute("INSERT INTO model_packages VALUES (?,?,?,?,?,?,?,?,?)",
                       (ModelPackageGroupName, version, ModelPackageDescription, ModelApprovalStatus, None,
                        json.dumps(CustomerMetadataProperties or {}),
                        json.dumps(ModelMetrics) if ModelMetrics else None, now, now))
        return {"ModelPackageArn": self.package_arn(ModelPackageGroupName, version)}

    def _row(self, group: str, version: int, name: str, operation: str):
        with self.store.read() as db:
            row = db.execute("SELECT * FROM model_packages WHERE grp=? AND version=?", (group, version)).fetchone()
        if row is None:
            raise client_error("ValidationException", f"Model package {name} not found", operation)
        return row

    def _summary(self, row) -> dict:
        return {
            "ModelPackageGroupName": row["grp"],
            "ModelPackageVersion": row["version"],
            "ModelPackageArn": self.package_arn(row["grp"], row["version"]),
            "ModelPackageDescription": row["description"] or "",
            "CreationTime": _ts(row["created"]),
            "ModelPackageStatus": "Completed",
            "ModelApprovalStatus": row["approval"],
        }

    def describe_model_package(self, ModelPackageName: str) -> dict:
        group, version = self._parse_package(ModelPackageName, "DescribeModelPackage")
        row = self._row(group, version, ModelPackageName, "DescribeModelPackage")
        out = self._summary(row)
        out["ModelPackageName"] = row["grp"]  # a versioned package is named after its group
        out["ModelPackageStatusDetails"] = {"ValidationStatuses": [], "ImageScanStatuses": []}
        out["LastModifiedTime"] = _ts(row["modified"])
        out["CustomerMetadataProperties"] = json.loads(row["metadata"])
        if row["metrics"]:
            out["ModelMetrics"] = json.loads(row["metrics"])
        if row["approval_description"] is not None:
            out["ApprovalDescription"] = row["approval_description"]
        return out

    def list_model_packages(self, ModelPackageGroupName: str | None = None, ModelApprovalStatus: str | None = None,
                            SortBy: str = "CreationTime", SortOrder: str = "Ascending",
                            MaxResults: int = 100, NextToken: str | None = None, **_: Any) -> dict:
        sql, args = "SELECT * FROM model_packages WHERE 1=1", []
        if ModelPackageGroupName:
            sql, args = sql + " AND grp=?", args + [ModelPackageGroupName]
        if ModelApprovalStatus:
            sql, args = sql + " AND approval=?", args + [ModelApprovalStatus]
        sql += " ORDER BY created, version" + (" DESC" if SortOrder == "Descending" else "")
        start = int(NextToken or 0)
        with self.store.read() as db:
            rows = db.execute(sql, args).fetchall()
        page = rows[start:start + MaxResults]
        out: dict = {"ModelPackageSummaryList": [self._summary(r) for r in page]}
        if start + MaxResults < len(rows):
            out["NextToken"] = str(start + MaxResults)
        return out

    def update_model_package(self, ModelPackageArn: str, ModelApprovalStatus: str | None = None,
                             ApprovalDescription: str | None = None,
                             CustomerMetadataProperties: dict | None = None,
                             CustomerMetadataPropertiesToRemove: list[str] | None = None, **_: Any) -> dict:
        group, version = self._parse_package(ModelPackageArn, "UpdateModelPackage")
        if ApprovalDescription is not None and len(ApprovalDescription) > 1024:
            raise client_error("ValidationException", "ApprovalDescription is longer than 1024 characters",
                               "UpdateModelPackage")
        if ModelApprovalStatus is not None and ModelApprovalStatus not in APPROVAL_STATUSES:
            raise client_error("ValidationException", f"bad ModelApprovalStatus {ModelApprovalStatus!r}",
                               "UpdateModelPackage")
        with self.store.tx() as db:
            row = db.execute("SELECT * FROM model_packages WHERE grp=? AND version=?", (group, version)).fetchone()
            if row is None:
                raise client_error("ValidationException", f"Model package {ModelPackageArn} not found",
                                   "UpdateModelPackage")
            metadata = json.loads(row["metadata"])
            check_metadata(CustomerMetadataProperties or {}, "UpdateModelPackage")
            metadata.update(CustomerMetadataProperties or {})
            for key in CustomerMetadataPropertiesToRemove or []:
                metadata.pop(key, None)
            if len(metadata) > MAX_METADATA_ENTRIES:
                raise client_error("ValidationException", f"the package would hold {len(metadata)} "
                                   f"CustomerMetadataProperties; at most {MAX_METADATA_ENTRIES}", "UpdateModelPackage")
            db.execute("UPDATE model_packages SET approval=?, approval_description=?, metadata=?, modified=? "
                       "WHERE grp=? AND version=?",
                       (ModelApprovalStatus or row["approval"],
                        ApprovalDescription if ApprovalDescription is not None else row["approval_description"],
                        json.dumps(metadata), time.time(), group, version))
        return {"ModelPackageArn": self.package_arn(group, version)}

    def delete_model_package(self, ModelPackageName: str) -> dict:
        group, version = self._parse_package(ModelPackageName, "DeleteModelPackage")
        with self.store.tx() as db:
            db.execute("DELETE FROM model_packages WHERE grp=? AND version=?", (group, version))
        return {}
