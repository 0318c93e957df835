"""``windfleet train --backend aws``: the same training as a SageMaker training job.

::

    from windfleet.cloud.backends import Backend
    from windfleet.training import sagemaker_job as sj

    backend = Backend.aws(region="eu-west-1", bucket="my-artifacts")
    config = sj.JobConfig(role="arn:aws:iam::123456789012:role/windfleet-sagemaker", instance_type="ml.c5.2xlarge")
    package = sj.train(backend, config, sj.simulated_data(seed=0, turbines=50, hours=24), epochs=40)

What happens: the project is staged as ``source_dir`` (its package folders,
``pyproject.toml`` and a ``requirements.txt`` the container installs) -> the data
goes to ``s3://<bucket>/training/<job>/data/train/`` -> the ``sagemaker`` SDK's
PyTorch estimator starts the job (entry point :mod:`.sagemaker_entry`) -> the job
is polled, each status change printed -> its ``model.tar.gz`` is downloaded and
registered with :class:`windfleet.cloud.registry.Registry` as
PendingManualApproval, carrying its metrics.  Approval then deploys it as before.

Everything the SDK would otherwise look up in the account (region, default bucket,
execution role) is passed explicitly; the image URI comes from the SDK's bundled
table and its usage telemetry is off, so building a job needs no network beyond the AWS
calls themselves.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from windfleet.cloud.backends import Backend, split_s3_uri

from .sagemaker_entry import FLEET_SPEC, METRIC_DEFINITIONS

ENTRY_POINT = "training/sagemaker_entry.py"  # relative to the staged source_dir
PREFIX = "training"  # s3://<bucket>/training/<job>/{data,source,output}
# The newest PyTorch training image the SDK's bundled table knows (sagemaker 2.257).
FRAMEWORK_VERSION = "2.8.0"
PY_VERSION = "py312"
DEFAULT_INSTANCE_TYPE = "ml.m5.xlarge"
# what the container must add to its own torch and numpy (the train extra, minus torch)
CONTAINER_REQUIREMENTS = (".", "onnx>=1.16", "onnxscript>=0.1", "scikit-learn>=1.4", "tqdm>=4.66")
# the project's folders that make up the windfleet package (pyproject's package-dir)
SOURCE_PARTS = ("pyproject.toml", "README.md", "windfleet", "training", "cloud", "components")
POLL_SECONDS = 15.0


class SageMakerError(Exception):
    """A job that failed or stopped, or a launch that cannot start; one-line message."""


@dataclass
class JobConfig:
    """How and where a training job runs (defaults in one place)."""

    role: str  # the job's execution role ARN (never looked up: that needs IAM access)
    instance_type: str = DEFAULT_INSTANCE_TYPE
    instance_count: int = 1
    framework_version: str = FRAMEWORK_VERSION
    py_version: str = PY_VERSION
    image_uri: str | None = None  # None: the SDK's PyTorch training image for the region
    max_run_seconds: int = 24 * 3600
    poll_seconds: float = POLL_SECONDS


@dataclass
class Data:
    """The train channel's files and the hyperparameters that say how to read them."""

    files: dict[str, bytes | Path]  # name in the channel -> content
    hyperparameters: dict[str, Any] = field(default_factory=dict)


def simulated_data(seed: int = 0, turbines: int = 6, hours: float = 2.0) -> Data:
    """A simulated fleet.  The simulator is deterministic in its seed, so the channel
    carries the fleet's spec and the job generates exactly the data a laptop would."""
    import json

    spec = {"seed": seed, "turbines": turbines, "hours": hours}
    return Data({FLEET_SPEC: json.dumps(spec).encode()})


def csv_data(path: str | Path, features: list[str], label: str | None = None, sep: str = ",",
             seed: int = 0) -> Data:
    """A CSV file, uploaded as it is, with the columns to train on."""
    path = Path(path)
    if not path.is_file():
        raise SageMakerError(f"{path}: no such file")
    hps = {"csv": path.name, "features": ",".join(features), "sep": sep, "seed": seed}
    if label:
        hps["label"] = label
    return Data({path.name: path}, hps)


# -- the SDK ----------------------------------------------------------------------------
def _no_telemetry(*args: Any, **kwargs: Any) -> None:
    """Stands in for the SDK's usage-telemetry sender (see :func:`import_sdk`)."""


def import_sdk() -> Any:
    """``import sagemaker`` without its side effects on this process.

    SDK v2 warns about its deprecation, logs where it looked for config files,
    configures the root logger (``logging.basicConfig`` in an experiments module a
    ``fit`` imports) and, through sagemaker-core, installs rich's traceback hook
    globally: windfleet's one-line errors and its logging stay as they are.  It also sends an HTTP GET
    of usage telemetry per ``fit``/``run`` (to an AWS-owned bucket, with no
    timeout): windfleet sends nothing beyond the AWS calls it makes.  The SDK's
    own opt-out (``TelemetryOptOut`` in a defaults config) makes it re-validate
    that config against its JSON schema on each of ~130 lookups (~0.5 s each
    here: a pipeline build takes a minute), so the private sender is replaced
    instead (sagemaker is pinned <3 for this).
    """
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    for name in ("sagemaker.config", "sagemaker.telemetry.telemetry_logging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hook, root = sys.excepthook, logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import sagemaker
        import sagemaker.experiments.run  # noqa: F401 - a fit imports it, and it calls logging.basicConfig
        import sagemaker.pytorch  # noqa: F401
        from sagemaker.telemetry import telemetry_logging
    except ImportError as exc:
        raise SageMakerError("the sagemaker SDK is not installed: pip install 'windfleet[aws]'") from exc
    finally:
        sys.excepthook = hook
        root.handlers[:], root.level = handlers, level
    telemetry_logging._send_telemetry_request = _no_telemetry
    return sagemaker


def session(backend: Backend, boto_session: Any = None, pipeline: bool = False) -> Any:
    """A ``sagemaker.Session`` on the backend's clients, region and bucket (no lookups)."""
    if backend.is_local:
        raise SageMakerError("SageMaker needs --backend aws (the local backend trains with 'windfleet train')")
    sagemaker = import_sdk()
    import boto3

    boto_session = boto_session or boto3.session.Session(region_name=backend.region)
    kwargs = {"boto_session": boto_session, "sagemaker_client": backend.sagemaker, "default_bucket": backend.bucket}
    if pipeline:
        from sagemaker.workflow.pipeline_context import PipelineSession

        return PipelineSession(**kwargs)
    return sagemaker.Session(**kwargs)


def project_root() -> Path:
    """The checkout this package was installed from (editable install or source tree)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise SageMakerError(f"{root}: not a windfleet checkout (SageMaker jobs ship the project as source_dir)")
    return root


def stage_source(dest: str | Path, root: Path | None = None) -> Path:
    """Copy the project's package folders to ``dest`` and write the container's requirements.txt.

    Only what ``pip install .`` needs goes in: never .venv, runs, build output or caches.
    """
    root, dest = root or project_root(), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "node_modules", "*.onnx")
    for part in SOURCE_PARTS:
        src = root / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / part)
    (dest / "requirements.txt").write_text(
        "# the PyTorch container brings torch and numpy; '.' is windfleet itself (pyproject.toml)\n"
        + "\n".join(CONTAINER_REQUIREMENTS) + "\n")
    return dest


@contextmanager
def staged_source() -> Iterator[Path]:
    """:func:`stage_source` into a temporary directory that lives as long as the block."""
    with tempfile.TemporaryDirectory(prefix="windfleet-source-") as tmp:
        yield stage_source(Path(tmp) / "source")


def estimator(sm_session: Any, config: JobConfig, source_dir: str | Path, output_path: str,
              hyperparameters: dict[str, Any], code_location: str | None = None) -> Any:
    """The PyTorch framework estimator that runs :mod:`.sagemaker_entry` on the staged project."""
    import_sdk()
    from sagemaker.pytorch import PyTorch

    kwargs: dict[str, Any] = {"image_uri": config.image_uri} if config.image_uri else {
        "framework_version": config.framework_version, "py_version": config.py_version}
    return PyTorch(
        entry_point=ENTRY_POINT, source_dir=str(source_dir), role=config.role,
        instance_type=config.instance_type, instance_count=config.instance_count,
        hyperparameters=hyperparameters, output_path=output_path, code_location=code_location or output_path,
        metric_definitions=METRIC_DEFINITIONS, max_run=config.max_run_seconds, sagemaker_session=sm_session,
        disable_profiler=True, debugger_hook_config=False,  # no debugger rules: they start jobs of their own
        **kwargs)


def job_name(now: datetime | None = None) -> str:
    """``windfleet-YYYYmmdd-HHMMSS-ffffff``: unique, sortable, within SageMaker's 63 characters."""
    return "windfleet-" + (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S-%f")


# -- one job ----------------------------------------------------------------------------
def upload_data(backend: Backend, data: Data, prefix: str) -> str:
    """Put the channel's files under ``prefix`` in the bucket; return the channel's S3 URI."""
    for name, content in data.files.items():
        body = content.read_bytes() if isinstance(content, Path) else content
        backend.s3.put_object(Bucket=backend.bucket, Key=f"{prefix}{name}", Body=body)
    return backend.s3_uri(prefix)


def start(backend: Backend, config: JobConfig, data: Data, *, name: str | None = None,
          hyperparameters: dict[str, Any] | None = None, boto_session: Any = None,
          log: Callable[[str], None] = print) -> str:
    """Upload the data and the staged project, start the training job; return its name."""
    name = name or job_name()
    if not re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name):
        raise SageMakerError(f"job name {name!r}: up to 63 letters, digits and hyphens")
    sm_session = session(backend, boto_session)
    channel = upload_data(backend, data, f"{PREFIX}/{name}/data/train/")
    log(f"data: {channel} ({', '.join(data.files)})")
    hps = {**(hyperparameters or {}), **data.hyperparameters}
    with staged_source() as source:
        est = estimator(sm_session, config, source, backend.s3_uri(PREFIX), hps)
        est.fit({"train": channel}, wait=False, logs=False, job_name=name)
    log(f"training job {name} started on {config.instance_count} x {config.instance_type}")
    return name


TERMINAL = ("Completed", "Failed", "Stopped")


def wait(sm: Any, name: str, *, poll_seconds: float = POLL_SECONDS, log: Callable[[str], None] = print,
         sleep: Callable[[float], None] = time.sleep) -> dict:
    """Poll ``describe_training_job`` until it ends, logging each status change; return the description."""
    seen = None
    while True:
        desc = sm.describe_training_job(TrainingJobName=name)
        status = (desc["TrainingJobStatus"], desc.get("SecondaryStatus"))
        if status != seen:
            transitions = desc.get("SecondaryStatusTransitions") or [{}]
            message = transitions[-1].get("StatusMessage", "")
            log(f"{name}: {status[0]} / {status[1]}" + (f" - {message}" if message else ""))
            seen = status
        if status[0] in TERMINAL:
            break
        sleep(poll_seconds)
    if status[0] != "Completed":
        raise SageMakerError(f"training job {name} {status[0].lower()}: {desc.get('FailureReason', 'no reason given')}")
    for metric in desc.get("FinalMetricDataList") or []:
        log(f"{name}: {metric['MetricName']} = {metric['Value']}")
    return desc


def download_package(s3: Any, desc: dict, dest: str | Path) -> Path:
    """The job's ``model.tar.gz`` -> a model package directory at ``dest``."""
    uri = desc["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = split_s3_uri(uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest.parent / f".{dest.name}.model.tar.gz"
    try:
        s3.download_file(bucket, key, str(archive))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/" not in m.name.lstrip("./")]
            for m in members:  # the package is flat: model.onnx, model.json, evaluation.json
                (dest / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    finally:
        archive.unlink(missing_ok=True)
    return dest


def finish(backend: Backend, name: str, out_dir: str | Path, *, poll_seconds: float = POLL_SECONDS,
           log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Wait for the job, download its package to ``out_dir`` and register it (PendingManualApproval)."""
    from windfleet.cloud.registry import Registry

    desc = wait(backend.sagemaker, name, poll_seconds=poll_seconds, log=log, sleep=sleep)
    package_dir = download_package(backend.s3, desc, out_dir)
    info = Registry(backend).register(package_dir)
    log(f"registered {backend.model_group} version {info['version']} ({info['status']})")
    return {**info, "job": name, "model_artifacts": desc["ModelArtifacts"]["S3ModelArtifacts"],
            "out": str(package_dir)}


def train(backend: Backend, config: JobConfig, data: Data, out_dir: str | Path, *, name: str | None = None,
          hyperparameters: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict:
    """Start, wait, download and register: ``windfleet train --backend aws`` in one call."""
    name = start(backend, config, data, name=name, hyperparameters=hyperparameters, log=log)
    return finish(backend, name, out_dir, poll_seconds=config.poll_seconds, log=log)
