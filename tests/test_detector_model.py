"""Model loading for the detector: what is trusted and what is refused.

Also home of :func:`build_model_package`, a small untrained Conv-AE exported like
training does (torch.onnx.export, opset mc.OPSET, dynamic batch, one self-contained
file) with a complete card, so the detector tests do not depend on a training
run.  The other detector test files import it from here.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from windfleet import model_contract as mc
from windfleet.components.detector.model import (
    ModelRejected, keep_as_last_good, last_good_dir, load_model, session_options,
)
from windfleet.preprocessing import fit_statistics, prepare, raw_features, sliding_windows
from windfleet.simulation import simulate

_CACHE: dict[tuple, Path] = {}


def _statistics() -> dict:
    data = simulate(turbines=1, seconds=300, seed=7, anomalies_per_hour=0)[0]
    return fit_statistics(raw_features(data))


def _export(path: Path, seed: int) -> np.ndarray:
    """Export a randomly initialised Conv-AE; returns its torch self-test errors."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    f = len(mc.FEATURES)
    net = nn.Sequential(
        nn.Conv2d(f, 32, 2), nn.ReLU(), nn.Conv2d(32, 64, 2), nn.ReLU(), nn.Conv2d(64, 128, 2), nn.ReLU(),
        nn.ConvTranspose2d(128, 64, 2), nn.ReLU(), nn.ConvTranspose2d(64, 32, 2), nn.ReLU(),
        nn.ConvTranspose2d(32, f, 2),
    ).eval()
    x = torch.from_numpy(mc.self_test_input())
    torch.onnx.export(net, (x,), str(path), input_names=[mc.INPUT_NAME], output_names=[mc.OUTPUT_NAME],
                      dynamic_axes={mc.INPUT_NAME: {0: "batch"}, mc.OUTPUT_NAME: {0: "batch"}},
                      opset_version=mc.OPSET, external_data=False, dynamo=False)
    with torch.no_grad():
        return mc.window_errors(x.numpy(), net(x).numpy())


def build_model_package(out: str | Path, version: str = "1.0.0", seed: int = 0) -> Path:
    """Write ``out/model.onnx`` + ``out/model.json``: a valid package for the detector."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = (seed,)
    if key not in _CACHE:
        import tempfile
        cache = Path(tempfile.mkdtemp(prefix=f"wf-model-{seed}-"))
        self_test = _export(cache / mc.MODEL_FILE, seed)
        stats = _statistics()
        import onnxruntime as ort
        session = ort.InferenceSession(str(cache / mc.MODEL_FILE), sess_options=session_options())
        data = simulate(turbines=1, seconds=200, seed=11, anomalies_per_hour=0)[0]
        windows, _ = sliding_windows(raw_features(data))
        x = prepare(windows, stats)
        errors = mc.window_errors(x, session.run([mc.OUTPUT_NAME], {mc.INPUT_NAME: x})[0])
        thresholds = np.quantile(errors, 0.999, axis=0) * 1.5
        (cache / "parts.json").write_text(json.dumps({
            "statistics": stats, "self_test": self_test.tolist(),
            "thresholds": dict(zip(mc.FEATURES, thresholds.tolist()))}))
        _CACHE[key] = cache
    cache = _CACHE[key]
    parts = json.loads((cache / "parts.json").read_text())
    shutil.copy2(cache / mc.MODEL_FILE, out / mc.MODEL_FILE)
    card = {
        "schema_version": mc.CARD_SCHEMA_VERSION, "version": version, "features": list(mc.FEATURES),
        "statistics": parts["statistics"],
        "window": {"length": mc.WINDOW, "shape": list(mc.WINDOW_SHAPE), "stride": mc.STRIDE},
        "thresholds": parts["thresholds"], "opset": mc.OPSET, "input_name": mc.INPUT_NAME,
        "output_name": mc.OUTPUT_NAME, "data_fingerprint": f"test-seed-{seed}", "metrics": {},
        "onnx_sha256": mc.sha256_file(out / mc.MODEL_FILE),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "preprocessing": {"wavelet": "db4", "level": 2}, "self_test": {"feature_errors": parts["self_test"]},
    }
    (out / mc.CARD_FILE).write_text(json.dumps(card, indent=1))
    return out


def edit_card(model_dir: Path, **changes) -> None:
    card = json.loads((model_dir / mc.CARD_FILE).read_text())
    card.update(changes)
    (model_dir / mc.CARD_FILE).write_text(json.dumps(card))


# ---------------------------------------------------------------- tests
@pytest.fixture
def good(tmp_path) -> Path:
    return build_model_package(tmp_path / "good", "1.2.3")


def test_a_valid_package_loads_and_scores(good):
    model = load_model(good)
    assert model.version == "1.2.3"
    errors = model.run(mc.self_test_input())
    assert errors.shape == (4, len(mc.FEATURES)) and np.isfinite(errors).all()
    assert set(model.thresholds) == set(mc.FEATURES)


@pytest.mark.fault
def test_corrupt_artifact_is_refused_by_digest(good):
    raw = bytearray((good / mc.MODEL_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (good / mc.MODEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelRejected, match="sha256") as info:
        load_model(good)
    assert info.value.version == "1.2.3"


def test_card_of_another_model_fails_the_self_test(tmp_path, good):
    other = build_model_package(tmp_path / "other", "9.9.9", seed=1)
    shutil.copy2(other / mc.MODEL_FILE, good / mc.MODEL_FILE)
    edit_card(good, onnx_sha256=mc.sha256_file(good / mc.MODEL_FILE))  # digest fine, card is not this model's
    with pytest.raises(ModelRejected, match="self-test"):
        load_model(good)


@pytest.mark.parametrize("changes, match", [
    ({"features": ["a", "b", "c", "d", "e", "f"]}, "card mismatch"),
    ({"thresholds": {"roll": 1.0}}, "card mismatch"),
    ({"window": {"length": 50}}, "card mismatch"),
    ({"schema_version": 99}, "verification failed"),
])
def test_mismatched_card_is_refused(good, changes, match):
    edit_card(good, **changes)
    with pytest.raises(ModelRejected, match=match):
        load_model(good)


@pytest.mark.fault
def test_not_onnx_with_matching_digest_is_refused(good):
    (good / mc.MODEL_FILE).write_bytes(b"definitely not a protobuf")
    edit_card(good, onnx_sha256=mc.sha256_file(good / mc.MODEL_FILE))
    with pytest.raises(ModelRejected, match="onnxruntime"):
        load_model(good)


def test_missing_package_is_refused(tmp_path):
    with pytest.raises(ModelRejected, match="missing"):
        load_model(tmp_path / "nothing-here")


def test_last_good_copy_survives_the_source(tmp_path, good):
    model = load_model(good)
    kept = keep_as_last_good(model, tmp_path / "work")
    shutil.rmtree(good)
    assert last_good_dir(tmp_path / "work") == kept
    assert load_model(kept).version == "1.2.3"
