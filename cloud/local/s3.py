"""``LocalS3``: the subset of the boto3 S3 client windfleet uses, on plain files.

Objects live at ``<home>/s3/<bucket>/<key>``.  Responses have the boto3 shapes
(``get_object()['Body'].read()``, ``ContentLength``, ``ETag``); missing things
raise ClientError with S3's codes (``NoSuchBucket``, ``NoSuchKey``, ``404`` for
``head_object``).
"""

from __future__ import annotations

import hashlib
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..backends import split_s3_uri as split_uri
from .errors import client_error, exceptions_namespace
from .store import Store, atomic_write


class _Body(io.BytesIO):
    """Stands in for botocore's StreamingBody (``read()``, ``close()``, context manager)."""


class LocalS3:
    def __init__(self, store: Store | str | Path | None = None):
        self.store = store if isinstance(store, Store) else Store(store)
        self.exceptions = exceptions_namespace("NoSuchKey", "NoSuchBucket", "BucketAlreadyOwnedByYou")

    # -- paths ---------------------------------------------------------------
    def _bucket_dir(self, bucket: str, operation: str, must_exist: bool = True) -> Path:
        if not bucket or "/" in bucket or bucket.startswith("."):
            raise client_error("InvalidBucketName", f"invalid bucket name {bucket!r}", operation)
        path = self.store.objects / bucket
        if must_exist and not path.is_dir():
            raise client_error("NoSuchBucket", f"The specified bucket does not exist: {bucket}", operation)
        return path

    def path(self, bucket: str, key: str, operation: str = "GetObject") -> Path:
        """The file backing ``s3://bucket/key`` (it may not exist yet)."""
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise client_error("InvalidKey", f"invalid key {key!r}", operation)
        return self._bucket_dir(bucket, operation).joinpath(*parts)

    # -- buckets -------------------------------------------------------------
    def create_bucket(self, Bucket: str, **_: Any) -> dict:
        path = self._bucket_dir(Bucket, "CreateBucket", must_exist=False)
        if path.is_dir():
            raise client_error("BucketAlreadyOwnedByYou", f"bucket {Bucket} exists", "CreateBucket")
        path.mkdir(parents=True, exist_ok=True)
        return {"Location": f"/{Bucket}"}

    def head_bucket(self, Bucket: str) -> dict:
        try:
            self._bucket_dir(Bucket, "HeadBucket")
        except Exception:
            raise client_error("404", "Not Found", "HeadBucket") from None
        return {}

    # -- objects -------------------------------------------------------------
    def put_object(self, Bucket: str, Key: str, Body: bytes | str | Any = b"", **_: Any) -> dict:
        if isinstance(Body, str):
            data = Body.encode()
        elif isinstance(Body, (bytes, bytearray, memoryview)):
            data = bytes(Body)
        else:  # a file-like object, as boto3 accepts
            data = Body.read()
        atomic_write(self.path(Bucket, Key, "PutObject"), data)
        return {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}

    def _existing(self, Bucket: str, Key: str, operation: str) -> Path:
        path = self.path(Bucket, Key, operation)
        if not path.is_file():
            if operation == "HeadObject":
                raise client_error("404", "Not Found", operation)
            raise client_error("NoSuchKey", "The specified key does not exist.", operation)
        return path

    def _meta(self, path: Path, data: bytes) -> dict:
        return {
            "ContentLength": len(data),
            "ETag": f'"{hashlib.md5(data).hexdigest()}"',
            "LastModified": datetime.fromtimestamp(path.stat().st_mtime, timezone.utc),
        }

    def get_object(self, Bucket: str, Key: str, **_: Any) -> dict:
        path = self._existing(Bucket, Key, "GetObject")
        data = path.read_bytes()
        return {"Body": _Body(data), **self._meta(path, data)}

    def head_object(self, Bucket: str, Key: str, **_: Any) -> dict:
        path = self._existing(Bucket, Key, "HeadObject")
        return self._meta(path, path.read_bytes())

    def copy_object(self, Bucket: str, Key: str, CopySource: dict | str, **_: Any) -> dict:
        if isinstance(CopySource, str):
            src_bucket, src_key = CopySource.lstrip("/").split("/", 1)
        else:
            src_bucket, src_key = CopySource["Bucket"], CopySource["Key"]
        data = self._existing(src_bucket, src_key, "CopyObject").read_bytes()
        etag = self.put_object(Bucket=Bucket, Key=Key, Body=data)["ETag"]
        return {"CopyObjectResult": {"ETag": etag}}

    def delete_object(self, Bucket: str, Key: str, **_: Any) -> dict:
        path = self.path(Bucket, Key, "DeleteObject")
        path.unlink(missing_ok=True)
        return {}

    def list_objects_v2(self, Bucket: str, Prefix: str = "", **_: Any) -> dict:
        root = self._bucket_dir(Bucket, "ListObjectsV2")
        contents = []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
            key = path.relative_to(root).as_posix()
            if key.startswith(Prefix):
                contents.append({"Key": key, "Size": path.stat().st_size})
        return {"Contents": contents, "KeyCount": len(contents), "IsTruncated": False}
