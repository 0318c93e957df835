"""The deployer against botocore's Stubber: every greengrassv2 request is checked against the
real service model (parameter names, types, enums), and the merge/first-deployment/idempotency
logic is checked on the requests it sends."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import boto3
import jsonschema
import pytest
from botocore.stub import ANY, Stubber

from windfleet.cloud import deployer, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.testing import fake_build, fake_model_dir

REGION, ACCOUNT = "eu-west-1", "123456789012"
GROUP_ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/turbines"
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "greengrass-recipe.schema.json"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
MODEL = settings.MODEL_COMPONENT


def carn(name: str, version: str | None = None) -> str:
    arn = f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:{name}"
    return f"{arn}:versions:{version}" if version else arn


class FakeS3:
    """Records uploads (S3 itself is exercised with moto elsewhere)."""

    def __init__(self):
        self.objects: dict[tuple[str, str], bytes] = {}

    def put_object(self, Bucket, Key, Body, **_):
        self.objects[(Bucket, Key)] = Body
        return {"ETag": '"x"'}


@pytest.fixture
def gg():
    client = boto3.client("greengrassv2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    sent: list[tuple[str, dict]] = []
    client.meta.events.register("provide-client-params.greengrassv2.*",
                                lambda params, model, **_: sent.append((model.name, copy.deepcopy(params))))
    with Stubber(client) as stub:
        client.sent = sent
        yield client, stub
        stub.assert_no_pending_responses()


@pytest.fixture
def backend(gg):
    client, _ = gg
    b = Backend(kind="aws", sagemaker=None, s3=FakeS3(), greengrassv2=client, bucket="artifacts",
                thing_group="turbines", region=REGION)
    b._cache[("thing_group_arn", "turbines")] = GROUP_ARN
    return b


@pytest.fixture
def model_files(tmp_path):
    d = fake_model_dir(tmp_path / "m", "2.0.0")
    return {"model.onnx": (d / "model.onnx").read_bytes(), "model.json": (d / "model.json").read_bytes()}


def describe(name, version, state="DEPLOYABLE"):
    return {"arn": carn(name, version), "componentName": name, "componentVersion": version,
            "creationTimestamp": NOW, "publisher": "windfleet", "description": "d",
            "status": {"componentState": state, "message": "ok", "errors": {}}, "platforms": [], "tags": {}}


def created(name, version):
    return {"arn": carn(name, version), "componentName": name, "componentVersion": version,
            "creationTimestamp": NOW, "status": {"componentState": "REQUESTED", "message": "requested", "errors": {}}}


SUITE_OLD = {settings.SIMULATOR: {"componentVersion": "1.0.0"},
             settings.DETECTOR: {"componentVersion": "1.2.0",
                                 "configurationUpdate": {"merge": json.dumps({"Threshold": 3})}},
             settings.FORWARDER: {"componentVersion": "1.0.1"},
             MODEL: {"componentVersion": "1.0.1"},
             "com.example.Extra": {"componentVersion": "0.3.0"}}


def get_deployment_response(dep_id, components):
    return {"targetArn": GROUP_ARN, "revisionId": "3", "deploymentId": dep_id, "deploymentName": "old",
            "deploymentStatus": "ACTIVE", "components": components,
            "deploymentPolicies": settings.DEPLOYMENT_POLICIES, "creationTimestamp": NOW, "isLatestForTarget": True}


def list_latest_response(dep_id):
    return {"deployments": [{"targetArn": GROUP_ARN, "revisionId": "3", "deploymentId": dep_id,
                             "deploymentName": "old", "creationTimestamp": NOW, "deploymentStatus": "ACTIVE",
                             "isLatestForTarget": True}]}


def test_model_version_is_merged_into_the_groups_latest_deployment(gg, backend, model_files):
    client, stub = gg
    version = "1.0.2"
    stub.add_response("create_component_version", created(MODEL, version), {"inlineRecipe": ANY})
    stub.add_response("describe_component", describe(MODEL, version, "REQUESTED"), {"arn": carn(MODEL, version)})
    stub.add_response("describe_component", describe(MODEL, version), {"arn": carn(MODEL, version)})
    stub.add_response("list_deployments", list_latest_response("d-old"),
                      {"targetArn": GROUP_ARN, "historyFilter": "LATEST_ONLY"})
    stub.add_response("get_deployment", get_deployment_response("d-old", SUITE_OLD), {"deploymentId": "d-old"})
    expected = copy.deepcopy(SUITE_OLD)
    # a model version always resets the model component's configuration to its own defaults
    expected[MODEL] = {"componentVersion": version, "configurationUpdate": settings.MODEL_CONFIGURATION_UPDATE}
    stub.add_response("create_deployment", {"deploymentId": "d-new", "iotJobId": "j", "iotJobArn": "arn:j"},
                      {"targetArn": GROUP_ARN, "deploymentName": ANY, "components": expected,
                       "deploymentPolicies": settings.DEPLOYMENT_POLICIES,
                       "iotJobConfiguration": settings.IOT_JOB_CONFIGURATION, "clientToken": ANY})

    out = deployer.deploy_model(backend, 2, model_files, package_arn="arn:pkg/2",
                                poll={"interval": 0.01, "max_interval": 0.01, "timeout": 5})

    assert out["status"] == "deployed" and out["deploymentId"] == "d-new" and out["componentVersion"] == version
    # artifacts uploaded where the recipe points, recipe carries no digest (the service fills it)
    assert backend.s3.objects[("artifacts", f"{MODEL}/{version}/model.onnx")] == model_files["model.onnx"]
    recipe = json.loads(next(p for op, p in client.sent if op == "CreateComponentVersion")["inlineRecipe"])
    assert recipe["ComponentName"] == MODEL and recipe["ComponentVersion"] == version
    uris = [a["Uri"] for a in recipe["Manifests"][0]["Artifacts"]]
    assert uris == [f"s3://artifacts/{MODEL}/{version}/model.onnx", f"s3://artifacts/{MODEL}/{version}/model.json"]
    assert all(a["Permission"]["Read"] == "ALL" for a in recipe["Manifests"][0]["Artifacts"])
    assert recipe["ComponentConfiguration"]["DefaultConfiguration"]["OnnxSha256"] == \
        json.loads(model_files["model.json"])["onnx_sha256"]


def _lower(obj):
    if isinstance(obj, dict):
        return {k.lower(): _lower(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_lower(v) for v in obj]
    return obj


def test_model_recipe_validates_against_the_gdk_schema():
    recipe = deployer.model_recipe("1.0.7", {"model.onnx": "s3://b/k/model.onnx", "model.json": "s3://b/k/model.json"},
                                   {"version": "3.1.0", "onnx_sha256": "ab" * 32}, "arn:pkg")
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(_lower(recipe))
    assert len(json.dumps(recipe).encode()) < 16_000
    bad = copy.deepcopy(recipe)
    bad["Manifests"][0]["Artifacts"][0]["Unarchive"] = "TAR"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(_lower(bad))


def test_first_deployment_deploys_the_whole_published_suite(gg, backend, model_files):
    client, stub = gg
    version = "1.0.1"
    stub.add_response("create_component_version", created(MODEL, version), {"inlineRecipe": ANY})
    stub.add_response("describe_component", describe(MODEL, version), {"arn": carn(MODEL, version)})
    stub.add_response("list_deployments", {"deployments": []}, {"targetArn": GROUP_ARN, "historyFilter": "LATEST_ONLY"})
    comps = [(settings.SIMULATOR, "1.0.0"), (settings.DETECTOR, "1.1.0"), (settings.FORWARDER, "1.0.3"),
             (MODEL, version)]
    stub.add_response("list_components", {"components": [
        {"arn": carn(n), "componentName": n, "latestVersion": {"arn": carn(n, v), "componentVersion": v}}
        for n, v in comps[:2]], "nextToken": "page2"}, {"scope": "PRIVATE"})
    stub.add_response("list_components", {"components": [
        {"arn": carn(n), "componentName": n, "latestVersion": {"arn": carn(n, v), "componentVersion": v}}
        for n, v in comps[2:]]}, {"scope": "PRIVATE", "nextToken": "page2"})
    stub.add_response("create_deployment", {"deploymentId": "d-1"},
                      {"targetArn": GROUP_ARN, "deploymentName": ANY,
                       "components": {n: {"componentVersion": v, **({"configurationUpdate": settings.MODEL_CONFIGURATION_UPDATE}
                                                                    if n == MODEL else {})} for n, v in comps},
                       "deploymentPolicies": settings.DEPLOYMENT_POLICIES,
                       "iotJobConfiguration": settings.IOT_JOB_CONFIGURATION, "clientToken": ANY})
    out = deployer.deploy_model(backend, 1, model_files, poll={"interval": 0.01, "timeout": 5})
    assert out["status"] == "deployed" and out["deploymentId"] == "d-1"


def _conflict(stub):
    stub.add_client_error("create_component_version", service_error_code="ConflictException",
                          service_message="Component version already exists", http_status_code=409,
                          expected_params={"inlineRecipe": ANY})


def _existing_recipe(version, sha):
    recipe = deployer.model_recipe(version, {"model.onnx": "s3://x/model.onnx"}, {"onnx_sha256": sha})
    return {"recipeOutputFormat": "JSON", "recipe": json.dumps(recipe).encode()}


def _existing_component(stub, version, sha, latest=None):
    """The model component version exists already (ConflictException, then its recipe); with
    ``latest``, it is DEPLOYABLE and ``latest`` is the group's latest deployment."""
    _conflict(stub)
    stub.add_response("get_component", _existing_recipe(version, sha),
                      {"arn": carn(MODEL, version), "recipeOutputFormat": "JSON"})
    if latest:
        stub.add_response("describe_component", describe(MODEL, version), {"arn": carn(MODEL, version)})
        stub.add_response("list_deployments", list_latest_response(latest),
                          {"targetArn": GROUP_ARN, "historyFilter": "LATEST_ONLY"})


def test_repeated_approval_is_idempotent(gg, backend, model_files):
    """ConflictException on the component + the model already in the latest deployment -> no new deployment."""
    client, stub = gg
    version = "1.0.2"
    sha = json.loads(model_files["model.json"])["onnx_sha256"]
    _existing_component(stub, version, sha, latest="d-new")
    current = copy.deepcopy(SUITE_OLD)
    current[MODEL] = {"componentVersion": version}
    stub.add_response("get_deployment", get_deployment_response("d-new", current), {"deploymentId": "d-new"})
    out = deployer.deploy_model(backend, 2, model_files, poll={"interval": 0.01, "timeout": 5})
    assert out == {**out, "status": "unchanged", "deploymentId": "d-new", "componentCreated": False}
    assert "CreateDeployment" not in [op for op, _ in client.sent]


def test_existing_component_of_a_crashed_earlier_attempt_is_still_deployed(gg, backend, model_files):
    """Conflict (component made by an attempt that died before deploying) -> deploy it now."""
    client, stub = gg
    version = "1.0.2"
    sha = json.loads(model_files["model.json"])["onnx_sha256"]
    _existing_component(stub, version, sha, latest="d-old")
    stub.add_response("get_deployment", get_deployment_response("d-old", SUITE_OLD), {"deploymentId": "d-old"})
    stub.add_response("create_deployment", {"deploymentId": "d-new"},
                      {"targetArn": GROUP_ARN, "deploymentName": ANY, "components": ANY,
                       "deploymentPolicies": ANY, "iotJobConfiguration": ANY, "clientToken": ANY})
    out = deployer.deploy_model(backend, 2, model_files, poll={"interval": 0.01, "timeout": 5})
    assert out["status"] == "deployed" and out["componentCreated"] is False


def test_existing_version_holding_another_model_is_refused(gg, backend, model_files):
    client, stub = gg
    _existing_component(stub, "1.0.2", "ff" * 32)
    with pytest.raises(deployer.DeployError, match="already exists with another model"):
        deployer.deploy_model(backend, 2, model_files)


def test_failed_component_stops_the_rollout(gg, backend, model_files):
    client, stub = gg
    stub.add_response("create_component_version", created(MODEL, "1.0.4"), {"inlineRecipe": ANY})
    failed = describe(MODEL, "1.0.4", "FAILED")
    failed["status"]["message"] = "artifact not found"
    stub.add_response("describe_component", failed, {"arn": carn(MODEL, "1.0.4")})
    with pytest.raises(deployer.DeployError, match="FAILED.*artifact not found"):
        deployer.deploy_model(backend, 4, model_files, poll={"interval": 0.01, "timeout": 5})


def test_waiting_for_deployable_is_bounded(gg, backend):
    client, stub = gg
    for _ in range(50):
        stub.add_response("describe_component", describe(MODEL, "1.0.5", "INITIATED"), {"arn": carn(MODEL, "1.0.5")})
    with pytest.raises(deployer.DeployError, match="INITIATED"):
        deployer.wait_deployable(backend, carn(MODEL, "1.0.5"), interval=0.01, max_interval=0.01, timeout=0.1)
    # drain what was not needed so the fixture's pending check passes
    stub._queue.clear()


def test_other_greengrass_errors_propagate(gg, backend, model_files):
    client, stub = gg
    stub.add_client_error("create_component_version", service_error_code="ValidationException",
                          service_message="bad recipe", http_status_code=400, expected_params={"inlineRecipe": ANY})
    with pytest.raises(Exception, match="bad recipe"):
        deployer.deploy_model(backend, 2, model_files)


def test_publish_creates_every_component_and_reports_existing(gg, backend, tmp_path):
    client, stub = gg
    build = fake_build(tmp_path / "gb")
    for name in sorted(settings.SUITE):
        if name == settings.FORWARDER:
            stub.add_client_error("create_component_version", service_error_code="ConflictException",
                                  http_status_code=409, expected_params={"inlineRecipe": ANY})
            continue
        stub.add_response("create_component_version", created(name, "1.0.0"), {"inlineRecipe": ANY})
        stub.add_response("describe_component", describe(name, "1.0.0"), {"arn": carn(name, "1.0.0")})
    results = deployer.publish(backend, build, poll={"interval": 0.01, "timeout": 5})
    assert {r["component"]: r["status"] for r in results} == {
        n: ("exists" if n == settings.FORWARDER else "created") for n in settings.SUITE}
    recipes = [p["inlineRecipe"] for op, p in client.sent if op == "CreateComponentVersion"]
    import yaml

    first = yaml.safe_load(recipes[0])
    uri = first["Manifests"][0]["Artifacts"][0]["Uri"]
    assert uri == f"s3://artifacts/{first['ComponentName']}/1.0.0/payload.zip"
    assert ("artifacts", f"{first['ComponentName']}/1.0.0/payload.zip") in backend.s3.objects


def test_deploy_suite_keeps_the_running_model_and_extra_components(gg, backend):
    client, stub = gg
    latest = [(settings.SIMULATOR, "1.1.0"), (settings.DETECTOR, "1.3.0"), (settings.FORWARDER, "1.0.1"),
              (MODEL, "1.0.9")]
    stub.add_response("list_components", {"components": [
        {"arn": carn(n), "componentName": n, "latestVersion": {"arn": carn(n, v), "componentVersion": v}}
        for n, v in latest]}, {"scope": "PRIVATE"})
    stub.add_response("list_deployments", list_latest_response("d-old"),
                      {"targetArn": GROUP_ARN, "historyFilter": "LATEST_ONLY"})
    stub.add_response("get_deployment", get_deployment_response("d-old", SUITE_OLD), {"deploymentId": "d-old"})
    stub.add_response("list_core_devices", {"coreDevices": []}, {"thingGroupArn": GROUP_ARN})  # none reports yet
    expected = copy.deepcopy(SUITE_OLD)
    expected[settings.SIMULATOR]["componentVersion"] = "1.1.0"
    expected[settings.DETECTOR]["componentVersion"] = "1.3.0"
    expected[MODEL]["configurationUpdate"] = settings.MODEL_CONFIGURATION_UPDATE
    stub.add_response("create_deployment", {"deploymentId": "d-s"},
                      {"targetArn": GROUP_ARN, "deploymentName": "windfleet suite", "components": expected,
                       "deploymentPolicies": settings.DEPLOYMENT_POLICIES,
                       "iotJobConfiguration": settings.IOT_JOB_CONFIGURATION, "clientToken": ANY})
    out = deployer.deploy_suite(backend)
    assert out["components"][MODEL]["componentVersion"] == "1.0.1"  # not the latest (maybe broken) 1.0.9


def test_deploy_suite_keeps_the_model_the_devices_run_after_a_failed_rollout(gg, backend):
    """The latest deployment names 1.0.9, which failed and was rolled back: the devices still
    run 1.0.1 (ListInstalledComponents), so a suite deployment must keep 1.0.1, not bring 1.0.9 back."""
    client, stub = gg
    latest = [(settings.SIMULATOR, "1.1.0"), (settings.DETECTOR, "1.3.0"), (settings.FORWARDER, "1.0.1"),
              (MODEL, "1.0.9")]
    stub.add_response("list_components", {"components": [
        {"arn": carn(n), "componentName": n, "latestVersion": {"arn": carn(n, v), "componentVersion": v}}
        for n, v in latest]}, {"scope": "PRIVATE"})
    failed = copy.deepcopy(SUITE_OLD)
    failed[MODEL]["componentVersion"] = "1.0.9"
    stub.add_response("list_deployments", list_latest_response("d-failed"),
                      {"targetArn": GROUP_ARN, "historyFilter": "LATEST_ONLY"})
    stub.add_response("get_deployment", get_deployment_response("d-failed", failed), {"deploymentId": "d-failed"})
    stub.add_response("list_core_devices", {"coreDevices": [
        {"coreDeviceThingName": t, "status": "HEALTHY", "lastStatusUpdateTimestamp": NOW} for t in ("gw-1", "gw-2")]},
        {"thingGroupArn": GROUP_ARN})
    for thing in ("gw-1", "gw-2"):
        stub.add_response("list_installed_components", {"installedComponents": [
            {"componentName": MODEL, "componentVersion": "1.0.1", "lifecycleState": "FINISHED"}]},
            {"coreDeviceThingName": thing})
    stub.add_response("create_deployment", {"deploymentId": "d-s"}, {
        "targetArn": GROUP_ARN, "deploymentName": "windfleet suite", "components": ANY,
        "deploymentPolicies": settings.DEPLOYMENT_POLICIES, "iotJobConfiguration": settings.IOT_JOB_CONFIGURATION,
        "clientToken": ANY})
    out = deployer.deploy_suite(backend)
    assert out["components"][MODEL]["componentVersion"] == "1.0.1"


def test_job_timeout_covers_the_longest_install():
    """A device still installing must not be TIMED_OUT by the IoT job: inProgressTimeoutInMinutes
    is at least every recipe's longest Install Timeout (recipe reference, "Lifecycle")."""
    import yaml

    longest = 0
    for recipe_path in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"):
        for manifest in yaml.safe_load(recipe_path.read_text()).get("Manifests") or []:
            install = (manifest.get("Lifecycle") or {}).get("Install")
            if isinstance(install, dict):
                longest = max(longest, int(install.get("Timeout", 120)))
    assert longest > 0
    assert settings.IOT_JOB_CONFIGURATION["timeoutConfig"]["inProgressTimeoutInMinutes"] * 60 >= longest


def test_deploy_suite_needs_every_component_published(gg, backend):
    client, stub = gg
    stub.add_response("list_components", {"components": []}, {"scope": "PRIVATE"})
    stub.add_response("list_deployments", {"deployments": []}, {"targetArn": GROUP_ARN, "historyFilter": "LATEST_ONLY"})
    stub.add_response("list_core_devices", {"coreDevices": []}, {"thingGroupArn": GROUP_ARN})
    with pytest.raises(deployer.DeployError, match="not published"):
        deployer.deploy_suite(backend)


def test_device_outcomes_and_cancel_requests(gg, backend):
    client, stub = gg
    stub.add_response("get_deployment", get_deployment_response("d-1", SUITE_OLD), {"deploymentId": "d-1"})
    stub.add_response("list_core_devices", {"coreDevices": [
        {"coreDeviceThingName": "gw-1", "status": "HEALTHY", "lastStatusUpdateTimestamp": NOW},
        {"coreDeviceThingName": "gw-2", "status": "UNHEALTHY", "lastStatusUpdateTimestamp": NOW}]},
        {"thingGroupArn": GROUP_ARN})
    for thing, status, reason in (("gw-1", "SUCCEEDED", None), ("gw-2", "FAILED", "model self-test failed")):
        eff = {"deploymentId": "d-1", "deploymentName": "x", "targetArn": GROUP_ARN,
               "coreDeviceExecutionStatus": status, "creationTimestamp": NOW, "modifiedTimestamp": NOW}
        if reason:
            eff["reason"] = reason
        stub.add_response("list_effective_deployments", {"effectiveDeployments": [eff]},
                          {"coreDeviceThingName": thing})
        stub.add_response("list_installed_components", {"installedComponents": [
            {"componentName": MODEL, "componentVersion": "1.0.1", "lifecycleState": "FINISHED"}]},
            {"coreDeviceThingName": thing})
    out = deployer.device_outcomes(backend, "d-1")
    assert [(o["thing"], o["status"], o["reason"], o["model_version"]) for o in out] == [
        ("gw-1", "SUCCEEDED", "", "1.0.1"), ("gw-2", "FAILED", "model self-test failed", "1.0.1")]
    stub.add_response("cancel_deployment", {"message": "ok"}, {"deploymentId": "d-1"})
    client.cancel_deployment(deploymentId="d-1")


def _suite_deployment(stub, components_sent):
    """A suite deployment over SUITE_OLD (nothing newer published, no device reports a model)."""
    stub.add_response("list_components", {"components": [
        {"arn": carn(n), "componentName": n, "latestVersion": {"arn": carn(n, SUITE_OLD[n]["componentVersion"]),
                                                             "componentVersion": SUITE_OLD[n]["componentVersion"]}}
        for n in settings.SUITE]}, {"scope": "PRIVATE"})
    stub.add_response("list_deployments", list_latest_response("d-old"),
                      {"targetArn": GROUP_ARN, "historyFilter": "LATEST_ONLY"})
    stub.add_response("get_deployment", get_deployment_response("d-old", SUITE_OLD), {"deploymentId": "d-old"})
    stub.add_response("list_core_devices", {"coreDevices": []}, {"thingGroupArn": GROUP_ARN})
    stub.add_response("create_deployment", {"deploymentId": "d-c"}, {
        "targetArn": GROUP_ARN, "deploymentName": "windfleet suite", "components": components_sent,
        "deploymentPolicies": settings.DEPLOYMENT_POLICIES, "iotJobConfiguration": settings.IOT_JOB_CONFIGURATION,
        "clientToken": ANY})


def test_deploy_suite_switches_capture_on_to_the_buckets_prefix_on_aws_s3(gg, backend):
    """On AWS the forwarder uploads to the backend's bucket under the prefix the devices' token
    exchange role may write (provision.device_policy), with no endpoint: AWS S3 itself.  The
    detector keeps the configuration earlier suite deployments gave it."""
    from windfleet import payloads

    client, stub = gg
    expected = copy.deepcopy(SUITE_OLD)
    expected[MODEL]["configurationUpdate"] = settings.MODEL_CONFIGURATION_UPDATE
    expected[settings.DETECTOR]["configurationUpdate"] = {
        "merge": json.dumps({"Threshold": 3, "capture": True}, sort_keys=True)}
    expected[settings.FORWARDER]["configurationUpdate"] = {"merge": json.dumps(
        {"capture_bucket": "artifacts", "capture_endpoint": "", "capture_prefix": payloads.CAPTURE_PREFIX},
        sort_keys=True)}
    _suite_deployment(stub, expected)
    out = deployer.deploy_suite(backend, capture=True)
    assert out["deploymentId"] == "d-c"
    sent = dict(client.sent)["CreateDeployment"]["components"]
    assert json.loads(sent[settings.DETECTOR]["configurationUpdate"]["merge"])["capture"] is True
    assert json.loads(sent[settings.FORWARDER]["configurationUpdate"]["merge"])["capture_bucket"] == backend.bucket

    # and off again: only the detector's switch changes
    off = copy.deepcopy(expected)
    off[settings.DETECTOR]["configurationUpdate"] = {
        "merge": json.dumps({"Threshold": 3, "capture": False}, sort_keys=True)}
    off[settings.FORWARDER] = SUITE_OLD[settings.FORWARDER]
    _suite_deployment(stub, off)
    deployer.deploy_suite(backend, capture=False)


def test_capture_on_the_local_backend_needs_an_endpoint(tmp_path):
    local = Backend.create("local", home=tmp_path)
    with pytest.raises(deployer.DeployError, match="s3-endpoint"):
        deployer.deploy_suite(local, capture=True)
    config = deployer.capture_configuration(local, endpoint="http://127.0.0.1:9000")
    assert config[settings.FORWARDER]["capture_endpoint"] == "http://127.0.0.1:9000"


def test_windfleet_deploy_capture_flags(tmp_path, monkeypatch):
    """`windfleet deploy --capture` on the local backend: the forwarder's endpoint is the local S3
    endpoint it was given; without one, or an endpoint without --capture, a one-line error."""
    import click
    from click.testing import CliRunner

    from windfleet import payloads
    from windfleet.cloud import cli

    for var in ("WINDFLEET_BUCKET", "WINDFLEET_THING_GROUP", "WINDFLEET_MODEL_GROUP", "WINDFLEET_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WINDFLEET_HOME", str(tmp_path / "home"))
    app = click.Group("windfleet")
    cli.register(app)

    def run(*args):
        return CliRunner().invoke(app, list(args), catch_exceptions=False)

    assert run("publish", "--build-dir", str(fake_build(tmp_path / "gb"))).exit_code == 0
    for args, message in ((("deploy", "--capture"), "s3-endpoint"),
                          (("deploy", "--capture-endpoint", "http://127.0.0.1:9"), "only with --capture")):
        result = run(*args)
        assert result.exit_code != 0 and message in result.output, result.output
    result = run("deploy", "--capture", "--capture-endpoint", "http://127.0.0.1:9", "--json")
    assert result.exit_code == 0, result.output
    components = Backend.local(tmp_path / "home").greengrassv2.get_deployment(
        deploymentId=json.loads(result.output)["deploymentId"])["components"]
    assert json.loads(components[settings.DETECTOR]["configurationUpdate"]["merge"]) == {"capture": True}
    assert json.loads(components[settings.FORWARDER]["configurationUpdate"]["merge"]) == {
        "capture_bucket": settings.BUCKET, "capture_prefix": payloads.CAPTURE_PREFIX,
        "capture_endpoint": "http://127.0.0.1:9"}
