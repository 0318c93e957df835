"""Every command runs on Python 3.10 (pyproject's requires-python) and the device code on 3.9.

- vermin (a dev dependency) over the package and the benchmarks: nothing needs more than
  3.10; over what ships to devices (the code zip): nothing needs more than 3.9, the
  Python of Raspberry Pi OS 11.
- A real Python 3.10: every file compiles, no import names a module 3.10's standard
  library lacks (tomllib, ...), every module imports or lacks only a third-party package,
  and ``python -m windfleet.build`` (what gdk-config.json's custom build runs) builds the
  same zip as on this interpreter.

A missing vermin, python3.10 or wheelhouse (``scripts/setup`` provides all three) FAILS.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_install import clean_env, require_python, require_wheelhouse
from windfleet import build as B

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"windfleet": "windfleet", "components": "windfleet.components", "cloud": "windfleet.cloud",
                "training": "windfleet.training"}
COMMAND_DIRS = [*PACKAGE_DIRS, "benchmarks"]


def vermin(target: str, *paths: Path | str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "vermin"
    if not exe.exists():
        pytest.fail(f"vermin is not installed in {exe.parent.parent} (pyproject's dev extra): run ./scripts/setup")
    return subprocess.run([str(exe), f"-t={target}-", "--violations", "--no-tips", "--eval-annotations",
                           "--no-parse-comments", *map(str, paths)], capture_output=True, text=True, cwd=REPO)


def python_files() -> list[Path]:
    return sorted(p for d in COMMAND_DIRS for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_vermin_finds_nothing_newer_than_310():
    proc = vermin("3.10", *COMMAND_DIRS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_device_code_needs_nothing_newer_than_39(tmp_path):
    out = tmp_path / "gg"
    B.build(out, components=["com.windfleet.LogForwarder"])
    with zipfile.ZipFile(out / "artifacts/com.windfleet.LogForwarder/1.0.0" / B.CODE_ARTIFACT) as zf:
        zf.extractall(tmp_path / "zip")
    proc = vermin("3.9", tmp_path / "zip")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_checks_catch_a_311_module(tmp_path):
    (tmp_path / "uses_tomllib.py").write_text("import tomllib\n\nprint(tomllib.loads('a = 1'))\n")
    proc = vermin("3.10", tmp_path)
    assert proc.returncode != 0 and "'tomllib' module requires !2, 3.11" in proc.stdout
    assert "tomllib" in sys.stdlib_module_names and "tomllib" not in stdlib_310()


# ------------------------------------------------------------------ a real 3.10
def stdlib_310() -> set[str]:
    python = require_python("3.10")
    return set(json.loads(subprocess.run([str(python), "-c", "import sys, json; print(json.dumps(sorted("
                                          "sys.stdlib_module_names)))"], check=True, capture_output=True,
                                         text=True).stdout))


def test_everything_compiles_on_310_and_imports_only_its_stdlib():
    python = require_python("3.10")
    files = python_files()
    script = ("import json, sys\nbad = []\nfor path in json.load(sys.stdin):\n"
              "    try:\n        compile(open(path, 'rb').read(), path, 'exec', dont_inherit=True)\n"
              "    except SyntaxError as exc:\n        bad.append(f'{path}:{exc.lineno}: {exc.msg}')\n"
              "print(json.dumps(bad))")
    proc = subprocess.run([str(python), "-c", script], input=json.dumps([str(p) for p in files]),
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == []
    newer = set(sys.stdlib_module_names) - stdlib_310()  # tomllib, wsgiref.types' parents, ...
    uses = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            uses += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in newer]
    assert uses == []
    assert len(files) > 50


@pytest.fixture(scope="module")
def venv310(tmp_path_factory) -> Path:
    """Python 3.10 with numpy and PyYAML, the build's only third-party needs (offline)."""
    python = require_python("3.10")
    wheelhouse = require_wheelhouse("3.10")
    path = tmp_path_factory.mktemp("py310") / "venv"
    env = clean_env(path.parent)
    subprocess.run([str(python), "-m", "venv", str(path)], check=True, env=env)
    subprocess.run([str(path / "bin/python"), "-m", "pip", "install", "-q", "--find-links", str(wheelhouse),
                    "numpy>=1.26", "PyYAML>=6.0"], check=True, env=env)
    return path / "bin/python"


def package_tree(dest: Path) -> Path:
    """``windfleet`` laid out as pyproject's package-dir maps it, without installing it."""
    pkg = dest / "windfleet"
    pkg.mkdir(parents=True)
    for item in (REPO / "windfleet").iterdir():
        if item.name != "__pycache__":
            (pkg / item.name).symlink_to(item)
    for folder in ("components", "cloud", "training"):
        (pkg / folder).symlink_to(REPO / folder)
    return dest


def test_windfleet_build_runs_on_310(venv310, tmp_path):
    env = clean_env(tmp_path)
    env["PYTHONPATH"] = str(package_tree(tmp_path / "src"))
    out = tmp_path / "out"
    proc = subprocess.run([str(venv310), "-m", "windfleet.build", "--out", str(out), "--root", str(REPO)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["com.windfleet.AnomalyDetector=1.0.0", "com.windfleet.LogForwarder=1.0.0",
                                   "com.windfleet.TurbineSimulator=1.0.0"]
    here = tmp_path / "here"
    B.build(here)
    for name in ("com.windfleet.AnomalyDetector", "com.windfleet.LogForwarder", "com.windfleet.TurbineSimulator"):
        rel = Path("artifacts", name, "1.0.0", B.CODE_ARTIFACT)
        assert hashlib.sha256((out / rel).read_bytes()).digest() == hashlib.sha256((here / rel).read_bytes()).digest()
        assert (out / "recipes" / f"{name}-1.0.0.yaml").read_text() == (here / "recipes" / f"{name}-1.0.0.yaml").read_text()


def test_every_module_imports_on_310_or_lacks_only_a_third_party_package(venv310, tmp_path):
    src = package_tree(tmp_path / "src")
    modules = []
    for folder, prefix in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if "__pycache__" in path.parts or path.name == "__main__.py":
                continue
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append(".".join([prefix, *parts]))
    script = ("import importlib, json, sys\nresult = {}\nfor name in json.load(sys.stdin):\n"
              "    try:\n        importlib.import_module(name)\n        result[name] = None\n"
              "    except ModuleNotFoundError as exc:\n        result[name] = ['missing', exc.name]\n"
              "    except BaseException as exc:\n        result[name] = ['error', repr(exc)]\n"
              "print(json.dumps(result))")
    env = clean_env(tmp_path)
    env["PYTHONPATH"] = str(src)
    proc = subprocess.run([str(venv310), "-c", script], input=json.dumps(modules), cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    stdlib_here = set(sys.stdlib_module_names)
    errors = {m: r for m, r in result.items()
              if r and (r[0] == "error" or r[1].split(".")[0] in stdlib_here | {"windfleet"})}
    assert errors == {}
    imported = [m for m, r in result.items() if r is None]
    # the shared contracts, the build and the device runtime import with stdlib + numpy + PyYAML
    assert {"windfleet.topics", "windfleet.payloads", "windfleet.model_contract", "windfleet.build",
            "windfleet.device_runtime", "windfleet.simulation"} <= set(imported)
    print(f"{len(imported)}/{len(modules)} modules import on 3.10 with numpy + PyYAML; the rest lack: "
          f"{sorted({r[1].split('.')[0] for r in result.values() if r})}")
