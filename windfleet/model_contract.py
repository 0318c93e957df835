"""The model package contract shared by training, the registry, the deployer and the edge.

A model package is a directory (or a Greengrass artifact folder) holding
``model.onnx`` and ``model.json`` (the model card).  The ONNX graph takes
``INPUT_NAME`` shaped ``(batch, len(FEATURES), *WINDOW_SHAPE)`` float32 of
z-scored, denoised features and returns ``OUTPUT_NAME`` of the same shape.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

# The sample's six features, in model input order.
FEATURES = ("roll", "pitch", "yaw", "wind_speed_rps", "rps", "voltage")
WINDOW = 100  # samples per window
WINDOW_SHAPE = (10, 10)  # a window reshaped for the Conv2d autoencoder
STRIDE = 10  # a window is scored every STRIDE new samples
INPUT_NAME = "windows"
OUTPUT_NAME = "reconstruction"
# ONNX opset of the exported graph: 18 (the model's ReduceMean takes its axes as an input, which
# opset 17 cannot express); the devices' onnxruntime>=1.18 runs opsets up to 21.
OPSET = 18
MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
CARD_SCHEMA_VERSION = 1
DEFAULT_FALSE_ALARM_RATE = 0.001  # per window, on held-out normal data

# Keys every model card carries (more are welcome).
CARD_KEYS = (
    "schema_version", "version", "features", "statistics", "window", "thresholds", "opset",
    "input_name", "output_name", "data_fingerprint", "metrics", "onnx_sha256", "created_at",
    "preprocessing", "self_test",
)


class ModelPackageError(ValueError):
    """A model package that must not be used (missing, corrupt, mismatched)."""


# Semantic Versioning 2.0.0 (semver.org's regular expression): MAJOR.MINOR.PATCH with optional
# -prerelease and +build.  A model version becomes a Greengrass component version, an S3 key
# and a directory name on devices, so nothing else (no "/", no "..") is accepted.
SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
MAX_VERSION_LENGTH = 64  # Greengrass ComponentVersion: at most 64 characters


def validate_version(version: object, what: str = "model version") -> str:
    """``version`` if it is semver (MAJOR.MINOR.PATCH[-pre][+build]), else ModelPackageError (one line)."""
    if not isinstance(version, str) or len(version) > MAX_VERSION_LENGTH or not SEMVER.fullmatch(version):
        raise ModelPackageError(f"{what} {version!r} is not semver (MAJOR.MINOR.PATCH, e.g. 1.2.0)")
    return version


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_card(model_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read ``model.json`` and, with ``verify``, check ``model.onnx`` against its sha256.

    Raises ModelPackageError with a one-line reason; never returns a card whose
    ONNX file does not match it.
    """
    model_dir = Path(model_dir)
    card_path, onnx_path = model_dir / CARD_FILE, model_dir / MODEL_FILE
    if not card_path.is_file():
        raise ModelPackageError(f"{card_path}: model card missing")
    if not onnx_path.is_file():
        raise ModelPackageError(f"{onnx_path}: ONNX file missing")
    try:
        card = json.loads(card_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelPackageError(f"{card_path}: not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise ModelPackageError(f"{card_path}: not a JSON object")
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise ModelPackageError(f"{card_path}: missing keys {', '.join(missing)}")
    if card["schema_version"] != CARD_SCHEMA_VERSION:
        raise ModelPackageError(f"{card_path}: unsupported schema_version {card['schema_version']!r}")
    try:
        validate_version(card["version"])
    except ModelPackageError as exc:
        raise ModelPackageError(f"{card_path}: {exc}") from None
    if len(card["features"]) != len(card["statistics"]["mean"]):
        raise ModelPackageError(f"{card_path}: features and statistics disagree")
    if verify:
        actual = sha256_file(onnx_path)
        if actual != card["onnx_sha256"]:
            raise ModelPackageError(
                f"{onnx_path}: sha256 {actual[:12]}... does not match the model card's {card['onnx_sha256'][:12]}..."
            )
    return card


def grid_shape(window: int) -> tuple[int, int]:
    """The near-square grid ``(h, w)``, ``h * w == window``, ``h <= w``, that a window of
    ``window`` samples is reshaped to for the Conv2d autoencoder: ``(10, 10)`` for 100,
    ``(4, 5)`` for 20, ``(1, 23)`` for a prime."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    h = max(d for d in range(1, int(window**0.5) + 1) if window % d == 0)
    return h, window // h


def window_errors(inputs, reconstructions):
    """Per-window, per-feature reconstruction error: mean squared error over the
    window's cells.  ``(k, F, 10, 10)`` (or ``(k, F, *shape)``) x2 -> ``(k, F)``.

    The one definition training (thresholds), evaluation and the edge share.
    Errors too large for float32 come out as inf (the edge scores such a window
    anomalous and counts it in ``windows_non_finite``).
    """
    import numpy as np

    diff = inputs - reconstructions
    with np.errstate(over="ignore", invalid="ignore"):
        return (diff * diff).mean(axis=tuple(range(2, diff.ndim)))


def self_test_input(features: int = len(FEATURES), shape: tuple[int, ...] = WINDOW_SHAPE):
    """The deterministic input whose errors the card's ``self_test`` records at export
    time; the edge recomputes them before trusting a model (catches a card that
    belongs to another model, a truncated graph, a runtime that computes differently).

    ``features``/``shape``: the card's ``window["shape"]`` (defaults: the edge's six
    features, ``(10, 10)``)."""
    import numpy as np

    return np.random.default_rng(0).standard_normal((4, features, *shape)).astype(np.float32)
