"""The recipes' real Install steps on the hosts a device may have, offline.

Each step is taken from the built recipe, its manifest chosen and its variables
interpolated the way the local nucleus does (``windfleet.nucleus.recipe``), and run with
``sh -c`` in the component's work dir with the nucleus' environment plus ``Setenv``.  The
host is a venv with system site packages whose ``python3`` is first on PATH, as
``/usr/bin/python3`` is on a core device:

- Python 3.9 with pip downgraded to 20.3.4 (Raspberry Pi OS 11 "Bullseye" ships both);
- Python 3.13 with its own pip.

Nothing is downloaded here: pip reads only ``.venv/wheelhouse/py<XY>`` (``scripts/setup``
fetches it) through ``PIP_NO_INDEX``/``PIP_FIND_LINKS``, and the machine's pip
configuration is switched off.  A missing interpreter or wheelhouse FAILS with the reason.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from windfleet import build as B
from windfleet.nucleus import recipe as R

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO / ".venv" / "wheelhouse"
DET, SIM, FWD, MODEL = ("com.windfleet.AnomalyDetector", "com.windfleet.TurbineSimulator",
                        "com.windfleet.LogForwarder", "com.windfleet.AnomalyModel")
CODE = {SIM: "simulator", DET: "detector", FWD: "forwarder"}
AMD64 = {"os": "linux", "architecture": "amd64"}
ARMV7L = {"os": "linux", "architecture": "arm"}
# what each runtime must import, and what it must NOT have
IMPORTS = {DET: ["numpy", "pywt", "onnxruntime", "awsiot.greengrasscoreipc.clientv2"],
           SIM: ["numpy", "awsiot.greengrasscoreipc.clientv2"],
           FWD: ["awsiot.greengrasscoreipc.clientv2"]}
ABSENT = {SIM: ["onnxruntime", "pywt"], FWD: ["onnxruntime", "numpy"]}
SUDO_ENV_DELETE = ("PYTHONPATH", "PYTHONHOME", "PYTHONINSPECT", "PYTHONUSERBASE")


# ------------------------------------------------------------------ hosts
def find_python(version: str) -> Path | None:
    """python<version> on PATH, else pyenv's (the same rule as scripts/setup)."""
    want = tuple(int(p) for p in version.split("."))
    candidates = [shutil.which(f"python{version}")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(pyenv.glob(f"{version}.*/bin/python{version}"))
    for cand in candidates:
        if not cand:
            continue
        ok = subprocess.run([str(cand), "-c", f"import sys; sys.exit(sys.version_info[:2] != {want!r})"],
                            capture_output=True).returncode == 0
        if ok:
            return Path(cand)
    return None


def require_python(version: str) -> Path:
    python = find_python(version)
    if python is None:
        pytest.fail(f"no Python {version} on this machine (python{version} on PATH or pyenv's versions/{version}.*): "
                    "this test runs the Install steps on it and cannot be replaced by another interpreter")
    return python


def require_wheelhouse(version: str) -> Path:
    path = WHEELHOUSE / f"py{version.replace('.', '')}"
    if not (path / ".stamp").is_file():
        pytest.fail(f"{path} is missing: scripts/setup downloads the device wheels for Python {version} "
                    "there (tests run offline); run ./scripts/setup")
    return path


def clean_env(home: Path) -> dict[str, str]:
    """This process's environment minus pip and Python settings, with pip offline."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "SVCUID", "AWS_GG_"))}
    env.update(HOME=str(home), PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


class Host:
    """A venv with system site packages standing in for a device's /usr/bin/python3 + pip."""

    def __init__(self, path: Path, base: Path, wheelhouse: Path, pip: str | None):
        self.path, self.wheelhouse = path, wheelhouse
        self.env = clean_env(path.parent / "home")
        Path(self.env["HOME"]).mkdir(exist_ok=True)
        self.env["PIP_FIND_LINKS"] = str(wheelhouse)
        subprocess.run([str(base), "-m", "venv", "--system-site-packages", str(path)], check=True, env=self.env)
        if pip:
            subprocess.run([str(self.python), "-m", "pip", "install", "-q", f"pip=={pip}"],
                           check=True, env=self.env)
        self.pip_version = subprocess.run([str(self.python), "-m", "pip", "--version"], check=True, env=self.env,
                                          capture_output=True, text=True).stdout.split()[1]
        self.env["PATH"] = f"{path / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python3"


# ------------------------------------------------------------------ device
class Device:
    """A kernel root laid out like /greengrass/v2 with the built suite's artifacts."""

    def __init__(self, root: Path, built: Path, recipes: dict[str, dict]):
        self.root, self.recipes = root, recipes
        self.versions = {n: str(r["ComponentVersion"]) for n, r in recipes.items()}
        for name, recipe in recipes.items():
            art = root / "packages/artifacts" / name / self.versions[name]
            shutil.copytree(built / "artifacts" / name / self.versions[name], art)
            for manifest in recipe["Manifests"][:1]:
                for artifact in manifest.get("Artifacts", []):
                    if artifact.get("Unarchive") == "ZIP":
                        file = art / artifact["Uri"].rsplit("/", 1)[-1]
                        with zipfile.ZipFile(file) as zf:
                            zf.extractall(self.decompressed(name) / file.stem)

    def decompressed(self, name: str) -> Path:
        return self.root / "packages/artifacts-unarchived" / name / self.versions[name]

    def work(self, name: str) -> Path:
        return self.root / "work" / name

    def runtimes(self) -> list[Path]:
        return sorted(p for p in (self.root / "work/windfleet-runtime").glob("py*-*") if p.is_dir())

    def step(self, name: str, step: str, platform: dict, as_name: str | None = None) -> tuple[str, dict]:
        """(script, env) of a lifecycle step, interpolated as windfleet.nucleus.runtime does.
        ``as_name`` runs the recipe as another component (its own work dir)."""
        recipe = self.recipes[name]
        manifest = R.select_manifest(recipe, platform)
        component = as_name or name
        configs = {n: R.default_configuration(r) for n, r in self.recipes.items()}
        ctx = R.Context(component, "gw-install", self.root,
                        artifacts_path=lambda n: self.root / "packages/artifacts" / (name if n == component else n)
                        / self.versions[name if n == component else n],
                        decompressed_path=lambda n: self.decompressed(name if n == component else n),
                        work_path=self.work, configuration=lambda n: configs.get(name if n == component else n, {}),
                        direct_dependencies=list(R.dependencies(recipe)))
        lifecycle = ctx.interpolate_tree(copy.deepcopy(manifest["Lifecycle"]))
        assert ctx.unresolved == [], ctx.unresolved
        body = lifecycle[step]
        env = {k: str(v) for k, v in (lifecycle.get("Setenv") or {}).items()}
        env["AWS_IOT_THING_NAME"] = "gw-install"
        return (body if isinstance(body, str) else body["Script"]), env

    def run(self, host: Host, name: str, step: str = "Install", platform: dict = AMD64, as_name: str | None = None,
            timeout: float = 300, script: str | None = None) -> subprocess.CompletedProcess:
        recipe_script, step_env = self.step(name, step, platform, as_name)
        env = dict(host.env)
        env.update(step_env)
        # The nucleus runs every step as `sudo -n -E -H -u <user> -- sh -c <script>`; sudo -E
        # still drops what sudoers' default env_delete names, PYTHONPATH among them.
        for var in SUDO_ENV_DELETE:
            env.pop(var, None)
        script = script or recipe_script
        work = self.work(as_name or name)
        work.mkdir(parents=True, exist_ok=True)
        return subprocess.run(["sh", "-c", script], cwd=work, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def imports(self, name: str, modules: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
        python = self.work(name) / "venv/bin/python3"
        env = clean_env(self.root)
        env["PYTHONPATH"] = str(self.decompressed(name) / "windfleet")
        env.update(extra_env or {})
        return subprocess.run([str(python), "-c", "import " + ", ".join(modules)], env=env, cwd=self.work(name),
                              capture_output=True, text=True)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from tests.detector_fixtures import build_model_package

    out = tmp_path_factory.mktemp("suite") / "greengrass-build"
    B.build(out, build_model_package(out.parent / "model", "1.2.0"))
    return out


@pytest.fixture(scope="module")
def recipes(built) -> dict[str, dict]:
    return {B.load_recipe(p)["ComponentName"]: B.load_recipe(p) for p in sorted((built / "recipes").glob("*.yaml"))}


@pytest.fixture(scope="module")
def host39(tmp_path_factory) -> Host:
    return Host(tmp_path_factory.mktemp("host39") / "venv", require_python("3.9"), require_wheelhouse("3.9"),
                pip="20.3.4")


@pytest.fixture(scope="module")
def device39(tmp_path_factory, built, recipes, host39) -> tuple[Device, dict]:
    """The three code components installed at once (the nucleus installs independent
    components in parallel) on Python 3.9 + pip 20.3.4; ``{name: (seconds, output)}``."""
    device = Device(tmp_path_factory.mktemp("dev39") / "greengrass", built, recipes)
    results = {}

    def install(name):
        started = time.monotonic()
        proc = device.run(host39, name)
        return name, time.monotonic() - started, proc

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for name, seconds, proc in pool.map(install, CODE):
            results[name] = (seconds, ok(proc))
    return device, results


def closure(names) -> set[str]:
    """Distributions ``names`` install: themselves and their dependencies, recursively."""
    import importlib.metadata as md

    normal = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    seen, todo = set(), [normal(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [normal(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    return seen


# ------------------------------------------------------------------ tests
def test_each_component_has_its_own_requirements_and_they_cover_its_imports(recipes, built):
    zipped = set(zipfile.ZipFile(built / "artifacts" / DET / "1.0.0" / B.CODE_ARTIFACT).namelist())
    pyproject = dict(re.findall(r'"([A-Za-z0-9_.-]+)(>=[^"]*)"', (REPO / "pyproject.toml").read_text()))
    normal = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    bounds = {normal(k): v for k, v in pyproject.items()}
    for name, pkg in CODE.items():
        member = f"windfleet/components/{pkg}/requirements.txt"
        assert member in zipped
        for manifest in recipes[name]["Manifests"]:
            assert f'{{artifacts:decompressedPath}}/windfleet/{member}"' in manifest["Lifecycle"]["Install"]["Script"]
        text = (REPO / "components" / pkg / "requirements.txt").read_text()
        reqs = {normal(m.group(1)): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)(\S*)$", text, re.M)}
        # the same lower bounds as the project declares
        assert all(bounds.get(r) == spec for r, spec in reqs.items()), (pkg, reqs)
        # what the component imports (its main module and the IPC bus), mapped to distributions
        probe = ("import importlib, importlib.metadata as md, json, sys, sysconfig\n"
                 "before = set(sys.modules)\n"
                 f"importlib.import_module('windfleet.components.{pkg}.main')\n"
                 "importlib.import_module('windfleet.components.bus.ipc')\n"
                 "dists = md.packages_distributions()\n"
                 "tops = {n.split('.')[0] for n in set(sys.modules) - before}\n"
                 "print(json.dumps(sorted({d for t in tops for d in dists.get(t, []) "
                 "if 'site-packages' in str(getattr(sys.modules.get(t), '__file__', '') or '')})))")
        used = json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                         text=True).stdout)
        # everything the component imports is listed or comes with what is (awscrt with
        # awsiotsdk), and everything listed is imported
        used = {normal(d) for d in used}
        assert used - closure(reqs) == set() and set(reqs) <= used, (pkg, used, reqs)
    assert "onnxruntime" not in (REPO / "components/simulator/requirements.txt").read_text()
    assert "onnxruntime" not in (REPO / "components/forwarder/requirements.txt").read_text()


def test_install_on_python39_with_pip_20_3_4(device39, host39):
    device, results = device39
    assert host39.pip_version == "20.3.4"
    runtimes = device.runtimes()
    assert len(runtimes) == 3 and all(p.name.startswith("py39-") for p in runtimes)  # one per requirements set
    for name, (seconds, out) in results.items():
        assert "pip 20.3.4: installing" in out and f"components/{CODE[name]}/requirements.txt" in out, out
        assert out.strip().splitlines()[-1].startswith("windfleet runtime: built "), out
        link = device.work(name) / "venv"
        assert link.is_symlink() and Path(os.readlink(link)) in runtimes
        ready = json.loads((Path(os.readlink(link)) / ".ready").read_text())
        assert ready["pip"] == "20.3.4" and ready["identity"].startswith("cpython 3.9 ")
        ok(device.imports(name, IMPORTS[name]))
        for module in ABSENT.get(name, []):  # never installed for this component
            assert device.imports(name, [module]).returncode != 0, (name, module)
        ok(device.imports(name, [f"windfleet.components.{CODE[name]}.main", "windfleet.components.bus.ipc"]))
    print({n: round(s, 1) for n, (s, _) in results.items()})


def test_the_model_checks_itself_with_the_detectors_runtime_on_python39(device39, host39):
    device, _ = device39
    out = ok(device.run(host39, MODEL))
    assert out.strip() == f"model 1.2.0 ok ({device.root}/packages/artifacts/{MODEL}/1.2.0)"


def test_run_steps_import_their_component_without_setenv_pythonpath(device39, host39):
    """Each Run step's own command line (up to ``-m``), under sudo's environment, imports the
    component it starts and the IPC bus from the artifact."""
    device, _ = device39
    for name, pkg in CODE.items():
        run, _ = device.step(name, "Run", AMD64)
        prefix = run.split(" -m ", 1)[0]
        assert prefix.startswith("exec env PYTHONPATH=")
        probe = (f"{prefix} -c 'import windfleet, windfleet.components.{pkg}.main, windfleet.components.bus.ipc; "
                 "print(windfleet.__file__)'")
        out = ok(device.run(host39, name, "Run", script=probe))
        assert out.strip() == str(device.decompressed(name) / "windfleet/windfleet/__init__.py")


def test_the_model_recipe_and_the_deployers_share_the_install_step(recipes):
    from windfleet.cloud import deployer

    generated = deployer.model_recipe("1.2.0", {"model.onnx": "s3://b/model.onnx", "model.json": "s3://b/model.json"})
    assert generated["Manifests"][0]["Lifecycle"] == recipes[MODEL]["Manifests"][0]["Lifecycle"]


def test_install_again_is_a_quick_no_op(device39, host39):
    device, _ = device39
    before = {p: (p / ".ready").stat().st_mtime_ns for p in device.runtimes()}
    for name in CODE:
        started = time.monotonic()
        out = ok(device.run(host39, name))
        seconds = time.monotonic() - started
        assert "pip" not in out and out.strip().startswith("windfleet runtime: reused "), out
        assert seconds < 5, seconds
    assert {p: (p / ".ready").stat().st_mtime_ns for p in device.runtimes()} == before


def test_a_broken_runtime_is_rebuilt(device39, host39):
    device, _ = device39
    venv = Path(os.readlink(device.work(FWD) / "venv"))
    for site_dir in venv.glob("lib/python3.9/site-packages/awsiot"):
        shutil.rmtree(site_dir)
    out = ok(device.run(host39, FWD))
    assert "no longer imports" in out and "rebuilding" in out and "built" in out.strip().splitlines()[-1]
    ok(device.imports(FWD, IMPORTS[FWD]))


def test_same_requirements_share_one_runtime_and_concurrent_installs_wait(tmp_path, built, recipes, host39):
    device = Device(tmp_path / "greengrass", built, recipes)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda n: device.run(host39, FWD, as_name=n), [FWD, "com.example.SameRequirements"]))
    outs = [ok(p) for p in procs]
    (runtime,) = device.runtimes()
    assert sum(o.count("windfleet runtime: creating") for o in outs) == 1  # pip ran once
    assert Path(os.readlink(device.work(FWD) / "venv")) == runtime
    assert Path(os.readlink(device.work("com.example.SameRequirements") / "venv")) == runtime


def test_armv7l_the_detector_refuses_in_one_line_while_the_others_install(device39, host39):
    device, _ = device39
    # the arm manifests are the ones chosen on armv7l
    for name in CODE:
        assert R.select_manifest(device.recipes[name], ARMV7L) is device.recipes[name]["Manifests"][0]
    proc = device.run(host39, DET, platform=ARMV7L)  # the host's python3 has no onnxruntime
    assert proc.returncode == 1
    (line,) = proc.stdout.strip().splitlines()
    assert "armv7l" in line and "onnxruntime" in line and "64-bit" in line and "redeploy" in line
    for name in (SIM, FWD):
        out = ok(device.run(host39, name, platform=ARMV7L))
        assert out.strip().splitlines()[-1].startswith("windfleet runtime: ")


def test_install_on_python313_with_its_own_pip(tmp_path, built, recipes):
    host = Host(tmp_path / "host313", require_python("3.13"), require_wheelhouse("3.13"), pip=None)
    device = Device(tmp_path / "greengrass", built, recipes)
    out = ok(device.run(host, DET))
    assert f"pip {host.pip_version}: installing" in out
    (runtime,) = device.runtimes()
    assert runtime.name.startswith("py313-")
    ok(device.imports(DET, IMPORTS[DET] + ["windfleet.components.detector.main"]))
    # and the detector's code runs there: the model component's self-check
    ok(device.run(host, MODEL))


def test_installer_errors_are_one_line(tmp_path):
    from windfleet import device_runtime as D

    proc = subprocess.run([sys.executable, "-I", str(REPO / "windfleet/device_runtime.py"), "--requirements",
                           str(tmp_path / "nope.txt"), "--root", str(tmp_path / "rt")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout.strip().splitlines() == [
        f"windfleet runtime: no requirements file at {tmp_path / 'nope.txt'}"]
    assert D.required_imports("# imports: a b.c\nx>=1\n# imports: d") == ["a", "b.c", "d"]
    assert D.runtime_key("x", "cpython 3.9") != D.runtime_key("x", "cpython 3.13") != D.runtime_key("y", "cpython 3.13")
