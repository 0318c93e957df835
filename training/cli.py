"""``windfleet train`` and ``windfleet score`` (see ``register``)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from botocore.exceptions import ClientError

from windfleet.model_contract import ModelPackageError
from windfleet.preprocessing import DataError

from .sagemaker_cli import aws_options


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


class TurbinesType(click.ParamType):
    """``--turbines``: a number (simulated turbines per fleet) or, with ``--from-capture``,
    turbine ids separated by commas (``gw1-t00,gw1-t03``)."""

    name = "N|ID,..."

    def convert(self, value, param, ctx):
        if isinstance(value, (int, list)):
            return value
        text = str(value).strip()
        if text.isdigit():
            return click.IntRange(1, 1000).convert(int(text), param, ctx)
        ids = [t.strip() for t in text.split(",") if t.strip()]
        if not ids:
            self.fail(f"{value!r} is neither a number nor turbine ids", param, ctx)
        return ids


def _capture_s3(kind: str, home: str | None, region: str | None):
    """The boto3-shaped S3 client ``--from-capture s3://...`` reads with (as ``windfleet registry`` builds it)."""
    from windfleet.cloud.backends import Backend
    from windfleet.cloud.local.store import default_home

    if kind == "local" and not Path(home or default_home()).is_dir():
        raise DataError(f"no local store at {home or default_home()} (--home, or --capture-backend aws)")
    return Backend.create(kind, home=home, region=region).s3


def register(group: click.Group) -> None:
    """Add ``train`` and ``score`` to the windfleet command group."""

    @group.command()
    @aws_options  # --backend aws: the same training as a SageMaker job (training/sagemaker_cli.py)
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="model package directory to write")
    @click.option("--quick", is_flag=True, help="small fleet, few epochs (< 2 min on 2 cores)")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--turbines", type=TurbinesType(), default=None,
                  help="simulated turbines per fleet; with --from-capture: the turbine ids to use (a,b,...)")
    @click.option("--hours", type=click.FloatRange(0.05, 1000), default=None, help="simulated hours per turbine")
    @click.option("--epochs", type=click.IntRange(1, 10000), default=None, help="maximum epochs (early stopping may stop sooner)")
    @click.option("--version", "version", default="1.0.0", show_default=True, help="model version (semver)")
    @click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="train on this CSV instead of simulated data")
    @click.option("--features", default=None, help="CSV feature columns, comma-separated")
    @click.option("--label", default=None, help="CSV label column (non-zero = anomalous row)")
    @click.option("--sep", default=",", show_default=True, help="CSV field separator")
    @click.option("--window", type=click.IntRange(2, 10000), default=None,
                  help="CSV: samples per window (default: about rows/15, at most 100)")
    @click.option("--stride", type=click.IntRange(1, 10000), default=None,
                  help="CSV: samples between scored windows (default: window/10)")
    @click.option("--max-far", type=click.FloatRange(0.0, 1.0), default=None,
                  help="fail, writing no model, when the held-out false-alarm rate exceeds this (default 0.01)")
    @click.option("--no-eval", is_flag=True, help="skip evaluation")
    @click.option("--from-capture", "from_capture", default=None, metavar="S3URI|DIR",
                  help="retrain from captured normal windows: s3://bucket/prefix or a directory of *.jsonl.gz")
    @click.option("--since", default=None, metavar="T",
                  help="--from-capture: windows captured at or after T (ISO-8601 or epoch seconds)")
    @click.option("--mix", type=click.Choice(["simulated", "csv", "none"]), default=None,
                  help="--from-capture: mix captures with a simulated fleet (default; its held-out test fleet "
                       "keeps the false-alarm gate), a CSV (--csv) or nothing")
    @click.option("--include-flagged", is_flag=True,
                  help="--from-capture: also train on unlabelled windows the old model flagged")
    @click.option("--capture-backend", type=click.Choice(["local", "aws"]), default="local", show_default=True,
                  help="--from-capture s3://: the local store's S3 or AWS S3 (boto3 credentials)")
    @click.option("--home", type=click.Path(file_okay=False), default=None,  # no envvar: the store reads it
                  help="--from-capture s3:// with the local store: its directory [default: $WINDFLEET_HOME or "
                       "~/.windfleet]")
    def train(out, quick, seed, turbines, hours, epochs, version, csv_path, features, label, sep, window, stride,
              max_far, no_eval, from_capture, since, mix, include_flagged, capture_backend, home):
        """Train the autoencoder and write DIR/model.onnx, DIR/model.json, DIR/evaluation.json."""
        from . import pipeline
        from .capture import parse_since
        from .csv import parse_features

        def log(msg: str) -> None:
            click.echo(msg, err=True)

        max_far = pipeline.MAX_HELD_OUT_FAR if max_far is None else max_far
        capture_only = {"--since": since, "--mix": mix, "--include-flagged": include_flagged}
        try:
            if from_capture:
                if isinstance(turbines, int):
                    turbines = [str(turbines)]  # with --from-capture, --turbines names turbines
                if window or stride:
                    raise DataError("--window/--stride: a model retrained from captures keeps the captured windows' length")
                if csv_path and not features:
                    raise DataError("--csv needs --features a,b,c (the captured features, in their order)")
                s3 = _capture_s3(capture_backend, home, click.get_current_context().params.get("region")) \
                    if from_capture.startswith("s3://") else None
                card = pipeline.train_from_capture(
                    from_capture, out, s3=s3, since=parse_since(since), turbines=turbines,
                    include_flagged=include_flagged, mix=mix or ("csv" if csv_path else "simulated"),
                    csv_path=csv_path, csv_features=parse_features(features) if features else None, label=label,
                    sep=sep, seed=seed, hours=hours, quick=quick, epochs=epochs, version=version,
                    evaluate=not no_eval, log=log, max_far=max_far)
            elif given := [k for k, v in capture_only.items() if v]:
                raise DataError(f"{'/'.join(given)} apply to --from-capture only")
            elif isinstance(turbines, list):
                raise DataError("--turbines a,b,... (turbine ids) applies to --from-capture only; "
                                "without it --turbines is a number")
            elif csv_path:
                if not features:
                    raise DataError("--csv needs --features a,b,c")
                card = pipeline.train_csv(csv_path, parse_features(features), out, label=label, sep=sep, seed=seed,
                                          epochs=epochs or (15 if quick else 40), version=version,
                                          evaluate=not no_eval, window=window, stride=stride, log=log,
                                          max_far=max_far)
            else:
                if features or label or window or stride:
                    raise DataError("--features/--label/--window/--stride apply to --csv only")
                card = pipeline.train_simulated(out, seed=seed, turbines=turbines, hours=hours, quick=quick,
                                                epochs=epochs, version=version, evaluate=not no_eval, log=log,
                                                max_far=max_far)
        except (DataError, ModelPackageError, OSError) as exc:
            raise _fail(exc) from None
        except ClientError as exc:  # reading captures from S3
            err = exc.response.get("Error", {})
            raise click.ClickException(f"{exc.operation_name}: {err.get('Code')}: {err.get('Message')}") from None
        summary = {"out": out, "version": card["version"], "features": card["features"],
                   **{k: v for k, v in card["metrics"].items() if k in ("autoencoder", "training_seconds")}}
        if card.get("lineage"):
            lineage = card["lineage"]
            summary["lineage"] = {**lineage, "captures": len(lineage.get("captures") or [])}
        click.echo(json.dumps(summary))

    @group.command()
    @click.option("--model", "model_dir", required=True, type=click.Path(), help="model package directory")
    @click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False), help="CSV to score")
    @click.option("--features", default=None, help="CSV columns for the model's features, in its order")
    @click.option("--sep", default=",", show_default=True)
    @click.option("--label", default=None, help="label column: print point-wise F1/FAR/MAR (SKAB) as JSON")
    @click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="predictions CSV to write")
    def score(model_dir, csv_path, features, sep, label, out):
        """Score a CSV: one row per input row with anomaly (0/1) and score."""
        from .csv import parse_features
        from .score import score_csv

        try:
            result = score_csv(model_dir, csv_path, out, features=parse_features(features), sep=sep, label=label)
        except (DataError, ModelPackageError, OSError) as exc:
            raise _fail(exc) from None
        click.echo(f"wrote {out}", err=True)
        click.echo(json.dumps(result))
