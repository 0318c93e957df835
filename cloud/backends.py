"""Where the cloud layer runs: AWS (boto3) or the embedded local store.

Cloud code takes a :class:`Backend` and calls boto3-shaped clients on it, so
the registry, the approval handler and the deployer are one code path::

    from windfleet.cloud.backends import Backend

    backend = Backend.local()                      # $WINDFLEET_HOME or ~/.windfleet
    backend = Backend.aws(region="eu-west-1", bucket="my-artifacts", thing_group="turbines")

    backend.greengrassv2.list_deployments(targetArn=backend.thing_group_arn(), historyFilter="LATEST_ONLY")

``local`` serves only sagemaker, s3 and greengrassv2 (the services the
lifecycle needs); the provisioning-only clients (iot, events, logs, lambda_,
iam, cloudwatch) are None there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import settings


@dataclass
class Backend:
    """boto3-shaped clients plus the names the cloud layer works with."""

    kind: str  # "aws" | "local"
    sagemaker: Any
    s3: Any
    greengrassv2: Any
    iot: Any = None
    events: Any = None
    logs: Any = None
    lambda_: Any = None
    iam: Any = None
    cloudwatch: Any = None
    bucket: str = settings.BUCKET
    thing_group: str = settings.THING_GROUP
    model_group: str = settings.MODEL_GROUP
    region: str | None = None
    home: Path | None = None  # the local store's directory
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    # -- constructors --------------------------------------------------------
    @classmethod
    def aws(cls, region: str | None = None, session: Any = None, **names: Any) -> "Backend":
        """boto3 clients from the standard credential chain (env, profile, role) and region."""
        import boto3

        session = session or boto3.session.Session(region_name=region)

        def client(name: str) -> Any:
            return session.client(name)

        return cls(kind="aws", sagemaker=client("sagemaker"), s3=client("s3"), greengrassv2=client("greengrassv2"),
                   iot=client("iot"), events=client("events"), logs=client("logs"), lambda_=client("lambda"),
                   iam=client("iam"), cloudwatch=client("cloudwatch"), region=session.region_name,
                   **_names(names))

    @classmethod
    def local(cls, home: str | Path | None = None, **names: Any) -> "Backend":
        """The embedded registry, artifact store and deployment service under ``home``."""
        from .local import LocalGreengrassV2, LocalS3, LocalSageMaker, Store

        store = Store(home)
        s3 = LocalS3(store)
        backend = cls(kind="local", sagemaker=LocalSageMaker(store), s3=s3, greengrassv2=LocalGreengrassV2(store, s3),
                      region="local", home=store.home, **_names(names))
        try:  # the local bucket always exists, so a fresh home works at once
            s3.create_bucket(Bucket=backend.bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        return backend

    @classmethod
    def create(cls, kind: str = "local", home: str | Path | None = None, region: str | None = None,
               **names: Any) -> "Backend":
        """``Backend.create("aws"|"local", ...)`` -- what the CLI's ``--backend`` selects."""
        if kind == "aws":
            return cls.aws(region=region, **names)
        if kind == "local":
            return cls.local(home=home, **names)
        raise ValueError(f"unknown backend {kind!r} (choose local or aws)")

    # -- ARNs ----------------------------------------------------------------
    def thing_group_arn(self, group: str | None = None) -> str:
        """The thing group's ARN (from IoT on AWS; constructed locally)."""
        group = group or self.thing_group
        if self.is_local:
            from .local import thing_group_arn

            return thing_group_arn(group)
        key = ("thing_group_arn", group)
        if key not in self._cache:
            self._cache[key] = self.iot.describe_thing_group(thingGroupName=group)["thingGroupArn"]
        return self._cache[key]

    def s3_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def _names(names: dict) -> dict:
    """Keep only names that were given (None means "the default")."""
    allowed = {"bucket", "thing_group", "model_group"}
    unknown = set(names) - allowed
    if unknown:
        raise TypeError(f"unknown backend names: {', '.join(sorted(unknown))}")
    return {k: v for k, v in names.items() if v is not None}


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; ValueError for anything else."""
    bucket, _, key = uri[5:].partition("/") if uri.startswith("s3://") else ("", "", "")
    if not bucket or not key:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return bucket, key


@functools.lru_cache(maxsize=1)
def lambda_backend() -> Backend:
    """The backend a Lambda function uses: AWS, names from its environment (cached per container)."""
    import os

    return Backend.aws(bucket=os.environ.get("WINDFLEET_BUCKET"),
                       thing_group=os.environ.get("WINDFLEET_THING_GROUP"),
                       model_group=os.environ.get("WINDFLEET_MODEL_GROUP"))
