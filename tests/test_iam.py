"""IAM: every role ``windfleet cloud provision`` creates allows the calls its Lambda's code makes,
plus what AWS documents as required for greengrass:CreateDeployment -- and nothing else.

The provisioner runs against moto's IAM and Lambda; each function's role and policy documents are
read back from IAM (what the provisioner actually put there).  Each handler's boto3 calls are
enumerated twice:

* statically -- an AST walk of the call graph from the handler through the modules packaged into
  the Lambda zip (``provision.LAMBDA_MODULES``), keeping attribute calls whose name is an operation
  of a service the reached code creates a client for (botocore's service models);
* dynamically -- the handler runs the way Lambda runs it (``handler(event, None)``, its
  environment as provisioned, clients from ``lambda_backend()`` / ``boto3.client``) over moto
  (SageMaker, S3, IoT, Logs) and the project's local Greengrass v2 service behind the greengrassv2
  client (and a recording fake behind iot-data: moto serves Publish only on its generic host, not on
  the account endpoint the provisioner passes the ingest Lambda), with every botocore API call recorded (``BaseClient._make_api_call``) with its
  parameters, so each call is checked on the resource it touched.

Both sets must agree, and each call is evaluated against the role's policy with a small IAM
evaluator (explicit Deny, Allow, wildcards in actions and resources, NotAction/NotResource).
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import botocore.session
import pytest
import yaml
from botocore import xform_name
from botocore.client import BaseClient
from botocore.validate import validate_parameters
from moto import mock_aws

from windfleet import payloads, topics
from windfleet.cloud import backends, ingest, provision, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.registry import Registry, approval_event, set_approval
from windfleet.cloud.testing import fake_model_dir

from tests.aws_fixtures import moto_backend

REGION = "eu-west-1"
BUCKET, THING_GROUP, MODEL_GROUP = "wf-iam-artifacts", "turbines", "wf-models"

# What AWS documents as required for greengrass:CreateDeployment (kept apart from the provisioner's
# copy on purpose): the Greengrass V2 developer guide, "Minimal IAM policy for installer to provision
# resources" (statement DeployDevTools), and the Service Authorization Reference, "Actions,
# resources, and condition keys for AWS IoT Greengrass V2" (the deployment actions' dependent actions).
CREATE_DEPLOYMENT_REQUIRES = (
    "iot:CancelJob", "iot:CreateJob", "iot:DeleteThingShadow", "iot:DescribeJob", "iot:DescribeThing",
    "iot:DescribeThingGroup", "iot:GetThingShadow", "iot:UpdateJob", "iot:UpdateThingShadow",
)
# Actions the policies may grant on Resource "*": no resource-level permissions, or resources the
# code cannot name in advance (deployment ids are the service's).
NO_RESOURCE_LEVEL = {"greengrass:CreateDeployment", "greengrass:GetDeployment", "greengrass:ListComponents",
                     "greengrass:ListDeployments", "greengrass:ListCoreDevices", "cloudwatch:PutMetricData",
                     "cloudwatch:GetMetricData"}


# ================================================================================= IAM evaluator
def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _wildcard(pattern: str, value: str, *, ignore_case: bool) -> bool:
    """IAM matching: ``*`` any run of characters, ``?`` one character, nothing else special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL) is not None


def _statements(docs: list[dict]) -> list[dict]:
    return [s for doc in docs for s in _as_list(doc.get("Statement", []))]


def _action_matches(stmt: dict, action: str) -> bool:
    if "NotAction" in stmt:
        return not any(_wildcard(p, action, ignore_case=True) for p in _as_list(stmt["NotAction"]))
    return any(_wildcard(p, action, ignore_case=True) for p in _as_list(stmt.get("Action", [])))


def _resource_matches(stmt: dict, resource: str | None, effect: str) -> bool:
    if resource is None:  # "on some resource": any Allow; a Deny only if it denies every resource
        if effect == "Allow":
            return True
        return "Resource" in stmt and "*" in _as_list(stmt["Resource"])
    if "NotResource" in stmt:
        return not any(_wildcard(p, resource, ignore_case=False) for p in _as_list(stmt["NotResource"]))
    return any(_wildcard(p, resource, ignore_case=False) for p in _as_list(stmt.get("Resource", [])))


def decide(docs: list[dict], action: str, resource: str | None = None) -> str:
    """``Allow``, ``Deny`` (explicit) or ``ImplicitDeny`` for ``action`` on ``resource``.

    ``resource=None`` asks whether the action is allowed on some resource (the static check, which
    knows no ARNs).  Conditions are not evaluated: conservatively, a conditional Allow does not
    count and a conditional Deny does.
    """
    allowed = False
    for stmt in _statements(docs):
        effect = stmt.get("Effect")
        if not _action_matches(stmt, action) or not _resource_matches(stmt, resource, effect):
            continue
        if effect == "Deny":
            return "Deny"
        if effect == "Allow" and not stmt.get("Condition"):
            allowed = True
    return "Allow" if allowed else "ImplicitDeny"


def test_the_evaluator_honours_deny_wildcards_and_resources():
    docs = [{"Statement": [
        {"Effect": "Allow", "Action": ["iot:*", "greengrass:Get*"], "Resource": "*"},
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/models/*"},
        {"Effect": "Deny", "Action": "iot:DeleteThing", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/models/secret"},
        {"Effect": "Allow", "NotAction": "logs:*", "Resource": "arn:aws:sqs:*:*:q?"},
        {"Effect": "Allow", "Action": "sns:Publish", "Resource": "*", "Condition": {"Bool": {"aws:x": "true"}}},
    ]}]
    assert decide(docs, "iot:CreateJob", "arn:aws:iot:r:1:job/j") == "Allow"
    assert decide(docs, "IOT:createjob") == "Allow"  # action names are case-insensitive
    assert decide(docs, "greengrass:GetDeployment") == "Allow"
    assert decide(docs, "greengrass:CreateDeployment", "*") == "ImplicitDeny"
    assert decide(docs, "greengrass:CreateDeployment", "arn:aws:sqs:r:1:q1") == "Allow"  # NotAction
    assert decide(docs, "iot:DeleteThing", "arn:aws:iot:r:1:thing/t") == "Deny"
    assert decide(docs, "s3:GetObject", "arn:aws:s3:::b/models/1/model.onnx") == "Allow"
    assert decide(docs, "s3:GetObject", "arn:aws:s3:::b/Models/1/model.onnx") == "ImplicitDeny"  # ARNs: case
    assert decide(docs, "s3:GetObject", "arn:aws:s3:::b/models/secret") == "Deny"
    assert decide(docs, "s3:GetObject") == "Allow"  # on some resource
    assert decide(docs, "s3:PutObject", "arn:aws:s3:::b/models/x") == "ImplicitDeny"
    assert decide(docs, "sqs:SendMessage", "arn:aws:sqs:r:1:q1") == "Allow"
    assert decide(docs, "sqs:SendMessage", "arn:aws:sqs:r:1:q10") == "ImplicitDeny"
    assert decide(docs, "logs:PutLogEvents", "arn:aws:sqs:r:1:q1") == "ImplicitDeny"
    assert decide(docs, "sns:Publish", "arn:aws:sns:r:1:t") == "ImplicitDeny"  # conditional Allow


# ============================================================================ calls -> actions
_SESSION = botocore.session.get_session()
IAM_PREFIX = {"monitoring": "cloudwatch", "iotdata": "iot"}  # signing names that are not the IAM prefix
ACTION_NAME = {  # operations authorised by an action of another name
    ("s3", "HeadObject"): "GetObject", ("s3", "HeadBucket"): "ListBucket",
    ("s3", "ListObjectsV2"): "ListBucket", ("s3", "ListObjects"): "ListBucket",
}


def _model(service: str):
    return _SESSION.get_service_model(service)


def iam_action(service: str, operation: str) -> str:
    """botocore (service, operation) -> IAM action (``greengrassv2`` signs as ``greengrass``)."""
    model = _model(service)
    prefix = model.signing_name or model.endpoint_prefix
    return f"{IAM_PREFIX.get(prefix, prefix)}:{ACTION_NAME.get((service, operation), operation)}"


def _operations(service: str) -> dict[str, str]:
    return {xform_name(op): op for op in _model(service).operation_names}


def test_action_names_follow_the_service_models():
    assert iam_action("greengrassv2", "CreateDeployment") == "greengrass:CreateDeployment"
    assert iam_action("sagemaker", "DescribeModelPackage") == "sagemaker:DescribeModelPackage"
    assert iam_action("logs", "PutLogEvents") == "logs:PutLogEvents"
    assert iam_action("cloudwatch", "PutDashboard") == "cloudwatch:PutDashboard"
    assert iam_action("s3", "HeadObject") == "s3:GetObject"
    assert iam_action("iot-data", "Publish") == "iot:Publish"


# ====================================================================== static enumeration
@dataclass
class _Module:
    name: str
    tree: ast.Module
    funcs: dict[str, ast.AST] = field(default_factory=dict)
    classes: dict[str, dict[str, ast.AST]] = field(default_factory=dict)
    imports: dict[str, tuple] = field(default_factory=dict)  # local name -> ("mod", m) | ("sym", m, name)
    is_pkg: bool = False


def _package_modules() -> dict[str, _Module]:
    """The modules packaged into the Lambda zip, parsed."""
    mods = {}
    for arcname in provision.LAMBDA_MODULES:
        dotted = arcname[:-3].replace("/", ".").removesuffix(".__init__")
        path = provision._module_file(dotted)
        mods[dotted] = _Module(dotted, ast.parse(path.read_text(), str(path)), is_pkg=path.name == "__init__.py")
    for mod in mods.values():
        package = mod.name if mod.is_pkg else mod.name.rpartition(".")[0]
        for node in mod.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                mod.funcs[node.name] = node
            elif isinstance(node, ast.ClassDef):
                mod.classes[node.name] = {n.name: n for n in node.body
                                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in ast.walk(mod.tree):  # imports inside functions count too
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        mod.imports[alias.asname or alias.name] = ("mod", alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[:len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    local = alias.asname or alias.name
                    if f"{base}.{alias.name}" in mods:
                        mod.imports[local] = ("mod", f"{base}.{alias.name}")
                    elif base in mods:
                        mod.imports[local] = ("sym", base, alias.name)
    return mods


@dataclass
class StaticCalls:
    calls: set[tuple[str, str]]  # (botocore service, operation)
    reached: set[tuple[str, str]]  # (module, function or Class.method)
    services: set[str]


def static_calls(handler: str) -> StaticCalls:
    """The boto3 calls reachable from ``handler`` ("package.module.function")."""
    mods = _package_modules()
    entry_mod, _, entry_fn = handler.rpartition(".")

    def lookup(key):
        mod, qual = key
        cls, _, meth = qual.rpartition(".")
        return mods[mod].classes.get(cls, {}).get(meth) if cls else mods[mod].funcs.get(qual)

    def symbol(mod: _Module, name: str):
        """A class or function visible as ``name`` in ``mod``: (module, name) or None."""
        if name in mod.funcs or name in mod.classes:
            return mod.name, name
        imp = mod.imports.get(name)
        if imp and imp[0] == "sym" and (imp[2] in mods[imp[1]].funcs or imp[2] in mods[imp[1]].classes):
            return imp[1], imp[2]
        return None

    def member(owner, attr):
        """``attr`` of a class (owner = (module, class)) or of a module (owner = module name)."""
        if isinstance(owner, tuple):
            return (owner[0], f"{owner[1]}.{attr}") if attr in mods[owner[0]].classes.get(owner[1], {}) else None
        return symbol(mods[owner], attr) if owner in mods else None

    reached, stack = set(), [(entry_mod, entry_fn)]
    attr_calls: list[tuple[str, str]] = []  # (method name, receiver source)
    services: set[str] = set()
    while stack:
        key = stack.pop()
        if key in reached:
            continue
        reached.add(key)
        fn, mod = lookup(key), mods[key[0]]
        assert fn is not None, f"cannot find {key}"
        typed = {}  # variable -> (module, class): self/cls, and parameters annotated with a package class
        if "." in key[1]:
            typed["self"] = typed["cls"] = (key[0], key[1].rpartition(".")[0])
        for arg in ast.walk(fn.args):
            if isinstance(arg, ast.arg) and arg.annotation is not None:
                for name in re.findall(r"[A-Za-z_]\w*", ast.unparse(arg.annotation)):
                    target = symbol(mod, name)
                    if target and target[1] in mods[target[0]].classes:
                        typed[arg.arg] = target
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            func, target = node.func, None
            if isinstance(func, ast.Name):
                found = symbol(mod, func.id)
                if found and found[1] in mods[found[0]].funcs:
                    target = found
                elif found:  # a class: its constructor
                    target = member(found, "__init__")
                if func.id == "client" and node.args and isinstance(node.args[0], ast.Constant):
                    services.add(node.args[0].value)
            elif isinstance(func, ast.Attribute):
                if func.attr == "client" and node.args and isinstance(node.args[0], ast.Constant):
                    services.add(node.args[0].value)  # boto3.client("logs"), session.client("s3")
                value = func.value
                if isinstance(value, ast.Name):
                    imp = mod.imports.get(value.id)
                    if imp and imp[0] == "mod":
                        target = member(imp[1], func.attr)
                    elif value.id in typed:
                        target = member(typed[value.id], func.attr)
                    elif symbol(mod, value.id) and symbol(mod, value.id)[1] in mods[symbol(mod, value.id)[0]].classes:
                        target = member(symbol(mod, value.id), func.attr)
                if target is None:
                    attr_calls.append((func.attr, ast.unparse(func.value)))
            if target is not None and lookup(target) is not None:
                stack.append(target)

    calls = set()
    for method, receiver in attr_calls:
        candidates = [s for s in sorted(services) if method in _operations(s)]
        if len(candidates) > 1:  # e.g. list_tags_for_resource: the receiver has to say which client
            candidates = [s for s in candidates if re.search(rf"\b{s}\b", receiver)]
        assert len(candidates) <= 1, f"{receiver}.{method}() could be any of {candidates}"
        if candidates:
            calls.add((candidates[0], _operations(candidates[0])[method]))
    return StaticCalls(calls, reached, services)


def test_static_enumeration_follows_the_call_graph_not_whole_modules():
    found = static_calls(provision.APPROVAL_HANDLER)
    assert {("sagemaker", "DescribeModelPackage"), ("sagemaker", "UpdateModelPackage"), ("s3", "GetObject"),
            ("s3", "PutObject"), ("iot", "DescribeThingGroup"), ("greengrassv2", "CreateComponentVersion"),
            ("greengrassv2", "DescribeComponent"), ("greengrassv2", "CreateDeployment")} <= found.calls
    # reached modules hold more than the handler calls: registering, publishing, the fleet view
    assert ("sagemaker", "CreateModelPackage") not in found.calls
    assert ("greengrassv2", "ListInstalledComponents") not in found.calls
    assert ("windfleet.cloud.deployer", "deploy_model") in found.reached
    assert ("windfleet.cloud.backends", "Backend.thing_group_arn") in found.reached
    assert static_calls(provision.INGEST_HANDLER).calls == {
        ("logs", "PutLogEvents"), ("logs", "CreateLogGroup"), ("logs", "CreateLogStream"),
        ("iot-data", "Publish"), ("cloudwatch", "PutMetricData")}


# ===================================================================== dynamic recording
@dataclass
class Call:
    service: str
    operation: str
    params: dict
    implied_by: str | None = None  # a call the service makes with the caller's permissions

    @property
    def action(self) -> str:
        return iam_action(self.service, self.operation)


class Recorder:
    """Every botocore API call, recorded while ``active``; greengrassv2 is served by a fake."""

    def __init__(self):
        self.calls: list[Call] = []
        self.active = False
        self.ignored: set[int] = set()  # ids of the test's own clients
        self.fakes: dict = {}

    def install(self, mp: pytest.MonkeyPatch) -> None:
        original, rec = BaseClient._make_api_call, self

        def _make_api_call(client, operation_name, api_params):
            service = client.meta.service_model.service_name
            if rec.active and id(client) not in rec.ignored:
                rec.calls.append(Call(service, operation_name, copy.deepcopy(api_params)))
            fake = rec.fakes.get(service)
            if fake is not None:
                validate_parameters(api_params, client.meta.service_model.operation_model(operation_name).input_shape)
                return getattr(fake, xform_name(operation_name))(**api_params)
            return original(client, operation_name, api_params)

        mp.setattr(BaseClient, "_make_api_call", _make_api_call)


class _IotData:
    """The ingest Lambda's iot-data client's service: records what it publishes."""

    def __init__(self):
        self.published: list[tuple[str, int, dict]] = []

    def publish(self, topic: str, qos: int = 0, payload: bytes = b"", **_) -> dict:
        self.published.append((topic, qos, json.loads(payload)))
        return {}


class _MotoArtifacts:
    """The local Greengrass service's artifact store, reading moto's S3.

    CreateComponentVersion reads each s3:// artifact to compute its digest, and refuses a version
    whose artifact it cannot read ("Specified artifact resource cannot be accessed"); those reads
    are recorded as calls implied by CreateComponentVersion, so the role must allow them.  (Not a
    documented dependent action: the provisioner grants it to be safe; see approval_policy.)
    """

    def __init__(self, s3, home: Path, recorder: Recorder):
        self.s3, self.home, self.recorder = s3, home, recorder

    def path(self, bucket: str, key: str, operation: str = "GetObject") -> Path:
        if self.recorder.active:
            self.recorder.calls.append(Call("s3", "GetObject", {"Bucket": bucket, "Key": key},
                                            implied_by="greengrass:CreateComponentVersion"))
        target = self.home / bucket / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        return target


def call_resources(call: Call, arn: tuple[str, str, str]) -> list[str]:
    """The ARNs IAM authorises ``call`` on ("*" for actions without resource-level permissions)."""
    p, r, a = arn
    s, op, q = call.service, call.operation, call.params
    if s == "s3" and "Key" in q:
        return [f"arn:{p}:s3:::{q['Bucket']}/{q['Key']}"]
    if s == "sagemaker" and op in ("DescribeModelPackage", "UpdateModelPackage"):
        name = q.get("ModelPackageName") or q["ModelPackageArn"]
        return [name if name.startswith("arn:") else f"arn:{p}:sagemaker:{r}:{a}:model-package/{name}"]
    if s == "iot" and op == "DescribeThingGroup":
        return [f"arn:{p}:iot:{r}:{a}:thinggroup/{q['thingGroupName']}"]
    if s == "iot" and op == "ListThingsInThingGroup":
        return [f"arn:{p}:iot:{r}:{a}:thinggroup/{q['thingGroupName']}"]
    if s == "iot" and op == "AddThingToThingGroup":
        return [f"arn:{p}:iot:{r}:{a}:thinggroup/{q['thingGroupName']}", f"arn:{p}:iot:{r}:{a}:thing/{q['thingName']}"]
    if s == "cloudwatch" and op in ("PutMetricData", "GetMetricData"):
        return ["*"]
    if s == "greengrassv2":
        if op == "CreateComponentVersion":
            recipe = yaml.safe_load(q["inlineRecipe"])
            name = next(v for k, v in recipe.items() if k.lower() == "componentname")
            return [f"arn:{p}:greengrass:{r}:{a}:components:{name}"]
        if "arn" in q:
            return [q["arn"]]
        if op == "GetDeployment":
            return [f"arn:{p}:greengrass:{r}:{a}:deployments:{q['deploymentId']}"]
        if op in ("CreateDeployment", "ListComponents", "ListDeployments", "ListCoreDevices"):
            return ["*"]
    if s == "iot-data" and op == "Publish":
        return [f"arn:{p}:iot:{r}:{a}:topic/{q['topic']}"]
    if s == "logs" and "logGroupName" in q:
        group = f"arn:{p}:logs:{r}:{a}:log-group:{q['logGroupName']}"
        return [f"{group}:log-stream:{q['logStreamName']}"] if op == "PutLogEvents" else [group]
    raise AssertionError(f"no resource rule for {s}.{op}: add one to call_resources")


# ============================================================================== the world
@dataclass
class Function:
    name: str
    handler: str
    env: dict
    role_arn: str
    docs: list[dict]
    calls: list[Call] = field(default_factory=list)


@dataclass
class World:
    """A snapshot of the provisioned account and of what the handlers did in it."""
    arn: tuple[str, str, str]  # partition, region, account
    functions: dict[str, Function]
    roles: list[dict]  # iam list_roles
    built: dict[str, dict]  # provision.role_policies(...) for the same backend
    acks: list[tuple[str, int, dict]]  # (topic, qos, payload) the ingest Lambda published
    topic_rule: dict  # iot get_topic_rule
    approval_rule_arn: str
    canary_rule_arn: str
    invoke_policies: dict[str, dict]  # function name -> its resource policy
    canary_results: list[dict]  # what the canary Lambda returned, in order


def _policy_documents(iam, role_name: str) -> list[dict]:
    docs = []
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        doc = iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
        docs.append(json.loads(doc) if isinstance(doc, str) else doc)
    for attached in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
        doc = iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"]
        docs.append(json.loads(doc) if isinstance(doc, str) else doc)
    return docs


def _run(recorder: Recorder, fn: Function, mp: pytest.MonkeyPatch, *events) -> list[dict]:
    """Invoke ``fn``'s handler as Lambda does: its environment, ``handler(event, None)``."""
    for key, value in fn.env.items():
        mp.setenv(key, value)
    module, _, name = fn.handler.rpartition(".")
    handler = getattr(importlib.import_module(module), name)
    backends.lambda_backend.cache_clear()  # a cold start: clients and names from the environment
    mp.setattr(ingest, "_logs_client", None)
    mp.setattr(ingest, "_iot_data_client", None)
    mp.setattr(ingest, "_cloudwatch_client", None)
    out = []
    recorder.active = True
    try:
        for event in events:
            out.append(handler(event, None))
    finally:
        recorder.active = False
    fn.calls += recorder.calls
    recorder.calls = []
    return out


def _shadow_message(thing: str, seq: int, candidate: str, candidate_alarms: int) -> dict:
    """A telemetry message whose detector health carries canary shadow statistics (the rule's shape)."""
    model = {"score_p50": 0.1, "score_p90": 0.2, "score_p99": 0.3, "infer_ms_p50": 1.0, "infer_ms_p99": 2.0}
    stats = payloads.shadow_stats(candidate, "1.0.0", time.time() - 60, 100,
                                  {**model, "alarms": 1, "alarm_rate": 0.01},
                                  {**model, "alarms": candidate_alarms, "alarm_rate": candidate_alarms / 100},
                                  either_flagged=max(1, candidate_alarms), both_flagged=1)
    body = payloads.health(thing, settings.DETECTOR, "1.0.0", "RUNNING", time.time(), {}, shadow=stats)
    return {**payloads.telemetry(thing, seq, time.time(), [{"type": "health", "body": body}]), "source_thing": thing}


def _approved(backend: Backend, tmp: Path, version: str) -> dict:
    info = Registry(backend).register(fake_model_dir(tmp / version, version))
    set_approval(backend.sagemaker, info["arn"], "Approved", "ok")
    return backend.sagemaker.describe_model_package(ModelPackageName=info["arn"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iam")
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "t",
                 "AWS_DEFAULT_REGION": REGION}.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    recorder = Recorder()
    recorder.install(mp)
    try:
        with mock_aws():
            b = Backend.aws(region=REGION, bucket=BUCKET, thing_group=THING_GROUP, model_group=MODEL_GROUP)
            for client in (b.sagemaker, b.s3, b.greengrassv2, b.iot, b.events, b.logs, b.lambda_, b.iam,
                           b.cloudwatch):
                recorder.ignored.add(id(client))
            provision.provision(b)
            arn = provision.arn_parts(b)

            # Greengrass v2 (not in moto): the project's local service, in this account and region
            from windfleet.cloud.local import greengrass as local_gg
            from windfleet.cloud.local.store import Store

            mp.setattr(local_gg, "REGION", arn[1])
            mp.setattr(local_gg, "ACCOUNT", arn[2])
            gg = local_gg.LocalGreengrassV2(Store(tmp / "gg"), _MotoArtifacts(b.s3, tmp / "artifacts", recorder))
            recorder.fakes["greengrassv2"] = gg
            iot_data = recorder.fakes["iot-data"] = _IotData()
            b.iot.create_thing(thingName="gw-01")  # a core device of the fleet: the canary takes it
            gg.register_core_device("gw-01", [THING_GROUP])
            from windfleet.cloud import canary
            for name in settings.SUITE:  # the published suite (the first deployment deploys all of it)
                if name != settings.MODEL_COMPONENT:
                    gg.create_component_version(inlineRecipe=json.dumps({
                        "RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": "1.0.0",
                        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": "true"}}]}))

            functions = {}
            for conf in b.lambda_.list_functions()["Functions"]:
                conf = b.lambda_.get_function(FunctionName=conf["FunctionName"])["Configuration"]
                functions[conf["FunctionName"]] = Function(
                    conf["FunctionName"], conf["Handler"], conf.get("Environment", {}).get("Variables", {}),
                    conf["Role"], _policy_documents(b.iam, conf["Role"].rsplit("/", 1)[1]))

            # --- the approval Lambda: every path of the handler
            fn = functions[settings.APPROVAL_FUNCTION]
            first = approval_event(_approved(b, tmp, "1.0.0"), region=REGION, account=arn[2])
            out = _run(recorder, fn, mp, first, first)  # the group's first deployment, then a duplicate
            assert [o["status"] for o in out] == ["deployed", "unchanged"], out
            second = approval_event(_approved(b, tmp, "2.0.0"), region=REGION, account=arn[2])
            assert _run(recorder, fn, mp, second)[0]["status"] == "canary"  # the fleet runs a model: canary first
            tampered = _approved(b, tmp, "3.0.0")
            meta = tampered["CustomerMetadataProperties"]
            b.s3.put_object(Bucket=BUCKET, Key=meta["model_uri"].split("/", 3)[3], Body=b"not the model")
            refused = approval_event(tampered, region=REGION, account=arn[2])
            assert _run(recorder, fn, mp, refused, {"source": "aws.s3"})[0]["status"] == "refused"

            # --- the ingest Lambda: a device's first message (creates its stream), then another, a
            # repeat (acknowledged again) and a malformed one (dropped, no ack)
            fn = functions[settings.INGEST_FUNCTION]
            now = time.time()
            records = [{"type": "log", "body": payloads.log("gw-01", settings.DETECTOR, "WARNING", "slow", now)}]
            # each as the telemetry rule hands it over: the body plus topic(3) AS source_thing
            second = {**payloads.telemetry("gw-01", 1, now, records), "source_thing": "gw-01"}
            first_msg = {**payloads.telemetry("gw-01", 0, now, records), "source_thing": "gw-01"}
            out = _run(recorder, fn, mp, first_msg, second, second, {"thing": 3, "source_thing": "gw-01"})
            assert out[0]["written"] >= 1 and out[0]["acked"] and out[2]["acked"] and "dropped" in out[3], out
            # the canary candidate's shadow statistics become CloudWatch metrics
            assert _run(recorder, fn, mp, _shadow_message("gw-01", 2, "2.0.0", 2))[0]["metrics"] > 0

            # --- the canary Lambda (its schedule): v2 passes its gates and is promoted; v4 alarms on
            # everything and is aborted (package Rejected); then there is nothing to evaluate
            canary.save_config(b, {"min_seconds": 0, "min_windows": 50})
            canary_fn = functions[settings.CANARY_FUNCTION]
            canary_results = _run(recorder, canary_fn, mp, {"source": "aws.events"})
            fourth = approval_event(_approved(b, tmp, "4.0.0"), region=REGION, account=arn[2])
            assert _run(recorder, functions[settings.APPROVAL_FUNCTION], mp, fourth)[0]["status"] == "canary"
            _run(recorder, fn, mp, _shadow_message("gw-01", 3, "4.0.0", 90))
            canary_results += _run(recorder, canary_fn, mp, {"source": "aws.events"}, {"source": "aws.events"})

            snapshot = World(
                arn, functions, b.iam.list_roles()["Roles"], provision.role_policies(b, settings.LOG_GROUP),
                iot_data.published,
                b.iot.get_topic_rule(ruleName=settings.TELEMETRY_RULE),
                b.events.describe_rule(Name=settings.APPROVAL_RULE)["Arn"],
                b.events.describe_rule(Name=settings.CANARY_RULE)["Arn"],
                {name: json.loads(b.lambda_.get_policy(FunctionName=name)["Policy"]) for name in functions},
                canary_results)
    finally:
        backends.lambda_backend.cache_clear()
        mp.undo()
    return snapshot


# =================================================================================== tests
def test_every_role_allows_every_call_its_lambda_makes(world):
    assert set(world.functions) == {settings.APPROVAL_FUNCTION, settings.INGEST_FUNCTION, settings.CANARY_FUNCTION}
    assert [(o["verdict"], o["status"]) for o in world.canary_results] == [
        ("promote", "promoted"), ("abort", "aborted"), (None, None)], world.canary_results
    problems = []
    for fn in world.functions.values():
        static = static_calls(fn.handler).calls
        dynamic = {(c.service, c.operation) for c in fn.calls if not c.implied_by}
        assert dynamic, f"{fn.name}: no calls recorded"
        # the two enumerations agree: static analysis misses nothing that runs, and the scenarios
        # above run every call the code can make (so each is also checked on its resources)
        assert dynamic <= static, f"{fn.name}: calls the static walk missed: {sorted(dynamic - static)}"
        assert static <= dynamic, f"{fn.name}: calls no scenario runs (add one): {sorted(static - dynamic)}"
        for service, operation in sorted(static):
            action = iam_action(service, operation)
            if decide(fn.docs, action) != "Allow":
                problems.append(f"{fn.name}: {action} (called by the code) is not allowed")
        for call in fn.calls:
            for resource in call_resources(call, world.arn):
                verdict = decide(fn.docs, call.action, resource)
                if verdict != "Allow":
                    why = f" (done by {call.implied_by})" if call.implied_by else ""
                    problems.append(f"{fn.name}: {call.action} on {resource}{why}: {verdict}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_the_approval_role_allows_what_create_deployment_requires(world):
    fn = world.functions[settings.APPROVAL_FUNCTION]
    p, r, a = world.arn
    targets = {c.params["targetArn"] for c in fn.calls if c.operation == "CreateDeployment"}
    assert targets == {f"arn:{p}:iot:{r}:{a}:thinggroup/{THING_GROUP}",
                       f"arn:{p}:iot:{r}:{a}:thinggroup/{THING_GROUP}{settings.CANARY_GROUP_SUFFIX}"}
    job = f"arn:{p}:iot:{r}:{a}:job/gg-deployment-job"  # ids are the service's: any job of the account
    device = f"arn:{p}:iot:{r}:{a}:thing/gw-01"  # a core device of the group (its deployment shadow)
    on = {"iot:CreateJob": [job, *targets], "iot:DescribeJob": [job], "iot:UpdateJob": [job],
          "iot:CancelJob": [job], "iot:DescribeThingGroup": list(targets), "iot:DescribeThing": [device],
          "iot:GetThingShadow": [device], "iot:UpdateThingShadow": [device], "iot:DeleteThingShadow": [device]}
    assert set(on) == set(CREATE_DEPLOYMENT_REQUIRES)
    denied = [(action, resource) for action, resources in on.items() for resource in resources
              if decide(fn.docs, action, resource) != "Allow"]
    assert not denied, denied
    assert decide(fn.docs, "iot:CreateJob", f"arn:{p}:iot:{r}:{a}:thinggroup/someone-elses") != "Allow"


def test_every_role_lets_its_function_write_its_own_logs(world):
    p, r, a = world.arn
    for fn in world.functions.values():
        group = f"arn:{p}:logs:{r}:{a}:log-group:/aws/lambda/{fn.name}"
        stream = f"{group}:log-stream:2026/01/01/[$LATEST]0123456789abcdef"
        for action, resource in (("logs:CreateLogGroup", group), ("logs:CreateLogStream", group),
                                 ("logs:PutLogEvents", stream)):
            assert decide(fn.docs, action, resource) == "Allow", (fn.name, action)


def _needed(fn: Function) -> set[str]:
    actions = {iam_action(s, o) for s, o in static_calls(fn.handler).calls} | {c.action for c in fn.calls}
    if "greengrass:CreateDeployment" in actions:
        actions |= set(CREATE_DEPLOYMENT_REQUIRES)
    return actions | {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"}  # the runtime's


def test_roles_grant_nothing_beyond_what_is_needed(world):
    p, r, a = world.arn
    for fn in world.functions.values():
        granted, problems = set(), []
        for stmt in _statements(fn.docs):
            assert stmt["Effect"] == "Allow" and "NotAction" not in stmt and "NotResource" not in stmt, stmt
            actions, resources = _as_list(stmt["Action"]), _as_list(stmt["Resource"])
            problems += [f"wildcard action {x}" for x in actions if "*" in x or "?" in x]
            granted |= set(actions)
            if "*" in resources:
                problems += [f"{x} on Resource *" for x in actions if x not in NO_RESOURCE_LEVEL]
            for resource in resources:
                own = resource == "*" or resource.startswith(f"arn:{p}:s3:::{BUCKET}/") or \
                    resource.startswith(f"arn:{p}:") and resource.split(":")[3:5] == [r, a]
                if not own:
                    problems.append(f"{resource} is outside this account, region or bucket")
        problems += [f"{x} is granted but never needed" for x in sorted(granted - _needed(fn))]
        assert not problems, f"{fn.name}:\n" + "\n".join(problems)
    ingest_actions = {x for s in _statements(world.functions[settings.INGEST_FUNCTION].docs)
                      for x in _as_list(s["Action"])}
    assert {x.split(":")[0] for x in ingest_actions} == {"logs", "iot", "cloudwatch"}
    assert {x for x in ingest_actions if x.startswith("iot:")} == {"iot:Publish"}


def test_the_ingest_lambda_acknowledges_stored_messages_and_may_publish_only_acks(world):
    fn = world.functions[settings.INGEST_FUNCTION]
    assert fn.env[provision.IOT_DATA_ENDPOINT_ENV].endswith(f"-ats.iot.{REGION}.amazonaws.com")
    assert world.acks == [(topics.telemetry_ack("gw-01"), 1, payloads.telemetry_ack("gw-01", seq))
                          for seq in (0, 1, 1, 2, 3)]
    p, r, a = world.arn
    topic = f"arn:{p}:iot:{r}:{a}:topic/"
    publish = [s for s in _statements(fn.docs) if "iot:Publish" in _as_list(s["Action"])]
    assert [_as_list(s["Resource"]) for s in publish] == [[topic + topics.telemetry_ack("*")]]
    assert decide(fn.docs, "iot:Publish", topic + topics.telemetry_ack("gw-02.site:a")) == "Allow"
    for other in (topics.telemetry("gw-01"), topics.health("gw-01"), topics.readings("gw-01-t00"),
                  topics.telemetry_ack("gw-01") + "/x"):
        assert decide(fn.docs, "iot:Publish", topic + other) != "Allow", other


def test_every_role_the_provisioner_creates_is_one_functions_execution_role(world):
    by_role = {fn.role_arn: fn.name for fn in world.functions.values()}
    assert len(by_role) == len(world.functions), "each function gets its own role"
    ours = [role for role in world.roles if role["RoleName"].startswith(settings.LAMBDA_ROLE)]
    assert sorted(role["Arn"] for role in ours) == sorted(by_role)
    assert {role["RoleName"] for role in ours} == {provision.role_name(f) for f in world.functions}
    for role in ours:
        trust = role["AssumeRolePolicyDocument"]
        trust = json.loads(trust) if isinstance(trust, str) else trust
        assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "lambda.amazonaws.com"}]
    # the IoT rule and the EventBridge rule invoke through resource policies (no role), each scoped
    # to its rule
    rule = world.topic_rule
    assert all("roleArn" not in action.get("lambda", {}) for action in rule["rule"]["actions"])
    sources = {settings.INGEST_FUNCTION: rule["ruleArn"], settings.APPROVAL_FUNCTION: world.approval_rule_arn,
               settings.CANARY_FUNCTION: world.canary_rule_arn}
    for name, source in sources.items():
        for stmt in world.invoke_policies[name]["Statement"]:
            assert stmt["Action"] == "lambda:InvokeFunction"
            assert stmt["Condition"]["ArnLike"]["AWS:SourceArn"] == source, (name, stmt)


def test_the_policies_are_the_provisioners_role_policies(world):
    """What IAM holds is what :func:`provision.role_policies` builds (the test reads IAM)."""
    for name, fn in world.functions.items():
        assert fn.docs == [world.built[name]]


@pytest.fixture
def aws(monkeypatch):
    with moto_backend(monkeypatch, REGION, bucket=BUCKET, thing_group=THING_GROUP, model_group=MODEL_GROUP) as backend:
        yield backend


def _our_roles(b: Backend) -> list[str]:
    return sorted(r["RoleName"] for r in b.iam.list_roles()["Roles"] if r["RoleName"].startswith(settings.LAMBDA_ROLE))


def test_the_shared_role_of_earlier_versions_is_replaced_and_teardown_removes_the_roles(aws):
    aws.iam.create_role(RoleName=settings.LAMBDA_ROLE, AssumeRolePolicyDocument=json.dumps(provision.TRUST_POLICY))
    aws.iam.put_role_policy(RoleName=settings.LAMBDA_ROLE, PolicyName="windfleet", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "logs:*", "Resource": "*"}]}))
    report = provision.provision(aws)
    assert ("iam role", settings.LAMBDA_ROLE, "deleted") in report
    assert _our_roles(aws) == sorted(provision.role_name(f) for f in provision.FUNCTIONS)
    again = provision.provision(aws)  # idempotent: the roles exist, their policies are put again
    assert {s for k, _, s in again if k == "iam role"} == {"exists"}
    down = provision.teardown(aws, keep_data=True)
    assert {s for k, _, s in down if k == "iam role"} == {"deleted"}
    assert _our_roles(aws) == []


def test_a_given_role_is_used_by_both_functions_and_never_deleted(aws):
    arn = aws.iam.create_role(RoleName="ops-lambda", AssumeRolePolicyDocument=json.dumps(
        provision.TRUST_POLICY))["Role"]["Arn"]
    report = provision.provision(aws, role_arn=arn)
    assert not [r for r in report if r[0] == "iam role"]
    for name in provision.FUNCTIONS:
        assert aws.lambda_.get_function(FunctionName=name)["Configuration"]["Role"] == arn
    provision.teardown(aws, keep_data=True, role_arn=arn)
    assert [r["RoleName"] for r in aws.iam.list_roles()["Roles"]] == ["ops-lambda"]


# ======================================================= the devices' token exchange role
DEVICE_ROLE = "GreengrassV2TokenExchangeRole"  # the Greengrass installer's default
DEVICE_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "credentials.iot.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
INSTALLER_POLICY = {"Version": "2012-10-17", "Statement": [{  # what the installer puts there
    "Effect": "Allow", "Resource": "*", "Action": ["logs:CreateLogGroup", "logs:CreateLogStream",
                                                  "logs:PutLogEvents", "logs:DescribeLogStreams",
                                                  "s3:GetBucketLocation"]}]}


def _device_role(b: Backend) -> None:
    b.iam.create_role(RoleName=DEVICE_ROLE, AssumeRolePolicyDocument=json.dumps(DEVICE_TRUST))
    b.iam.put_role_policy(RoleName=DEVICE_ROLE, PolicyName="GreengrassV2TokenExchangeRoleAccess",
                          PolicyDocument=json.dumps(INSTALLER_POLICY))


def _cli(*args: str) -> str:
    """``windfleet cloud ...`` on the AWS backend named like the ``aws`` fixture's (same moto account)."""
    import click
    from click.testing import CliRunner

    from windfleet.cloud import cli

    app = click.Group("windfleet")
    cli.register(app)
    result = CliRunner().invoke(app, [*args, "--backend", "aws", "--region", REGION, "--bucket", BUCKET,
                                      "--thing-group", THING_GROUP, "--group", MODEL_GROUP], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_device_role_may_upload_captures_and_read_component_artifacts_and_nothing_else(aws):
    from windfleet.cloud import deployer

    _device_role(aws)
    out = _cli("cloud", "provision", "--device-role", DEVICE_ROLE)
    assert any(line.split() == ["created", "iam", "role", "policy", f"{DEVICE_ROLE}/{provision.DEVICE_POLICY}"]
               for line in out.splitlines()), out
    docs = {name: json.loads(doc) if isinstance(doc, str) else doc for name, doc in (
        (n, aws.iam.get_role_policy(RoleName=DEVICE_ROLE, PolicyName=n)["PolicyDocument"])
        for n in aws.iam.list_role_policies(RoleName=DEVICE_ROLE)["PolicyNames"])}
    ours = docs[provision.DEVICE_POLICY]
    assert ours == provision.device_policy(aws)
    role = [docs[provision.DEVICE_POLICY]]
    p = provision.arn_parts(aws)[0]

    def s3(bucket: str, key: str) -> str:
        return f"arn:{p}:s3:::{bucket}/{key}"

    def object_of(uri: str) -> str:  # s3://bucket/key -> its ARN
        return s3(*uri.removeprefix("s3://").split("/", 1))

    # the forwarder's uploads: what payloads.capture_key makes under the capture prefix
    capture = payloads.capture_key(payloads.CAPTURE_PREFIX, "gw1", 1767225600.25, 1)
    assert decide(role, "s3:PutObject", s3(BUCKET, capture)) == "Allow"
    # the nucleus' downloads: every artifact the deployer uploads for windfleet's components
    for name in provision.DEVICE_COMPONENTS:
        uri = deployer.upload(aws, name, "1.0.7", {"model.onnx": b"x"})["model.onnx"]
        assert decide(role, "s3:GetObject", object_of(uri)) == "Allow", name
        assert decide(role, "s3:PutObject", object_of(uri)) != "Allow", name
    # nothing else written, in this bucket or any other
    canary_state = settings.CANARY_PREFIX.format(group=MODEL_GROUP) + "state.json"
    for key in (settings.MODEL_PREFIX.format(group=MODEL_GROUP, digest="ab12") + "model.onnx",
                settings.COMPONENT_PREFIX.format(name=settings.DETECTOR, version="1.0.0") + "windfleet.zip",
                settings.COMPONENT_PREFIX.format(name=settings.MODEL_COMPONENT, version="1.0.3") + "model.onnx",
                canary_state, settings.CANARY_PREFIX.format(group=MODEL_GROUP) + "config.json",
                "training/job/data/train/fleet.json", "captures", "Captures/gw1/x.jsonl.gz", "x/" + capture):
        assert decide(role, "s3:PutObject", s3(BUCKET, key)) != "Allow", key
    for bucket in ("someone-elses", BUCKET + "-x", BUCKET[:-1]):
        assert decide(role, "s3:PutObject", s3(bucket, capture)) != "Allow", bucket
    # reading is only the artifacts: not captures, registry copies or the canary's records
    for key in (capture, settings.MODEL_PREFIX.format(group=MODEL_GROUP, digest="ab12") + "model.onnx",
                canary_state):
        assert decide(role, "s3:GetObject", s3(BUCKET, key)) != "Allow", key
    granted = {a for s in _statements(role) for a in _as_list(s["Action"])}
    assert granted == {"s3:GetObject", "s3:PutObject"}
    assert all(s["Effect"] == "Allow" and "*" not in _as_list(s["Resource"]) for s in _statements(role))
    # the installer's own policy is left alone
    assert docs["GreengrassV2TokenExchangeRoleAccess"] == INSTALLER_POLICY

    again = provision.provision(aws, device_role=DEVICE_ROLE)  # idempotent
    assert ("iam role policy", f"{DEVICE_ROLE}/{provision.DEVICE_POLICY}", "updated") in again

    out = _cli("cloud", "teardown", "--keep-data", "--device-role", DEVICE_ROLE)
    assert any(line.split() == ["deleted", "iam", "role", "policy", f"{DEVICE_ROLE}/{provision.DEVICE_POLICY}"]
               for line in out.splitlines()), out
    assert aws.iam.get_role(RoleName=DEVICE_ROLE)["Role"]["RoleName"] == DEVICE_ROLE  # the role stays
    assert aws.iam.list_role_policies(RoleName=DEVICE_ROLE)["PolicyNames"] == ["GreengrassV2TokenExchangeRoleAccess"]
    twice = provision.teardown(aws, keep_data=True, device_role=DEVICE_ROLE)
    assert ("iam role policy", f"{DEVICE_ROLE}/{provision.DEVICE_POLICY}", "absent") in twice


def test_provision_never_creates_the_device_role(aws, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        provision.provision(aws, device_role="NoSuchRole")
    assert "NoSuchRole" not in [r["RoleName"] for r in aws.iam.list_roles()["Roles"]]
    assert aws.s3.list_buckets()["Buckets"] == []  # refused before anything was created
    with pytest.raises(ValueError, match="--backend aws"):
        provision.provision(Backend.create("local", home=tmp_path), device_role=DEVICE_ROLE)
