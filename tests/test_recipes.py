"""The recipes in recipes/ and gdk-config.json, checked the way the GDK checks them, plus
what the schema does not model (accessControl, manifest order, size)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from windfleet import topics
from windfleet.nucleus import recipe as R
from windfleet.nucleus.authorization import Authorizer

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO.parent / "shared" / "schemas"  # ../shared beside the checkout (CI clones it there too)
RECIPE_FILES = sorted((REPO / "recipes").glob("*.yaml"))
NAMES = {"com.windfleet.TurbineSimulator", "com.windfleet.AnomalyDetector", "com.windfleet.LogForwarder",
         "com.windfleet.AnomalyModel"}
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


def lower_keys(value):
    """What gdk/common/RecipeValidator.py does before validating."""
    if isinstance(value, dict):
        return {str(k).lower(): lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [lower_keys(v) for v in value]
    return value


def gdk_errors(recipe: dict) -> list[str]:
    schema = json.loads((SCHEMAS / "greengrass-recipe.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [e.message for e in validator.iter_errors(lower_keys(recipe))]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def recipes() -> dict[str, dict]:
    return {r["ComponentName"]: r for r in map(load, RECIPE_FILES)}


def test_all_four_components_have_a_recipe(recipes):
    assert set(recipes) == NAMES


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_recipe_is_valid_the_way_the_gdk_validates(path):
    recipe = load(path)
    assert gdk_errors(recipe) == []
    assert path.stat().st_size < 16_000
    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert SEMVER.match(recipe["ComponentVersion"])
    assert not recipe["ComponentName"].startswith("aws.greengrass")
    assert path.name == f"{recipe['ComponentName']}.yaml"
    # PascalCase top-level keys, as in the AWS docs.
    assert all(k[0].isupper() for k in recipe)


def test_the_validator_can_fail():
    bad = load(RECIPE_FILES[0])
    bad["Manifests"][0]["Artifacts"][0]["Unarchive"] = "TAR"
    bad["RecipeFormatVersion"] = "2021-01-01"
    assert len(gdk_errors(bad)) == 2
    # Without lower-casing, the PascalCase recipe would not validate at all.
    schema = json.loads((SCHEMAS / "greengrass-recipe.schema.json").read_text())
    assert list(jsonschema.Draft7Validator(schema).iter_errors(load(RECIPE_FILES[0])))


PUBSUB, MQTTPROXY = "aws.greengrass.ipc.pubsub", "aws.greengrass.ipc.mqttproxy"
PUBLISH, SUBSCRIBE = "aws.greengrass#PublishToTopic", "aws.greengrass#SubscribeToTopic"
TO_IOT_CORE = "aws.greengrass#PublishToIoTCore"
FROM_IOT_CORE = "aws.greengrass#SubscribeToIoTCore"
# What each component does on the bus (windfleet.components.*), on gateway gw1 with turbine gw1-t03.
NEEDS = {
    "com.windfleet.TurbineSimulator": [(PUBSUB, PUBLISH, topics.readings("gw1-t03")),
                                       (PUBSUB, PUBLISH, topics.labels("gw1-t03")),
                                       (PUBSUB, PUBLISH, topics.health("gw1")), (PUBSUB, PUBLISH, topics.logs("gw1")),
                                       (MQTTPROXY, TO_IOT_CORE, topics.labels("gw1-t03"))],  # ground truth
    "com.windfleet.AnomalyDetector": [(PUBSUB, SUBSCRIBE, topics.readings("gw1-t03")),
                                      (PUBSUB, SUBSCRIBE, topics.labels("gw1-t03")),  # a canary's recall
                                      (PUBSUB, PUBLISH, topics.scores("gw1-t03")),
                                      (PUBSUB, PUBLISH, topics.drift("gw1-t03")),  # issue 15
                                      (PUBSUB, PUBLISH, topics.capture("gw1")),  # issue 15
                                      (PUBSUB, PUBLISH, topics.health("gw1")), (PUBSUB, PUBLISH, topics.logs("gw1"))],
    "com.windfleet.LogForwarder": [(PUBSUB, SUBSCRIBE, topics.scores("gw1-t03")),
                                   (PUBSUB, SUBSCRIBE, topics.drift("gw1-t03")), (PUBSUB, SUBSCRIBE, topics.capture("gw1")),
                                   (PUBSUB, SUBSCRIBE, topics.health("gw1")), (PUBSUB, SUBSCRIBE, topics.logs("gw1")),
                                   (PUBSUB, PUBLISH, topics.health("gw1")), (PUBSUB, PUBLISH, topics.logs("gw1")),
                                   (MQTTPROXY, TO_IOT_CORE, topics.telemetry("gw1")),
                                   (MQTTPROXY, FROM_IOT_CORE, topics.telemetry_ack("gw1"))],  # cloud_ack
    "com.windfleet.AnomalyModel": [],
}
ALL_TOPICS = [f("gw1-t03") for f in (topics.readings, topics.labels, topics.scores, topics.drift)] + \
    [f("gw1") for f in (topics.health, topics.logs, topics.telemetry, topics.telemetry_ack, topics.capture)] + \
    ["windfleet/other", "other/topic"]


def test_access_control_is_least_privilege(recipes):
    assert R.access_control_problems(recipes.values()) == []
    # `*` stands only for the thing / turbine level of a windfleet topic: accessControl is not
    # interpolated on a stock nucleus, so {iot:thingName} would be literal text and deny everything.
    allowed = {f("*") for f in (topics.readings, topics.labels, topics.scores, topics.health, topics.logs,
                                topics.telemetry, topics.telemetry_ack, topics.drift, topics.capture)}
    for name, recipe in recipes.items():
        acl = recipe.get("ComponentConfiguration", {}).get("DefaultConfiguration", {}).get("accessControl", {})
        for service, policies in acl.items():
            for policy in policies.values():
                assert "*" not in policy["operations"]
                for res in policy["resources"]:
                    assert res in allowed and "{iot:thingName}" not in res, (name, res)

    # The nucleus' own authorization over the recipes' default configuration (accessControl
    # stays in the configuration): each component may do exactly what it does, nothing more.
    auth = Authorizer("gw1", interpolate=False)
    for name, recipe in recipes.items():
        auth.set_component(name, R.default_configuration(recipe))
    assert auth.errors == []
    for name in recipes:
        for service, operation in ((PUBSUB, PUBLISH), (PUBSUB, SUBSCRIBE), (MQTTPROXY, TO_IOT_CORE),
                                   (MQTTPROXY, FROM_IOT_CORE)):
            granted = {t for t in ALL_TOPICS if auth.is_authorized(name, service, operation, t)}
            wanted = {t for s, o, t in NEEDS[name] if (s, o) == (service, operation)}
            assert granted == wanted, (name, service, operation)
    # IoT Core: the forwarder's telemetry (and the cloud's acknowledgements of it), the simulator's
    # ground-truth labels, nothing else.
    mqtt = {n: r["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"].get(MQTTPROXY)
            for n, r in recipes.items() if "accessControl" in R.default_configuration(r)}
    assert sorted(n for n, v in mqtt.items() if v) == ["com.windfleet.LogForwarder", "com.windfleet.TurbineSimulator"]
    granted = sorted((p["operations"], p["resources"]) for p in mqtt["com.windfleet.LogForwarder"].values())
    assert granted == [([TO_IOT_CORE], [topics.telemetry("*")]), ([FROM_IOT_CORE], [topics.telemetry_ack("*")])]
    (policy,) = mqtt["com.windfleet.TurbineSimulator"].values()
    assert policy["resources"] == [topics.labels("*")] and policy["operations"] == [TO_IOT_CORE]
    assert not auth.is_authorized("com.windfleet.LogForwarder", MQTTPROXY, TO_IOT_CORE, "windfleet/fleet/gw1/other")


def test_access_control_checker_catches_each_mistake(recipes):
    det = copy.deepcopy(recipes["com.windfleet.AnomalyDetector"])
    fwd = copy.deepcopy(recipes["com.windfleet.LogForwarder"])
    acl = det["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]
    pubsub = acl["aws.greengrass.ipc.pubsub"]
    pubsub["com.windfleet.AnomalyDetector:pubsub:1"]["resources"].append("windfleet/turbines/+/readings")
    pubsub["com.windfleet.AnomalyDetector:pubsub:2"]["operations"].append("aws.greengrass#PublishToIoTCore")
    # the forwarder's mqttproxy may use MQTT wildcards; its duplicated policy id may not
    fwd_acl = fwd["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]
    fwd_acl["aws.greengrass.ipc.mqttproxy"]["com.windfleet.LogForwarder:mqttproxy:1"]["resources"].append(
        "windfleet/fleet/*/#")
    fwd_acl["aws.greengrass.ipc.pubsub"]["com.windfleet.AnomalyDetector:pubsub:1"] = {
        "operations": ["aws.greengrass#SubscribeToTopic"], "resources": ["windfleet/devices/x/health"]}
    acl["aws.greengrass.ipc.shadow"] = {}
    problems = R.access_control_problems([det, fwd])
    joined = "\n".join(problems)
    assert "uses an MQTT wildcard" in joined and "'windfleet/turbines/+/readings'" in joined
    assert "'aws.greengrass#PublishToIoTCore' is not an operation of aws.greengrass.ipc.pubsub" in joined
    assert "also used by com.windfleet.AnomalyDetector" in joined
    assert "unknown IPC service 'aws.greengrass.ipc.shadow'" in joined
    assert "windfleet/fleet/*/#" not in joined
    assert len(problems) == 5  # the four above + the borrowed id not starting with its component's name


def test_manifests_most_specific_first_and_catch_all_linux_last(recipes):
    for name, recipe in recipes.items():
        manifests = recipe["Manifests"]
        assert manifests[-1]["Platform"] == {"os": "linux"}, name
        for earlier in manifests[:-1]:
            assert len(earlier["Platform"]) > 1, f"{name}: a catch-all before a specific manifest"
        for arch in ("aarch64", "arm", "amd64"):  # aarch64, armv7l, x86_64 as Greengrass names them
            R.select_manifest(recipe, {"os": "linux", "architecture": arch})
        assert R.select_manifest(recipe, {"os": "linux", "architecture": "amd64"}) is manifests[-1]


def test_lifecycle_install_run_and_the_model_found_through_variables(recipes):
    for name in NAMES - {"com.windfleet.AnomalyModel"}:
        recipe = recipes[name]
        assert R.default_configuration(recipe)["turbines"] >= 1
        for manifest in recipe["Manifests"]:
            life = manifest["Lifecycle"]
            assert ("Run" in life) != ("Startup" in life)
            install = life["Install"]
            assert install["Timeout"] >= 60
            module = {"com.windfleet.TurbineSimulator": "simulator", "com.windfleet.AnomalyDetector": "detector",
                      "com.windfleet.LogForwarder": "forwarder"}[name]
            # one shared, idempotent runtime per requirements set (tests/test_install.py runs it)
            assert 'exec python3 -I "{artifacts:decompressedPath}/windfleet/windfleet/device_runtime.py"' in install["Script"]
            assert install["RequiresPrivilege"] is True
            assert f"/windfleet/components/{module}/requirements.txt\"" in install["Script"]
            assert '--root "{kernel:rootPath}/work/windfleet-runtime" --link "{work:path}/venv"' in install["Script"]
            assert f"-m windfleet.components.{module}.main" in life["Run"]["Script"]
            assert life["Setenv"]["PYTHONPATH"] == "{artifacts:decompressedPath}/windfleet"
            (artifact,) = manifest["Artifacts"]
            assert artifact["Uri"].endswith("/windfleet.zip") and artifact["Unarchive"] == "ZIP"
    det = recipes["com.windfleet.AnomalyDetector"]
    # The detector does not depend on the model (a model change must not restart it): it
    # follows the model component's configuration over IPC and finds its versions on disk.
    assert "ComponentDependencies" not in det
    for m in det["Manifests"]:
        run = m["Lifecycle"]["Run"]["Script"]
        assert '--models-root "{kernel:rootPath}/packages/artifacts/com.windfleet.AnomalyModel"' in run
        assert "{com.windfleet.AnomalyModel:" not in run and "--model-dir" not in run
    assert "health_gate" not in R.default_configuration(det)
    fwd = recipes["com.windfleet.LogForwarder"]
    assert all('--spool "{work:path}/' in m["Lifecycle"]["Run"]["Script"] for m in fwd["Manifests"])
    model = recipes["com.windfleet.AnomalyModel"]
    # The model HARD-depends on the detector: its Install validates with the detector's code and venv.
    assert model["ComponentDependencies"]["com.windfleet.AnomalyDetector"]["DependencyType"] == "HARD"
    assert set(R.default_configuration(model)) >= {"OnnxSha256", "ModelVersion"}
    (manifest,) = model["Manifests"]
    life = manifest["Lifecycle"]
    assert set(life) == {"Setenv", "Install"}  # no Run: nothing to restart
    assert "-m windfleet.components.detector.check_model \"{artifacts:path}\"" in life["Install"]["Script"]
    assert "{kernel:rootPath}/work/com.windfleet.AnomalyDetector/venv/bin/python3" in life["Install"]["Script"]
    assert life["Setenv"]["PYTHONPATH"] == "{com.windfleet.AnomalyDetector:artifacts:decompressedPath}/windfleet"
    assert sorted(a["Uri"].rsplit("/", 1)[-1] for a in manifest["Artifacts"]) == ["model.json", "model.onnx"]
    assert all(a["Permission"]["Read"] == "ALL" for a in manifest["Artifacts"])
    # Everything the recipes reference resolves: no variable is left as literal text.
    versions = {n: r["ComponentVersion"] for n, r in recipes.items()}
    configs = {n: R.default_configuration(r) for n, r in recipes.items()}
    for name, recipe in recipes.items():
        for manifest in recipe["Manifests"]:
            ctx = R.Context(name, "gw1", Path("/greengrass/v2"),
                            artifacts_path=lambda n: Path(f"/gg/art/{n}/{versions[n]}"),
                            decompressed_path=lambda n: Path(f"/gg/unz/{n}/{versions[n]}"),
                            work_path=lambda n: Path(f"/gg/work/{n}"), configuration=lambda n: configs[n],
                            direct_dependencies=list(R.dependencies(recipe)))
            ctx.interpolate_tree(copy.deepcopy(manifest.get("Lifecycle") or {}))
            assert ctx.unresolved == [], (name, ctx.unresolved)


def test_gdk_config_is_valid_and_names_one_component(recipes):
    schema = json.loads((SCHEMAS / "gdk-config.schema.json").read_text())
    config = json.loads((REPO / "gdk-config.json").read_text())
    jsonschema.Draft7Validator(schema).validate(config)
    (name,) = config["component"]
    assert name in recipes
    assert config["component"][name]["version"] == recipes[name]["ComponentVersion"]  # explicit, no NEXT_PATCH
    bad = copy.deepcopy(config)
    bad["component"]["second.Component"] = bad["component"][name]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))
