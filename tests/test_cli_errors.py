"""Every CLI error is one line on stderr, a non-zero exit and no traceback, and a refused
command leaves no files (issue 12, "One-line errors").

Each row runs ``python -m windfleet.cli ...`` as a real process in an empty working
directory with ``WINDFLEET_HOME`` pointing at a directory that does not exist yet, and
compares every file under the test's directory before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from windfleet.cloud.testing import fake_model_dir
from windfleet.model_contract import ModelPackageError, validate_version
from windfleet.topics import validate_thing

# (id, argv); {root}, {home}, {cwd} are filled in per test.
ROWS = [
    # the table of issue 12 (the two `dashboard` rows belong to the dashboard's own tests)
    ("device-run-bad-broker", ["device", "run", "--broker", "nohost:notaport", "--thing", "gw1", "--root", "{root}"]),
    ("device-run-bad-thing", ["device", "run", "--thing", "bad/thing", "--root", "{root}"]),
    ("registry-approve-empty-home", ["registry", "approve", "999"]),
    ("registry-register-path-version", ["registry", "register", "{pwn_model}"]),
    # more paths that tracebacked or accepted bad input
    ("device-run-bad-cloud-broker", ["device", "run", "--thing", "gw1", "--root", "{root}",
                                     "--cloud-broker", "host:0"]),
    ("device-run-thing-too-long", ["device", "run", "--thing", "g" * 129, "--root", "{root}"]),
    ("device-run-thing-with-wildcard", ["device", "run", "--thing", "gw+", "--root", "{root}"]),
    ("device-run-bad-thing-group", ["device", "run", "--thing", "gw1", "--thing-group", "a/b", "--root", "{root}"]),
    ("device-run-update-config-not-json", ["device", "run", "--thing", "gw1", "--root", "{root}", "--recipe-dir",
                                           "{cwd}", "--merge", "com.x.A=1.0.0", "--update-config", "{bad"]),
    ("device-run-update-config-not-an-object", ["device", "run", "--thing", "gw1", "--root", "{root}", "--recipe-dir",
                                                "{cwd}", "--merge", "com.x.A=1.0.0", "--update-config", "[1]"]),
    ("device-run-update-config-bad-reset", ["device", "run", "--thing", "gw1", "--root", "{root}", "--recipe-dir",
                                            "{cwd}", "--merge", "com.x.A=1.0.0",
                                            "--update-config", '{"com.x.A": {"RESET": "/a"}}']),
    ("device-run-merge-path-version", ["device", "run", "--thing", "gw1", "--root", "{root}", "--recipe-dir", "{cwd}",
                                       "--merge", "com.x.A=../../x"]),
    ("device-run-missing-recipe", ["device", "run", "--thing", "gw1", "--root", "{root}", "--recipe-dir", "{cwd}",
                                   "--merge", "com.x.A=1.0.0"]),
    ("device-run-missing-recipe-dir", ["device", "run", "--thing", "gw1", "--root", "{root}",
                                       "--recipe-dir", "{cwd}/nope", "--merge", "com.x.A=1.0.0"]),
    ("device-run-missing-home", ["device", "run", "--thing", "gw1", "--root", "{root}", "--home", "{home}"]),
    ("device-run-missing-broker-data", ["device", "run", "--thing", "gw1", "--root", "{root}",
                                        "--broker-data", "{cwd}/nope"]),
    ("device-run-no-thing", ["device", "run", "--root", "{root}"]),
    ("device-deployment-create-not-json", ["device", "deployment", "create", "--root", "{root}",
                                           "--update-config", "{bad"]),
    ("device-component-list-no-nucleus", ["device", "component", "list", "--root", "{root}"]),
    ("fleet-run-bad-broker", ["fleet", "run", "--report", "{cwd}/r.json", "--broker", "x:y"]),
    ("fleet-run-report-dir-missing", ["fleet", "run", "--report", "{cwd}/nope/r.json"]),
    ("registry-list-bad-thing-group", ["registry", "list", "--thing-group", "a/b"]),
    ("registry-register-missing-dir", ["registry", "register", "{cwd}/nope"]),
    ("registry-reject-empty-home", ["registry", "reject", "v3"]),
    ("registry-home-unwritable", ["registry", "approve", "1", "--home", "/proc/nope/home"]),
    ("deployments-status-empty-home", ["deployments", "status"]),
    ("deploy-path-version", ["deploy", "--component", "com.windfleet.AnomalyModel=../../x"]),
    ("publish-missing-build", ["publish", "--build-dir", "{cwd}/nope"]),
    ("unknown-command", ["nope"]),
]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINDFLEET_")}
    env.update(WINDFLEET_HOME=str(home), PYTHONUNBUFFERED="1")
    return env


def _files(top: Path) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob("*")}


def _run(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "windfleet.cli", *args], cwd=cwd, env=_env(home),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _assert_one_line_error(done: subprocess.CompletedProcess) -> str:
    err = done.stderr
    assert done.returncode != 0, (done.stdout, err)
    assert "Traceback" not in err + done.stdout, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


@pytest.mark.parametrize("args", [r[1] for r in ROWS], ids=[r[0] for r in ROWS])
def test_each_row_is_one_line_and_leaves_no_files(args, tmp_path):
    cwd, home, root = tmp_path / "cwd", tmp_path / "home", tmp_path / "root"
    cwd.mkdir()
    pwn_model = fake_model_dir(tmp_path / "pwn-model", "../../../tmp/pwn")
    fill = {"{cwd}": cwd, "{home}": home, "{root}": root, "{pwn_model}": pwn_model}
    argv = [str(fill[a]) if a in fill else a.replace("{cwd}", str(cwd)) for a in args]
    before = _files(tmp_path)

    _assert_one_line_error(_run(argv, cwd, home))

    assert _files(tmp_path) == before  # no root, no home, nothing in the working directory
    assert not root.exists() and not home.exists()


def test_the_issue_rows_say_why(tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    line = _assert_one_line_error(_run(["device", "run", "--broker", "nohost:notaport", "--thing", "gw1",
                                        "--root", str(tmp_path / "R")], cwd, home))
    assert "--broker" in line and "notaport" in line
    line = _assert_one_line_error(_run(["device", "run", "--thing", "bad/thing", "--root", str(tmp_path / "R")],
                                       cwd, home))
    assert "bad/thing" in line and "a-z A-Z 0-9 : _ -" in line
    line = _assert_one_line_error(_run(["registry", "approve", "999"], cwd, home))
    assert "999" in line
    model = fake_model_dir(tmp_path / "m", "../../../tmp/pwn")
    line = _assert_one_line_error(_run(["registry", "register", str(model)], cwd, home))
    assert "not semver" in line and "../../../tmp/pwn" in line


def test_a_refused_register_changes_nothing_in_an_existing_store(tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    done = _run(["registry", "register", str(fake_model_dir(tmp_path / "good", "1.0.0"))], cwd, home)
    assert done.returncode == 0, done.stderr
    listed = _run(["registry", "list", "--json"], cwd, home)
    before_files = _files(home) - {"cloud.db-wal", "cloud.db-shm"}

    for version in ("../../../tmp/pwn", "1.0", "v1.0.0", "1.0.0/../../x"):
        _assert_one_line_error(_run(["registry", "register", str(fake_model_dir(tmp_path / version.replace("/", "_"),
                                                                                 version))], cwd, home))
    _assert_one_line_error(_run(["registry", "approve", "999"], cwd, home))

    assert _files(home) - {"cloud.db-wal", "cloud.db-shm"} == before_files
    assert json.loads(_run(["registry", "list", "--json"], cwd, home).stdout) == json.loads(listed.stdout)
    assert not (Path("/tmp/pwn")).exists() or not any(Path("/tmp/pwn").rglob("model.onnx"))


@pytest.mark.parametrize("name", ["gw1", "gw-01", "a:b_c-d", "G" * 128, "0"])
def test_thing_names_aws_iot_accepts(name):
    assert validate_thing(name) == name


@pytest.mark.parametrize("name", ["", "bad/thing", "gw+", "gw#", "a b", "gw.1", "g" * 129, "ü", "gw1\n", None, 7])
def test_thing_names_aws_iot_refuses(name):
    with pytest.raises(ValueError, match="not valid"):
        validate_thing(name)


@pytest.mark.parametrize("version", ["0.0.0", "1.2.3", "10.20.30", "1.0.0-rc.1", "1.0.0-alpha-a.b-c+build.1"])
def test_semver_versions(version):
    assert validate_version(version) == version


@pytest.mark.parametrize("version", ["../../../tmp/pwn", "1.0", "1", "01.0.0", "1.01.0", "v1.0.0", "1.0.0/x",
                                     "1.0.0-", "1.0.0-..", "1.0.0-01", "1.0.0+", " 1.0.0", "1.0.0\n", "", None, 1,
                                     "1.0.0-" + "a" * 64])
def test_versions_that_are_not_semver(version):
    with pytest.raises(ModelPackageError, match="not semver"):
        validate_version(version)


def test_the_runtime_refuses_a_bad_thing_before_creating_its_root(tmp_path):
    from windfleet.nucleus.runtime import DeviceRuntime

    with pytest.raises(ValueError, match="not valid"):
        DeviceRuntime("bad/thing", tmp_path / "root")
    with pytest.raises(ValueError, match="thing group"):
        DeviceRuntime("gw1", tmp_path / "root", thing_groups=["a/b"])
    assert not (tmp_path / "root").exists()
