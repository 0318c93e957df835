"""`windfleet registry|deployments|cloud|publish|deploy` through click's CliRunner."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from moto import mock_aws

from windfleet.cloud import cli as cloud_cli
from windfleet.cloud import canary, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.testing import fake_build, fake_model_dir


@pytest.fixture
def app():
    group = click.Group("windfleet")
    cloud_cli.register(group)
    return group


@pytest.fixture
def run(app, tmp_path, monkeypatch):
    home = tmp_path / "home"
    for var in ("WINDFLEET_BUCKET", "WINDFLEET_THING_GROUP", "WINDFLEET_MODEL_GROUP", "WINDFLEET_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WINDFLEET_HOME", str(home))

    def invoke(*args: str, ok: bool = True):
        result = CliRunner().invoke(app, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    invoke.home = home
    return invoke


def test_the_windfleet_cli_has_the_cloud_commands():
    from windfleet.cli import main

    assert {"registry", "deployments", "cloud", "publish", "deploy"} <= set(main.commands)


def test_lifecycle_on_the_local_backend(run, tmp_path):
    build = fake_build(tmp_path / "gb")
    out = run("publish", "--build-dir", str(build)).output
    assert out.count("created") == 4
    assert run("publish", "--build-dir", str(build)).output.count("exists") == 4  # reported, not an error

    out = run("registry", "register", str(fake_model_dir(tmp_path / "m1", "1.0.0"))).output
    assert "version 1" in out and "PendingManualApproval" in out
    run("registry", "register", str(fake_model_dir(tmp_path / "m2", "1.1.0", f1=0.97)))
    listed = json.loads(run("registry", "list", "--json").output)
    assert [(p["version"], p["status"]) for p in listed] == [(1, "PendingManualApproval"), (2, "PendingManualApproval")]
    assert "f1=0.97" in run("registry", "list").output

    Backend.local(run.home).greengrassv2.register_core_device("gw-1", [settings.THING_GROUP])
    out = run("deploy").output
    assert "deployment" in out and f"{settings.MODEL_COMPONENT} 1.0.0" in out

    canary.save_config(Backend.local(run.home), {"enabled": False})  # straight to the fleet (test_canary.py)
    out = run("registry", "approve", "1").output  # to the fleet, or first to a canary of it
    assert "approved" in out and f"{settings.MODEL_COMPONENT} 1.0.1" in out
    assert "already in deployment" in run("registry", "approve", "1").output  # idempotent
    out = run("registry", "reject", "2", "--reason", "F1 too good to be true").output
    assert "rejected" in out and "too good" in out

    status = json.loads(run("deployments", "status", "--json").output)
    assert status["deployment"]["components"][settings.MODEL_COMPONENT]["componentVersion"] == "1.0.1"
    assert [(d["thing"], d["status"]) for d in status["devices"]] == [("gw-1", "QUEUED")]
    out = run("deployments", "status").output
    assert "gw-1" in out and "QUEUED" in out

    listed = json.loads(run("deployments", "list", "--all", "--json").output)
    assert len(listed) == 2 and [d["isLatestForTarget"] for d in listed] == [True, False]
    assert len(json.loads(run("deployments", "list", "--json").output)) == 1
    dep = listed[0]["deploymentId"]
    assert "canceled" in run("deployments", "cancel", dep).output


def test_clear_one_line_errors(run, tmp_path):
    cases = [
        (("registry", "approve", "3"), "no model package version '3'"),
        (("registry", "register", str(tmp_path)), "model card missing"),
        (("publish", "--build-dir", str(tmp_path / "nope")), "no recipes"),
        (("deploy",), "not published"),
        (("deploy", "--component", "oops"), "NAME=VERSION"),
        (("deployments", "status"), "no deployment for thing group"),
        (("deployments", "status", "no-such-id"), "ResourceNotFoundException"),
    ]
    for args, message in cases:
        result = run(*args, ok=False)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(error_lines) == 1, result.output


def test_approve_reports_a_refused_package(run, tmp_path):
    run("registry", "register", str(fake_model_dir(tmp_path / "m")))
    b = Backend.local(run.home)
    (pkg,) = json.loads(run("registry", "list", "--json").output)
    bucket, key = pkg["model_uri"][5:].split("/", 1)
    b.s3.put_object(Bucket=bucket, Key=key, Body=b"bit rot")
    result = run("registry", "approve", "1", ok=False)
    assert result.exit_code == 1 and "refused" in result.output and "does not match" in result.output
    assert json.loads(run("registry", "list", "--json").output)[0]["status"] == "Rejected"


def test_names_come_from_options(run, tmp_path):
    run("registry", "register", str(fake_model_dir(tmp_path / "m")), "--group", "other-models",
        "--bucket", "other-bucket")
    assert json.loads(run("registry", "list", "--json", "--group", "other-models").output)[0]["model_uri"].startswith(
        "s3://other-bucket/")
    assert "no model packages" in run("registry", "list").output


def test_provision_local_and_aws(run, monkeypatch):
    out = run("cloud", "provision").output  # local: bucket + model package group
    assert "model package group" in out
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        out = run("cloud", "provision", "--backend", "aws", "--thing-group", "turbines", "--bucket", "wf-b",
                  "--region", "us-east-1").output
        assert "created" in out and settings.APPROVAL_FUNCTION in out
        out = run("cloud", "teardown", "--backend", "aws", "--thing-group", "turbines", "--bucket", "wf-b",
                  "--region", "us-east-1", "--keep-data").output
        assert "deleted" in out
        result = run("registry", "approve", "1", "--backend", "aws", "--region", "us-east-1", ok=False)
        assert result.exit_code == 1 and "Error: no model package version" in result.output


def test_approve_and_reject_record_reason_actor_and_time(run, tmp_path, monkeypatch):
    run("publish", "--build-dir", str(fake_build(tmp_path / "gb")))
    for i, version in enumerate(("1.0.0", "1.1.0"), 1):
        run("registry", "register", str(fake_model_dir(tmp_path / f"m{i}", version)))
    run("registry", "approve", "1", "--reason", "baseline, reviewed", "--actor", "alice")
    monkeypatch.setenv("WINDFLEET_ACTOR", "bob")
    assert "F1 too low" in run("registry", "reject", "2", "--reason", "F1 too low").output
    history = json.loads(run("registry", "history", "1", "--json").output)
    assert [(d["status"], d["actor"], d["reason"]) for d in history] == [("Approved", "alice", "baseline, reviewed")]
    out = run("registry", "history", "2").output
    assert out.splitlines()[0].split() == ["TIME", "DECISION", "ACTOR", "REASON"]
    assert "Rejected  bob" in out and "F1 too low" in out
    result = run("registry", "reject", "2", "--actor", "a;b", ok=False)
    assert result.exit_code == 1 and "Error: actor 'a;b' must be" in result.output

    other = ("--home", str(tmp_path / "other-home"))  # a fleet's first approval, with the old option
    run("publish", "--build-dir", str(fake_build(tmp_path / "gb")), *other)
    run("registry", "register", str(fake_model_dir(tmp_path / "m3", "1.2.0")), *other)
    run("registry", "approve", "1", "--description", "the old option still works", *other)
    [listed] = json.loads(run("registry", "list", "--json", *other).output)
    assert [(d["actor"], d["reason"]) for d in listed["decisions"]] == [("bob", "the old option still works")]


def test_decisions_from_the_cli_on_aws_in_moto(run, tmp_path, monkeypatch):
    import boto3

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    aws = ("--backend", "aws", "--region", "us-east-1", "--bucket", "wf-b")
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="wf-b")
        run("registry", "register", str(fake_model_dir(tmp_path / "m")), *aws)
        out = run("registry", "approve", "1", "--reason", "F1 0.9, reviewed", "--actor", "alice", *aws).output
        assert "EventBridge -> Lambda" in out
        [d] = json.loads(run("registry", "history", "1", "--json", *aws).output)
        assert (d["status"], d["actor"], d["reason"]) == ("Approved", "alice", "F1 0.9, reviewed")
        desc = boto3.client("sagemaker", region_name="us-east-1").describe_model_package(
            ModelPackageName=json.loads(run("registry", "list", "--json", *aws).output)[0]["arn"])
        assert desc["ApprovalDescription"] == "F1 0.9, reviewed"
        assert desc["CustomerMetadataProperties"]["decision:1:reason"] == "F1 0.9=2C reviewed"
