"""The SageMaker Pipeline: prepare -> train -> evaluate -> F1/false-alarm gate -> register.

::

    from windfleet.training import sm_pipeline as sp

    pipe = sp.build(backend, sp.PipelineConfig(role=ROLE))   # a sagemaker.workflow Pipeline
    sp.upsert(backend, sp.PipelineConfig(role=ROLE))          # create or update it in the account
    sp.start(backend, "windfleet-training", {"Epochs": 40})  # -> execution ARN
    sp.status(backend, "windfleet-training")                 # latest execution and its steps

Every step runs :mod:`.sagemaker_entry` from the staged project, so the pipeline
trains, checks and registers with exactly the code ``windfleet train`` and
``windfleet registry register`` run:

- ``Prepare`` (processing): checks ``InputData`` (a ``fleet.json`` spec or a CSV)
  and hands it on as the train channel;
- ``Train`` (training job): the PyTorch estimator of :mod:`.sagemaker_job`;
- ``Evaluate`` (processing): verifies the package (digest, ONNX loads and scores)
  and writes ``report.json`` with the autoencoder's held-out precision, recall,
  F1 and false-alarm rate (the ``Evaluation`` property file);
- ``QualityGate`` (condition): F1 >= ``MinF1`` and false-alarm rate <=
  ``MaxFalseAlarmRate``, else ``QualityBarNotMet`` (a fail step);
- ``Register`` (processing): :meth:`windfleet.cloud.registry.Registry.register`,
  so the package carries the sha256 and artifact URIs the approval handler checks
  (the SDK's ``RegisterModel`` step would not), as PendingManualApproval.

The training image is chosen when the pipeline is built, from the default
``TrainingInstanceType`` (a CPU type: the CPU image); a run may change the type
within the same kind.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from windfleet.cloud.backends import Backend

from . import sagemaker_job as sj
from .sagemaker_entry import REPORT

NAME = "windfleet-training"
PROCESSING_INSTANCE_TYPE = "ml.m5.large"
# The bar `windfleet train` itself holds a model to on held-out data (issue 11's targets).
MIN_F1 = 0.95
MAX_FALSE_ALARM_RATE = 0.01
DATA_PREFIX = "pipeline/data/"  # s3://<bucket>/pipeline/data/<run>/: what start() uploads


@dataclass
class PipelineConfig:
    """The pipeline's fixed settings; everything a run may vary is a pipeline parameter."""

    role: str
    name: str = NAME
    instance_type: str = sj.DEFAULT_INSTANCE_TYPE
    instance_count: int = 1
    processing_instance_type: str = PROCESSING_INSTANCE_TYPE
    min_f1: float = MIN_F1
    max_false_alarm_rate: float = MAX_FALSE_ALARM_RATE
    framework_version: str = sj.FRAMEWORK_VERSION
    py_version: str = sj.PY_VERSION


def build(backend: Backend, config: PipelineConfig, source: str | Path, boto_session: Any = None) -> Any:
    """The pipeline object on the project staged at ``source`` (:func:`.sagemaker_job.staged_source`,
    which must outlive ``.definition()``: the SDK packs each step's code then, uploading it
    to ``s3://<bucket>/pipeline/<name>/code/<hash>/``)."""
    sm_session = sj.session(backend, boto_session, pipeline=True)
    from sagemaker.inputs import TrainingInput
    from sagemaker.processing import ProcessingInput, ProcessingOutput
    from sagemaker.pytorch.processing import PyTorchProcessor
    from sagemaker.workflow.condition_step import ConditionStep
    from sagemaker.workflow.conditions import ConditionGreaterThanOrEqualTo, ConditionLessThanOrEqualTo
    from sagemaker.workflow.fail_step import FailStep
    from sagemaker.workflow.functions import Join, JsonGet
    from sagemaker.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString
    from sagemaker.workflow.pipeline import Pipeline
    from sagemaker.workflow.properties import PropertyFile
    from sagemaker.workflow.steps import ProcessingStep, TrainingStep

    default_data = backend.s3_uri(DATA_PREFIX + "default/")
    p = {
        "InputData": ParameterString("InputData", default_value=default_data),
        "Features": ParameterString("Features", default_value=""),
        "Label": ParameterString("Label", default_value=""),
        "Epochs": ParameterInteger("Epochs", default_value=40),
        "ModelVersion": ParameterString("ModelVersion", default_value="1.0.0"),
        "TrainingInstanceType": ParameterString("TrainingInstanceType", default_value=config.instance_type),
        "TrainingInstanceCount": ParameterInteger("TrainingInstanceCount", default_value=config.instance_count),
        "MinF1": ParameterFloat("MinF1", default_value=config.min_f1),
        "MaxFalseAlarmRate": ParameterFloat("MaxFalseAlarmRate", default_value=config.max_false_alarm_rate),
    }
    code = backend.s3_uri("pipeline")  # the SDK adds <pipeline>/code/<hash of the code>

    def processor(base: str) -> Any:
        return PyTorchProcessor(framework_version=config.framework_version, py_version=config.py_version,
                                role=config.role, instance_type=config.processing_instance_type,
                                instance_count=1, base_job_name=f"{config.name}-{base}",
                                sagemaker_session=sm_session, code_location=code)

    source = str(source)
    prepare = ProcessingStep("Prepare", step_args=processor("prepare").run(
        code=sj.ENTRY_POINT, source_dir=source,
        arguments=["prepare", "--features", p["Features"], "--label", p["Label"]],
        inputs=[ProcessingInput(source=p["InputData"], destination="/opt/ml/processing/input/raw",
                                input_name="raw")],
        outputs=[ProcessingOutput(output_name="train", source="/opt/ml/processing/train")]))

    job = sj.JobConfig(role=config.role, instance_type=p["TrainingInstanceType"],
                       instance_count=p["TrainingInstanceCount"], framework_version=config.framework_version,
                       py_version=config.py_version)
    est = sj.estimator(sm_session, job, source, backend.s3_uri(f"pipeline/{config.name}/output"),
                       {"epochs": p["Epochs"], "version": p["ModelVersion"], "features": p["Features"],
                        "label": p["Label"]}, code_location=code)
    train = TrainingStep("Train", step_args=est.fit({"train": TrainingInput(
        s3_data=prepare.properties.ProcessingOutputConfig.Outputs["train"].S3Output.S3Uri)}))

    model_input = ProcessingInput(source=train.properties.ModelArtifacts.S3ModelArtifacts,
                                  destination="/opt/ml/processing/model", input_name="model")
    report = PropertyFile(name="Evaluation", output_name="evaluation", path=REPORT)
    evaluate = ProcessingStep("Evaluate", property_files=[report], step_args=processor("evaluate").run(
        code=sj.ENTRY_POINT, source_dir=source, arguments=["evaluate"], inputs=[model_input],
        outputs=[ProcessingOutput(output_name="evaluation", source="/opt/ml/processing/evaluation")]))

    register = ProcessingStep("Register", step_args=processor("register").run(
        code=sj.ENTRY_POINT, source_dir=source, inputs=[model_input],
        arguments=["register", "--bucket", backend.bucket, "--model-group", backend.model_group,
                   "--region", backend.region or ""]))

    f1 = JsonGet(step_name=evaluate.name, property_file=report, json_path="autoencoder.f1")
    far = JsonGet(step_name=evaluate.name, property_file=report, json_path="autoencoder.false_alarm_rate")
    fail = FailStep("QualityBarNotMet", error_message=Join(on=" ", values=[
        "held-out F1", f1, "(need >=", p["MinF1"], "), false-alarm rate", far,
        "(need <=", p["MaxFalseAlarmRate"], ")"]))
    gate = ConditionStep("QualityGate", conditions=[
        ConditionGreaterThanOrEqualTo(left=f1, right=p["MinF1"]),
        ConditionLessThanOrEqualTo(left=far, right=p["MaxFalseAlarmRate"]),
    ], if_steps=[register], else_steps=[fail])
    return Pipeline(name=config.name, parameters=list(p.values()), steps=[prepare, train, evaluate, gate],
                    sagemaker_session=sm_session)


@contextmanager
def _compiling() -> Iterator[Path]:
    """Stage the project for the steps; silence the SDK's note that a PipelineSession starts no jobs."""
    with warnings.catch_warnings(), sj.staged_source() as source:
        warnings.filterwarnings("ignore", message="Running within a PipelineSession")
        yield source


def definition(backend: Backend, config: PipelineConfig, boto_session: Any = None) -> dict:
    """The pipeline's JSON definition, parsed."""
    with _compiling() as source:
        return json.loads(build(backend, config, source, boto_session).definition())


def upsert(backend: Backend, config: PipelineConfig, boto_session: Any = None) -> str:
    """Create the pipeline or update its definition; return its ARN."""
    # what a run without data of its own trains on: the default simulated fleet
    sj.upload_data(backend, sj.simulated_data(), DATA_PREFIX + "default/")
    with _compiling() as source:
        pipe = build(backend, config, source, boto_session)
        resp = pipe.upsert(role_arn=config.role, description="windfleet: prepare, train, evaluate, gate, register")
    return resp["PipelineArn"]


def start(backend: Backend, name: str = NAME, parameters: dict[str, Any] | None = None,
          data: sj.Data | None = None, run: str | None = None) -> str:
    """Start an execution (uploading ``data`` first, as its ``InputData``); return its ARN."""
    params = dict(parameters or {})
    if data is not None:
        run = run or sj.job_name()
        params["InputData"] = sj.upload_data(backend, data, f"{DATA_PREFIX}{run}/")
        for key, hp in (("Features", "features"), ("Label", "label")):
            if data.hyperparameters.get(hp):
                params.setdefault(key, data.hyperparameters[hp])
    resp = backend.sagemaker.start_pipeline_execution(
        PipelineName=name, PipelineParameters=[{"Name": k, "Value": str(v)} for k, v in params.items()])
    return resp["PipelineExecutionArn"]


def status(backend: Backend, name: str = NAME, execution: str | None = None) -> dict:
    """The latest (or the given) execution: its status and each step's status."""
    sm = backend.sagemaker
    if execution is None:
        runs = sm.list_pipeline_executions(PipelineName=name, SortBy="CreationTime", SortOrder="Descending",
                                           MaxResults=1)["PipelineExecutionSummaries"]
        if not runs:
            return {"pipeline": name, "execution": None, "status": None, "steps": []}
        execution = runs[0]["PipelineExecutionArn"]
    desc = sm.describe_pipeline_execution(PipelineExecutionArn=execution)
    steps = sm.list_pipeline_execution_steps(PipelineExecutionArn=execution, SortOrder="Ascending")
    return {
        "pipeline": name, "execution": execution, "status": desc["PipelineExecutionStatus"],
        "failure_reason": desc.get("FailureReason") or None,
        "steps": [{"name": s["StepName"], "status": s["StepStatus"],
                   **({"failure_reason": s["FailureReason"]} if s.get("FailureReason") else {})}
                  for s in steps.get("PipelineExecutionSteps", [])],
    }
