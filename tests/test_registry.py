"""The registry (local store and SageMaker in moto) and the approval handler."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from windfleet.cloud import approval, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.registry import Registry, RegistryError, approval_event, flat_metrics, set_approval
from windfleet.cloud.testing import fake_build, fake_model_dir
from windfleet.cloud import deployer
from windfleet.model_contract import ModelPackageError

from tests.aws_fixtures import fake_aws_env


@pytest.fixture
def local(tmp_path):
    b = Backend.local(tmp_path / "home", thing_group="fleet")
    deployer.publish(b, fake_build(tmp_path / "gb"))
    return b


@pytest.fixture
def aws_env(monkeypatch):
    fake_aws_env(monkeypatch, "us-east-1")
    with mock_aws():
        yield


@pytest.fixture
def moto_backend(aws_env):
    b = Backend.aws(region="us-east-1", bucket="wf-artifacts", thing_group="fleet")
    b.s3.create_bucket(Bucket="wf-artifacts")
    return b


def test_event_pattern_is_the_documented_one():
    assert approval.EVENT_PATTERN == {
        "source": ["aws.sagemaker"],
        "detail-type": ["SageMaker Model Package State Change"],
        "detail": {"ModelPackageGroupName": [settings.MODEL_GROUP], "ModelApprovalStatus": ["Approved"]},
    }
    assert approval.event_pattern("g2")["detail"]["ModelPackageGroupName"] == ["g2"]


def test_flat_metrics_keeps_numbers_only():
    assert flat_metrics({"f1": 0.5, "ok": True, "s": "x", "per": {"a": {"auc": 1}}, "l": [1]}) == {
        "f1": 0.5, "per.a.auc": 1.0}


@pytest.mark.parametrize("kind", ["local", "moto"])
def test_register_list_approve_reject(kind, request, tmp_path):
    backend = request.getfixturevalue("local" if kind == "local" else "moto_backend")
    reg = Registry(backend, group="turbine-ae")
    a = reg.register(fake_model_dir(tmp_path / "a", "1.0.0", f1=0.81))
    b = reg.register(fake_model_dir(tmp_path / "b", "1.1.0", f1=0.93))
    assert (a["version"], b["version"]) == (1, 2)
    assert a["status"] == "PendingManualApproval" and a["group"] == "turbine-ae"
    assert a["metrics"]["f1"] == pytest.approx(0.81) and a["metrics"]["per_feature.rps.auc"] == pytest.approx(0.97)
    card = json.loads((tmp_path / "a" / "model.json").read_text())
    assert a["sha256"] == card["onnx_sha256"] and a["component_version"] == "1.0.1"
    # the artifacts are in the store where the package says
    bucket, key = a["model_uri"][5:].split("/", 1)
    assert backend.s3.get_object(Bucket=bucket, Key=key)["Body"].read() == (tmp_path / "a" / "model.onnx").read_bytes()
    desc = backend.sagemaker.describe_model_package(ModelPackageName=a["arn"])
    assert desc["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"].endswith("metrics.json")
    assert desc["CustomerMetadataProperties"]["onnx_sha256"] == card["onnx_sha256"]

    listed = reg.list()
    assert [(i["version"], i["status"], i["model_version"]) for i in listed] == [
        (1, "PendingManualApproval", "1.0.0"), (2, "PendingManualApproval", "1.1.0")]
    assert all(i["created_at"] for i in listed)

    rejected = reg.reject("v1", "F1 below the bar")
    assert rejected["status"] == "Rejected" and rejected["description"] == "F1 below the bar"
    if kind == "local":
        backend.thing_group = "fleet"
        approved = reg.approve("1.1.0")  # the card's version names one package
        assert approved["status"] == "Approved"
        assert approved["deployment"]["status"] == "deployed"
        assert approved["deployment"]["componentVersion"] == "1.0.2"
    else:
        approved = reg.approve(2)
        assert approved["status"] == "Approved" and approved["deployment"] is None  # EventBridge's job on AWS
    assert approved["sha256"] == b["sha256"] and approved["metrics"] == b["metrics"]  # survives the update

    with pytest.raises(RegistryError, match="no model package version '7'.*known: 1, 2"):
        reg.approve(7)
    with pytest.raises(RegistryError):
        reg.reject("9.9.9", "x")


@pytest.mark.fault
def test_register_refuses_a_package_that_does_not_match_its_card(local, tmp_path):
    d = fake_model_dir(tmp_path / "m")
    (d / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelPackageError, match="does not match"):
        Registry(local).register(d)
    assert Registry(local).list() == []


def test_list_of_an_unknown_group_is_empty(local):
    assert Registry(local, group="never-created").list() == []


# ------------------------------------------------------------------------- approval handler
def _approved(backend, tmp_path, version="1.0.0"):
    reg = Registry(backend)
    info = reg.register(fake_model_dir(tmp_path / version, version))
    set_approval(backend.sagemaker, info["arn"], "Approved", "ok")
    return info, backend.sagemaker.describe_model_package(ModelPackageName=info["arn"])


def test_handler_deploys_once_and_is_idempotent(local, tmp_path):
    info, desc = _approved(local, tmp_path)
    event = approval_event(desc)
    first = approval.handler(event, None, backend=local)
    assert first["status"] == "deployed" and first["componentVersion"] == "1.0.1"
    again = approval.handler(event, None, backend=local)
    assert again["status"] == "unchanged" and again["deploymentId"] == first["deploymentId"]
    history = local.greengrassv2.list_deployments(targetArn=local.thing_group_arn(), historyFilter="ALL")
    assert len(history["deployments"]) == 1


@pytest.mark.parametrize("mutate, reason", [
    (lambda e: e.update(source="aws.s3"), "not a SageMaker"),
    (lambda e: e.update({"detail-type": "Something else"}), "not a SageMaker"),
    (lambda e: e["detail"].update(ModelPackageGroupName="other-group"), "other-group"),
    (lambda e: e["detail"].update(ModelApprovalStatus="Rejected"), "Rejected"),
    (lambda e: e["detail"].update(ModelApprovalStatus="PendingManualApproval"), "Pending"),
    (lambda e: e.pop("detail"), "not a SageMaker"),
])
def test_handler_ignores_other_events(local, tmp_path, mutate, reason):
    info, desc = _approved(local, tmp_path)
    event = approval_event(desc)
    mutate(event)
    out = approval.handler(event, None, backend=local)
    assert out["status"] == "ignored" and reason in out["reason"]
    assert local.greengrassv2.list_deployments()["deployments"] == []


def test_handler_ignores_a_stale_event_for_a_package_no_longer_approved(local, tmp_path):
    info, desc = _approved(local, tmp_path)
    event = approval_event(desc)
    Registry(local).reject(info["version"], "changed my mind")
    assert approval.handler(event, None, backend=local)["status"] == "ignored"


@pytest.mark.fault
def test_handler_refuses_an_artifact_that_does_not_match_its_sha256(local, tmp_path):
    info, desc = _approved(local, tmp_path)
    bucket, key = info["model_uri"][5:].split("/", 1)
    local.s3.put_object(Bucket=bucket, Key=key, Body=b"corrupted in the store")
    out = approval.handler(approval_event(desc), None, backend=local)
    assert out["status"] == "refused" and "does not match" in out["reason"]
    assert local.greengrassv2.list_deployments()["deployments"] == []
    assert local.greengrassv2.list_components()["components"] and not any(
        c["componentName"] == settings.MODEL_COMPONENT and c["latestVersion"]["componentVersion"] == "1.0.1"
        for c in local.greengrassv2.list_components()["components"])
    after = Registry(local).get(info["version"])
    assert after["status"] == "Rejected" and "does not match" in after["description"]


@pytest.mark.fault
def test_approve_through_the_registry_reports_a_refusal(local, tmp_path):
    reg = Registry(local)
    info = reg.register(fake_model_dir(tmp_path / "m"))
    bucket, key = info["card_uri"][5:].split("/", 1)
    card = json.loads(local.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    card["onnx_sha256"] = "0" * 64
    local.s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(card).encode())
    out = reg.approve(info["version"])
    assert out["deployment"]["status"] == "refused" and out["status"] == "Rejected"


def test_handler_in_moto_with_the_lambda_environment(moto_backend, tmp_path, monkeypatch):
    """The Lambda path: backend from the environment, SageMaker + S3 in moto, Greengrass stubbed."""
    from botocore.stub import ANY, Stubber

    from windfleet.cloud import backends

    moto_backend.iot.create_thing_group(thingGroupName="fleet")
    info, desc = _approved(moto_backend, tmp_path)
    monkeypatch.setenv("WINDFLEET_BUCKET", "wf-artifacts")
    monkeypatch.setenv("WINDFLEET_THING_GROUP", "fleet")
    monkeypatch.setenv("WINDFLEET_MODEL_GROUP", settings.MODEL_GROUP)
    backends.lambda_backend.cache_clear()
    lam = backends.lambda_backend()
    group_arn = lam.thing_group_arn()
    version_arn = group_arn.replace(":iot:", ":greengrass:").rsplit(":", 1)[0] + \
        f":components:{settings.MODEL_COMPONENT}:versions:1.0.1"
    with Stubber(lam.greengrassv2) as stub:
        stub.add_response("create_component_version", {"arn": version_arn, "componentName": settings.MODEL_COMPONENT,
                                                       "componentVersion": "1.0.1", "creationTimestamp": 0,
                                                       "status": {"componentState": "REQUESTED"}},
                          {"inlineRecipe": ANY})
        stub.add_response("describe_component", {"arn": version_arn, "status": {"componentState": "DEPLOYABLE"}},
                          {"arn": version_arn})
        stub.add_response("list_deployments", {"deployments": []},
                          {"targetArn": group_arn, "historyFilter": "LATEST_ONLY"})
        stub.add_response("list_components", {"components": []}, {"scope": "PRIVATE"})
        stub.add_response("create_deployment", {"deploymentId": "d-1"},
                          {"targetArn": group_arn, "deploymentName": ANY,
                           "components": {settings.MODEL_COMPONENT: {
                               "componentVersion": "1.0.1", "configurationUpdate": settings.MODEL_CONFIGURATION_UPDATE}},
                           "deploymentPolicies": ANY, "iotJobConfiguration": ANY, "clientToken": ANY})
        out = approval.handler(approval_event(desc, region="us-east-1", account="123456789012"), None)
        assert out["status"] == "deployed", out
        stub.assert_no_pending_responses()
    backends.lambda_backend.cache_clear()
    assert out["status"] == "deployed" and out["deploymentId"] == "d-1"
    key = f"{settings.MODEL_COMPONENT}/1.0.1/model.onnx"
    assert lam.s3.get_object(Bucket="wf-artifacts", Key=key)["Body"].read() == \
        (tmp_path / "1.0.0" / "model.onnx").read_bytes()


# ------------------------------------------------------------------------- decisions (audit trail)
REASON = "F1 0.94 vs 0.91, FAR = 0.1 % (was 0.2 %); recall 'bearing' +0.12 -- ok für Zürich\nsecond line"


@pytest.mark.parametrize("kind", ["local", "moto"])
def test_decisions_are_recorded_with_the_package(kind, request, tmp_path):
    """Reason, actor and time of every decision live in the package (ApprovalDescription +
    CustomerMetadataProperties), in values SageMaker's pattern accepts, and read back intact."""
    from windfleet.cloud.registry import MAX_DECISIONS, metadata_char_ok

    backend = request.getfixturevalue("local" if kind == "local" else "moto_backend")
    reg = Registry(backend)
    info = reg.register(fake_model_dir(tmp_path / "m", "1.0.0"))
    assert info["decisions"] == []
    reg.reject(1, REASON, actor="bob")
    after = reg.get(1)
    assert after["description"] == REASON and after["status"] == "Rejected"
    [d] = after["decisions"]
    assert (d["status"], d["actor"], d["reason"]) == ("Rejected", "bob", REASON)
    assert len(d["at"]) == 20 and d["at"].endswith("Z")
    meta = backend.sagemaker.describe_model_package(ModelPackageName=info["arn"])["CustomerMetadataProperties"]
    assert all(metadata_char_ok(c) for v in meta.values() for c in v) and all(len(v) <= 256 for v in meta.values())
    assert meta["onnx_sha256"] == info["sha256"]  # the record survives (moto replaces the whole set)

    long_reason = "x, " * 400  # longer than a metadata value: the latest keeps its full text
    for i in range(MAX_DECISIONS + 1):
        reg.reject(1, long_reason if i == MAX_DECISIONS else f"round {i}", actor=f"user{i}")
    decided = reg.get(1)["decisions"]
    assert len(decided) == MAX_DECISIONS and decided[0]["actor"] == "user1"
    assert decided[-1]["reason"] == long_reason[:1024]
    meta = backend.sagemaker.describe_model_package(ModelPackageName=info["arn"])["CustomerMetadataProperties"]
    assert len(meta) <= 50 and meta["onnx_sha256"] == info["sha256"]
    with pytest.raises(ValueError, match="actor"):
        reg.approve(1, "ok", actor="<script>")


def test_the_approval_handler_records_its_refusal(local, tmp_path):
    info, desc = _approved(local, tmp_path)
    bucket, key = info["model_uri"][5:].split("/", 1)
    local.s3.put_object(Bucket=bucket, Key=key, Body=b"corrupted in the store")
    approval.handler(approval_event(desc), None, backend=local)
    assert [(d["status"], d["actor"]) for d in Registry(local).get(info["version"])["decisions"]] == [
        ("Approved", "windfleet"), ("Rejected", "windfleet")]


def test_the_local_store_refuses_metadata_sagemaker_refuses(local):
    from botocore.exceptions import ClientError

    sm = local.sagemaker
    sm.create_model_package_group(ModelPackageGroupName="g")
    for bad in ({"k": "a, b"}, {"k": ""}, {"k" * 129: "v"}, {"k": "v" * 257}, {f"k{i}": "v" for i in range(51)}):
        with pytest.raises(ClientError) as err:
            sm.create_model_package(ModelPackageGroupName="g", CustomerMetadataProperties=bad)
        assert err.value.response["Error"]["Code"] == "ValidationException"
    arn = sm.create_model_package(ModelPackageGroupName="g", CustomerMetadataProperties={"a": "1", "b": "2"})[
        "ModelPackageArn"]
    sm.update_model_package(ModelPackageArn=arn, CustomerMetadataProperties={"c": "3"},
                            CustomerMetadataPropertiesToRemove=["a"])
    assert sm.describe_model_package(ModelPackageName=arn)["CustomerMetadataProperties"] == {"b": "2", "c": "3"}


def test_set_approval_sends_what_the_sagemaker_api_accepts():
    """moto neither validates metadata values nor merges them, so the request itself is
    checked against the real service model with Stubber: the documented value pattern
    (the one :func:`metadata_char_ok` implements), lengths, and the full set resent."""
    import boto3
    from botocore.stub import Stubber

    from windfleet.cloud.registry import metadata_char_ok

    sm = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    op = sm.meta.service_model.operation_model("UpdateModelPackage")
    value_shape = op.input_shape.members["CustomerMetadataProperties"].value
    assert value_shape.metadata["pattern"] == "([\\p{L}\\p{Z}\\p{N}_.:\\/=+\\-@]*)${1,256}"
    arn = "arn:aws:sagemaker:us-east-1:123456789012:model-package/windfleet-anomaly/3"
    record = {"onnx_sha256": "ab" * 32, "model_uri": "s3://b/models/x/model.onnx", "metric:f1": "0.94"}
    sent = {}
    with Stubber(sm) as stub:
        stub.add_response("describe_model_package", {
            "ModelPackageName": "windfleet-anomaly", "ModelPackageArn": arn, "CreationTime": 0,
            "ModelPackageStatus": "Completed", "CustomerMetadataProperties": record,
            "ModelPackageStatusDetails": {"ValidationStatuses": []}}, {"ModelPackageName": arn})
        stub.add_response("update_model_package", {"ModelPackageArn": arn}, None)
        sm.meta.events.register("provide-client-params.sagemaker.UpdateModelPackage",
                                lambda params, **_: sent.update(params))
        set_approval(sm, arn, "Approved", REASON, actor="alice", at="2026-11-30T10:31:49Z")
        stub.assert_no_pending_responses()
    assert sent["ModelApprovalStatus"] == "Approved" and sent["ApprovalDescription"] == REASON
    meta = sent["CustomerMetadataProperties"]
    assert {k: meta[k] for k in record} == record  # resent unchanged
    assert meta["decision:1"] == "Approved 2026-11-30T10:31:49Z alice"
    assert all(1 <= len(v) <= 256 and all(metadata_char_ok(c) for c in v) for v in meta.values())
    assert all(1 <= len(k) <= 128 and all(metadata_char_ok(c) for c in k) for k in meta)
