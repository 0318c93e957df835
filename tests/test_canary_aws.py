"""The canary on AWS: provisioning (the schedule rule and the canary Lambda, moto), approval ->
canary deployment, the ingest Lambda's metrics (CloudWatch in moto) and the scheduled evaluation
promoting the candidate.  SageMaker, S3, IoT, CloudWatch, EventBridge and Lambda are moto;
every greengrassv2 request is checked with botocore's Stubber against the real service model.
The detector's shadow statistics are simulated (its shadow scoring is issue 14, part B)."""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone
from typing import Callable

import pytest
from botocore.stub import ANY, Stubber

from windfleet import payloads
from windfleet.cloud import approval, canary, ingest, provision, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.registry import Registry, approval_event, set_approval
from windfleet.cloud.testing import fake_model_dir

from tests.aws_fixtures import moto_backend

REGION = "eu-west-1"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
MODEL, CANDIDATE = settings.MODEL_COMPONENT, settings.CANARY_COMPONENT
SUITE = {settings.DETECTOR: {"componentVersion": "1.0.0"}, MODEL: {"componentVersion": "1.0.1"}}


@pytest.fixture
def aws(monkeypatch):
    with moto_backend(monkeypatch, REGION, bucket="wf-canary", thing_group="turbines", model_group="wf-models") as backend:
        yield backend


def _arns(b: Backend) -> tuple[str, str, Callable[[str, str], str]]:
    fleet, canary_group = b.thing_group_arn(), b.thing_group_arn("turbines-canary")
    _, partition, _, region, account, _ = fleet.split(":", 5)

    def carn(name: str, version: str) -> str:
        return f"arn:{partition}:greengrass:{region}:{account}:components:{name}:versions:{version}"

    return fleet, canary_group, carn


def _deployment(target: str, dep_id: str, components: dict) -> tuple[dict, dict]:
    summary = {"targetArn": target, "revisionId": "1", "deploymentId": dep_id, "deploymentName": "d",
               "creationTimestamp": NOW, "deploymentStatus": "ACTIVE", "isLatestForTarget": True}
    return {"deployments": [summary]}, {**summary, "components": components}


def _component(stub, carn, name: str, version: str) -> None:
    stub.add_response("create_component_version", {
        "arn": carn(name, version), "componentName": name, "componentVersion": version, "creationTimestamp": NOW,
        "status": {"componentState": "DEPLOYABLE", "message": "ok", "errors": {}}}, {"inlineRecipe": ANY})
    stub.add_response("describe_component", {"arn": carn(name, version),
                                             "status": {"componentState": "DEPLOYABLE"}}, {"arn": carn(name, version)})


def _create(stub, target: str, components: dict, dep_id: str) -> None:
    stub.add_response("create_deployment", {"deploymentId": dep_id},
                      {"targetArn": target, "deploymentName": ANY, "components": components,
                       "deploymentPolicies": settings.DEPLOYMENT_POLICIES,
                       "iotJobConfiguration": settings.IOT_JOB_CONFIGURATION, "clientToken": ANY})


def _latest(stub, target: str, dep_id: str | None, components: dict | None = None) -> None:
    if dep_id is None:
        stub.add_response("list_deployments", {"deployments": []},
                          {"targetArn": target, "historyFilter": "LATEST_ONLY"})
        return
    listed, got = _deployment(target, dep_id, components)
    stub.add_response("list_deployments", listed, {"targetArn": target, "historyFilter": "LATEST_ONLY"})
    stub.add_response("get_deployment", got, {"deploymentId": dep_id})


def _shadow_message(thing: str, seq: int, candidate: str) -> dict:
    model = {"score_p50": 0.1, "score_p90": 0.2, "score_p99": 0.3, "infer_ms_p50": 1.0, "infer_ms_p99": 2.0}
    stats = payloads.shadow_stats(candidate, "1.0.0", time.time() - 60, 400, {**model, "alarms": 4, "alarm_rate": 0.01},
                                  {**model, "alarms": 5, "alarm_rate": 5 / 400}, either_flagged=5, both_flagged=4)
    body = payloads.health(thing, settings.DETECTOR, "1.0.0", "RUNNING", time.time(), {}, shadow=stats)
    return {**payloads.telemetry(thing, seq, time.time(), [{"type": "health", "body": body}]), "source_thing": thing}


class _IotData:
    def publish(self, **_) -> dict:
        return {}


def test_scheduled_evaluation_promotes_a_candidate_that_passes_its_gates(aws, tmp_path):
    provision.provision(aws)
    rule = aws.events.describe_rule(Name=settings.CANARY_RULE)
    assert rule["ScheduleExpression"] == settings.CANARY_SCHEDULE
    fn = aws.lambda_.get_function(FunctionName=settings.CANARY_FUNCTION)["Configuration"]
    assert fn["Handler"] == provision.CANARY_HANDLER
    assert [t["Arn"] for t in aws.events.list_targets_by_rule(Rule=settings.CANARY_RULE)["Targets"]] == [
        fn["FunctionArn"]]
    assert canary.load_state(aws) == {}  # provisioned: an empty record the Lambdas may read

    for thing in ("gw-01", "gw-02"):
        aws.iot.create_thing(thingName=thing)
    reg = Registry(aws)
    reg.register(fake_model_dir(tmp_path / "v1", "1.0.0"))
    info = reg.register(fake_model_dir(tmp_path / "v2", "2.0.0"))
    set_approval(aws.sagemaker, info["arn"], "Approved", "looks good", "alice")
    desc = aws.sagemaker.describe_model_package(ModelPackageName=info["arn"])
    fleet, canary_arn, carn = _arns(aws)
    reset = settings.MODEL_CONFIGURATION_UPDATE

    with Stubber(aws.greengrassv2) as stub:
        _component(stub, carn, MODEL, "1.0.2")  # what a promotion will deploy
        _latest(stub, fleet, "d-fleet", SUITE)  # the fleet runs a model: canary first
        stub.add_response("list_core_devices", {"coreDevices": [
            {"coreDeviceThingName": t, "status": "HEALTHY"} for t in ("gw-01", "gw-02")]}, {"thingGroupArn": fleet})
        _component(stub, carn, CANDIDATE, "1.0.2")
        _latest(stub, canary_arn, None)
        _create(stub, canary_arn, {CANDIDATE: {"componentVersion": "1.0.2", "configurationUpdate": reset}}, "d-can")
        out = approval.handler(approval_event(desc, region=REGION), None, backend=aws)
        stub.assert_no_pending_responses()
    assert out["status"] == "canary" and out["devices"] == ["gw-01"], out
    assert [t for t in aws.iot.list_things_in_thing_group(thingGroupName="turbines-canary")["things"]] == ["gw-01"]

    # the ingest Lambda turns the (simulated) detector report into metrics the schedule reads back
    result = ingest.lambda_handler(_shadow_message("gw-01", 0, "2.0.0"), None, logs_client=aws.logs,
                                   log_group="/wf/t", iot_data_client=_IotData(), cloudwatch_client=aws.cloudwatch)
    assert result["metrics"] == len(canary.METRICS)
    canary.save_config(aws, {"min_seconds": 0, "min_windows": 100})

    with Stubber(aws.greengrassv2) as stub:
        _latest(stub, fleet, "d-fleet", SUITE)
        promoted = copy.deepcopy(SUITE)
        promoted[MODEL] = {"componentVersion": "1.0.2", "configurationUpdate": reset}
        _create(stub, fleet, promoted, "d-fleet-2")
        _latest(stub, canary_arn, "d-can", {CANDIDATE: {"componentVersion": "1.0.2"}})
        _create(stub, canary_arn, {}, "d-can-2")  # the canary group's deployment without the candidate
        verdict = canary.handler({"source": "aws.events", "detail-type": "Scheduled Event"}, None, backend=aws)
        stub.assert_no_pending_responses()
    assert verdict["verdict"] == "promote" and verdict["status"] == "promoted", verdict
    state = canary.load_state(aws)
    assert state["status"] == "promoted" and state["candidate_alarm_rate"] == pytest.approx(5 / 400)
    assert state["agreement"] == pytest.approx(4 / 5)
