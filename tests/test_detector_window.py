"""Models whose window is not the contract's 100 samples (issue 11, the edge half): the
detector cuts, shapes and scores windows as the model card says, swaps between window sizes
without losing a reading, and refuses an inconsistent card with a one-line reason.

The package is a small Conv1d autoencoder over ``[F, 64]`` windows, exported with
``training/export.py``'s helpers (the training pipeline makes such models too).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np
import pytest

from windfleet import model_contract as mc
from windfleet import topics
from windfleet.components.detector import ModelRejected, load_model
from windfleet.preprocessing import denoise, raw_features, sliding_windows, standardize

from tests.detector_fixtures import THING, drain, make_detector, messages, simulate_stream
from tests.detector_fixtures import _statistics, build_model_package, edit_card

WINDOW, STRIDE, DIMS = 64, 8, (64,)


def offline(card: dict, onnx: Path, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """The training side's path for this window: sliding windows -> z-score, denoise -> the
    card's shape -> onnxruntime -> per-feature errors."""
    from windfleet.training.export import onnx_outputs

    windows, ends = sliding_windows(raw_features(data), WINDOW, STRIDE)
    z = denoise(standardize(windows, card["statistics"]), card["statistics"]["noise_sigma"])
    x = z.reshape(len(z), z.shape[1], *DIMS).astype(np.float32)
    return ends, mc.window_errors(x, onnx_outputs(onnx, x))


def build_window_package(out: Path, version: str) -> Path:
    """A valid package for a 64-sample window of shape [6, 64], stride 8."""
    import torch
    from torch import nn

    from windfleet.training.export import export_onnx, onnx_outputs

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    f = len(mc.FEATURES)
    class AE(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv1d(f, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, f, 3, padding=1))

        def forward(self, x):  # export_onnx names the dynamic batch axis of ``x``
            return self.net(x)

    net = AE().eval()
    check = mc.self_test_input(f, DIMS)
    export_onnx(net, out / mc.MODEL_FILE, check)
    card = {
        "schema_version": mc.CARD_SCHEMA_VERSION, "version": version, "features": list(mc.FEATURES),
        "statistics": _statistics(), "window": {"size": WINDOW, "stride": STRIDE, "shape": [f, *DIMS]},
        "thresholds": dict.fromkeys(mc.FEATURES, 1.0), "opset": mc.OPSET, "input_name": mc.INPUT_NAME,
        "output_name": mc.OUTPUT_NAME, "data_fingerprint": "test-window-64", "metrics": {},
        "onnx_sha256": mc.sha256_file(out / mc.MODEL_FILE),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(), "preprocessing": {},
        "self_test": {"feature_errors": mc.window_errors(check, onnx_outputs(out / mc.MODEL_FILE, check)).tolist()},
    }
    _, errors = offline(card, out / mc.MODEL_FILE, simulate_stream(f"{THING}-t09", 600))
    card["thresholds"] = dict(zip(mc.FEATURES, (errors.max(axis=0) * 1.5).tolist()))
    (out / mc.CARD_FILE).write_text(json.dumps(card))
    return out


@pytest.fixture(scope="module")
def model_64(tmp_path_factory) -> Path:
    return build_window_package(tmp_path_factory.mktemp("w64") / "m", "4.0.0")


def test_a_64_sample_model_scores_the_windows_its_card_names(model_64, tmp_path):
    model = load_model(model_64)
    assert (model.window, model.stride, model.shape) == (WINDOW, STRIDE, DIMS)
    tid = f"{THING}-t00"
    det, bus = make_detector(model_64, tmp_path, turbines=[tid])
    data = simulate_stream(tid, 600)
    for raw in messages(tid, data, batch=20):
        bus.deliver(topics.readings(tid), raw)
    drain(det)
    ends, expected = offline(model.card, model_64 / mc.MODEL_FILE, data)
    got = sorted(bus.scores(), key=lambda s: s["window_end_seq"])
    assert [s["window_end_seq"] for s in got] == ends.tolist()  # 63, 71, ..., 599
    np.testing.assert_allclose([[s["feature_errors"][f] for f in mc.FEATURES] for s in got], expected,
                               rtol=1e-4, atol=1e-6)
    assert {s["model_version"] for s in got} == {"4.0.0"}
    assert det.snapshot()["readings_scored"] == 600


def test_a_swap_to_another_window_size_loses_no_reading(model_64, tmp_path):
    """100-sample model, then the 64-sample one mid-stream: every window queued is scored by
    the model it was cut for, the tail carries over, and every reading lies in a scored window."""
    tid = f"{THING}-t00"
    det, bus = make_detector(build_model_package(tmp_path / "v1", "1.0.0"), tmp_path, turbines=[tid])
    data = simulate_stream(tid, 800)
    msgs = messages(tid, data, batch=20)
    for raw in msgs[:15]:  # 300 samples, windows queued and not yet scored
        bus.deliver(topics.readings(tid), raw)
    assert det.swap(model_64) is True
    for raw in msgs[15:]:
        bus.deliver(topics.readings(tid), raw)
    drain(det)
    scores = sorted(bus.scores(), key=lambda s: s["window_end_seq"])
    old = [s["window_end_seq"] for s in scores if s["model_version"] == "1.0.0"]
    new = [s["window_end_seq"] for s in scores if s["model_version"] == "4.0.0"]
    assert old == list(range(99, 300, 10))  # all of them, by the old model
    assert new and new[0] - WINDOW + 1 <= old[-1] + 1  # no gap: the first new window reaches back
    assert np.all(np.diff(new) == STRIDE) and new[-1] == 799 - (799 - new[0]) % STRIDE
    assert det.snapshot()["readings_scored"] == 800


@pytest.mark.parametrize("window, reason", [
    ({"size": 64, "stride": 8, "shape": [6, 10, 10]}, "window.shape"),
    ({"size": 64, "stride": 80, "shape": [6, 64]}, "stride"),
    ({"size": 64, "stride": 8}, "not the graph's input"),  # no shape: the (8, 8) grid, not the graph's [6, 64]
    ({"size": 1, "stride": 1, "shape": [6, 1]}, "window size"),
])
def test_an_inconsistent_window_is_refused_with_a_one_line_reason(model_64, tmp_path, window, reason):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in (mc.MODEL_FILE, mc.CARD_FILE):
        (bad / name).write_bytes((model_64 / name).read_bytes())
    edit_card(bad, window=window)
    with pytest.raises(ModelRejected) as info:
        load_model(bad)
    assert reason in info.value.reason and "\n" not in info.value.reason
