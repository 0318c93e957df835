"""Helpers for the detector tests (test_detector*.py, test_simulator.py, test_simulation_drift.py):

- :func:`build_model_package`: a small untrained Conv-AE exported like training does
  (torch.onnx.export, opset mc.OPSET, dynamic batch, one self-contained file) with a complete
  card, so the detector tests do not depend on a training run; :func:`edit_card`;
- :class:`FakeBus` (the Bus interface in memory: records publications, ``deliver`` plays the
  broker), :func:`simulate_stream` and :func:`messages` (readings as the simulator sends them),
  :func:`make_detector` and :func:`drain`.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import threading
from pathlib import Path

import numpy as np

from windfleet import model_contract as mc
from windfleet import payloads
from windfleet.components.bus.base import Bus
from windfleet.components.detector import Detector, load_model
from windfleet.components.detector.model import session_options
from windfleet.preprocessing import fit_statistics, prepare, raw_features, sliding_windows
from windfleet.simulation import Turbine, simulate, turbine_seed

THING = "gw1"
FIELDS = payloads.SAMPLE_FIELDS + payloads.EXTRA_SAMPLE_FIELDS


class FakeBus(Bus):
    """Records everything; ``deliver`` plays the broker's part."""

    def __init__(self, thing: str = THING, config: dict | None = None, others: dict[str, dict] | None = None):
        self.thing_name, self.component_name, self.version = thing, "test", "0.1.0"
        self.config = config or {}
        self.others = dict(others or {})  # other deployed components' configuration
        self.published: list[tuple[str, dict]] = []
        self.states: list[tuple[str, dict]] = []
        self.handlers: dict[str, list] = {}
        self.config_handlers: list = []
        self.other_config_handlers: dict[str, list] = {}
        self.update_handlers: list = []
        self.closed = False
        self._lock = threading.Lock()

    def publish(self, topic, payload, qos=0):
        assert not self.closed, "publish after close"
        body = payload if isinstance(payload, dict) else json.loads(payload)
        json.dumps(body, allow_nan=False)  # what the real bus would send
        with self._lock:
            self.published.append((topic, body))

    def subscribe(self, topic, handler):
        self.handlers.setdefault(topic, []).append(handler)

    def deliver(self, topic, payload):
        for handler in self.handlers.get(topic, []):
            handler(topic, payload)

    def publish_cloud(self, topic, payload, qos=1):
        return False

    def get_configuration(self, component=None):
        if component is None:
            return dict(self.config)
        if component not in self.others:
            raise LookupError(f"{component} is not deployed")  # as GetConfiguration's ResourceNotFoundError
        return dict(self.others[component])

    def on_configuration_update(self, handler, component=None):
        if component is None:
            self.config_handlers.append(handler)
        else:
            self.other_config_handlers.setdefault(component, []).append(handler)

    def on_component_update(self, handler):
        self.update_handlers.append(handler)

    def update_state(self, state, **extra):
        self.states.append((state, extra))

    def close(self):
        self.closed = True

    def scores(self) -> list[dict]:
        with self._lock:
            batches = [b for t, b in self.published if t.endswith("/scores")]
        # one message per turbine per scoring batch; the records the forwarder makes of them
        return [r for b in batches for r in payloads.score_records(payloads.validate_score_batch(b))]


def simulate_stream(tid: str, n: int, seed: int = 3) -> dict[str, np.ndarray]:
    return Turbine(tid, turbine_seed(seed, int(tid[-2:])), 20.0, [], 8.0, 1_700_000_000.0).step(n)


def messages(tid: str, data: dict, batch: int = 10, start: int = 0, end: int | None = None,
             version: int = payloads.BATCH_VERSION) -> list[bytes]:
    """Readings messages: columnar batches (version 2) or one object per sample (version 1)."""
    n = len(data["ts"]) if end is None else end
    out = []
    for s in range(start, n, batch):
        e = min(s + batch, n)
        if version == payloads.BATCH_VERSION:
            out.append(payloads.encode(payloads.readings_batch(tid, s, {f: data[f][s:e] for f in FIELDS})))
        else:
            rows = [{f: float(data[f][i]) for f in FIELDS} for i in range(s, e)]
            out.append(payloads.encode(payloads.readings(tid, s, rows)))
    return out


def make_detector(model_dir, tmp_path, turbines=(f"{THING}-t00", f"{THING}-t01"), **kw) -> tuple[Detector, FakeBus]:
    bus = FakeBus()
    det = Detector(bus, load_model(model_dir), list(turbines), tmp_path / "work", **kw)
    det.subscribe()
    return det, bus


def drain(det: Detector) -> None:
    while det.score_available(timeout=0):
        pass


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
