"""SageMaker's side of training: the script its containers run, on ``windfleet train``'s code.

A training job (the PyTorch framework container, the project as ``source_dir``)
runs ``python training/sagemaker_entry.py --key value ...`` in ``/opt/ml/code``
after ``pip install -r requirements.txt`` (which installs windfleet itself). It
follows SageMaker's container contract:

- data: the ``train`` channel (``SM_CHANNEL_TRAIN``, default
  ``/opt/ml/input/data/train``) holds either ``fleet.json`` (a simulated fleet:
  ``{"seed", "turbines", "hours"}``; the simulator is deterministic in its seed,
  so the spec is the data) or a CSV (the ``csv`` hyperparameter names it, else
  the channel's only ``*.csv``);
- hyperparameters: ``$SM_INPUT_CONFIG_DIR/hyperparameters.json`` (every value a
  JSON-encoded string, as SageMaker writes it) and argv ``--key value`` (as the
  framework containers pass them; argv wins): ``epochs``, ``quick``, ``version``,
  ``evaluate``, and for a CSV ``seed``, ``features``, ``label``, ``sep``, ``csv``;
- output: ``model.onnx``, ``model.json`` and ``evaluation.json`` in
  ``SM_MODEL_DIR`` (SageMaker tars it to ``model.tar.gz``); ``evaluation.json``
  also in ``SM_OUTPUT_DATA_DIR``; metric lines ``windfleet-metric <name>=<x>``
  on stdout for the job's metric definitions.

The pipeline's processing steps run the same file with a verb first
(``prepare``, ``evaluate``, ``register``; see :func:`main`).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder is sys.path[0], and its csv.py would shadow the
# standard library's csv for every import that follows: drop it first.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse  # noqa: E402 - after the sys.path fix above
import json  # noqa: E402
import shutil  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

FLEET_SPEC = "fleet.json"
REPORT = "report.json"  # the evaluate step's output (the pipeline's PropertyFile)
HYPERPARAMETERS = ("seed", "epochs", "quick", "version", "evaluate", "features", "label", "sep", "csv")
METRIC_PREFIX = "windfleet-metric"
# what the job's MetricDefinitions read from the log (name, regex)
METRIC_DEFINITIONS = [
    {"Name": name, "Regex": rf"{METRIC_PREFIX} {name}=([-+0-9.eE]+)"}
    for name in ("f1", "precision", "recall", "false_alarm_rate", "val_loss", "epochs")
]


# -- SageMaker's contract ---------------------------------------------------------------
def sm_dir(env: str, default: str) -> Path:
    return Path(os.environ.get(env, default))


def hyperparameters(argv: list[str]) -> dict[str, Any]:
    """``hyperparameters.json`` (JSON-string values) overlaid by argv ``--key value`` pairs.

    Keys SageMaker adds itself (``sagemaker_*``) are dropped; unknown keys are an error,
    so a misspelt hyperparameter fails the job instead of being ignored.
    """
    hps: dict[str, Any] = {}
    path = sm_dir("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config") / "hyperparameters.json"
    if path.is_file():
        hps.update({key: _decode(value) for key, value in json.loads(path.read_text()).items()})
    if len(argv) % 2 or any(not a.startswith("--") for a in argv[::2]):
        raise SystemExit(f"expected --key value pairs, got {argv!r}")
    hps.update({k[2:].replace("-", "_"): _decode(v) for k, v in zip(argv[::2], argv[1::2])})
    hps = {k: v for k, v in hps.items() if not k.startswith("sagemaker_")}
    unknown = sorted(set(hps) - set(HYPERPARAMETERS))
    if unknown:
        raise SystemExit(f"unknown hyperparameters: {', '.join(unknown)} (known: {', '.join(HYPERPARAMETERS)})")
    return hps


def _decode(value: Any) -> Any:
    """A JSON-encoded value as SageMaker writes them (``"3"``, ``"\\"a,b\\""``); a bare string as it is
    (pipeline parameters arrive unencoded)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def is_leader() -> bool:
    """True on the first host (SM_HOSTS / SM_CURRENT_HOST); one model per job."""
    hosts = json.loads(os.environ.get("SM_HOSTS", "[]") or "[]")
    return not hosts or os.environ.get("SM_CURRENT_HOST", hosts[0]) == hosts[0]


def find_csv(channel: Path, name: str | None) -> Path:
    if name:
        path = channel / name
        if not path.is_file():
            raise SystemExit(f"{path}: not in the train channel")
        return path
    found = sorted(channel.rglob("*.csv"))
    if len(found) != 1:
        raise SystemExit(f"{channel}: expected {FLEET_SPEC} or exactly one *.csv, found {len(found)} CSV files "
                         "(name one with the csv hyperparameter)")
    return found[0]


def train(argv: list[str]) -> int:
    """The training job: the channel's data -> the model package in SM_MODEL_DIR."""
    hps = hyperparameters(argv)
    if not is_leader():  # the autoencoder trains on one host; the others have nothing to add
        print(f"{os.environ.get('SM_CURRENT_HOST')}: not the first host, nothing to do", flush=True)
        return 0
    from windfleet.training import pipeline
    from windfleet.training.csv import parse_features

    channel = sm_dir("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train")
    model_dir = sm_dir("SM_MODEL_DIR", "/opt/ml/model")
    output_dir = sm_dir("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")
    common = {"version": str(hps.get("version", "1.0.0")), "evaluate": _bool(hps.get("evaluate", True)),
              "progress": False, "log": lambda msg: print(msg, flush=True)}
    epochs = int(hps["epochs"]) if _text(hps.get("epochs")) else None
    # fit_package writes its directory by renaming a sibling into place; SM_MODEL_DIR
    # may be a mount point that cannot be renamed, so train beside it and copy in.
    with tempfile.TemporaryDirectory(prefix="windfleet-") as tmp:
        out = Path(tmp) / "model"
        if (channel / FLEET_SPEC).is_file():
            spec = json.loads((channel / FLEET_SPEC).read_text())
            card = pipeline.train_simulated(out, seed=int(spec.get("seed", 0)), turbines=spec.get("turbines"),
                                            hours=spec.get("hours"), quick=_bool(hps.get("quick", False)),
                                            epochs=epochs, **common)
        else:
            features = parse_features(_text(hps.get("features")))
            if not features:
                raise SystemExit("a CSV channel needs the features hyperparameter (a,b,c)")
            card = pipeline.train_csv(find_csv(channel, _text(hps.get("csv"))), features, out,
                                      label=_text(hps.get("label")), sep=str(hps.get("sep") or ","),
                                      seed=int(hps.get("seed", 0)),
                                      epochs=epochs or (15 if _bool(hps.get("quick", False)) else 40), **common)
        model_dir.mkdir(parents=True, exist_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        for item in out.iterdir():
            shutil.copy2(item, model_dir / item.name)
        if (out / "evaluation.json").is_file():
            shutil.copy2(out / "evaluation.json", output_dir / "evaluation.json")
    print_metrics(card["metrics"])
    return 0


def print_metrics(metrics: dict[str, Any]) -> None:
    flat = {**metrics.get("autoencoder", {}), "val_loss": metrics.get("val_loss"), "epochs": metrics.get("epochs")}
    for name, value in flat.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            print(f"{METRIC_PREFIX} {name}={value}", flush=True)


# -- the pipeline's processing steps -----------------------------------------------------
def unpack_model(src: Path, dest: Path) -> Path:
    """A processing input holding ``model.tar.gz`` (or the package itself) -> the package dir."""
    tars = sorted(src.rglob("model.tar.gz"))
    if not tars:
        return src
    with tarfile.open(tars[0]) as tar:
        tar.extractall(dest, filter="data")
    return dest


def prepare(args: argparse.Namespace) -> int:
    """Check the raw data and hand the train channel exactly what training reads."""
    src, out = Path(args.input), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if (src / FLEET_SPEC).is_file():
        spec = json.loads((src / FLEET_SPEC).read_text())
        if not {"seed", "turbines", "hours"} <= set(spec):
            raise SystemExit(f"{src / FLEET_SPEC}: needs seed, turbines and hours")
        shutil.copy2(src / FLEET_SPEC, out / FLEET_SPEC)
        print(f"simulated fleet: {spec}", flush=True)
        return 0
    from windfleet.training.csv import parse_features, read

    features = parse_features(args.features)
    if not features:
        raise SystemExit("a CSV needs --features a,b,c")
    path = find_csv(src, _text(args.csv))
    table = read(path, features, _text(args.label), args.sep)  # DataError: one line, fails the step
    shutil.copy2(path, out / path.name)
    print(f"{path.name}: {len(table.x)} rows of {', '.join(features)}", flush=True)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Verify the trained package (digest, ONNX loads and scores) and report its metrics."""
    import numpy as np
    import onnxruntime as ort

    from windfleet.model_contract import MODEL_FILE, load_card

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = unpack_model(Path(args.model), Path(tmp))
        card = load_card(model_dir, verify=True)
        session = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
        x = np.zeros((2, *card["window"]["shape"]), dtype=np.float32)
        y = session.run(None, {session.get_inputs()[0].name: x})[0]
        if y.shape != x.shape or not np.isfinite(y).all():
            raise SystemExit(f"{MODEL_FILE}: output {y.shape} for input {x.shape}")
    ae = card["metrics"].get("autoencoder")
    # without a labelled evaluation the quality bar cannot be met: report the worst values
    report = {"autoencoder": ae or {"precision": 0.0, "recall": 0.0, "f1": 0.0, "false_alarm_rate": 1.0},
              "evaluated": ae is not None, "model_version": card["version"], "onnx_sha256": card["onnx_sha256"]}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)
    return 0


def register(args: argparse.Namespace) -> int:
    """Register the package with windfleet's registry code (the metadata the approval handler checks)."""
    from windfleet.cloud.backends import Backend
    from windfleet.cloud.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = unpack_model(Path(args.model), Path(tmp))
        backend = Backend.aws(region=args.region or None, bucket=args.bucket, model_group=args.model_group)
        info = Registry(backend).register(model_dir)
    print(json.dumps({k: info[k] for k in ("version", "arn", "status", "model_version")}), flush=True)
    return 0


def step_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagemaker_entry.py", description="windfleet's SageMaker pipeline steps")
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("prepare", help="check raw data -> the train channel")
    p.add_argument("--input", default="/opt/ml/processing/input/raw")
    p.add_argument("--output", default="/opt/ml/processing/train")
    p.add_argument("--features", default="")
    p.add_argument("--label", default="")
    p.add_argument("--sep", default=",")
    p.add_argument("--csv", default="")
    e = verbs.add_parser("evaluate", help="verify the package, write report.json")
    e.add_argument("--model", default="/opt/ml/processing/model")
    e.add_argument("--output", default="/opt/ml/processing/evaluation")
    r = verbs.add_parser("register", help="register the package as PendingManualApproval")
    r.add_argument("--model", default="/opt/ml/processing/model")
    r.add_argument("--bucket", required=True)
    r.add_argument("--model-group", required=True)
    r.add_argument("--region", default="")
    return parser


STEPS = {"prepare": prepare, "evaluate": evaluate, "register": register}


def main(argv: list[str] | None = None) -> int:
    """``[prepare|evaluate|register] ...`` runs a pipeline step; anything else trains."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in STEPS:
        args = step_parser().parse_args(argv)
        return STEPS[args.verb](args)
    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
