"""``windfleet train`` and ``windfleet score`` (see ``register``)."""

from __future__ import annotations

import json

import click

from windfleet.model_contract import ModelPackageError
from windfleet.preprocessing import DataError

from .sagemaker_cli import aws_options


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def register(group: click.Group) -> None:
    """Add ``train`` and ``score`` to the windfleet command group."""

    @group.command()
    @aws_options  # --backend aws: the same training as a SageMaker job (training/sagemaker_cli.py)
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="model package directory to write")
    @click.option("--quick", is_flag=True, help="small fleet, few epochs (< 2 min on 2 cores)")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--turbines", type=click.IntRange(1, 1000), default=None, help="simulated turbines per fleet")
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
    def train(out, quick, seed, turbines, hours, epochs, version, csv_path, features, label, sep, window, stride,
              max_far, no_eval):
        """Train the autoencoder and write DIR/model.onnx, DIR/model.json, DIR/evaluation.json."""
        from . import pipeline
        from .csv import parse_features

        def log(msg: str) -> None:
            click.echo(msg, err=True)

        try:
            if csv_path:
                if not features:
                    raise DataError("--csv needs --features a,b,c")
                card = pipeline.train_csv(csv_path, parse_features(features), out, label=label, sep=sep, seed=seed,
                                          epochs=epochs or (15 if quick else 40), version=version,
                                          evaluate=not no_eval, window=window, stride=stride, log=log,
                                          max_far=pipeline.MAX_HELD_OUT_FAR if max_far is None else max_far)
            else:
                if features or label or window or stride:
                    raise DataError("--features/--label/--window/--stride apply to --csv only")
                card = pipeline.train_simulated(out, seed=seed, turbines=turbines, hours=hours, quick=quick,
                                                epochs=epochs, version=version, evaluate=not no_eval, log=log,
                                                max_far=pipeline.MAX_HELD_OUT_FAR if max_far is None else max_far)
        except (DataError, ModelPackageError, OSError) as exc:
            raise _fail(exc) from None
        summary = {"out": out, "version": card["version"], "features": card["features"],
                   **{k: v for k, v in card["metrics"].items() if k in ("autoencoder", "training_seconds")}}
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
