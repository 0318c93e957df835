"""`windfleet build`: the gdk / greengrass-cli layout, and that what it lays out deploys."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.mqtt_fixtures import wait_until
from tests.test_recipes import gdk_errors
from tests.test_runtime_helpers import FAST, RuntimeThread, deployment, status
from windfleet import model_contract
from windfleet.build import BuildError, build, built_components
from windfleet.cli import main as cli
from windfleet.nucleus.runtime import DeviceRuntime
from windfleet.nucleus.sources import DirectorySource

CODE = ("com.windfleet.TurbineSimulator", "com.windfleet.AnomalyDetector", "com.windfleet.LogForwarder")


def fake_model(path: Path, version: str = "1.2.0") -> Path:
    """A model package whose card passes load_card (the ONNX bytes are not a real graph)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(b"not really onnx " + version.encode())
    n = len(model_contract.FEATURES)
    card = {"schema_version": model_contract.CARD_SCHEMA_VERSION, "version": version,
            "features": list(model_contract.FEATURES), "statistics": {"mean": [0.0] * n, "std": [1.0] * n},
            "window": model_contract.WINDOW, "thresholds": {f: 1.0 for f in model_contract.FEATURES},
            "opset": model_contract.OPSET, "input_name": model_contract.INPUT_NAME,
            "output_name": model_contract.OUTPUT_NAME, "data_fingerprint": "x", "metrics": {},
            "onnx_sha256": model_contract.sha256_file(path / "model.onnx"), "created_at": "2020-01-25T00:00:00Z",
            "preprocessing": {}}
    for key in model_contract.CARD_KEYS:  # keys the contract may add later
        card.setdefault(key, {})
    (path / "model.json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gg") / "greengrass-build"
    build(out, fake_model(out.parent / "model"))
    return out


def test_layout_is_what_greengrass_cli_reads(built):
    components = built_components(built)
    assert set(components) == set(CODE) | {"com.windfleet.AnomalyModel"}
    assert components["com.windfleet.AnomalyModel"] == "1.2.0"  # from the model card
    for name, version in components.items():
        recipe_file = built / "recipes" / f"{name}-{version}.yaml"  # --recipeDir R reads R/<Name>-<Version>.yaml
        recipe = yaml.safe_load(recipe_file.read_text())
        assert gdk_errors(recipe) == [] and recipe_file.stat().st_size < 16_000
        for manifest in recipe["Manifests"]:
            for artifact in manifest.get("Artifacts", []):
                # As `gdk component build` writes them; publish fills the three placeholders.
                assert artifact["Uri"].startswith("s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/")
                assert "Digest" not in artifact
                # --artifactDir A reads A/<Name>/<Version>/<file name of the URI>
                assert (built / "artifacts" / name / version / artifact["Uri"].rsplit("/", 1)[-1]).is_file()
    # The same reader the local runtime uses accepts the whole suite.
    src = DirectorySource(built / "recipes", built / "artifacts", components)
    for name, version in components.items():
        recipe, files = src.fetch_component(name, version)
        assert files and all(p.is_file() for p in files.values())


def test_code_zip_holds_device_code_only_and_is_reproducible(built, tmp_path):
    zips = [built / "artifacts" / n / "1.0.0" / "windfleet.zip" for n in CODE]
    digests = {hashlib.sha256(z.read_bytes()).hexdigest() for z in zips}
    assert len(digests) == 1
    names = set(zipfile.ZipFile(zips[0]).namelist())
    for must in ("windfleet/__init__.py", "windfleet/topics.py", "windfleet/payloads.py",
                 "windfleet/model_contract.py", "windfleet/jsonlog.py", "windfleet/components/__init__.py",
                 "windfleet/components/bus/__init__.py", "windfleet/device_runtime.py",
                 "windfleet/components/detector/requirements.txt"):
        assert must in names, must
    assert not any(n.startswith(("windfleet/nucleus/", "windfleet/cloud", "windfleet/training", "cloud/",
                                 "training/")) or n.endswith(".pyc") for n in names)
    # each component's own requirements (tests/test_install.py); GDK project files stay out
    reqs = zipfile.ZipFile(zips[0]).read("windfleet/components/detector/requirements.txt").decode().split()
    assert any(r.startswith("onnxruntime") for r in reqs) and not any(r.startswith("boto3") for r in reqs)
    assert not any(n.endswith(("gdk-config.json", "/recipe.yaml")) or "greengrass-build" in n for n in names)
    again = tmp_path / "again"
    build(again)  # no --model: the model component is skipped, the rest is byte-identical
    assert "com.windfleet.AnomalyModel" not in built_components(again)
    assert hashlib.sha256((again / "artifacts/com.windfleet.LogForwarder/1.0.0/windfleet.zip").read_bytes()).hexdigest() in digests


def test_bad_model_and_bad_version_are_refused(tmp_path):
    model = fake_model(tmp_path / "m")
    (model / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BuildError, match="does not match"):
        build(tmp_path / "out", model)
    with pytest.raises(BuildError, match="not explicit semver"):
        build(tmp_path / "out", fake_model(tmp_path / "m2"), model_version="NEXT_PATCH")
    result = CliRunner().invoke(cli, ["build", "--out", str(tmp_path / "o"), "--component", "com.nope.X"])
    assert result.exit_code != 0 and "unknown component" in result.output
    result = CliRunner().invoke(cli, ["build", "--out", str(tmp_path / "o"), "--model", str(fake_model(tmp_path / "m3", "2.0.0"))])
    assert result.exit_code == 0, result.output
    assert "com.windfleet.AnomalyModel=2.0.0" in result.output


def test_built_recipes_install_idempotently_and_import_from_the_artifact(tmp_path):
    """The real Install steps of the built detector and model recipes, executed by the runtime:
    the detector's makes the venv once, the code imported is the unpacked artifact's, and the
    model component validates its package with that venv and code (check_model) each time."""
    from tests.detector_fixtures import build_model_package

    built = tmp_path / "greengrass-build"
    build(built, build_model_package(tmp_path / "model", "1.2.0"))  # a real package: check_model loads it
    out = tmp_path / "gg"
    shutil.copytree(built / "artifacts", out / "artifacts")
    (out / "recipes").mkdir()
    for name, version in built_components(built).items():
        recipe = yaml.safe_load((built / "recipes" / f"{name}-{version}.yaml").read_text())
        for manifest in recipe["Manifests"]:
            if "Run" in manifest.get("Lifecycle", {}):  # same Install; a Run that reports what it imports
                manifest["Lifecycle"]["Run"]["Script"] = (
                    'exec env PYTHONPATH="{artifacts:decompressedPath}/windfleet" '
                    '"{work:path}/venv/bin/python3" -c "import windfleet, windfleet.components.bus, '
                    'windfleet.payloads, onnxruntime, sys; print(windfleet.__file__); print(sys.prefix)"')
        (out / "recipes" / f"{name}-{version}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    comps = {"com.windfleet.AnomalyDetector": "1.0.0", "com.windfleet.AnomalyModel": "1.2.0"}
    root = tmp_path / "dev"
    settings = FAST.__class__(**{**FAST.__dict__, "install_timeout": 120, "health_timeout": 120})
    log = root / "logs/com.windfleet.AnomalyDetector.log"
    model_log = root / "logs/com.windfleet.AnomalyModel.log"
    model_dir = root / "packages/artifacts/com.windfleet.AnomalyModel/1.2.0"
    for attempt in range(2):  # the second start runs Install again (as the nucleus does): a no-op
        rt = DeviceRuntime("gw-build", root, DirectorySource(out / "recipes", out / "artifacts", comps),
                           settings=settings)
        t = RuntimeThread(rt)
        try:
            wait_until(lambda: deployment(root).get("status") in ("SUCCEEDED", "FAILED", "TIMED_OUT")
                       and log.exists() and log.read_text().count("__init__.py") == attempt + 1
                       and model_log.exists() and model_log.read_text().count("model 1.2.0 ok") == attempt + 1,
                       150, message="detector installed and finished, model checked")
            wait_until(lambda: status(root)["components"]["com.windfleet.AnomalyModel"]["state"] == "FINISHED",
                       30, message="model component installed")
        finally:
            t.stop()
        assert deployment(root)["status"] == "SUCCEEDED", deployment(root)
        work = root / "work/com.windfleet.AnomalyDetector"
        runtimes = root / "work/windfleet-runtime"  # the device's shared runtimes (windfleet.device_runtime)
        venvs = sorted(p.name for p in runtimes.glob("py*-*"))
        if attempt == 0:
            first_ready = (runtimes / venvs[0] / ".ready").stat().st_mtime_ns
    assert len(venvs) == 1 and (runtimes / venvs[0] / ".ready").stat().st_mtime_ns == first_ready  # not rebuilt
    assert (work / "venv").resolve() == (runtimes / venvs[0]).resolve()
    lines = log.read_text().splitlines()
    unpacked = root / "packages/artifacts-unarchived/com.windfleet.AnomalyDetector/1.0.0/windfleet/windfleet/__init__.py"
    assert lines.count(str(unpacked)) == 2
    assert lines.count(str(work / "venv")) == 2  # sys.prefix: the component's venv
    assert model_log.read_text().splitlines().count(f"model 1.2.0 ok ({model_dir})") == 2
    # the model component's configuration names its package, for the detector to follow
    config = json.loads((root / "config/runtime.json").read_text())["configuration"]["com.windfleet.AnomalyModel"]
    assert config["ModelVersion"] == "1.2.0"
    assert config["OnnxSha256"] == model_contract.sha256_file(model_dir / "model.onnx")
