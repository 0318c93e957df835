"""Shared fixtures.

``model_dir``: a real trained model package (version "1.0.0"), built once per
session from a small simulated fleet (a few epochs, no evaluation) -- a working
model, not a good one.  ``model_dir_factory(version)``: the same package under
another version string (the card is rewritten; the ONNX file and its sha256 stay).

``--fuzz-examples N`` (else ``WINDFLEET_FUZZ_EXAMPLES``, else 10,000, the fault suite's
figure): how many fuzzed payloads each fuzz test feeds its target; the ``fuzz_examples``
fixture reads it.  Hypothesis draws them ``FUZZ_BATCH`` per example (a list), which
spreads its per-example cost: 10,000 payloads take about a minute per target.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from windfleet import model_contract as mc

FUZZ_EXAMPLES_DEFAULT = 10_000
FUZZ_BATCH = 10  # payloads per hypothesis example


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                     help="fuzzed payloads per fuzz test (default: $WINDFLEET_FUZZ_EXAMPLES, "
                          f"else {FUZZ_EXAMPLES_DEFAULT})")


def fuzz_examples_of(config) -> int:
    value = config.getoption("--fuzz-examples") or os.environ.get("WINDFLEET_FUZZ_EXAMPLES")
    return int(value) if value else FUZZ_EXAMPLES_DEFAULT


# The longest modules (about a minute or more each), started first: scripts/test runs two
# xdist workers that take whole modules (--dist loadfile), and a long module picked up last
# would leave one worker idle while the other finishes it.
LONG_MODULES = ("test_quality", "test_demo", "test_dashboard_fleet", "test_ingest_fuzz", "test_faults",
                "test_deploy_e2e", "test_csv_short", "test_score", "test_sagemaker", "test_install",
                "test_detector_fuzz", "test_fleet", "test_detector")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a module kept


@pytest.fixture(scope="session")
def fuzz_examples(request) -> int:
    """Fuzzed payloads per fuzz test (see the module docstring)."""
    return fuzz_examples_of(request.config)


def _build_model(out: Path) -> Path:
    from windfleet.training.pipeline import train_simulated

    train_simulated(out, seed=7, turbines=1, hours=0.25, epochs=3, version="1.0.0", evaluate=False,
                    progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory, worker_id) -> Path:
    """A small ``windfleet train`` package for ``windfleet demo`` runs (3 turbines across the wind
    envelope x 0.5 h, 6 epochs): thresholds calibrated on held-out turbines, so the current model
    raises few false alarms all demo long and v3 alarming on normal data shows in the canary's
    gates; its card carries the drift reference training builds.  (``model_dir``, trained on one
    8 m/s turbine for 15 minutes, alarms on most windows once the simulated weather moves on.)
    Trained once per run: the xdist workers share it through a file lock in their common base."""
    from filelock import FileLock

    from windfleet.training.pipeline import train_simulated

    base = tmp_path_factory.getbasetemp()
    root = base.parent if worker_id != "master" else base
    out = root / "demo-model"
    with FileLock(str(root / "demo-model.lock")):
        if not (out / mc.CARD_FILE).exists():  # train_simulated writes the package atomically
            train_simulated(out, seed=1, turbines=3, hours=0.5, epochs=6, evaluate=False, progress=False,
                            log=lambda *_: None)
    assert "drift" in json.loads((out / mc.CARD_FILE).read_text())
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A trained model package directory (model.onnx + model.json), version 1.0.0.
    Treat it as read-only: copy it before changing anything."""
    return _build_model(tmp_path_factory.mktemp("model") / "model-1.0.0")


@pytest.fixture(scope="session")
def model_dir_factory(model_dir, tmp_path_factory):
    """``factory(version) -> Path``: a model package whose card says ``version``."""
    cache: dict[str, Path] = {"1.0.0": model_dir}
    root = tmp_path_factory.mktemp("models")

    def make(version: str) -> Path:
        if version not in cache:
            out = root / f"model-{version}"
            shutil.copytree(model_dir, out)
            card_path = out / mc.CARD_FILE
            card = json.loads(card_path.read_text())
            card["version"] = version
            card_path.write_text(json.dumps(card, indent=2) + "\n")
            mc.load_card(out)
            cache[version] = out
        return cache[version]

    return make
