"""The real GDK CLI 1.6.2 on every GDK project of a clean checkout.

In a copy of what a clone holds (``git ls-files``: tracked plus new, not ignored), in each
folder with a ``gdk-config.json`` (the root, for the detector, and ``components/<pkg>/``
for each code component) this runs

- ``gdk component build``: its custom build must leave the recipe where
  ``gdk component publish`` reads it (``greengrass-build/recipes/<recipe file name>``),
  valid by GDK's own schema, and the artifacts in ``greengrass-build/artifacts/<Name>/<Version>/``;
- ``gdk component publish``, the real command, with AWS stood in for: S3 and STS by moto,
  greengrassv2 (which moto lacks) answered through botocore's ``before-call`` hook after
  botocore has validated the request against the real service model.  It must upload the
  artifacts and create the component version from a recipe whose URIs point at them.

``scripts/setup`` installs the GDK into ``.venv`` from ``../shared/tools/gdk-cli-1.6.2.tar.gz``;
without it these tests FAIL and say so.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GDK_VERSION = "1.6.2"
PROJECTS = {".": "com.windfleet.AnomalyDetector", "components/simulator": "com.windfleet.TurbineSimulator",
            "components/detector": "com.windfleet.AnomalyDetector", "components/forwarder": "com.windfleet.LogForwarder"}
ACCOUNT, REGION = "123456789012", "us-east-1"

# `gdk component publish` in-process, AWS stood in for (see the module docstring).
PUBLISH_DRIVER = r'''
import datetime, hashlib, json, sys
from moto import mock_aws

out = sys.argv[1]
calls = []

def record(model, params, **_):
    calls.append({"operation": model.name,
                  "params": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in params.items()}})

def answer(model, **_):
    from botocore.awsrequest import AWSResponse
    if model.name == "ListComponentVersions":
        body = {"componentVersions": []}
    elif model.name == "CreateComponentVersion":
        body = {"arn": "arn:aws:greengrass:us-east-1:123456789012:components:c:versions:v", "componentName": "c",
                "componentVersion": "v", "creationTimestamp": datetime.datetime(2020, 1, 25),
                "status": {"componentState": "REQUESTED"}}
    else:
        raise AssertionError("unexpected greengrassv2 call " + model.name)
    return AWSResponse("https://greengrass.invalid", 200, {}, None), body

with mock_aws():
    import boto3
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-parameter-build.greengrassv2.*", record)
    boto3.DEFAULT_SESSION.events.register("before-call.greengrassv2.*", answer)
    from gdk.CLIParser import main
    sys.argv = ["gdk", "component", "publish"]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    except Exception as exc:
        code = repr(exc)
    s3 = boto3.client("s3", region_name="us-east-1")
    objects = {}
    for bucket in s3.list_buckets()["Buckets"]:
        for obj in s3.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            data = s3.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
            objects["s3://%s/%s" % (bucket["Name"], obj["Key"])] = hashlib.sha256(data).hexdigest()
with open(out, "w") as fh:
    json.dump({"exit": code, "greengrassv2": calls, "s3": objects}, fh, indent=1, default=str)
'''


def gdk() -> Path:
    exe = BIN / "gdk"
    if not exe.exists():
        pytest.fail(f"the GDK CLI is not installed in {BIN.parent}: scripts/setup installs it from "
                    f"../shared/tools/gdk-cli-{GDK_VERSION}.tar.gz (or GDK_TARBALL); run ./scripts/setup")
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.strip()
    if version != f"gdk {GDK_VERSION}":
        pytest.fail(f"{exe} is {version!r}, not gdk {GDK_VERSION}: run ./scripts/setup")
    return exe


def clean_copy(dest: Path) -> Path:
    """What a clone of this working tree holds: tracked and new files, nothing ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)
    return dest


def env() -> dict[str, str]:
    """gdk and the custom build's python3 come from this venv (as with it activated)."""
    result = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTHON"))}
    result["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return result


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    gdk()
    return clean_copy(tmp_path_factory.mktemp("clone") / "windfleet")


@pytest.fixture(scope="module")
def published(checkout) -> dict[str, dict]:
    """``gdk component build`` then ``gdk component publish`` in every project (in parallel:
    each project has its own greengrass-build/); ``{project: results}``."""
    exe = gdk()

    def run(project: str) -> tuple[str, dict]:
        cwd = checkout / project
        build = subprocess.run([str(exe), "component", "build"], cwd=cwd, env=env(), capture_output=True, text=True)
        result = {"build": build}
        if build.returncode == 0:
            out = cwd.parent / f"publish-{cwd.name}.json"
            result["publish_log"] = subprocess.run([sys.executable, "-c", PUBLISH_DRIVER, str(out)], cwd=cwd, env=env(),
                                                   capture_output=True, text=True)
            result["publish"] = json.loads(out.read_text()) if out.exists() else None
        return project, result

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, PROJECTS))


def test_every_code_component_is_a_gdk_project(checkout):
    found = sorted(str(p.parent.relative_to(checkout)) for p in checkout.rglob("gdk-config.json"))
    assert found == sorted(PROJECTS)
    for project, name in PROJECTS.items():
        config = json.loads((checkout / project / "gdk-config.json").read_text())
        assert list(config["component"]) == [name] and config["gdk_version"] == GDK_VERSION
        assert config["component"][name]["build"]["build_system"] == "custom"
        # GDK needs its recipe beside gdk-config.json: the recipe in recipes/, linked
        recipe = checkout / project / "recipe.yaml"
        assert recipe.is_symlink() and recipe.resolve() == (checkout / "recipes" / f"{name}.yaml").resolve()


@pytest.mark.parametrize("project", list(PROJECTS))
def test_gdk_component_build_lays_out_what_publish_reads(published, checkout, project):
    from gdk.common import consts, utils
    from gdk.common.RecipeValidator import RecipeValidator

    result = published[project]
    assert result["build"].returncode == 0, result["build"].stdout + result["build"].stderr
    name = PROJECTS[project]
    config = json.loads((checkout / project / "gdk-config.json").read_text())["component"][name]
    version = config["version"]
    out = checkout / project / "greengrass-build"
    # the recipe under the name GDK resolves its project recipe to (GDKProject._get_recipe_file)
    gdk_name = (checkout / project / "recipe.yaml").resolve().name
    built_recipe = out / "recipes" / gdk_name
    recipe = yaml.safe_load(built_recipe.read_text())
    assert recipe["ComponentName"] == name and str(recipe["ComponentVersion"]) == version
    assert recipe["ComponentPublisher"] == config["author"]
    RecipeValidator(utils.get_static_file_path(consts.recipe_schema_file)).validate_recipe(recipe)
    assert built_recipe.stat().st_size < 16_000
    art_dir = out / "artifacts" / name / version
    assert sorted(p.name for p in art_dir.iterdir()) == ["windfleet.zip"]
    for manifest in recipe["Manifests"]:
        for artifact in manifest["Artifacts"]:
            assert artifact["Uri"] == "s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/windfleet.zip"
    with zipfile.ZipFile(art_dir / "windfleet.zip") as zf:
        names = set(zf.namelist())
    pkg = {"com.windfleet.TurbineSimulator": "simulator", "com.windfleet.AnomalyDetector": "detector",
           "com.windfleet.LogForwarder": "forwarder"}[name]
    assert f"windfleet/components/{pkg}/requirements.txt" in names and "windfleet/device_runtime.py" in names
    assert not any("greengrass-build" in n or n.endswith(("gdk-config.json", "recipe.yaml")) for n in names)


@pytest.mark.parametrize("project", list(PROJECTS))
def test_gdk_component_publish_uploads_and_creates_the_version(published, checkout, project):
    result = published[project]
    publish = result.get("publish")
    log = result["publish_log"].stdout + result["publish_log"].stderr if "publish_log" in result else ""
    assert publish is not None and publish["exit"] == 0, log
    name = PROJECTS[project]
    version = "1.0.0"
    bucket = f"windfleet-artifacts-{REGION}-{ACCOUNT}"  # gdk-config's bucket + region + account
    zip_path = checkout / project / "greengrass-build" / "artifacts" / name / version / "windfleet.zip"
    uri = f"s3://{bucket}/{name}/{version}/windfleet.zip"
    assert publish["s3"] == {uri: hashlib.sha256(zip_path.read_bytes()).hexdigest()}
    operations = [c["operation"] for c in publish["greengrassv2"]]
    assert operations == ["ListComponentVersions", "CreateComponentVersion"]
    inline = yaml.safe_load(publish["greengrassv2"][-1]["params"]["inlineRecipe"])
    assert inline["ComponentName"] == name and str(inline["ComponentVersion"]) == version
    assert [a["Uri"] for m in inline["Manifests"] for a in m["Artifacts"]] == [uri] * len(inline["Manifests"])
    # the file publish wrote and sent: greengrass-build/recipes/<Name>-<Version>.yaml
    sent = checkout / project / "greengrass-build" / "recipes" / f"{name}-{version}.yaml"
    assert yaml.safe_load(sent.read_text()) == inline


def test_gdk_build_refuses_a_version_that_differs_from_the_recipe(checkout, tmp_path):
    project = tmp_path / "p"
    shutil.copytree(checkout / "components/forwarder", project, symlinks=False,
                    ignore=shutil.ignore_patterns("greengrass-build", "__pycache__"))
    config = json.loads((project / "gdk-config.json").read_text())
    config["component"]["com.windfleet.LogForwarder"]["version"] = "NEXT_PATCH"
    (project / "gdk-config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "windfleet.build", "--gdk", "--root", str(checkout)], cwd=project,
                          env={**env(), "PYTHONPATH": str(checkout)}, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("windfleet build: gdk-config.json has version 'NEXT_PATCH' and "
                                   "recipe.yaml '1.0.0': keep them equal (explicit semver; NEXT_PATCH is not used)")
