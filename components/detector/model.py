"""Loading, verifying and keeping a model package for the detector.

A model is trusted only after every check passed, in this order:

1. ``model_contract.load_card(verify=True)``: the card is complete and the ONNX
   file's sha256 matches it (a corrupt or swapped artifact stops here);
2. the card speaks our preprocessing: the features are ``model_contract.FEATURES``
   in order, statistics and thresholds cover every feature;
   The card's ``window`` (``{"size": W, "stride": S, "shape": [F, *dims]}``, dims
   multiplying to W) says how the detector cuts and shapes windows for this model; any
   sane window is accepted, an inconsistent one is rejected with a one-line reason;
3. onnxruntime loads the graph; its input/output names and shape are the card's
   (``(batch, F, *dims)``, dynamic batch);
4. self-test: the errors on ``model_contract.self_test_input()`` (the card's shape) match the card's
   ``self_test.feature_errors`` (rtol 1e-3) -- a card that belongs to another
   model, a truncated graph or a runtime that computes differently fails here.

The last model that passed is copied into the work directory (``last_good/``) so
a restart with a bad new package keeps scoring with it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from windfleet import model_contract as mc

LAST_GOOD = "last_good"
SELF_TEST_RTOL = 1e-3
SELF_TEST_ATOL = 1e-6


class ModelRejected(mc.ModelPackageError):
    """A package that failed a check.  ``version`` is the card's version when it could be read."""

    def __init__(self, reason: str, version: str = "unknown"):
        super().__init__(reason)
        self.reason, self.version = reason, version


def session_options() -> ort.SessionOptions:
    """One thread, no spinning: the detector shares a small gateway with other components,
    and spinning threads would burn a core while waiting for the next batch."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def make_session(onnx_path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])


@dataclass
class LoadedModel:
    """A verified model ready to score: session, card and the arrays the hot path needs."""

    model_dir: Path
    card: dict[str, Any]
    session: ort.InferenceSession
    thresholds: dict[str, float]
    sha256: str

    @property
    def version(self) -> str:
        return str(self.card["version"])

    @property
    def statistics(self) -> dict:
        return self.card["statistics"]

    @property
    def window(self) -> int:
        """Samples per window."""
        return window_geometry(self.card)[0]

    @property
    def stride(self) -> int:
        """A window is scored every ``stride`` new samples."""
        return window_geometry(self.card)[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The ONNX input's dims after the feature axis (``(10, 10)`` for the contract's Conv-AE)."""
        return window_geometry(self.card)[2]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Model input ``(k, F, *shape)`` float32 -> per-window, per-feature errors ``(k, F)``."""
        recon = self.session.run([mc.OUTPUT_NAME], {mc.INPUT_NAME: x})[0]
        return mc.window_errors(x, recon)


MAX_WINDOW = 100_000  # samples; far beyond any model, small enough that a window fits in memory


def window_geometry(card: dict) -> tuple[int, int, tuple[int, ...]]:
    """``(size, stride, shape)`` from the card's ``window``; ValueError (one line) when it is
    inconsistent.  Without ``shape`` (older cards; a bare size): ``model_contract.grid_shape``
    of the size, as ``preprocessing.prepare`` does -- (10, 10) for 100."""
    window = card["window"]
    if isinstance(window, dict):
        size = window.get("size", window.get("length"))
        stride, shape = window.get("stride", mc.STRIDE), window.get("shape")
    else:
        size, stride, shape = window, mc.STRIDE, None
    if isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= MAX_WINDOW:
        raise ValueError(f"window size {size!r} is not an integer in 2..{MAX_WINDOW}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= size:
        raise ValueError(f"window stride {stride!r} is not an integer in 1..{size} (the window size)")
    if shape is None:
        return size, stride, tuple(mc.grid_shape(size))
    n_features = len(card.get("features") or ())
    if not isinstance(shape, list) or not shape or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"window.shape {shape!r} is not [features, dims...] of positive integers")
    if shape[0] == n_features and int(np.prod(shape[1:])) == size:
        return size, stride, tuple(shape[1:])
    if int(np.prod(shape)) == size:  # older cards: the dims alone, e.g. [10, 10]
        return size, stride, tuple(shape)
    raise ValueError(f"window.shape {shape} is not [{n_features} features, dims holding {size} samples]")


def _card_version(model_dir: Path) -> str:
    try:
        card = json.loads((model_dir / mc.CARD_FILE).read_text())
        return str(card.get("version", "unknown")) if isinstance(card, dict) else "unknown"
    except Exception:
        return "unknown"


def _thresholds(card: dict) -> dict[str, float]:
    raw = card["thresholds"]
    if isinstance(raw, dict):
        missing = [f for f in mc.FEATURES if f not in raw]
        if missing:
            raise ValueError(f"thresholds missing for {', '.join(missing)}")
        values = {f: float(raw[f]) for f in mc.FEATURES}
    elif isinstance(raw, list) and len(raw) == len(mc.FEATURES):
        values = {f: float(v) for f, v in zip(mc.FEATURES, raw)}
    else:
        raise ValueError("thresholds must map every feature to a number")
    bad = [f for f, v in values.items() if not (np.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"thresholds not positive and finite for {', '.join(bad)}")
    return values


def _check_card(card: dict) -> None:
    if list(card["features"]) != list(mc.FEATURES):
        raise ValueError(f"features {card['features']} are not the contract's {list(mc.FEATURES)}")
    stats = card["statistics"]
    for key in ("mean", "std", "noise_sigma"):
        values = stats.get(key) if isinstance(stats, dict) else None
        if not isinstance(values, list) or len(values) != len(mc.FEATURES):
            raise ValueError(f"statistics.{key} must hold {len(mc.FEATURES)} numbers")
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            raise ValueError(f"statistics.{key} holds a non-finite value")
    if any(v <= 0 for v in stats["std"]):
        raise ValueError("statistics.std must be positive")
    window_geometry(card)
    if card["input_name"] != mc.INPUT_NAME or card["output_name"] != mc.OUTPUT_NAME:
        raise ValueError("input/output names are not the contract's")


def _check_session(session: ort.InferenceSession) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [mc.INPUT_NAME]:
        raise ValueError(f"graph inputs {[i.name for i in inputs]} are not [{mc.INPUT_NAME!r}]")
    if mc.OUTPUT_NAME not in [o.name for o in outputs]:
        raise ValueError(f"graph outputs {[o.name for o in outputs]} lack {mc.OUTPUT_NAME!r}")
    shape = list(inputs[0].shape)
    if isinstance(shape[0], int) and shape[0] != -1:
        raise ValueError(f"graph input has a fixed batch of {shape[0]}; the contract needs a dynamic batch")
    if inputs[0].type != "tensor(float)":
        raise ValueError(f"graph input type {inputs[0].type} is not float32")


def self_test(model: LoadedModel) -> None:
    expected = np.asarray(model.card["self_test"]["feature_errors"], dtype=np.float64)
    got = model.run(mc.self_test_input(len(mc.FEATURES), model.shape))
    if got.shape != expected.shape:
        raise ValueError(f"self-test shape {got.shape} != card's {expected.shape}")
    if not np.allclose(got, expected, rtol=SELF_TEST_RTOL, atol=SELF_TEST_ATOL):
        worst = float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)))
        raise ValueError(f"self-test errors differ from the card's (worst relative difference {worst:.3g})")


def load_model(model_dir: str | Path) -> LoadedModel:
    """Verify and load a model package; :class:`ModelRejected` with a one-line reason otherwise."""
    model_dir = Path(model_dir)
    version = _card_version(model_dir)
    try:
        card = mc.load_card(model_dir, verify=True)
    except mc.ModelPackageError as exc:
        raise ModelRejected(f"verification failed: {exc}", version) from None
    except Exception as exc:  # e.g. a card whose fields have the wrong types
        raise ModelRejected(f"verification failed: {type(exc).__name__}: {exc}", version) from None
    version = str(card["version"])
    try:
        _check_card(card)
        thresholds = _thresholds(card)
        _, _, dims = window_geometry(card)
    except Exception as exc:
        raise ModelRejected(f"card mismatch: {exc}", version) from None
    try:
        session = make_session(model_dir / mc.MODEL_FILE)
        _check_session(session)
    except Exception as exc:
        raise ModelRejected(f"onnxruntime cannot use the graph: {str(exc).splitlines()[0][:300]}", version) from None
    graph, want = list(session.get_inputs()[0].shape[1:]), [len(mc.FEATURES), *dims]
    if graph != want:
        raise ModelRejected(f"card mismatch: window shape {want} is not the graph's input {graph}", version)
    model = LoadedModel(model_dir, card, session, thresholds, card["onnx_sha256"])
    try:
        self_test(model)
    except Exception as exc:
        raise ModelRejected(f"self-test failed: {str(exc).splitlines()[0][:300]}", version) from None
    return model


def keep_as_last_good(model: LoadedModel, work_dir: str | Path) -> Path:
    """Copy a verified package to ``work_dir/last_good`` (atomically replaced) and return that path."""
    work_dir = Path(work_dir)
    target = work_dir / LAST_GOOD
    if target.resolve() == model.model_dir.resolve():
        return target
    try:
        if mc.sha256_file(target / mc.MODEL_FILE) == model.sha256 and \
                json.loads((target / mc.CARD_FILE).read_text()) == model.card:
            return target
    except (OSError, ValueError):
        pass
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".last_good-", dir=work_dir))
    for name in (mc.MODEL_FILE, mc.CARD_FILE):
        shutil.copy2(model.model_dir / name, tmp / name)
        os.chmod(tmp / name, 0o644)
    old = work_dir / ".last_good-old"
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def last_good_dir(work_dir: str | Path) -> Path | None:
    target = Path(work_dir) / LAST_GOOD
    return target if (target / mc.MODEL_FILE).is_file() else None
