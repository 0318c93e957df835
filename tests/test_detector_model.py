"""Model loading for the detector: what is trusted and what is refused.

The packages come from :func:`tests.detector_fixtures.build_model_package`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from windfleet import model_contract as mc
from windfleet.components.detector.model import (
    ModelRejected, keep_as_last_good, last_good_dir, load_model,
)

from tests.detector_fixtures import build_model_package, edit_card


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
