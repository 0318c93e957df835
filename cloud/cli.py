"""``windfleet registry|deployments|cloud|publish|deploy`` (click).

Every command takes ``--backend local|aws`` (default local), ``--home`` (the
local store, default ``$WINDFLEET_HOME`` or ``~/.windfleet``), ``--region``,
``--bucket``, ``--thing-group`` and ``--group`` (model package group); the
names also come from ``WINDFLEET_BUCKET`` / ``WINDFLEET_THING_GROUP`` /
``WINDFLEET_MODEL_GROUP``.  Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import click
from botocore.exceptions import BotoCoreError, ClientError

from windfleet.model_contract import ModelPackageError, validate_version
from windfleet.topics import validate_thing

from . import settings
from .backends import Backend
from .deployer import DeployError
from .registry import ACTOR_RE, DEFAULT_ACTOR, RegistryError, check_actor


# ------------------------------------------------------------------------------- plumbing
def backend_options(f: Callable) -> Callable:
    options = [
        click.option("--backend", "backend_kind", type=click.Choice(["local", "aws"]), default="local",
                     show_default=True, envvar="WINDFLEET_BACKEND", help="local store or AWS (boto3 credentials)"),
        click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="WINDFLEET_HOME",
                     help="local store directory [default: ~/.windfleet]"),
        click.option("--region", default=None, help="AWS region (default: the boto3 chain)"),
        click.option("--bucket", default=None, envvar="WINDFLEET_BUCKET",
                     help=f"artifact bucket [default: {settings.BUCKET}]"),
        click.option("--thing-group", default=None, envvar="WINDFLEET_THING_GROUP",
                     help=f"thing group [default: {settings.THING_GROUP}]"),
        click.option("--group", "model_group", default=None, envvar="WINDFLEET_MODEL_GROUP",
                     help=f"model package group [default: {settings.MODEL_GROUP}]"),
    ]
    for option in reversed(options):
        f = option(f)

    @functools.wraps(f)
    def wrapper(backend_kind: str, home: Path | None, region: str | None, bucket: str | None,
                thing_group: str | None, model_group: str | None, **kwargs: Any) -> Any:
        scaffold = _LocalScaffold(home, bucket) if backend_kind == "local" else None
        try:
            if thing_group is not None:
                validate_thing(thing_group, "--thing-group")
            backend = Backend.create(backend_kind, home=home, region=region, bucket=bucket,
                                     thing_group=thing_group, model_group=model_group)
            return f(backend, **kwargs)
        except BaseException:
            if scaffold is not None:  # a refused command leaves no files behind
                scaffold.remove_new()
            raise

    return _one_line_errors(wrapper)


def _one_line_errors(f: Callable) -> Callable:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except (RegistryError, DeployError, ModelPackageError, ValueError, OSError, sqlite3.Error) as exc:
            raise click.ClickException(_one_line(exc)) from None
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise click.ClickException(_one_line(f"{exc.operation_name}: {err.get('Code')}: "
                                                 f"{err.get('Message')}")) from None
        except BotoCoreError as exc:
            raise click.ClickException(_one_line(f"AWS: {exc}")) from None

    return wrapper


class _LocalScaffold:
    """What opening the local store creates (home, cloud.db, s3/<bucket>), noted before a
    command runs so that a command that fails removes what it alone created."""

    def __init__(self, home: Path | None, bucket: str | None):
        from .local.store import default_home

        self.home = Path(home) if home is not None else default_home()
        self.paths = [self.home, self.home / "s3", self.home / "s3" / (bucket or settings.BUCKET)]
        self.db = self.home / "cloud.db"
        self.existed = {p: p.exists() for p in [*self.paths, self.db]}

    def remove_new(self) -> None:
        if not self.existed[self.db] and self.db.is_file():
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(f"{self.db}{suffix}")
                except FileNotFoundError:
                    pass
        for path in reversed(self.paths):  # deepest first; only directories left empty
            if not self.existed[path]:
                try:
                    path.rmdir()
                except OSError:
                    pass


def _one_line(exc: Any) -> str:
    return " ".join(str(exc).split())


def _json_default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


def _table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [headers] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _ts(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value or "")[:19].replace("T", " ")


json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


# ------------------------------------------------------------------------------- registry
@click.group("registry")
def registry_group() -> None:
    """Model registry: register, list, approve, reject model packages."""


@registry_group.command("register")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@backend_options
@json_option
def registry_register(backend: Backend, model_dir: Path, as_json: bool) -> None:
    """Register MODEL_DIR (model.onnx + model.json) as PendingManualApproval."""
    from .registry import Registry

    info = Registry(backend).register(model_dir)
    if as_json:
        return _dump(info)
    click.echo(f"registered {info['group']} version {info['version']} (model {info['model_version']}, "
               f"sha256 {info['sha256'][:12]}...) {info['status']}")


@registry_group.command("list")
@backend_options
@json_option
def registry_list(backend: Backend, as_json: bool) -> None:
    """Every model package version of the group."""
    from .registry import Registry

    items = Registry(backend).list()
    if as_json:
        return _dump(items)
    if not items:
        return click.echo(f"no model packages in {backend.model_group}")
    rows = []
    for i in items:
        metrics = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in list(i["metrics"].items())[:4])
        rows.append([i["version"], i["status"], i["model_version"], i["component_version"], _ts(i["created_at"]),
                     (i["sha256"] or "")[:12], (i.get("lineage") or {}).get("parent") or "", metrics])
    _table(rows, ["VERSION", "STATUS", "MODEL", "COMPONENT", "CREATED", "SHA256", "PARENT", "METRICS"])


def lineage_line(lineage: dict | None) -> str | None:
    """A registry entry's lineage as one line (None for a model not retrained from captures)."""
    if not lineage:
        return None
    parts = [f"parent {lineage.get('parent') or '?'}"]
    if lineage.get("captures") is not None:
        parts.append(f"{lineage['captures']} capture objects under {lineage.get('captures_prefix') or '?'}")
    if lineage.get("capture_windows") is not None:
        parts.append(f"{lineage['capture_windows']} windows")
    if lineage.get("turbines"):
        parts.append("turbines " + " ".join(lineage["turbines"]))
    return "lineage: " + ", ".join(parts)


def default_actor() -> str:
    """Who decides from this shell: ``$WINDFLEET_ACTOR``, else the login name (when it is a
    valid actor name), else ``windfleet``."""
    import getpass

    name = os.environ.get("WINDFLEET_ACTOR")
    if name:
        return name  # said explicitly: checked (and refused in one line) where it is used
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return DEFAULT_ACTOR
    return name if ACTOR_RE.match(name) else DEFAULT_ACTOR


actor_option = click.option("--actor", default=None, metavar="NAME",
                            help="who decides, recorded with the decision [default: $WINDFLEET_ACTOR or the "
                                 "login name]")


@registry_group.command("approve")
@click.argument("version")
@click.option("--reason", default=None, help="why; recorded with the actor and the time (ApprovalDescription "
              "and the package's metadata)")
@click.option("--description", default="approved with windfleet", show_default=True,
              help="the same as --reason (kept for scripts that use it)")
@actor_option
@backend_options
@json_option
def registry_approve(backend: Backend, version: str, reason: str | None, description: str, actor: str | None,
                     as_json: bool) -> None:
    """Approve VERSION; this alone rolls it out to the thing group."""
    from .registry import Registry

    info = Registry(backend).approve(version, reason or description, actor=check_actor(actor or default_actor()))
    if as_json:
        _dump(info)
    dep = info.get("deployment")
    if dep is not None and dep["status"] == "refused":
        raise click.ClickException(f"version {info['version']} refused: {dep['reason']}")
    if as_json:
        return
    click.echo(f"approved {info['group']} version {info['version']}")
    if dep is None:
        click.echo("the approval rule (EventBridge -> Lambda) deploys it; see `windfleet deployments status`")
    elif dep["status"] == "unchanged":
        click.echo(f"{settings.MODEL_COMPONENT} {dep['componentVersion']} is already in deployment "
                   f"{dep['deploymentId']}")
    elif dep["status"] == "deployed":
        click.echo(f"deployment {dep['deploymentId']}: {settings.MODEL_COMPONENT} {dep['componentVersion']} "
                   f"-> {dep['targetArn']}")
    elif dep["status"] == "canary":
        click.echo(f"canary: {dep.get('candidateVersion') or dep.get('componentVersion')} on "
                   f"{', '.join(dep.get('devices') or []) or 'no device'} ({dep.get('canaryGroup')}); the fleet "
                   f"gets {settings.MODEL_COMPONENT} {dep['componentVersion']} when it passes its gates")
    else:
        click.echo(f"approval handler: {dep['status']} ({dep.get('reason', '')})")


@registry_group.command("reject")
@click.argument("version")
@click.option("--reason", default="", help="why; recorded with the actor and the time (ApprovalDescription "
              "and the package's metadata)")
@actor_option
@backend_options
@json_option
def registry_reject(backend: Backend, version: str, reason: str, actor: str | None, as_json: bool) -> None:
    """Reject VERSION (it is never deployed)."""
    from .registry import Registry

    info = Registry(backend).reject(version, reason, actor=check_actor(actor or default_actor()))
    if as_json:
        return _dump(info)
    click.echo(f"rejected {info['group']} version {info['version']}" + (f": {reason}" if reason else ""))


@registry_group.command("history")
@click.argument("version")
@backend_options
@json_option
def registry_history(backend: Backend, version: str, as_json: bool) -> None:
    """Who approved or rejected VERSION, when and why (oldest first)."""
    from .registry import Registry

    info = Registry(backend).get(version)
    if as_json:
        return _dump(info["decisions"])
    if line := lineage_line(info.get("lineage")):
        click.echo(line)
    if not info["decisions"]:
        return click.echo(f"no decisions recorded for version {info['version']} ({info['status']})")
    _table([[d["at"], d["status"], d["actor"], d["reason"]] for d in info["decisions"]],
           ["TIME", "DECISION", "ACTOR", "REASON"])


# ---------------------------------------------------------------------------- deployments
@click.group("deployments")
def deployments_group() -> None:
    """Greengrass deployments and their per-device outcomes."""


@deployments_group.command("list")
@click.option("--all", "history", is_flag=True, help="include superseded deployments")
@backend_options
@json_option
def deployments_list(backend: Backend, history: bool, as_json: bool) -> None:
    """Deployments of the thing group (latest only unless --all)."""
    gg, items, token = backend.greengrassv2, [], None
    target = backend.thing_group_arn()
    while True:
        kwargs: dict[str, Any] = {"targetArn": target, "historyFilter": "ALL" if history else "LATEST_ONLY"}
        if token:
            kwargs["nextToken"] = token
        page = gg.list_deployments(**kwargs)
        items += page.get("deployments", [])
        token = page.get("nextToken")
        if not token:
            break
    if as_json:
        return _dump(items)
    if not items:
        return click.echo(f"no deployments for {target}")
    _table([[d["deploymentId"], d.get("deploymentStatus"), "yes" if d.get("isLatestForTarget") else "",
             _ts(d.get("creationTimestamp")), d.get("deploymentName")] for d in items],
           ["DEPLOYMENT", "STATUS", "LATEST", "CREATED", "NAME"])


@deployments_group.command("status")
@click.argument("deployment", required=False)
@backend_options
@json_option
def deployments_status(backend: Backend, deployment: str | None, as_json: bool) -> None:
    """Per-device outcome of DEPLOYMENT (default: the thing group's latest)."""
    from .deployer import device_outcomes, latest_deployment

    gg = backend.greengrassv2
    if deployment:
        dep = gg.get_deployment(deploymentId=deployment)
    else:
        dep = latest_deployment(backend, backend.thing_group_arn())
        if dep is None:
            raise click.ClickException(f"no deployment for thing group {backend.thing_group}")
    outcomes = device_outcomes(backend, dep["deploymentId"])
    if as_json:
        return _dump({"deployment": dep, "devices": outcomes})
    comps = ", ".join(f"{n}={s['componentVersion']}" for n, s in sorted((dep.get("components") or {}).items()))
    click.echo(f"deployment {dep['deploymentId']} ({dep.get('deploymentName')}) {dep.get('deploymentStatus')} "
               f"-> {dep['targetArn']}")
    click.echo(f"components: {comps}")
    if not outcomes:
        return click.echo("no core devices in the target")
    _table([[o["thing"], o["status"], o["model_version"], _ts(o["modified"]), o["reason"]] for o in outcomes],
           ["DEVICE", "STATUS", "MODEL", "UPDATED", "REASON"])


@deployments_group.command("cancel")
@click.argument("deployment")
@backend_options
def deployments_cancel(backend: Backend, deployment: str) -> None:
    """Cancel DEPLOYMENT (devices still applying it stop and roll back)."""
    click.echo(backend.greengrassv2.cancel_deployment(deploymentId=deployment).get("message") or "canceled")


# ---------------------------------------------------------------------------------- cloud
@click.group("cloud")
def cloud_group() -> None:
    """Provision or tear down the AWS resources (idempotent)."""


def _report(report: list[tuple[str, str, str]]) -> None:
    _table([[status, kind, name] for kind, name, status in report], ["STATUS", "RESOURCE", "NAME"])


@cloud_group.command("provision")
@click.option("--role-arn", default=None, help="an existing IAM role for the Lambda functions")
@click.option("--log-group", default=settings.LOG_GROUP, show_default=True)
@click.option("--device-role", default=None, metavar="NAME",
              help="the devices' existing token exchange role (e.g. GreengrassV2TokenExchangeRole): gets the "
                   "inline policy windfleet-device (component artifacts, capture uploads)")
@backend_options
def cloud_provision(backend: Backend, role_arn: str | None, log_group: str, device_role: str | None) -> None:
    """Bucket, model package group, thing group, approval rule + Lambda, telemetry rule + ingest Lambda,
    log group and dashboard."""
    from .provision import provision

    _report(provision(backend, role_arn=role_arn, log_group=log_group, device_role=device_role))


@cloud_group.command("teardown")
@click.option("--keep-data", is_flag=True, help="keep the bucket and the model registry")
@click.option("--role-arn", default=None, help="the role given to provision (it is not deleted)")
@click.option("--log-group", default=settings.LOG_GROUP, show_default=True)
@click.option("--device-role", default=None, metavar="NAME",
              help="the role given to provision: its windfleet-device policy is removed (the role is not)")
@click.option("--yes", is_flag=True, help="do not ask")
@backend_options
def cloud_teardown(backend: Backend, keep_data: bool, role_arn: str | None, log_group: str,
                   device_role: str | None, yes: bool) -> None:
    """Remove what provision created."""
    from .provision import teardown

    if not yes and not keep_data:
        click.confirm(f"delete bucket {backend.bucket} and model group {backend.model_group} with all their "
                      "contents?", abort=True)
    _report(teardown(backend, keep_data=keep_data, role_arn=role_arn, log_group=log_group, device_role=device_role))


@cloud_group.command("s3-endpoint")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="WINDFLEET_HOME",
              help="local store directory [default: ~/.windfleet]")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, type=click.IntRange(0, 65535), show_default=True, help="0: any free port")
def cloud_s3_endpoint(home: Path | None, host: str, port: int) -> None:
    """Serve the local backend's S3 over HTTP (path-style, SigV4 with credentials from the local
    token exchange service), for devices' capture uploads: prints the URL to set as the
    forwarder's capture_endpoint, then serves until Ctrl-C."""
    from .local.s3_server import main

    main(home, host, port)


# ------------------------------------------------------------------------ publish / deploy
@click.command("publish")
@click.option("--build-dir", type=click.Path(path_type=Path), default=Path("greengrass-build"), show_default=True,
              help="output of `windfleet build`")
@backend_options
@json_option
def publish_cmd(backend: Backend, build_dir: Path, as_json: bool) -> None:
    """Upload every component of the build and create its version (existing versions are reported)."""
    from .deployer import publish

    results = publish(backend, build_dir)
    if as_json:
        return _dump(results)
    _table([[r["status"], r["component"], r["version"], r["arn"]] for r in results],
           ["STATUS", "COMPONENT", "VERSION", "ARN"])


@click.command("deploy")
@click.option("--component", "overrides", multiple=True, metavar="NAME=VERSION",
              help="pin a component version (repeatable)")
@click.option("--capture/--no-capture", default=None,
              help="switch data capture on (to the backend's bucket) or off [default: leave as is]")
@click.option("--capture-endpoint", default=None, metavar="URL",
              help="S3-compatible endpoint for capture uploads (local backend: `windfleet cloud s3-endpoint`); "
                   "none: AWS S3 with the device's token exchange credentials")
@backend_options
@json_option
def deploy_cmd(backend: Backend, overrides: tuple[str, ...], capture: bool | None, capture_endpoint: str | None,
               as_json: bool) -> None:
    """Deploy the whole suite (latest published versions) to the thing group."""
    from .deployer import deploy_suite

    versions = {}
    for item in overrides:
        name, sep, version = item.partition("=")
        if not sep or not name or not version:
            raise click.BadParameter(f"{item!r} is not NAME=VERSION", param_hint="--component")
        versions[name] = validate_version(version, f"--component {name}: version")
    if capture_endpoint and not capture:
        raise click.BadParameter("only with --capture", param_hint="--capture-endpoint")
    result = deploy_suite(backend, versions=versions, capture=capture, capture_endpoint=capture_endpoint)
    if as_json:
        return _dump(result)
    click.echo(f"deployment {result['deploymentId']} -> {result['targetArn']}")
    for name, spec in sorted(result["components"].items()):
        click.echo(f"  {name} {spec['componentVersion']}")


def register(group: click.Group) -> None:
    """Attach the cloud commands to the ``windfleet`` group."""
    for command in (registry_group, deployments_group, cloud_group, publish_cmd, deploy_cmd):
        group.add_command(command)
