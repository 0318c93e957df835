"""``windfleet cloud provision`` / ``teardown``: the AWS side, idempotently (replaces the sample's CDK stack).

:func:`provision` creates or updates, and reports each as ``created`` /
``exists`` / ``updated``:

- the artifact bucket (public access blocked);
- the SageMaker model package group;
- the IoT thing group and its canary group (``<group>-canary``, :mod:`.canary`);
- one IAM role per Lambda function (unless ``role_arn`` is given, which both
  then use), each with only what its code calls (:func:`role_policies`);
- the approval Lambda (``windfleet.cloud.approval.handler``) and the ingest
  Lambda (``windfleet.cloud.ingest.lambda_handler``), both from one zip built
  from this project (:func:`lambda_zip`; tenacity is vendored, boto3 is in the
  runtime);
- the EventBridge rule with :func:`windfleet.cloud.approval.event_pattern`
  targeting the approval Lambda (+ invoke permission);
- the telemetry log group (with retention) and the IoT topic rule sending
  ``windfleet/fleet/+/telemetry`` to the ingest Lambda with the topic's thing as
  ``source_thing`` (:data:`TELEMETRY_RULE_SQL`) (+ invoke permission); the ingest
  Lambda gets the account's IoT data endpoint (looked up once with
  ``iot:DescribeEndpoint``, the provisioner's own permission) to publish its acks on
  ``windfleet/fleet/{thing}/ack``;
- the canary Lambda (``windfleet.cloud.canary.handler``) and the EventBridge schedule
  (``settings.CANARY_SCHEDULE``) that runs it: it evaluates the running canary over the
  metrics the ingest Lambda puts to CloudWatch and promotes or aborts;
- the CloudWatch dashboard (body from ``windfleet.cloud.ingest.dashboard_body``);
- with ``device_role`` (``--device-role``, e.g. the installer's default
  ``GreengrassV2TokenExchangeRole``): the inline policy ``windfleet-device``
  (:func:`device_policy`) on that existing token exchange role -- the role behind the
  devices' role alias is Greengrass', so it is never created or deleted here.

:func:`teardown` removes them (the bucket and the registry only with ``keep_data=False``;
of the device role only its inline policy).  Locally, provisioning just creates the bucket and the
model package group (the rest has no local counterpart).
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Callable

import tenacity
from botocore.exceptions import ClientError

from windfleet import payloads, topics

from . import settings
from .approval import event_pattern
from .backends import Backend
from .registry import Registry

Report = list[tuple[str, str, str]]  # (resource kind, name, created|exists|updated|deleted|absent)

# What the Lambda functions import: stdlib-only modules of the package plus tenacity.
LAMBDA_MODULES = (
    "windfleet/__init__.py", "windfleet/model_contract.py", "windfleet/jsonlog.py", "windfleet/payloads.py",
    "windfleet/topics.py", "windfleet/cloud/__init__.py", "windfleet/cloud/settings.py",
    "windfleet/cloud/backends.py", "windfleet/cloud/approval.py", "windfleet/cloud/deployer.py",
    "windfleet/cloud/registry.py", "windfleet/cloud/ingest.py", "windfleet/cloud/canary.py",
)
APPROVAL_HANDLER = "windfleet.cloud.approval.handler"
INGEST_HANDLER = "windfleet.cloud.ingest.lambda_handler"
CANARY_HANDLER = "windfleet.cloud.canary.handler"
# The telemetry rule: the whole message plus the topic's thing (who published it), which the
# ingest Lambda uses as the message's identity (``source_thing``; the body's "thing" must match).
TELEMETRY_RULE_SQL = f"SELECT *, topic(3) AS source_thing FROM '{topics.ALL_TELEMETRY}'"
IOT_DATA_ENDPOINT_ENV = "WINDFLEET_IOT_DATA_ENDPOINT"  # = windfleet.cloud.ingest.IOT_DATA_ENDPOINT_ENV

FUNCTIONS = (settings.APPROVAL_FUNCTION, settings.INGEST_FUNCTION, settings.CANARY_FUNCTION)

TRUST_POLICY = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _module_file(dotted: str) -> Path:
    spec = importlib.util.find_spec(dotted)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"cannot find module {dotted} to package it")
    return Path(spec.origin)


def lambda_zip() -> bytes:
    """A Lambda deployment package with the cloud layer's handlers (deterministic bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        def add(arcname: str, path: Path) -> None:
            info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())

        for arcname in LAMBDA_MODULES:
            dotted = arcname[:-3].replace("/", ".").removesuffix(".__init__")
            add(arcname, _module_file(dotted))
        tenacity_dir = _module_file("tenacity").parent
        for path in sorted(tenacity_dir.rglob("*.py")):
            add("tenacity/" + path.relative_to(tenacity_dir).as_posix(), path)
    return buf.getvalue()


# The IoT actions AWS documents as required by greengrass:CreateDeployment: the service creates
# and manages the deployment's IoT job and (for a thing target) the device's deployment shadow
# with the caller's permissions.  Sources: the Greengrass V2 developer guide, "Minimal IAM policy
# for installer to provision resources" (statement DeployDevTools grants exactly these with
# greengrass:CreateDeployment), and the Service Authorization Reference for AWS IoT Greengrass V2,
# which lists the same set as the deployment actions' "Dependent actions".
CREATE_DEPLOYMENT_DEPENDENCIES = (
    "iot:CancelJob", "iot:CreateJob", "iot:DeleteThingShadow", "iot:DescribeJob", "iot:DescribeThing",
    "iot:DescribeThingGroup", "iot:GetThingShadow", "iot:UpdateJob", "iot:UpdateThingShadow",
)
LAMBDA_LOGGING = ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents")  # the runtime's own logs


def role_name(function: str) -> str:
    """The execution role the provisioner creates for ``function`` (one role per function)."""
    return {settings.APPROVAL_FUNCTION: f"{settings.LAMBDA_ROLE}-approval",
            settings.INGEST_FUNCTION: f"{settings.LAMBDA_ROLE}-ingest",
            settings.CANARY_FUNCTION: f"{settings.LAMBDA_ROLE}-canary"}[function]


def arn_parts(backend: Backend) -> tuple[str, str, str]:
    """``(partition, region, account)`` of the account being provisioned (from the thing group's ARN)."""
    _, partition, _, region, account, _ = backend.thing_group_arn().split(":", 5)
    return partition, region, account


def _log_group_arns(partition: str, region: str, account: str, group: str) -> list[str]:
    # The group itself (CreateLogGroup, CreateLogStream) and its streams (PutLogEvents).
    base = f"arn:{partition}:logs:{region}:{account}:log-group:{group}"
    return [base, base + ":*"]


def _statement(sid: str, actions: list[str] | tuple[str, ...], resources: list[str] | str) -> dict:
    return {"Sid": sid, "Effect": "Allow", "Action": sorted(actions), "Resource": resources}


def _packages(p: str, r: str, a: str, group: str) -> list[str]:
    # SageMaker writes resource names into ARNs in lower case; allow the group as given and lowered.
    return [f"arn:{p}:sagemaker:{r}:{a}:model-package/{g}/*" for g in dict.fromkeys((group, group.lower()))]


def _canary_objects(p: str, bucket: str, group: str) -> list[str]:
    prefix = settings.CANARY_PREFIX.format(group=group)
    return [f"arn:{p}:s3:::{bucket}/{prefix}{name}" for name in ("config.json", "state.json")]


def _canary_thing_group(backend: Backend) -> str:
    return settings.canary_thing_group(backend.thing_group)


def approval_policy(backend: Backend, arn: tuple[str, str, str] | None = None) -> dict:
    """The approval Lambda's policy: what :func:`windfleet.cloud.approval.handler` calls, scoped to
    this deployment's bucket, model package group, model components and thing groups (the fleet's
    and its canary group), plus the IoT actions greengrass:CreateDeployment depends on."""
    p, r, a = arn or arn_parts(backend)
    bucket, group = backend.bucket, backend.model_group
    model_keys = settings.MODEL_PREFIX.format(group=group, digest="*") + "*"
    component_keys = [f"arn:{p}:s3:::{bucket}/" + settings.COMPONENT_PREFIX.format(name=name, version="*") + "*"
                      for name in (settings.MODEL_COMPONENT, settings.CANARY_COMPONENT)]
    components = [f"arn:{p}:greengrass:{r}:{a}:components:{name}{suffix}"
                  for name in (settings.MODEL_COMPONENT, settings.CANARY_COMPONENT) for suffix in ("", ":versions:*")]
    thing_groups = [f"arn:{p}:iot:{r}:{a}:thinggroup/{g}" for g in (backend.thing_group, _canary_thing_group(backend))]
    things = f"arn:{p}:iot:{r}:{a}:thing/*"
    canary_config, canary_state = _canary_objects(p, bucket, group)
    return {"Version": "2012-10-17", "Statement": [
        _statement("ModelPackages", ["sagemaker:DescribeModelPackage", "sagemaker:UpdateModelPackage"],
                   _packages(p, r, a, group)),
        # registered artifacts are read; model component artifacts are written, and Greengrass reads them
        # with the caller's permissions when it creates the component version (to compute digests);
        # the canary's configuration is read and its state written
        _statement("ReadArtifacts", ["s3:GetObject"],
                   [f"arn:{p}:s3:::{bucket}/{model_keys}", *component_keys, canary_config, canary_state]),
        _statement("WriteModelComponentArtifacts", ["s3:PutObject"], [*component_keys, canary_state]),
        _statement("ModelComponent", ["greengrass:CreateComponentVersion", "greengrass:DescribeComponent",
                                      "greengrass:GetComponent"], components),
        # these have no resource-level permissions (or none this code can name in advance)
        _statement("Deployments", ["greengrass:CreateDeployment", "greengrass:GetDeployment",
                                   "greengrass:ListComponents", "greengrass:ListCoreDevices",
                                   "greengrass:ListDeployments"], "*"),
        # the canary takes gateways of the fleet into its thing group
        _statement("CanaryMembership", ["iot:AddThingToThingGroup"], [thing_groups[1], things]),
        _statement("CanaryMembers", ["iot:ListThingsInThingGroup"], thing_groups[1]),
        # the deployments target the fleet's and the canary's thing groups; their IoT job ids and
        # device things are the service's
        _statement("CreateDeploymentDependencies", CREATE_DEPLOYMENT_DEPENDENCIES,
                   [*thing_groups, f"arn:{p}:iot:{r}:{a}:job/*", things]),
        _statement("FunctionLogs", LAMBDA_LOGGING,
                   _log_group_arns(p, r, a, f"/aws/lambda/{settings.APPROVAL_FUNCTION}")),
    ]}


def canary_policy(backend: Backend, arn: tuple[str, str, str] | None = None) -> dict:
    """The canary Lambda's policy: read the canary's metrics, state and configuration, deploy the
    promoted model to the fleet / withdraw the candidate from the canary group, and reject an
    aborted package."""
    p, r, a = arn or arn_parts(backend)
    thing_groups = [f"arn:{p}:iot:{r}:{a}:thinggroup/{g}" for g in (backend.thing_group, _canary_thing_group(backend))]
    canary_config, canary_state = _canary_objects(p, backend.bucket, backend.model_group)
    return {"Version": "2012-10-17", "Statement": [
        _statement("CanaryState", ["s3:GetObject"], [canary_config, canary_state]),
        _statement("WriteCanaryState", ["s3:PutObject"], canary_state),
        # no resource-level permissions
        _statement("CanaryMetrics", ["cloudwatch:GetMetricData"], "*"),
        _statement("Deployments", ["greengrass:CreateDeployment", "greengrass:GetDeployment",
                                   "greengrass:ListDeployments"], "*"),
        _statement("CreateDeploymentDependencies", CREATE_DEPLOYMENT_DEPENDENCIES,
                   [*thing_groups, f"arn:{p}:iot:{r}:{a}:job/*", f"arn:{p}:iot:{r}:{a}:thing/*"]),
        _statement("RejectPackage", ["sagemaker:DescribeModelPackage", "sagemaker:UpdateModelPackage"],
                   _packages(p, r, a, backend.model_group)),
        _statement("FunctionLogs", LAMBDA_LOGGING,
                   _log_group_arns(p, r, a, f"/aws/lambda/{settings.CANARY_FUNCTION}")),
    ]}


def ingest_policy(backend: Backend, log_group: str = settings.LOG_GROUP,
                  arn: tuple[str, str, str] | None = None) -> dict:
    """The ingest Lambda's policy: writing the telemetry log group (creating it and a stream per
    device when missing), publishing acknowledgements on the devices' ack topics only, plus its
    own function logs."""
    p, r, a = arn or arn_parts(backend)
    ack_topics = f"arn:{p}:iot:{r}:{a}:topic/{topics.telemetry_ack('*')}"  # windfleet/fleet/*/ack
    return {"Version": "2012-10-17", "Statement": [
        _statement("TelemetryLogs", ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                   _log_group_arns(p, r, a, log_group)),
        _statement("TelemetryAcks", ["iot:Publish"], ack_topics),
        # canary shadow statistics as metrics (PutMetricData has no resource-level permissions)
        _statement("CanaryMetrics", ["cloudwatch:PutMetricData"], "*"),
        _statement("FunctionLogs", LAMBDA_LOGGING,
                   _log_group_arns(p, r, a, f"/aws/lambda/{settings.INGEST_FUNCTION}")),
    ]}


DEVICE_POLICY = "windfleet-device"  # the inline policy on the devices' token exchange role
# Components whose artifacts the nucleus downloads from the bucket (deployer.upload: `windfleet
# publish` for the suite, approvals for the model and the canary's candidate).
DEVICE_COMPONENTS = (*settings.SUITE, settings.CANARY_COMPONENT)


def device_policy(backend: Backend, arn: tuple[str, str, str] | None = None) -> dict:
    """What windfleet's components need from the devices' token exchange role (the IAM role behind
    the core devices' role alias, whose credentials the nucleus' token exchange service hands out).

    - ``s3:GetObject`` on the artifacts of windfleet's components (``settings.COMPONENT_PREFIX``
      keys of :data:`DEVICE_COMPONENTS`, where :func:`windfleet.cloud.deployer.upload` puts them):
      the nucleus downloads a component's S3 artifacts with the token exchange role's
      credentials.  AWS IoT Greengrass V2 Developer Guide, "Authorize core devices to interact
      with AWS services" (``device-service-role.html``), section "Allow access to S3 buckets for
      component artifacts": the installer's default role policy
      (``GreengrassV2TokenExchangeRoleAccess``) grants no access to S3 objects, so the role needs
      ``s3:GetObject`` on the artifact bucket added.
    - ``s3:PutObject`` on ``<bucket>/<payloads.CAPTURE_PREFIX>*`` and nothing else written: the
      forwarder's capture uploads (``payloads.capture_key`` under that prefix, plain
      ``put_object``).  The role is shared by every device, so this does not stop one device
      writing under another's ``captures/<thing>/``.
    """
    p = (arn or arn_parts(backend))[0]
    bucket = f"arn:{p}:s3:::{backend.bucket}/"
    artifacts = [bucket + settings.COMPONENT_PREFIX.format(name=name, version="*") + "*"
                 for name in DEVICE_COMPONENTS]
    return {"Version": "2012-10-17", "Statement": [
        _statement("ComponentArtifacts", ["s3:GetObject"], artifacts),
        _statement("CaptureUploads", ["s3:PutObject"], bucket + payloads.CAPTURE_PREFIX + "*"),
    ]}


def role_policies(backend: Backend, log_group: str = settings.LOG_GROUP) -> dict[str, dict]:
    """``{function name: policy document}`` of every role the provisioner creates."""
    arn = arn_parts(backend)
    return {settings.APPROVAL_FUNCTION: approval_policy(backend, arn),
            settings.INGEST_FUNCTION: ingest_policy(backend, log_group, arn),
            settings.CANARY_FUNCTION: canary_policy(backend, arn)}


class Provisioner:
    def __init__(self, backend: Backend, *, role_arn: str | None = None, log_group: str = settings.LOG_GROUP,
                 device_role: str | None = None, retry_wait: float = 5.0, retry_timeout: float = 120.0):
        self.b = backend
        self.role_arn = role_arn
        self.device_role = device_role  # the devices' token exchange role (name): its inline policy only
        self._roles: dict[str, str] = {}  # function name -> the role created for it
        self.log_group = log_group
        self.report: Report = []
        self._retry = dict(wait=tenacity.wait_fixed(retry_wait), stop=tenacity.stop_after_delay(retry_timeout))

    def _note(self, kind: str, name: str, status: str) -> None:
        self.report.append((kind, name, status))

    # -- pieces --------------------------------------------------------------
    def bucket(self) -> None:
        s3, name = self.b.s3, self.b.bucket
        try:
            s3.head_bucket(Bucket=name)
            self._note("s3 bucket", name, "exists")
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise  # 403: the name belongs to someone else
            kwargs: dict[str, Any] = {"Bucket": name}
            if self.b.region and self.b.region not in ("us-east-1", "local"):
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.b.region}
            s3.create_bucket(**kwargs)
            self._note("s3 bucket", name, "created")
        if not self.b.is_local:
            s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration={
                "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True})

    def model_group(self) -> None:
        reg = Registry(self.b)
        try:
            self.b.sagemaker.describe_model_package_group(ModelPackageGroupName=reg.group)
            self._note("model package group", reg.group, "exists")
        except ClientError:
            reg.ensure_group()
            self._note("model package group", reg.group, "created")

    def thing_group(self, name: str | None = None,
                    description: str = "windfleet gateways (Greengrass core devices)") -> None:
        iot, name = self.b.iot, name or self.b.thing_group
        try:
            iot.describe_thing_group(thingGroupName=name)
            self._note("thing group", name, "exists")
        except ClientError as exc:
            if _code(exc) != "ResourceNotFoundException":
                raise
            iot.create_thing_group(thingGroupName=name, thingGroupProperties={"thingGroupDescription": description})
            self._note("thing group", name, "created")

    def role(self, function: str) -> str:
        """The execution role of ``function``: the given ``role_arn``, or its own role with its policy."""
        if self.role_arn:
            return self.role_arn
        if function in self._roles:
            return self._roles[function]
        iam, name = self.b.iam, role_name(function)
        try:
            arn = iam.get_role(RoleName=name)["Role"]["Arn"]
            self._note("iam role", name, "exists")
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST_POLICY),
                                  Description=f"windfleet: execution role of the {function} Lambda")["Role"]["Arn"]
            self._note("iam role", name, "created")
        policy = role_policies(self.b, self.log_group)[function]
        iam.put_role_policy(RoleName=name, PolicyName="windfleet", PolicyDocument=json.dumps(policy))
        self._roles[function] = arn
        return arn

    def function(self, name: str, handler: str, env: dict, code: bytes) -> str:
        lam = self.b.lambda_
        config = dict(Role=self.role(name), Handler=handler, Runtime=settings.LAMBDA_RUNTIME,
                      Timeout=settings.LAMBDA_TIMEOUT, MemorySize=256, Environment={"Variables": env})
        # a fresh IAM role takes a few seconds to become assumable
        fresh_role = tenacity.retry(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, ClientError)
                                              and _code(e) == "InvalidParameterValueException"),
            reraise=True, **self._retry)
        try:
            lam.get_function(FunctionName=name)
        except ClientError as exc:
            if _code(exc) != "ResourceNotFoundException":
                raise
            arn = fresh_role(lam.create_function)(
                FunctionName=name, Code={"ZipFile": code}, Publish=True,
                Description="windfleet (packaged by windfleet cloud provision)", **config)["FunctionArn"]
            self._note("lambda", name, "created")
            return arn
        lam.update_function_code(FunctionName=name, ZipFile=code, Publish=True)
        self._wait_updated(name)
        arn = fresh_role(lam.update_function_configuration)(FunctionName=name, **config)["FunctionArn"]
        self._note("lambda", name, "updated")
        return arn

    def _wait_updated(self, name: str) -> None:
        try:
            self.b.lambda_.get_waiter("function_updated_v2").wait(
                FunctionName=name, WaiterConfig={"Delay": 2, "MaxAttempts": 60})
        except Exception:  # noqa: BLE001 - older botocore / moto: the next call will tell
            pass

    def permission(self, function: str, statement: str, principal: str, source_arn: str) -> None:
        try:
            self.b.lambda_.add_permission(FunctionName=function, StatementId=statement,
                                          Action="lambda:InvokeFunction", Principal=principal,
                                          SourceArn=source_arn)
        except ClientError as exc:
            if _code(exc) != "ResourceConflictException":
                raise

    def approval_rule(self, function_arn: str) -> None:
        ev = self.b.events
        rule_arn = ev.put_rule(Name=settings.APPROVAL_RULE, EventPattern=json.dumps(event_pattern(self.b.model_group)),
                               State="ENABLED", Description="windfleet: model package approved -> deploy")["RuleArn"]
        ev.put_targets(Rule=settings.APPROVAL_RULE, Targets=[{"Id": "approval", "Arn": function_arn}])
        self.permission(settings.APPROVAL_FUNCTION, "windfleet-events", "events.amazonaws.com", rule_arn)
        self._note("eventbridge rule", settings.APPROVAL_RULE, "updated")

    def canary_records(self) -> None:
        """The canary's configuration and state objects exist from the start (``{}``): without
        s3:ListBucket, which the Lambdas do not get, reading a missing key is AccessDenied, not NoSuchKey."""
        for name in ("config.json", "state.json"):
            key = settings.CANARY_PREFIX.format(group=self.b.model_group) + name
            try:
                self.b.s3.head_object(Bucket=self.b.bucket, Key=key)
                self._note("canary record", key, "exists")
            except ClientError as exc:
                if _code(exc) not in ("404", "NoSuchKey", "NotFound"):
                    raise
                self.b.s3.put_object(Bucket=self.b.bucket, Key=key, Body=b"{}", ContentType="application/json")
                self._note("canary record", key, "created")

    def canary_schedule(self, function_arn: str) -> None:
        ev = self.b.events
        rule_arn = ev.put_rule(Name=settings.CANARY_RULE, ScheduleExpression=settings.CANARY_SCHEDULE,
                               State="ENABLED", Description="windfleet: evaluate the running canary")["RuleArn"]
        ev.put_targets(Rule=settings.CANARY_RULE, Targets=[{"Id": "canary", "Arn": function_arn}])
        self.permission(settings.CANARY_FUNCTION, "windfleet-schedule", "events.amazonaws.com", rule_arn)
        self._note("eventbridge rule", settings.CANARY_RULE, "updated")

    def check_device_role(self) -> None:
        """The token exchange role ``device_role`` exists (it is Greengrass': never created here)."""
        try:
            self.b.iam.get_role(RoleName=self.device_role)
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            raise ValueError(f"device role {self.device_role} does not exist: give the token exchange role of "
                             "the devices' role alias (the Greengrass installer creates it, default "
                             "GreengrassV2TokenExchangeRole)") from None

    def device_role_policy(self) -> None:
        """Put :func:`device_policy` on the existing token exchange role ``device_role``."""
        iam, name = self.b.iam, self.device_role
        try:
            iam.get_role_policy(RoleName=name, PolicyName=DEVICE_POLICY)
            status = "updated"
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            status = "created"
        iam.put_role_policy(RoleName=name, PolicyName=DEVICE_POLICY, PolicyDocument=json.dumps(device_policy(self.b)))
        self._note("iam role policy", f"{name}/{DEVICE_POLICY}", status)

    def log_group_(self) -> None:
        try:
            self.b.logs.create_log_group(logGroupName=self.log_group)
            self._note("log group", self.log_group, "created")
        except ClientError as exc:
            if _code(exc) != "ResourceAlreadyExistsException":
                raise
            self._note("log group", self.log_group, "exists")
        self.b.logs.put_retention_policy(logGroupName=self.log_group, retentionInDays=settings.LOG_RETENTION_DAYS)

    def iot_data_endpoint(self) -> str:
        """The account's IoT data (ATS) endpoint, where the ingest Lambda publishes acks."""
        return self.b.iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]

    def telemetry_rule(self, function_arn: str) -> None:
        iot = self.b.iot
        # topic(3) is the thing the publisher's policy let it publish as: the ingest Lambda
        # trusts that, never the body's "thing" (cloud/ingest.py, "Identity comes from the transport").
        payload = {"sql": TELEMETRY_RULE_SQL, "awsIotSqlVersion": "2016-03-23",
                   "ruleDisabled": False, "description": "windfleet fleet telemetry -> ingest Lambda",
                   "actions": [{"lambda": {"functionArn": function_arn}}]}
        try:
            rule_arn = iot.get_topic_rule(ruleName=settings.TELEMETRY_RULE)["ruleArn"]
            iot.replace_topic_rule(ruleName=settings.TELEMETRY_RULE, topicRulePayload=payload)
            self._note("iot topic rule", settings.TELEMETRY_RULE, "updated")
        except ClientError as exc:
            if _code(exc) not in ("ResourceNotFoundException", "UnauthorizedException"):
                raise
            iot.create_topic_rule(ruleName=settings.TELEMETRY_RULE, topicRulePayload=payload)
            rule_arn = iot.get_topic_rule(ruleName=settings.TELEMETRY_RULE)["ruleArn"]
            self._note("iot topic rule", settings.TELEMETRY_RULE, "created")
        self.permission(settings.INGEST_FUNCTION, "windfleet-iot", "iot.amazonaws.com", rule_arn)

    def dashboard(self) -> None:
        from windfleet.cloud.ingest import dashboard_body  # the DASHBOARD area's

        body = _call_with_known(dashboard_body, log_group=self.log_group, region=self.b.region or "us-east-1")
        self.b.cloudwatch.put_dashboard(DashboardName=settings.DASHBOARD,
                                        DashboardBody=body if isinstance(body, str) else json.dumps(body))
        self._note("cloudwatch dashboard", settings.DASHBOARD, "updated")

    # -- all -----------------------------------------------------------------
    def provision(self) -> Report:
        if self.device_role and self.b.is_local:
            raise ValueError("--device-role is for --backend aws (local devices get their credentials from the "
                             "local token exchange service)")
        if self.device_role:
            self.check_device_role()  # before anything is created
        self.bucket()
        self.model_group()
        if self.b.is_local:
            return self.report
        self.thing_group()
        self.thing_group(_canary_thing_group(self.b), "windfleet canary gateways: a candidate model is tried here "
                                                      "first")
        self.canary_records()
        if self.device_role:
            self.device_role_policy()
        code = lambda_zip()
        names = {"WINDFLEET_BUCKET": self.b.bucket, "WINDFLEET_THING_GROUP": self.b.thing_group,
                 "WINDFLEET_MODEL_GROUP": self.b.model_group}
        approval_arn = self.function(settings.APPROVAL_FUNCTION, APPROVAL_HANDLER, names, code)
        self.approval_rule(approval_arn)
        self.log_group_()
        ingest_arn = self.function(settings.INGEST_FUNCTION, INGEST_HANDLER,
                                   {"WINDFLEET_LOG_GROUP": self.log_group,
                                    IOT_DATA_ENDPOINT_ENV: self.iot_data_endpoint()}, code)
        self.telemetry_rule(ingest_arn)
        canary_arn = self.function(settings.CANARY_FUNCTION, CANARY_HANDLER, names, code)
        self.canary_schedule(canary_arn)
        if not self.role_arn:
            self._delete_legacy_role()  # both functions have their own roles now
        self.dashboard()
        return self.report

    def teardown(self, keep_data: bool = False) -> Report:
        b = self.b
        if not b.is_local:
            self._gone("cloudwatch dashboard", settings.DASHBOARD,
                       lambda: b.cloudwatch.delete_dashboards(DashboardNames=[settings.DASHBOARD]))
            self._gone("iot topic rule", settings.TELEMETRY_RULE,
                       lambda: b.iot.delete_topic_rule(ruleName=settings.TELEMETRY_RULE))

            def rule() -> None:
                b.events.remove_targets(Rule=settings.APPROVAL_RULE, Ids=["approval"])
                b.events.delete_rule(Name=settings.APPROVAL_RULE)

            self._gone("eventbridge rule", settings.APPROVAL_RULE, rule)

            def schedule() -> None:
                b.events.remove_targets(Rule=settings.CANARY_RULE, Ids=["canary"])
                b.events.delete_rule(Name=settings.CANARY_RULE)

            self._gone("eventbridge rule", settings.CANARY_RULE, schedule)
            for fn in FUNCTIONS:
                self._gone("lambda", fn, lambda fn=fn: b.lambda_.delete_function(FunctionName=fn))

            if self.device_role:  # the role is Greengrass'; only windfleet's policy goes
                self._gone("iam role policy", f"{self.device_role}/{DEVICE_POLICY}",
                           lambda: b.iam.delete_role_policy(RoleName=self.device_role, PolicyName=DEVICE_POLICY))
            if not self.role_arn:
                for fn in FUNCTIONS:
                    self._gone("iam role", role_name(fn), lambda fn=fn: self._delete_role(role_name(fn)))
                self._delete_legacy_role()
            self._gone("log group", self.log_group, lambda: b.logs.delete_log_group(logGroupName=self.log_group))
            for name in (_canary_thing_group(b), b.thing_group):
                self._gone("thing group", name, lambda name=name: b.iot.delete_thing_group(thingGroupName=name))
        if keep_data:
            return self.report

        def registry() -> None:
            for pkg in Registry(b)._summaries():
                b.sagemaker.delete_model_package(ModelPackageName=pkg["ModelPackageArn"])
            b.sagemaker.delete_model_package_group(ModelPackageGroupName=b.model_group)

        self._gone("model package group", b.model_group, registry)

        def bucket() -> None:
            while True:
                keys = [o["Key"] for o in b.s3.list_objects_v2(Bucket=b.bucket).get("Contents", [])]
                if not keys:
                    break
                for key in keys:
                    b.s3.delete_object(Bucket=b.bucket, Key=key)
            if not b.is_local:
                b.s3.delete_bucket(Bucket=b.bucket)

        self._gone("s3 bucket", b.bucket, bucket)
        return self.report

    def _delete_role(self, name: str) -> None:
        iam = self.b.iam
        for policy in iam.list_role_policies(RoleName=name).get("PolicyNames", []):
            iam.delete_role_policy(RoleName=name, PolicyName=policy)
        iam.delete_role(RoleName=name)

    def _delete_legacy_role(self) -> None:
        """The one role both functions shared before each got its own: removed if it is still there."""
        try:
            self.b.iam.get_role(RoleName=settings.LAMBDA_ROLE)
        except ClientError as exc:
            if _code(exc) == "NoSuchEntity":
                return
            raise
        self._gone("iam role", settings.LAMBDA_ROLE, lambda: self._delete_role(settings.LAMBDA_ROLE))

    def _gone(self, kind: str, name: str, delete: Callable[[], Any]) -> None:
        try:
            delete()
            self._note(kind, name, "deleted")
        except ClientError as exc:
            if _code(exc) in ("ResourceNotFoundException", "NoSuchEntity", "NoSuchBucket", "ValidationException",
                              "ResourceNotFound", "404", "UnauthorizedException"):
                self._note(kind, name, "absent")
            else:
                raise


def _call_with_known(fn: Callable, **kwargs: Any) -> Any:
    """Call ``fn`` with those of ``kwargs`` its signature accepts (the DASHBOARD area owns it)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def provision(backend: Backend, **kwargs: Any) -> Report:
    return Provisioner(backend, **kwargs).provision()


def teardown(backend: Backend, keep_data: bool = False, **kwargs: Any) -> Report:
    return Provisioner(backend, **kwargs).teardown(keep_data=keep_data)
