"""Training on SageMaker (issue 16): the training job's request, the entry point run in an
imitation of the PyTorch container, registration, the Pipeline's definition and the
``windfleet train --backend aws`` / ``windfleet pipeline`` commands.

AWS is moto (S3, training jobs, model packages, pipelines) plus botocore's Stubber where
moto has no implementation (``list_pipeline_execution_steps``); nothing reaches the network.
moto marks a training job Completed at once and runs nothing, so the tests run the job's
container themselves: they download what the SDK uploaded (the staged project, the data
channel) and the hyperparameters it sent, lay them out as ``/opt/ml`` under a temp dir,
run the entry point as SageMaker's training toolkit does, and put the ``model.tar.gz``
where the job's description says it is.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from unittest import mock

import boto3
import pytest
from botocore.stub import Stubber
from click.testing import CliRunner
from moto import mock_aws

from windfleet.cloud.backends import Backend, split_s3_uri
from windfleet.cloud.registry import Registry
from windfleet.model_contract import load_card
from windfleet.training import sagemaker_entry as entry
from windfleet.training import sagemaker_job as sj
from windfleet.training import sm_pipeline as sp

REGION = "eu-west-1"
BUCKET = "wf-sagemaker-test"
GROUP = "wf-models"
ROLE = "arn:aws:iam::123456789012:role/windfleet-sagemaker"
IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-training:2.8.0-cpu-py312"
AWS_ARGS = ["--backend", "aws", "--region", REGION, "--bucket", BUCKET, "--group", GROUP, "--role", ROLE]


@pytest.fixture(scope="module")
def aws():
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "t",
           "AWS_DEFAULT_REGION": REGION, "SAGEMAKER_SUPPRESS_V2_WARNING": "1"}
    sj.import_sdk()
    with mock.patch.dict(os.environ, env), mock_aws(), \
            mock.patch("sagemaker.telemetry.telemetry_logging._requests_helper") as telemetry:
        os.environ.pop("AWS_PROFILE", None)
        backend = Backend.aws(region=REGION, bucket=BUCKET, model_group=GROUP)
        backend.s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield backend
    assert not telemetry.called, "the SDK sent telemetry: it must be opted out"


def get(backend: Backend, uri: str) -> bytes:
    bucket, key = split_s3_uri(uri)
    return backend.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def run_container(backend: Backend, desc: dict, root: Path) -> subprocess.CompletedProcess:
    """What SageMaker's PyTorch training container does with a job, under ``root`` for /opt/ml.

    The toolkit unpacks ``sagemaker_submit_directory`` into /opt/ml/code, installs its
    requirements.txt (here: the venv already has windfleet), copies each channel to
    /opt/ml/input/data/<channel>, writes hyperparameters.json as sent (JSON strings) and
    runs ``python <sagemaker_program> --key value ...`` from /opt/ml/code with SM_* set.
    """
    hps = desc["HyperParameters"]
    code, config, model, output = (root / "code", root / "input" / "config", root / "model",
                                   root / "output" / "data")
    for d in (code, config, model, output):
        d.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(get(backend, json.loads(hps["sagemaker_submit_directory"])))) as tar:
        tar.extractall(code, filter="data")
    channels = {}
    for ch in desc["InputDataConfig"]:
        bucket, prefix = split_s3_uri(ch["DataSource"]["S3DataSource"]["S3Uri"])
        dest = channels[ch["ChannelName"]] = root / "input" / "data" / ch["ChannelName"]
        for obj in backend.s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
            target = dest / obj["Key"][len(prefix):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(get(backend, f"s3://{bucket}/{obj['Key']}"))
    (config / "hyperparameters.json").write_text(json.dumps(hps))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    user = {k: json.loads(v) for k, v in hps.items() if not k.startswith("sagemaker_")}
    argv = [a for k, v in sorted(user.items()) for a in (f"--{k}", str(v))]
    env = {**os.environ, "SM_MODEL_DIR": str(model), "SM_OUTPUT_DATA_DIR": str(output),
           "SM_INPUT_CONFIG_DIR": str(config), "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1",
           "SM_CHANNELS": json.dumps(sorted(channels)), "SM_HPS": json.dumps(user), "SM_USER_ARGS": json.dumps(argv),
           **{f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()}}
    return subprocess.run([sys.executable, json.loads(hps["sagemaker_program"]), *argv], cwd=code, env=env,
                          capture_output=True, text=True, timeout=300)


def model_tar(model_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for item in sorted(model_dir.iterdir()):
            tar.add(item, arcname=item.name)
    return buf.getvalue()


@pytest.fixture(scope="module")
def job(aws, tmp_path_factory):
    """A tiny simulated-fleet job: started through the SDK, its container run, its output in S3."""
    name = "wf-job-sim"
    started = sj.start(aws, sj.JobConfig(role=ROLE, instance_type="ml.c5.xlarge"),
                       sj.simulated_data(seed=3, turbines=1, hours=0.05), name=name,
                       hyperparameters={"epochs": 1, "version": "2.0.0", "evaluate": True}, log=lambda m: None)
    desc = aws.sagemaker.describe_training_job(TrainingJobName=started)
    root = tmp_path_factory.mktemp("sm") / "opt" / "ml"
    proc = run_container(aws, desc, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    archive = model_tar(root / "model")
    bucket, key = split_s3_uri(desc["ModelArtifacts"]["S3ModelArtifacts"])
    aws.s3.put_object(Bucket=bucket, Key=key, Body=archive)
    return {"name": name, "desc": desc, "root": root, "proc": proc, "archive": archive}


@pytest.mark.slow
def test_training_job_request(job, aws):
    desc = job["desc"]
    assert desc["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert desc["RoleArn"] == ROLE
    assert desc["ResourceConfig"]["InstanceType"] == "ml.c5.xlarge" and desc["ResourceConfig"]["InstanceCount"] == 1
    hps = desc["HyperParameters"]
    assert json.loads(hps["sagemaker_program"]) == "training/sagemaker_entry.py"
    assert {k: json.loads(v) for k, v in hps.items() if not k.startswith("sagemaker_")} == {
        "epochs": 1, "version": "2.0.0", "evaluate": True}
    assert [(c["ChannelName"], c["DataSource"]["S3DataSource"]["S3Uri"]) for c in desc["InputDataConfig"]] == [
        ("train", f"s3://{BUCKET}/training/wf-job-sim/data/train/")]
    assert desc["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/training"
    assert desc["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://{BUCKET}/training/wf-job-sim/output/model.tar.gz"
    # the data: the simulated fleet's spec; the code: the project, not the venv
    assert json.loads(get(aws, f"s3://{BUCKET}/training/wf-job-sim/data/train/fleet.json")) == {
        "seed": 3, "turbines": 1, "hours": 0.05}
    submit = json.loads(hps["sagemaker_submit_directory"])
    assert submit.startswith(f"s3://{BUCKET}/training/wf-job-sim/")
    with tarfile.open(fileobj=io.BytesIO(get(aws, submit))) as tar:
        names = set(tar.getnames())
        requirements = [line for line in tar.extractfile("requirements.txt").read().decode().splitlines()
                            if line and not line.startswith("#")]
    assert {"pyproject.toml", "training/sagemaker_entry.py", "training/pipeline.py", "windfleet/model_contract.py",
            "requirements.txt"} <= names
    assert not any(n.split("/")[0] in (".venv", "tests", "runs", "greengrass-build") or "__pycache__" in n
                   for n in names)
    assert "." in requirements and not any(r.startswith("torch") for r in requirements)


@pytest.mark.slow
def test_entry_point_writes_the_package_sagemaker_uploads(job):
    model, proc = job["root"] / "model", job["proc"]
    assert sorted(p.name for p in model.iterdir()) == ["evaluation.json", "model.json", "model.onnx"]
    card = load_card(model, verify=True)
    assert card["version"] == "2.0.0"
    assert card["training"]["data"] == {"kind": "simulated", "seed": 3, "turbines": 1, "hours": 0.05}
    assert card["training"]["seed"] == 3
    assert (job["root"] / "output" / "data" / "evaluation.json").is_file()
    f1 = card["metrics"]["autoencoder"]["f1"]
    assert f"windfleet-metric f1={f1}" in proc.stdout.splitlines()


@pytest.mark.slow
def test_finish_waits_downloads_and_registers_pending_with_metrics(job, aws, tmp_path):
    logs: list[str] = []
    info = sj.finish(aws, job["name"], tmp_path / "pkg", poll_seconds=0, log=logs.append)
    assert info["status"] == "PendingManualApproval" and info["group"] == GROUP
    card = load_card(tmp_path / "pkg")
    assert info["sha256"] == card["onnx_sha256"]
    assert info["metrics"]["autoencoder.f1"] == pytest.approx(card["metrics"]["autoencoder"]["f1"])
    assert info["metrics"]["autoencoder.false_alarm_rate"] == pytest.approx(
        card["metrics"]["autoencoder"]["false_alarm_rate"])
    assert any("Completed" in line for line in logs) and any("registered" in line for line in logs)
    assert Registry(aws).get(info["version"])["sha256"] == card["onnx_sha256"]


def test_wait_prints_progress_and_fails_with_the_reason():
    sm = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    base = {"TrainingJobName": "j", "TrainingJobArn": "arn:aws:sagemaker:eu-west-1:1:training-job/j",
            "AlgorithmSpecification": {"TrainingInputMode": "File", "TrainingImage": IMAGE},
            "ModelArtifacts": {"S3ModelArtifacts": "s3://b/k"}, "CreationTime": 0,
            "ResourceConfig": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
            "StoppingCondition": {"MaxRuntimeInSeconds": 60}}
    stub = Stubber(sm)
    for status, secondary, extra in (("InProgress", "Starting", {}), ("InProgress", "Starting", {}),
                                     ("InProgress", "Training", {}),
                                     ("Failed", "Failed", {"FailureReason": "AlgorithmError: out of memory"})):
        stub.add_response("describe_training_job", {**base, "TrainingJobStatus": status,
                                                    "SecondaryStatus": secondary, **extra}, {"TrainingJobName": "j"})
    logs: list[str] = []
    with stub, pytest.raises(sj.SageMakerError, match="training job j failed: AlgorithmError: out of memory"):
        sj.wait(sm, "j", poll_seconds=0, log=logs.append, sleep=lambda s: None)
    stub.assert_no_pending_responses()
    assert logs == ["j: InProgress / Starting", "j: InProgress / Training", "j: Failed / Failed"]


def test_hyperparameters_from_file_and_argv(tmp_path, monkeypatch):
    # as SageMaker writes them: every value a JSON string; argv (the toolkit's) wins
    (tmp_path / "hyperparameters.json").write_text(json.dumps({
        "epochs": "3", "features": "\"a,b\"", "evaluate": "false", "label": "y", "sagemaker_program": "\"x.py\""}))
    monkeypatch.setenv("SM_INPUT_CONFIG_DIR", str(tmp_path))
    assert entry.hyperparameters(["--epochs", "5"]) == {"epochs": 5, "features": "a,b", "evaluate": False,
                                                          "label": "y"}
    with pytest.raises(SystemExit, match="unknown hyperparameters: epoch"):
        entry.hyperparameters(["--epoch", "5"])


def test_only_the_first_host_trains(tmp_path, monkeypatch, capsys):
    for k, v in {"SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_MODEL_DIR": str(tmp_path / "m"),
                 "SM_INPUT_CONFIG_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    assert entry.main(["--epochs", "1"]) == 0
    assert not (tmp_path / "m").exists() and "not the first host" in capsys.readouterr().out


# -- the command line ----------------------------------------------------------------------
def cli(*args: str):
    from windfleet.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_cli_train_backend_aws_uploads_csv_starts_job_and_registers(job, aws, tmp_path):
    csv = tmp_path / "skab.csv"
    csv.write_text("a,b,c,y\n1,2,3,0\n")
    # moto completes the job at once and runs nothing: its output is the package the container made
    aws.s3.put_object(Bucket=BUCKET, Key="training/wf-job-csv/output/model.tar.gz", Body=job["archive"])
    result = cli("train", *AWS_ARGS, "--csv", str(csv), "--features", "a,b,c", "--label", "y", "--epochs", "2",
                 "--instance-type", "ml.c5.2xlarge", "--instance-count", "2", "--job-name", "wf-job-csv",
                 "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["package"]["status"] == "PendingManualApproval" and summary["job"] == "wf-job-csv"
    assert summary["version"] == "2.0.0" and load_card(tmp_path / "out")["onnx_sha256"]
    assert "training job wf-job-csv started on 2 x ml.c5.2xlarge" in result.stderr
    desc = aws.sagemaker.describe_training_job(TrainingJobName="wf-job-csv")
    user = {k: json.loads(v) for k, v in desc["HyperParameters"].items() if not k.startswith("sagemaker_")}
    assert user == {"csv": "skab.csv", "features": "a,b,c", "label": "y", "sep": ",", "seed": 0, "epochs": 2,
                    "version": "1.0.0", "evaluate": True}
    assert desc["ResourceConfig"]["InstanceType"] == "ml.c5.2xlarge" and desc["ResourceConfig"]["InstanceCount"] == 2
    assert get(aws, f"s3://{BUCKET}/training/wf-job-csv/data/train/skab.csv") == csv.read_bytes()


def test_cli_train_backend_aws_needs_a_role(aws, tmp_path, monkeypatch):
    monkeypatch.delenv("WINDFLEET_SAGEMAKER_ROLE", raising=False)
    result = cli("train", "--backend", "aws", "--region", REGION, "--bucket", BUCKET, "--out", str(tmp_path / "o"))
    assert result.exit_code != 0 and "--role" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


# -- the pipeline --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def definition(aws):
    return sp.definition(aws, sp.PipelineConfig(role=ROLE, min_f1=0.6, max_false_alarm_rate=0.02))


def test_pipeline_definition_steps_and_parameters(definition):
    d = definition
    params = {p["Name"]: p for p in d["Parameters"]}
    assert params["MinF1"] == {"Name": "MinF1", "Type": "Float", "DefaultValue": 0.6}
    assert params["MaxFalseAlarmRate"] == {"Name": "MaxFalseAlarmRate", "Type": "Float", "DefaultValue": 0.02}
    assert params["InputData"]["DefaultValue"] == f"s3://{BUCKET}/pipeline/data/default/"
    assert {"Features", "Label", "Epochs", "ModelVersion", "TrainingInstanceType",
            "TrainingInstanceCount"} <= set(params)
    steps = {s["Name"]: s for s in d["Steps"]}
    assert [(s["Name"], s["Type"]) for s in d["Steps"]] == [
        ("Prepare", "Processing"), ("Train", "Training"), ("Evaluate", "Processing"), ("QualityGate", "Condition")]

    prepare = steps["Prepare"]["Arguments"]
    assert prepare["AppSpecification"]["ImageUri"] == IMAGE
    assert prepare["AppSpecification"]["ContainerArguments"][:2] == ["prepare", "--features"]
    assert prepare["ProcessingInputs"][0]["S3Input"]["S3Uri"] == {"Get": "Parameters.InputData"}

    train = steps["Train"]["Arguments"]
    assert train["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert json.loads(train["HyperParameters"]["sagemaker_program"]) == "training/sagemaker_entry.py"
    assert train["HyperParameters"]["features"] == {"Get": "Parameters.Features"}
    assert train["InputDataConfig"][0]["ChannelName"] == "train"
    assert train["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == {
        "Get": "Steps.Prepare.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri"}
    assert train["ResourceConfig"]["InstanceType"] == {"Get": "Parameters.TrainingInstanceType"}
    assert train["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/pipeline/windfleet-training/output"

    evaluate = steps["Evaluate"]
    assert evaluate["Arguments"]["AppSpecification"]["ContainerArguments"] == ["evaluate"]
    assert evaluate["Arguments"]["ProcessingInputs"][0]["S3Input"]["S3Uri"] == {
        "Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}
    assert evaluate["PropertyFiles"] == [{"PropertyFileName": "Evaluation", "OutputName": "evaluation",
                                          "FilePath": "report.json"}]

    gate = steps["QualityGate"]["Arguments"]
    f1, far = gate["Conditions"]
    assert f1["Type"] == "GreaterThanOrEqualTo" and far["Type"] == "LessThanOrEqualTo"
    assert f1["LeftValue"]["Std:JsonGet"]["Path"] == "autoencoder.f1"
    assert far["LeftValue"]["Std:JsonGet"]["Path"] == "autoencoder.false_alarm_rate"
    assert f1["LeftValue"]["Std:JsonGet"]["PropertyFile"] == {"Get": "Steps.Evaluate.PropertyFiles.Evaluation"}
    assert f1["RightValue"] == {"Get": "Parameters.MinF1"}
    assert far["RightValue"] == {"Get": "Parameters.MaxFalseAlarmRate"}
    (register,) = gate["IfSteps"]
    assert register["Name"] == "Register" and register["Type"] == "Processing"
    assert register["Arguments"]["AppSpecification"]["ContainerArguments"] == [
        "register", "--bucket", BUCKET, "--model-group", GROUP, "--region", REGION]
    assert [s["Type"] for s in gate["ElseSteps"]] == ["Fail"]


@pytest.mark.slow
def test_pipeline_steps_evaluate_and_register_the_jobs_package(job, aws, tmp_path):
    model_in = tmp_path / "model"
    model_in.mkdir()
    (model_in / "model.tar.gz").write_bytes(job["archive"])
    assert entry.main(["evaluate", "--model", str(model_in), "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    card = load_card(job["root"] / "model")
    # the paths the QualityGate's JsonGet reads
    assert report["autoencoder"]["f1"] == card["metrics"]["autoencoder"]["f1"]
    assert report["autoencoder"]["false_alarm_rate"] == card["metrics"]["autoencoder"]["false_alarm_rate"]

    before = len(Registry(aws).list())
    assert entry.main(["register", "--model", str(model_in), "--bucket", BUCKET, "--model-group", GROUP,
                       "--region", REGION]) == 0
    packages = Registry(aws).list()
    assert len(packages) == before + 1
    assert packages[-1]["status"] == "PendingManualApproval" and packages[-1]["sha256"] == card["onnx_sha256"]


def test_prepare_step_checks_the_csv(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "train"
    raw.mkdir()
    (raw / "d.csv").write_text("a,b\n1,2\n3,oops\n")
    from windfleet.preprocessing import DataError

    with pytest.raises(DataError):
        entry.main(["prepare", "--input", str(raw), "--output", str(out), "--features", "a,b"])
    (raw / "d.csv").write_text("a,b\n1,2\n3,4\n")
    assert entry.main(["prepare", "--input", str(raw), "--output", str(out), "--features", "a,b"]) == 0
    assert (out / "d.csv").read_text() == "a,b\n1,2\n3,4\n"


def test_cli_pipeline_upsert_start_status(aws, tmp_path):
    first = cli("pipeline", "upsert", *AWS_ARGS, "--min-f1", "0.7")
    assert first.exit_code == 0, first.output
    arn = json.loads(first.stdout)["arn"]
    again = cli("pipeline", "upsert", *AWS_ARGS, "--max-far", "0.02")  # an update, not a second pipeline
    assert again.exit_code == 0 and json.loads(again.stdout)["arn"] == arn
    stored = json.loads(aws.sagemaker.describe_pipeline(PipelineName=sp.NAME)["PipelineDefinition"])
    params = {p["Name"]: p.get("DefaultValue") for p in stored["Parameters"]}
    assert (params["MinF1"], params["MaxFalseAlarmRate"]) == (sp.MIN_F1, 0.02)
    assert json.loads(get(aws, f"s3://{BUCKET}/pipeline/data/default/fleet.json"))["turbines"] == 6

    csv = tmp_path / "d.csv"
    csv.write_text("a,b,c\n1,2,3\n")
    started = cli("pipeline", "start", *AWS_ARGS[:-2], "--csv", str(csv), "--features", "a,b,c", "--epochs", "3",
                  "--min-f1", "0.8")
    assert started.exit_code == 0, started.output
    execution = json.loads(started.stdout)["execution"]
    sent = {p["Name"]: p["Value"] for p in aws.sagemaker.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=execution)["PipelineParameters"]}
    assert sent["Features"] == "a,b,c" and sent["Epochs"] == "3" and sent["MinF1"] == "0.8"
    assert get(aws, sent["InputData"] + "d.csv") == csv.read_bytes()

    local = cli("pipeline", "status", "--backend", "local", "--home", str(tmp_path / "home"))
    assert local.exit_code != 0 and "--backend aws" in local.output


def test_pipeline_status_reports_each_step():
    # moto has no list_pipeline_execution_steps: the whole conversation is stubbed
    sm = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    arn = "arn:aws:sagemaker:eu-west-1:123456789012:pipeline/windfleet-training/execution/abc"
    stub = Stubber(sm)
    stub.add_response("list_pipeline_executions", {"PipelineExecutionSummaries": [{"PipelineExecutionArn": arn}]},
                      {"PipelineName": sp.NAME, "SortBy": "CreationTime", "SortOrder": "Descending", "MaxResults": 1})
    stub.add_response("describe_pipeline_execution", {"PipelineExecutionArn": arn, "PipelineExecutionStatus": "Failed",
                                                      "FailureReason": "Step failure: QualityBarNotMet"},
                      {"PipelineExecutionArn": arn})
    stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
        {"StepName": "Prepare", "StepStatus": "Succeeded"}, {"StepName": "Train", "StepStatus": "Succeeded"},
        {"StepName": "Evaluate", "StepStatus": "Succeeded"}, {"StepName": "QualityGate", "StepStatus": "Succeeded"},
        {"StepName": "QualityBarNotMet", "StepStatus": "Failed", "FailureReason": "held-out F1 0.4 (need >= 0.5 )"}]},
        {"PipelineExecutionArn": arn, "SortOrder": "Ascending"})
    backend = Backend(kind="aws", sagemaker=sm, s3=None, greengrassv2=None, region=REGION)
    with stub:
        got = sp.status(backend)
    assert got["status"] == "Failed" and got["execution"] == arn
    assert [(s["name"], s["status"]) for s in got["steps"]][-1] == ("QualityBarNotMet", "Failed")
    assert got["steps"][-1]["failure_reason"].startswith("held-out F1 0.4")
