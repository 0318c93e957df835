"""Small fakes for tests of the cloud layer (no torch needed).

``fake_model_dir(path, version)`` writes a model package whose card has every
key of :data:`windfleet.model_contract.CARD_KEYS` and the right sha256 of an
arbitrary ``model.onnx`` payload; ``fake_build(path)`` writes a
``greengrass-build/`` tree shaped like ``windfleet build`` output.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from windfleet.model_contract import CARD_FILE, CARD_KEYS, CARD_SCHEMA_VERSION, FEATURES, MODEL_FILE, OPSET, sha256_file

from . import settings


def fake_model_dir(path: str | Path, version: str = "1.0.0", payload: bytes | None = None,
                   f1: float = 0.9) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MODEL_FILE).write_bytes(payload if payload is not None else f"fake onnx {version}".encode())
    card = {
        "schema_version": CARD_SCHEMA_VERSION, "version": version, "features": list(FEATURES),
        "statistics": {"mean": [0.0] * len(FEATURES), "std": [1.0] * len(FEATURES)},
        "window": {"length": 100, "shape": [10, 10], "stride": 10},
        "thresholds": {f: 1.0 for f in FEATURES}, "opset": OPSET, "input_name": "windows",
        "output_name": "reconstruction", "data_fingerprint": "sha256:fake",
        "metrics": {"f1": f1, "precision": 0.95, "recall": 0.85, "per_feature": {"rps": {"auc": 0.97}},
                    "note": "not a number"},
        "onnx_sha256": sha256_file(path / MODEL_FILE), "created_at": "2026-01-01T00:00:00Z",
        "preprocessing": {"denoise": "wavelet"},
        "self_test": {"errors": [[0.0] * len(FEATURES)] * 4, "atol": 1e-4},
    }
    missing = [k for k in CARD_KEYS if k not in card]  # the contract grew: keep the fake loadable
    card.update({k: {} for k in missing})
    (path / CARD_FILE).write_text(json.dumps(card))
    return path


def fake_build(path: str | Path, versions: dict[str, str] | None = None) -> Path:
    """A ``greengrass-build/`` with the four suite components, one artifact each."""
    path = Path(path)
    versions = versions or {c: "1.0.0" for c in settings.SUITE}
    for name, version in versions.items():
        art = path / "artifacts" / name / version
        art.mkdir(parents=True, exist_ok=True)
        (art / "payload.zip").write_bytes(f"{name} {version}".encode())
        recipe = {
            "RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
            "ComponentDescription": name, "ComponentPublisher": "windfleet",
            "Manifests": [{"Platform": {"os": "linux"}, "Artifacts": [{
                "Uri": f"s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/payload.zip", "Unarchive": "ZIP"}],
                "Lifecycle": {"Run": "true"}}],
        }
        (path / "recipes").mkdir(parents=True, exist_ok=True)
        (path / "recipes" / f"{name}-{version}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
