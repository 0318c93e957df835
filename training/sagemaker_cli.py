"""``windfleet train --backend aws`` and ``windfleet pipeline upsert|start|status`` (click).

:func:`aws_options` adds the SageMaker options to ``windfleet train``: with
``--backend aws`` the command runs as a SageMaker training job
(:mod:`.sagemaker_job`); with ``--backend local`` (the default) it is unchanged.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import click

from . import sagemaker_job as sj

ROLE_ENV = "WINDFLEET_SAGEMAKER_ROLE"


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _errors(f: Callable) -> Callable:
    """SDK, AWS and package errors as one line."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        from windfleet.cloud.registry import RegistryError
        from windfleet.model_contract import ModelPackageError

        try:
            return f(*args, **kwargs)
        except (sj.SageMakerError, RegistryError, ModelPackageError, ValueError, OSError) as exc:
            raise click.ClickException(" ".join(str(exc).split()) or type(exc).__name__) from None
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise click.ClickException(f"{exc.operation_name}: {err.get('Code')}: {err.get('Message')}") from None
        except BotoCoreError as exc:
            raise click.ClickException(f"AWS: {exc}") from None

    return wrapper


def _role(role: str | None) -> str:
    if not role:
        raise click.UsageError(f"--backend aws needs --role (the SageMaker execution role ARN) or ${ROLE_ENV}")
    return role


def _aws_backend(region: str | None, bucket: str | None, model_group: str | None) -> Any:
    from windfleet.cloud.backends import Backend

    return Backend.aws(region=region, bucket=bucket, model_group=model_group)


_AWS_OPTIONS = ("backend", "region", "bucket", "model_group", "role", "instance_type", "instance_count",
                "job_name", "image_uri")
# ``windfleet train`` options a SageMaker job honours; any other one set is refused, not ignored
_JOB_OPTIONS = {"out", "quick", "seed", "turbines", "hours", "epochs", "version", "csv_path", "features", "label",
                "sep", "no_eval"}


def aws_options(f: Callable) -> Callable:
    """Add ``--backend local|aws`` and the SageMaker options to ``windfleet train``.

    With ``--backend aws`` the wrapped command does not run: the training runs as a
    SageMaker job (:func:`train_on_sagemaker`) and is registered.
    """

    @functools.wraps(f)
    def wrapper(**kwargs: Any) -> Any:
        aws = {k: kwargs.pop(k) for k in _AWS_OPTIONS}
        if aws.pop("backend") != "aws":
            return f(**kwargs)
        ctx = click.get_current_context()
        unsupported = sorted(k for k in kwargs if k not in _JOB_OPTIONS
                             and ctx.get_parameter_source(k) not in (None, click.core.ParameterSource.DEFAULT))
        if unsupported:
            raise click.UsageError("not supported with --backend aws: "
                                   + ", ".join("--" + k.replace("_", "-") for k in unsupported))
        return train_on_sagemaker(**aws, **{k: v for k, v in kwargs.items() if k in _JOB_OPTIONS})

    options = [
        click.option("--backend", type=click.Choice(["local", "aws"]), default="local", show_default=True,
                     help="train here, or as a SageMaker training job registered in the model registry"),
        click.option("--region", default=None, help="[aws] AWS region (default: the boto3 chain)"),
        click.option("--bucket", default=None, envvar="WINDFLEET_BUCKET", help="[aws] artifact bucket"),
        click.option("--group", "model_group", default=None, envvar="WINDFLEET_MODEL_GROUP",
                     help="[aws] model package group"),
        click.option("--role", default=None, envvar=ROLE_ENV, help="[aws] SageMaker execution role ARN"),
        click.option("--instance-type", default=sj.DEFAULT_INSTANCE_TYPE, show_default=True,
                     help="[aws] training instance type"),
        click.option("--instance-count", type=click.IntRange(1, 100), default=1, show_default=True,
                     help="[aws] training instances (the first one trains)"),
        click.option("--job-name", default=None, help="[aws] training job name [default: windfleet-<time>]"),
        click.option("--image-uri", default=None, help="[aws] training image [default: SageMaker's PyTorch image]"),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@_errors
def train_on_sagemaker(*, region, bucket, model_group, role, instance_type, instance_count, job_name, image_uri,
                       out, quick, seed, turbines, hours, epochs, version, csv_path, features, label, sep,
                       no_eval) -> None:
    """``windfleet train --backend aws``: the job, then the registered package as JSON on stdout."""
    from windfleet.model_contract import load_card

    from .csv import parse_features
    from .pipeline import DEFAULT, QUICK

    config = sj.JobConfig(role=_role(role), instance_type=instance_type, instance_count=instance_count,
                          image_uri=image_uri)
    hps: dict[str, Any] = {"version": version, "evaluate": not no_eval}
    if csv_path:
        names = parse_features(features)
        if not names:
            raise click.UsageError("--csv needs --features a,b,c")
        data = sj.csv_data(csv_path, names, label=label, sep=sep, seed=seed)
        hps["epochs"] = epochs or (15 if quick else 40)
    else:
        if features or label:
            raise click.UsageError("--features/--label apply to --csv only")
        d_turbines, d_hours, _ = QUICK if quick else DEFAULT
        data = sj.simulated_data(seed=seed, turbines=turbines or d_turbines, hours=hours or d_hours)
        hps.update({"quick": quick, **({"epochs": epochs} if epochs else {})})
    backend = _aws_backend(region, bucket, model_group)
    info = sj.train(backend, config, data, out, name=job_name, hyperparameters=hps, log=_log)
    card = load_card(out)
    click.echo(json.dumps({
        "out": out, "version": card["version"], "features": card["features"],
        **{k: v for k, v in card["metrics"].items() if k in ("autoencoder", "training_seconds")},
        "job": info["job"], "model_artifacts": info["model_artifacts"],
        "package": {k: info[k] for k in ("version", "arn", "status", "group")},
    }))


# -- windfleet pipeline -----------------------------------------------------------------
def register(group: click.Group) -> None:
    """Add ``pipeline upsert|start|status`` to the windfleet command group."""
    from windfleet.cloud.cli import backend_options

    from . import sm_pipeline as sp

    @group.group()
    def pipeline() -> None:
        """The SageMaker Pipeline: prepare -> train -> evaluate -> F1/false-alarm gate -> register (--backend aws)."""

    name_option = click.option("--name", default=sp.NAME, show_default=True, help="pipeline name")

    @pipeline.command()
    @backend_options
    @name_option
    @click.option("--role", default=None, envvar=ROLE_ENV, help="SageMaker execution role ARN (pipeline and jobs)")
    @click.option("--instance-type", default=sj.DEFAULT_INSTANCE_TYPE, show_default=True,
                  help="default training instance type")
    @click.option("--instance-count", type=click.IntRange(1, 100), default=1, show_default=True)
    @click.option("--processing-instance-type", default=sp.PROCESSING_INSTANCE_TYPE, show_default=True)
    @click.option("--min-f1", type=click.FloatRange(0, 1), default=sp.MIN_F1, show_default=True,
                  help="default quality bar: held-out F1 at least this")
    @click.option("--max-far", type=click.FloatRange(0, 1), default=sp.MAX_FALSE_ALARM_RATE, show_default=True,
                  help="default quality bar: false-alarm rate at most this")
    @_errors
    def upsert(backend, name, role, instance_type, instance_count, processing_instance_type, min_f1, max_far):
        """Create or update the pipeline's definition."""
        config = sp.PipelineConfig(role=_role(role), name=name, instance_type=instance_type,
                                   instance_count=instance_count, processing_instance_type=processing_instance_type,
                                   min_f1=min_f1, max_false_alarm_rate=max_far)
        arn = sp.upsert(backend, config)
        click.echo(json.dumps({"pipeline": name, "arn": arn}))

    @pipeline.command()
    @backend_options
    @name_option
    @click.option("--csv", "csv_path", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="train on this CSV (uploaded as the run's InputData)")
    @click.option("--features", default=None, help="CSV feature columns, comma-separated")
    @click.option("--label", default=None, help="CSV label column")
    @click.option("--seed", type=int, default=None, help="simulated fleet seed (uploads a fleet spec)")
    @click.option("--turbines", type=click.IntRange(1, 1000), default=None)
    @click.option("--hours", type=click.FloatRange(0.05, 1000), default=None)
    @click.option("--epochs", type=click.IntRange(1, 10000), default=None)
    @click.option("--version", "model_version", default=None, help="model version (semver)")
    @click.option("--instance-type", default=None, help="training instance type for this run")
    @click.option("--min-f1", type=click.FloatRange(0, 1), default=None)
    @click.option("--max-far", type=click.FloatRange(0, 1), default=None)
    @_errors
    def start(backend, name, csv_path, features, label, seed, turbines, hours, epochs, model_version,
              instance_type, min_f1, max_far):
        """Start a run (with no data options: the default simulated fleet)."""
        from .csv import parse_features

        data = None
        if csv_path:
            names = parse_features(features)
            if not names:
                raise click.UsageError("--csv needs --features a,b,c")
            data = sj.csv_data(csv_path, names, label=label)
        elif features or label:
            raise click.UsageError("--features/--label apply to --csv only")
        elif seed is not None or turbines or hours:
            data = sj.simulated_data(seed=seed or 0, turbines=turbines or 6, hours=hours or 2.0)
        params = {k: v for k, v in {"Epochs": epochs, "ModelVersion": model_version,
                                    "TrainingInstanceType": instance_type, "MinF1": min_f1,
                                    "MaxFalseAlarmRate": max_far}.items() if v is not None}
        if backend.is_local:
            raise sj.SageMakerError("SageMaker Pipelines need --backend aws")
        arn = sp.start(backend, name, params, data)
        click.echo(json.dumps({"pipeline": name, "execution": arn}))

    @pipeline.command()
    @backend_options
    @name_option
    @click.option("--execution", default=None, help="execution ARN [default: the latest]")
    @_errors
    def status(backend, name, execution):
        """The latest run's status and each step's."""
        if backend.is_local:
            raise sj.SageMakerError("SageMaker Pipelines need --backend aws")
        click.echo(json.dumps(sp.status(backend, name, execution), default=str))

