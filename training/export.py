"""ONNX export with a parity check, and the model card.

``export_onnx`` writes ONE self-contained ``model.onnx`` (weights inside, dynamic
batch axis, names from :mod:`windfleet.model_contract`) and refuses it -- raising
:class:`ExportError` and deleting the file -- when onnxruntime's outputs differ
from torch's by more than ``atol`` on the check batch.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import torch

from windfleet import model_contract as mc
from windfleet import preprocessing as pp

PARITY_ATOL = 1e-4


class ExportError(RuntimeError):
    """The exported graph cannot be trusted (parity, loading)."""


def session(path: str | Path, threads: int = 1):
    """An onnxruntime session with the options an edge device wants: one intra-op and
    one inter-op thread, spinning off (no busy-waiting on a shared, small CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_outputs(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Reconstructions of ``x`` by the ONNX model at ``path`` (onnxruntime)."""
    return session(path).run([mc.OUTPUT_NAME], {mc.INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


def export_onnx(model: torch.nn.Module, path: str | Path, check: np.ndarray, *, opset: int = mc.OPSET,
                atol: float = PARITY_ATOL) -> float:
    """Export ``model`` to ``path``; return the max abs torch/onnxruntime difference on ``check``.

    Raises ExportError (and removes ``path``) when the difference exceeds ``atol``.
    """
    path = Path(path)
    model.eval()
    dummy = torch.from_numpy(np.ascontiguousarray(check[:2], dtype=np.float32))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # chatty exporter
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
        torch.onnx.export(
            model, (dummy,), str(path), opset_version=opset,
            input_names=[mc.INPUT_NAME], output_names=[mc.OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}}, external_data=False,
        )
    written = _opset_of(path)
    if written != opset:  # the card must say what the file is
        path.unlink(missing_ok=True)
        raise ExportError(f"exported graph has opset {written}, not the contract's {opset}")
    try:
        with torch.no_grad():
            expected = model(torch.from_numpy(np.ascontiguousarray(check, dtype=np.float32))).numpy()
        err = float(np.max(np.abs(onnx_outputs(path, check) - expected)))
    except Exception as exc:  # a graph onnxruntime cannot run is as bad as a wrong one
        path.unlink(missing_ok=True)
        raise ExportError(f"exported model does not run in onnxruntime: {exc}") from None
    if not err <= atol:
        path.unlink(missing_ok=True)
        raise ExportError(f"ONNX parity check failed: max abs error {err:.3g} > {atol:g} on {len(check)} windows")
    return err


def _opset_of(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def self_test_input(features: int = len(mc.FEATURES), shape: Sequence[int] = mc.WINDOW_SHAPE) -> np.ndarray:
    """``model_contract.self_test_input`` for ``features`` x ``shape`` windows."""
    return mc.self_test_input(features, tuple(shape))


def self_test(path: str | Path, features: int = len(mc.FEATURES),
              shape: Sequence[int] = mc.WINDOW_SHAPE) -> dict[str, list[list[float]]]:
    """The card's ``self_test``: per-feature errors of the ONNX model on
    ``model_contract.self_test_input(features, shape)``, computed with onnxruntime."""
    x = self_test_input(features, shape)
    return {"feature_errors": mc.window_errors(x, onnx_outputs(path, x)).astype(float).tolist()}


def model_card(*, onnx_path: str | Path, version: str, features: Sequence[str], statistics: Mapping[str, Any],
               thresholds: Sequence[float], fingerprint: str, metrics: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None, opset: int = mc.OPSET,
               window: int = mc.WINDOW, stride: int = mc.STRIDE, shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The model card (every key of ``model_contract.CARD_KEYS``, plus ``extra``).

    ``window``/``stride``/``shape``: the samples per window, the samples between two
    scored windows and the ONNX input's dims after the feature axis (default: the
    grid of ``window``) -- the edge detector windows and reshapes readings by them."""
    shape = tuple(shape) if shape is not None else mc.grid_shape(window)
    card = {
        "schema_version": mc.CARD_SCHEMA_VERSION,
        "version": version,
        "features": list(features),
        "statistics": {k: [float(v) for v in vals] if k != "circular" else [int(v) for v in vals]
                       for k, vals in statistics.items()},
        "window": {"size": int(window), "stride": int(stride), "shape": [len(features), *(int(d) for d in shape)]},
        "thresholds": {f: float(t) for f, t in zip(features, thresholds)},
        "opset": opset,
        "input_name": mc.INPUT_NAME,
        "output_name": mc.OUTPUT_NAME,
        "data_fingerprint": fingerprint,
        "metrics": dict(metrics),
        "onnx_sha256": mc.sha256_file(onnx_path),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "preprocessing": {
            "wavelet": pp.WAVELET, "level": pp.wavelet_level(int(window)), "mode": "periodization", "threshold": "soft, universal",
            "noise_sigma": "statistics.noise_sigma (z units, fixed at training)",
            "circular_features": [features[i] for i in statistics.get("circular", [pp.YAW] if len(features) == len(mc.FEATURES) else [])],
            "score": "max over features of window error / threshold; alarm when > 1",
            "error": "mean squared error per feature over the window (model_contract.window_errors)",
        },
        "self_test": self_test(onnx_path, len(features), shape),
    }
    card.update(extra or {})
    missing = [k for k in mc.CARD_KEYS if k not in card]
    assert not missing, missing  # a programming error, not bad input
    return card
