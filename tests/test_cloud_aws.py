"""AWS provisioning in moto (s3, sagemaker, iot, events, logs, lambda, iam, cloudwatch), the
EventBridge approval pattern end to end, and the Lambda package."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import pytest

from windfleet.cloud import approval, provision, settings
from windfleet.cloud.registry import approval_event

from tests.aws_fixtures import moto_backend

REGION = "eu-west-1"


@pytest.fixture
def aws(monkeypatch):
    with moto_backend(monkeypatch, REGION, bucket="wf-test-artifacts", thing_group="turbines", model_group="wf-models") as backend:
        yield backend


def test_provision_creates_everything_and_is_idempotent(aws):
    first = provision.provision(aws)
    statuses = {(kind, name): status for kind, name, status in first}
    assert statuses[("s3 bucket", "wf-test-artifacts")] == "created"
    assert statuses[("model package group", "wf-models")] == "created"
    assert statuses[("thing group", "turbines")] == "created"
    assert statuses[("lambda", settings.APPROVAL_FUNCTION)] == "created"
    assert statuses[("lambda", settings.INGEST_FUNCTION)] == "created"

    assert aws.s3.get_bucket_location(Bucket="wf-test-artifacts")["LocationConstraint"] == REGION
    assert aws.s3.get_public_access_block(Bucket="wf-test-artifacts")[
        "PublicAccessBlockConfiguration"]["BlockPublicPolicy"] is True
    aws.sagemaker.describe_model_package_group(ModelPackageGroupName="wf-models")
    group_arn = aws.iot.describe_thing_group(thingGroupName="turbines")["thingGroupArn"]
    assert group_arn.endswith(":thinggroup/turbines")

    fn = aws.lambda_.get_function(FunctionName=settings.APPROVAL_FUNCTION)["Configuration"]
    assert fn["Handler"] == "windfleet.cloud.approval.handler" and fn["Runtime"] == settings.LAMBDA_RUNTIME
    assert fn["Environment"]["Variables"] == {"WINDFLEET_BUCKET": "wf-test-artifacts",
                                              "WINDFLEET_THING_GROUP": "turbines", "WINDFLEET_MODEL_GROUP": "wf-models"}
    ingest = aws.lambda_.get_function(FunctionName=settings.INGEST_FUNCTION)["Configuration"]
    assert ingest["Handler"] == "windfleet.cloud.ingest.lambda_handler"
    # where the ingest Lambda publishes its acks: the account's ATS data endpoint, looked up once
    from windfleet.cloud import ingest as ingest_module

    assert provision.IOT_DATA_ENDPOINT_ENV == ingest_module.IOT_DATA_ENDPOINT_ENV
    env = ingest["Environment"]["Variables"]
    assert env["WINDFLEET_LOG_GROUP"] == settings.LOG_GROUP
    assert env[provision.IOT_DATA_ENDPOINT_ENV].endswith(f"-ats.iot.{REGION}.amazonaws.com")

    rule = aws.events.describe_rule(Name=settings.APPROVAL_RULE)
    assert json.loads(rule["EventPattern"]) == approval.event_pattern("wf-models")
    targets = aws.events.list_targets_by_rule(Rule=settings.APPROVAL_RULE)["Targets"]
    assert [t["Arn"] for t in targets] == [fn["FunctionArn"]]
    policy = json.loads(aws.lambda_.get_policy(FunctionName=settings.APPROVAL_FUNCTION)["Policy"])
    assert any(s["Principal"] == {"Service": "events.amazonaws.com"} for s in policy["Statement"])

    topic_rule = aws.iot.get_topic_rule(ruleName=settings.TELEMETRY_RULE)["rule"]
    assert topic_rule["sql"] == "SELECT *, topic(3) AS source_thing FROM 'windfleet/fleet/+/telemetry'"
    assert topic_rule["actions"][0]["lambda"]["functionArn"] == ingest["FunctionArn"]

    groups = aws.logs.describe_log_groups(logGroupNamePrefix=settings.LOG_GROUP)["logGroups"]
    assert [(g["logGroupName"], g.get("retentionInDays")) for g in groups] == [
        (settings.LOG_GROUP, settings.LOG_RETENTION_DAYS)]
    body = json.loads(aws.cloudwatch.get_dashboard(DashboardName=settings.DASHBOARD)["DashboardBody"])
    assert body["widgets"]

    second = provision.provision(aws)  # idempotent: nothing new, nothing fails
    statuses = {(kind, name): status for kind, name, status in second}
    assert "created" not in statuses.values()
    assert statuses[("lambda", settings.APPROVAL_FUNCTION)] == "updated"
    assert len(aws.events.list_targets_by_rule(Rule=settings.APPROVAL_RULE)["Targets"]) == 1

    # moto implements neither DeleteModelPackage nor DeleteModelPackageGroup: record the calls
    deleted = []
    aws.sagemaker = _SageMakerDeletes(aws.sagemaker, deleted)
    down = {(k, n): s for k, n, s in provision.teardown(aws)}
    assert deleted == [("group", "wf-models")]
    assert down[("lambda", settings.APPROVAL_FUNCTION)] == "deleted"
    assert down[("s3 bucket", "wf-test-artifacts")] == "deleted"
    assert aws.lambda_.list_functions()["Functions"] == []
    assert aws.events.list_rules()["Rules"] == []
    assert "wf-test-artifacts" not in [b["Name"] for b in aws.s3.list_buckets()["Buckets"]]
    again = {s for _, _, s in provision.teardown(aws)}
    assert again <= {"absent", "deleted"}


class _SageMakerDeletes:
    def __init__(self, real, calls):
        self._real, self._calls = real, calls

    def __getattr__(self, name):
        return getattr(self._real, name)

    def delete_model_package(self, ModelPackageName):
        self._calls.append(("package", ModelPackageName))

    def delete_model_package_group(self, ModelPackageGroupName):
        self._calls.append(("group", ModelPackageGroupName))


def test_teardown_keep_data_keeps_bucket_and_registry(aws):
    provision.provision(aws)
    provision.teardown(aws, keep_data=True)
    aws.s3.head_bucket(Bucket="wf-test-artifacts")
    aws.sagemaker.describe_model_package_group(ModelPackageGroupName="wf-models")


def test_approval_pattern_end_to_end_in_eventbridge(aws):
    """Put events on the bus: only an approval in our group reaches the rule's (SQS) target."""
    sqs = __import__("boto3").client("sqs", region_name=REGION)
    queue_url = sqs.create_queue(QueueName="approvals")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    aws.events.put_rule(Name="approvals", EventPattern=json.dumps(approval.event_pattern("wf-models")))
    aws.events.put_targets(Rule="approvals", Targets=[{"Id": "q", "Arn": queue_arn}])

    desc = {"ModelPackageArn": f"arn:aws:sagemaker:{REGION}:123456789012:model-package/wf-models/3",
            "ModelPackageGroupName": "wf-models", "ModelPackageVersion": 3, "ModelApprovalStatus": "Approved"}

    def put(detail_changes: dict, **top: str) -> None:
        event = approval_event(desc, region=REGION)
        event["detail"].update(detail_changes)
        resp = aws.events.put_events(Entries=[{
            "Source": top.get("source", event["source"]), "DetailType": top.get("detail_type", event["detail-type"]),
            "Detail": json.dumps(event["detail"]), "Resources": event["resources"]}])
        assert resp["FailedEntryCount"] == 0

    put({})  # the approval
    put({"ModelApprovalStatus": "Rejected"})
    put({"ModelApprovalStatus": "PendingManualApproval"})
    put({"ModelPackageGroupName": "someone-elses"})
    put({}, source="aws.s3")
    put({}, detail_type="SageMaker Model Package Group State Change")

    received = []
    for _ in range(3):
        msgs = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        received += [json.loads(m["Body"]) for m in msgs]
    assert len(received) == 1
    (event,) = received
    assert event["detail"]["ModelPackageArn"] == desc["ModelPackageArn"]
    assert event["detail-type"] == "SageMaker Model Package State Change"


def test_lambda_zip_is_self_contained():
    """The package imports both handlers with only the stdlib + boto3 (the Lambda runtime)."""
    data = provision.lambda_zip()
    assert data == provision.lambda_zip()  # deterministic: no spurious function updates
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "windfleet/cloud/approval.py" in names and "tenacity/__init__.py" in names
    assert "windfleet/cloud/canary.py" in names  # the canary Lambda's handler
    script = r"""
import importlib.abc, sys, zipimport
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("yaml", "click", "numpy", "paho", "windfleet_local_only"):
            raise ImportError("not in the Lambda runtime: " + name)
        return None
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import windfleet.cloud.approval as a, windfleet.cloud.ingest as i
assert a.__file__.startswith(sys.argv[1]), a.__file__
assert callable(a.handler) and callable(i.lambda_handler)
print(a.handler({"source": "aws.s3"}, None, backend=object(), group="g")["status"])
"""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(io.BytesIO(data)).extractall(tmp)
        out = subprocess.run([sys.executable, "-c", script, tmp], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ignored")
