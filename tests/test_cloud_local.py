"""The local backend: boto3 shapes (validated against the real service models), errors, the
device-side API, and several processes sharing one store."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys

import botocore.session
import pytest
from botocore.exceptions import ClientError
from botocore.validate import ParamValidator

from windfleet.cloud import deployer, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.local import LocalGreengrassV2, artifact_digest, thing_group_arn
from windfleet.cloud.testing import fake_build

MODELS = {name: botocore.session.get_session().get_service_model(name) for name in ("greengrassv2", "sagemaker")}


def assert_shape(service: str, operation: str, response: dict) -> None:
    """The response validates against the service's real output shape (names, types, enums)."""
    shape = MODELS[service].operation_model(operation).output_shape
    report = ParamValidator().validate(response, shape)
    assert not report.has_errors(), report.generate_report()


@pytest.fixture
def backend(tmp_path):
    return Backend.local(tmp_path / "home", thing_group="fleet")


def recipe(name="com.example.Thing", version="1.0.0", uri="s3://windfleet-artifacts/x/file.bin"):
    return json.dumps({"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
                       "ComponentPublisher": "me", "Manifests": [
                           {"Platform": {"os": "linux", "architecture": "aarch64"}, "Artifacts": [{"Uri": uri}]},
                           {"Platform": {"os": "linux"}, "Artifacts": [{"Uri": uri}]}]}).encode()


def test_s3_round_trip_and_errors(backend):
    s3 = backend.s3
    s3.put_object(Bucket=backend.bucket, Key="a/b/c.txt", Body=b"hello")
    got = s3.get_object(Bucket=backend.bucket, Key="a/b/c.txt")
    assert got["Body"].read() == b"hello" and got["ContentLength"] == 5
    assert s3.head_object(Bucket=backend.bucket, Key="a/b/c.txt")["ETag"] == got["ETag"]
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=backend.bucket, Key="missing")
    with pytest.raises(ClientError) as err:
        s3.head_object(Bucket=backend.bucket, Key="missing")
    assert err.value.response["Error"]["Code"] == "404"
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket="no-such-bucket", Key="k", Body=b"")
    assert err.value.response["Error"]["Code"] == "NoSuchBucket"
    with pytest.raises(ClientError):
        s3.put_object(Bucket=backend.bucket, Key="../escape", Body=b"")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=backend.bucket, Prefix="a/")["Contents"]] == ["a/b/c.txt"]


def test_sagemaker_shapes_versions_and_errors(backend):
    sm = backend.sagemaker
    sm.create_model_package_group(ModelPackageGroupName="g")
    with pytest.raises(ClientError) as err:
        sm.create_model_package_group(ModelPackageGroupName="g")
    assert err.value.response["Error"]["Code"] == "ValidationException"
    arns = [sm.create_model_package(ModelPackageGroupName="g", ModelApprovalStatus="PendingManualApproval",
                                    CustomerMetadataProperties={"k": str(i)},
                                    ModelMetrics={"ModelQuality": {"Statistics": {
                                        "ContentType": "application/json", "S3Uri": "s3://b/m.json"}}}
                                    )["ModelPackageArn"] for i in range(3)]
    assert [a.rsplit("/", 1)[1] for a in arns] == ["1", "2", "3"]
    sm.update_model_package(ModelPackageArn=arns[1], ModelApprovalStatus="Approved", ApprovalDescription="ok")
    desc = sm.describe_model_package(ModelPackageName=arns[1])
    assert desc["ModelApprovalStatus"] == "Approved" and desc["CustomerMetadataProperties"] == {"k": "1"}
    assert_shape("sagemaker", "DescribeModelPackage", desc)
    listing = sm.list_model_packages(ModelPackageGroupName="g", MaxResults=2)
    assert_shape("sagemaker", "ListModelPackages", listing)
    assert len(listing["ModelPackageSummaryList"]) == 2 and listing["NextToken"]
    rest = sm.list_model_packages(ModelPackageGroupName="g", MaxResults=2, NextToken=listing["NextToken"])
    assert [p["ModelPackageVersion"] for p in rest["ModelPackageSummaryList"]] == [3]
    assert_shape("sagemaker", "DescribeModelPackageGroup", sm.describe_model_package_group(ModelPackageGroupName="g"))
    for call in (lambda: sm.describe_model_package(ModelPackageName=arns[0][:-1] + "9"),
                 lambda: sm.describe_model_package_group(ModelPackageGroupName="nope"),
                 lambda: sm.create_model_package(ModelPackageGroupName="nope")):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] == "ValidationException"


def test_component_versions_digests_and_conflict(backend):
    gg, s3 = backend.greengrassv2, backend.s3
    s3.put_object(Bucket=backend.bucket, Key="x/file.bin", Body=b"artifact bytes")
    resp = gg.create_component_version(inlineRecipe=recipe())
    assert_shape("greengrassv2", "CreateComponentVersion", resp)
    assert resp["status"]["componentState"] == "DEPLOYABLE"
    with pytest.raises(gg.exceptions.ConflictException) as err:
        gg.create_component_version(inlineRecipe=recipe())
    assert err.value.response["Error"]["Code"] == "ConflictException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    desc = gg.describe_component(arn=resp["arn"])
    assert_shape("greengrassv2", "DescribeComponent", desc)
    body = gg.get_component(arn=resp["arn"], recipeOutputFormat="JSON")
    assert_shape("greengrassv2", "GetComponent", body)
    stored = json.loads(body["recipe"])
    expected = artifact_digest(s3.path(backend.bucket, "x/file.bin"))
    for manifest in stored["Manifests"]:  # every manifest's artifacts, as the service does
        assert manifest["Artifacts"][0]["Digest"] == expected
        assert manifest["Artifacts"][0]["Algorithm"] == "SHA-256"
    # a missing artifact leaves the version FAILED with the reason
    failed = gg.create_component_version(inlineRecipe=recipe("com.example.Broken", uri="s3://windfleet-artifacts/no"))
    assert failed["status"]["componentState"] == "FAILED" and "s3://windfleet-artifacts/no" in failed["status"]["errors"]
    with pytest.raises(gg.exceptions.ResourceNotFoundException):
        gg.describe_component(arn=resp["arn"].replace("1.0.0", "9.9.9"))
    with pytest.raises(gg.exceptions.ValidationException):
        gg.create_component_version(inlineRecipe=b"ComponentName: x\nComponentVersion: not-semver\n")
    gg.create_component_version(inlineRecipe=recipe(version="1.10.0"))
    gg.create_component_version(inlineRecipe=recipe(version="1.9.0"))
    versions = gg.list_component_versions(arn=resp["arn"].rsplit(":versions:", 1)[0])
    assert_shape("greengrassv2", "ListComponentVersions", versions)
    assert [v["componentVersion"] for v in versions["componentVersions"]] == ["1.10.0", "1.9.0", "1.0.0"]
    comps = gg.list_components(scope="PRIVATE")
    assert_shape("greengrassv2", "ListComponents", comps)
    assert {c["componentName"]: c["latestVersion"]["componentVersion"] for c in comps["components"]} == {
        "com.example.Thing": "1.10.0"}  # FAILED versions are not offered


def _publish(backend, tmp_path):
    return deployer.publish(backend, fake_build(tmp_path / "gb"))


def test_deployments_device_api_and_effective_status(backend, tmp_path):
    gg = backend.greengrassv2
    _publish(backend, tmp_path)
    target = thing_group_arn("fleet")
    for thing in ("gw-1", "gw-2", "gw-3"):
        assert_shape("greengrassv2", "GetCoreDevice", gg.register_core_device(thing, ["fleet"]))
    gg.register_core_device("other", ["elsewhere"])
    assert gg.next_deployment("gw-1") is None

    d1 = deployer.deploy_suite(backend)["deploymentId"]
    dep = gg.next_deployment("gw-1")
    assert_shape("greengrassv2", "GetDeployment", dep)
    assert dep["deploymentId"] == d1 and set(dep["components"]) == set(settings.SUITE)
    assert dep["deploymentPolicies"]["failureHandlingPolicy"] == "ROLLBACK"
    assert gg.next_deployment("other") is None

    recipe_, paths = gg.fetch_component(settings.DETECTOR, "1.0.0")
    (uri, path), = paths.items()
    assert recipe_["Manifests"][0]["Artifacts"][0]["Digest"] == artifact_digest(path)
    assert path.read_bytes() == f"{settings.DETECTOR} 1.0.0".encode()

    gg.report_device_status("gw-1", d1, "IN_PROGRESS")
    assert gg.next_deployment("gw-1")["deploymentId"] == d1  # resumed after a restart
    gg.report_device_status("gw-1", d1, "SUCCEEDED", components={settings.MODEL_COMPONENT: "1.0.0"})
    gg.report_device_status("gw-2", d1, "FAILED", reason="detector ERRORED: self-test failed")
    assert gg.next_deployment("gw-1") is None and gg.next_deployment("gw-2") is None
    eff = gg.list_effective_deployments(coreDeviceThingName="gw-2")
    assert_shape("greengrassv2", "ListEffectiveDeployments", eff)
    (e,) = eff["effectiveDeployments"]
    assert e["coreDeviceExecutionStatus"] == "FAILED" and "self-test" in e["reason"]
    assert gg.list_effective_deployments(coreDeviceThingName="gw-3")["effectiveDeployments"][0][
        "coreDeviceExecutionStatus"] == "QUEUED"
    installed = gg.list_installed_components(coreDeviceThingName="gw-1")
    assert_shape("greengrassv2", "ListInstalledComponents", installed)
    assert installed["installedComponents"][0]["componentVersion"] == "1.0.0"
    cores = gg.list_core_devices(thingGroupArn=target)
    assert_shape("greengrassv2", "ListCoreDevices", cores)
    assert [(c["coreDeviceThingName"], c["status"]) for c in cores["coreDevices"]] == [
        ("gw-1", "HEALTHY"), ("gw-2", "UNHEALTHY"), ("gw-3", "HEALTHY")]
    outcomes = {o["thing"]: o["status"] for o in deployer.device_outcomes(backend, d1)}
    assert outcomes == {"gw-1": "SUCCEEDED", "gw-2": "FAILED", "gw-3": "QUEUED"}

    # a new deployment supersedes the old one for the whole target
    d2 = deployer.deploy_suite(backend)["deploymentId"]
    assert d2 != d1
    latest = gg.list_deployments(targetArn=target, historyFilter="LATEST_ONLY")
    assert_shape("greengrassv2", "ListDeployments", latest)
    assert [d["deploymentId"] for d in latest["deployments"]] == [d2]
    history = gg.list_deployments(targetArn=target, historyFilter="ALL")["deployments"]
    assert [(d["deploymentId"], d["deploymentStatus"], d["isLatestForTarget"]) for d in history] == [
        (d2, "ACTIVE", True), (d1, "INACTIVE", False)]
    assert gg.next_deployment("gw-1")["deploymentId"] == d2
    assert gg.cancel_deployment(deploymentId=d2)["message"]
    assert gg.get_deployment(deploymentId=d2)["deploymentStatus"] == "CANCELED"
    assert gg.next_deployment("gw-3") is None
    with pytest.raises(gg.exceptions.ConflictException):
        gg.cancel_deployment(deploymentId=d2)
    with pytest.raises(ClientError):
        gg.report_device_status("gw-1", d2, "DONE")  # not a Greengrass status
    with pytest.raises(gg.exceptions.ResourceNotFoundException):
        gg.get_deployment(deploymentId="nope")


def test_create_deployment_validation_and_client_token(backend, tmp_path):
    gg = backend.greengrassv2
    _publish(backend, tmp_path)
    target = thing_group_arn("fleet")
    with pytest.raises(gg.exceptions.ResourceNotFoundException):
        gg.create_deployment(targetArn=target, components={"com.x.Missing": {"componentVersion": "1.0.0"}})
    with pytest.raises(gg.exceptions.ValidationException):
        gg.create_deployment(targetArn="fleet", components={})
    with pytest.raises(gg.exceptions.ValidationException):
        gg.create_deployment(targetArn=target, components={
            settings.DETECTOR: {"componentVersion": "1.0.0", "configurationUpdate": {"merge": {"not": "a string"}}}})
    a = gg.create_deployment(targetArn=target, components={settings.DETECTOR: {"componentVersion": "1.0.0"}},
                             clientToken="tok-1")
    assert_shape("greengrassv2", "CreateDeployment", a)
    b = gg.create_deployment(targetArn=target, components={settings.DETECTOR: {"componentVersion": "1.0.0"}},
                             clientToken="tok-1")
    assert a["deploymentId"] == b["deploymentId"]


def test_abort_config_cancels_the_rollout_after_enough_failures(backend, tmp_path):
    gg = backend.greengrassv2
    _publish(backend, tmp_path)
    things = [f"gw-{i}" for i in range(5)]
    for t in things:
        gg.register_core_device(t, ["fleet"])
    dep = deployer.deploy_suite(backend)["deploymentId"]
    minimum = settings.IOT_JOB_CONFIGURATION["abortConfig"]["criteriaList"][0]["minNumberOfExecutedThings"]
    for t in things[:minimum]:
        assert gg.get_deployment(deploymentId=dep)["deploymentStatus"] == "ACTIVE"
        gg.report_device_status(t, dep, "FAILED", reason="broken")
    assert gg.get_deployment(deploymentId=dep)["deploymentStatus"] == "CANCELED"
    assert gg.next_deployment(things[-1]) is None  # the rest of the fleet is spared


def _worker(home: str, index: int, n: int) -> None:
    b = Backend.local(home)
    for i in range(n):
        b.s3.put_object(Bucket=b.bucket, Key=f"w{index}/{i}", Body=b"x" * 1000)
        b.greengrassv2.create_component_version(inlineRecipe=json.dumps({
            "RecipeFormatVersion": "2020-01-25", "ComponentName": f"com.example.W{index}",
            "ComponentVersion": f"1.0.{i}"}).encode())
        b.sagemaker.create_model_package(ModelPackageGroupName="shared")


def test_several_processes_share_one_store(tmp_path):
    home = tmp_path / "home"
    Backend.local(home).sagemaker.create_model_package_group(ModelPackageGroupName="shared")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(home), i, 15)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    b = Backend.local(home)
    versions = [p["ModelPackageVersion"] for p in
                b.sagemaker.list_model_packages(ModelPackageGroupName="shared")["ModelPackageSummaryList"]]
    assert sorted(versions) == list(range(1, 46))  # unique versions: no lost or duplicated write
    assert len(b.greengrassv2.list_components()["components"]) == 3


def test_runtime_can_open_the_service_by_home_path(tmp_path):
    """The local runtime builds the service from a path (WINDFLEET_HOME) in another process."""
    home = tmp_path / "home"
    Backend.local(home).greengrassv2.register_core_device("gw-9", ["fleet"])
    out = subprocess.run([sys.executable, "-c", "import sys; from windfleet.cloud.local import LocalGreengrassV2; "
                          "print(LocalGreengrassV2(sys.argv[1]).get_core_device('gw-9')['status'])", str(home)],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "HEALTHY", out.stderr
    assert LocalGreengrassV2(home).get_core_device("gw-9")["coreDeviceThingName"] == "gw-9"
