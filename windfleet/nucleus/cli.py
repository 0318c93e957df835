"""``windfleet build | broker | device run | fleet run``."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import click


def _fail(msg: str) -> None:
    raise click.ClickException(" ".join(str(msg).split()))


def _thing(name: str, what: str = "--thing") -> str:
    from windfleet.topics import validate_thing

    try:
        return validate_thing(name, what)
    except ValueError as exc:
        _fail(str(exc))


def _version(version: str, what: str) -> str:
    from windfleet.model_contract import ModelPackageError, validate_version

    try:
        return validate_version(version, what)
    except ModelPackageError as exc:
        _fail(str(exc))


def _hostport(value: str | None, option: str, allow_any_port: bool = False) -> str | None:
    """``host:port`` (or ``host``) checked before anything starts; None passes.
    ``allow_any_port``: port 0 means "start a broker on a free port" (fleet run)."""
    from windfleet.hostport import check_hostport

    if value is not None:
        try:
            check_hostport(value, lowest_port=0 if allow_any_port else 1)
        except ValueError as exc:
            _fail(f"{option}: {exc}")
    return value


def _update_config(text: str | None) -> dict | None:
    """``--update-config``: a JSON object {"Name": {"MERGE": {...}, "RESET": ["/ptr"]}}."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        _fail(f"--update-config is not JSON: {exc}")
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        _fail('--update-config: expected {"Name": {"MERGE": {...}, "RESET": ["/ptr"]}}')
    for name, update in value.items():
        unknown = set(update) - {"MERGE", "RESET"}
        if unknown:
            _fail(f"--update-config {name}: unknown keys {', '.join(sorted(unknown))} (MERGE, RESET)")
        if not isinstance(update.get("MERGE", {}), dict):
            _fail(f"--update-config {name}: MERGE must be an object")
        reset = update.get("RESET", [])
        if not isinstance(reset, list) or not all(isinstance(p, str) for p in reset):
            _fail(f"--update-config {name}: RESET must be a list of JSON pointers")
    return value


@click.command("build")
@click.option("--out", default="greengrass-build", show_default=True, type=click.Path(file_okay=False))
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Model package directory (model.onnx + model.json) for com.windfleet.AnomalyModel.")
@click.option("--model-version", default=None, help="Version of the model component (default: the model card's).")
@click.option("--component", "components", multiple=True, help="Build only these components.")
def build_cmd(out: str, model_dir: str | None, model_version: str | None, components: tuple[str, ...]) -> None:
    """Lay out every component like `gdk component build` (recipes/ + artifacts/<Name>/<Version>/)."""
    from windfleet.build import BuildError, build

    try:
        built = build(out, model_dir, model_version, list(components) or None)
    except BuildError as exc:
        _fail(str(exc))
    for name, version in built.items():
        click.echo(f"{name}={version}")
    if model_dir is None:
        click.echo("note: no --model, so com.windfleet.AnomalyModel was not built", err=True)


@click.command("broker")
@click.option("--port", default=1883, show_default=True, type=int)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="Broker directory (default: $WINDFLEET_HOME/broker).")
def broker_cmd(port: int, host: str, data_dir: str | None) -> None:
    """Run the local Mosquitto broker with per-device accounts and ACLs (foreground)."""
    from windfleet.nucleus.broker import serve

    serve(data_dir or str(_home() / "broker"), port, host)


def _home() -> Path:
    return Path(os.environ.get("WINDFLEET_HOME", Path.home() / ".windfleet"))


@click.group("device")
def device() -> None:
    """The local device runtime (one gateway's Greengrass nucleus)."""


def _merge_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, version = pair.partition("=")
        if not sep or not name or not version:
            _fail(f"--merge {pair!r}: expected Name=Version")
        if "/" in name or name.startswith("."):
            _fail(f"--merge {pair!r}: not a component name")
        out[name] = _version(version, f"--merge {name}: version")
    return out


@device.command("run")
@click.option("--thing", required=True, help="The core device's thing name.")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Runtime root (like /greengrass/v2).")
@click.option("--broker", default=None, envvar="WINDFLEET_BROKER",
              help="IoT Core stand-in (Mosquitto) host:port; the nucleus holds the device's one connection.")
@click.option("--broker-user", default=None, envvar="WINDFLEET_BROKER_USER")
@click.option("--broker-password", default=None, envvar="WINDFLEET_BROKER_PASSWORD")
@click.option("--broker-data", default=None, type=click.Path(file_okay=False),
              help="A windfleet broker directory to read this thing's credentials from.")
@click.option("--cloud-broker", default=None, envvar="WINDFLEET_CLOUD_BROKER", help="IoT Core stand-in host:port.")
@click.option("--thing-group", "thing_groups", multiple=True, help="Thing group(s) to register in.")
@click.option("--home", default=None, type=click.Path(file_okay=False),
              help="Poll the local deployment service in this store (WINDFLEET_HOME).")
@click.option("--recipe-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Local deployment (like greengrass-cli): recipes of a `windfleet build`.")
@click.option("--artifact-dir", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--merge", "merge", multiple=True, help="Name=Version to deploy from --recipe-dir (repeatable).")
@click.option("--update-config", default=None,
              help='JSON {"Name": {"MERGE": {...}, "RESET": ["/ptr"]}} for the local deployment.')
@click.option("--poll-interval", default=2.0, show_default=True, type=float)
def device_run(thing: str, root: str, broker: str | None, broker_user: str | None, broker_password: str | None,
               broker_data: str | None, cloud_broker: str | None, thing_groups: tuple[str, ...], home: str | None,
               recipe_dir: str | None, artifact_dir: str | None, merge: tuple[str, ...],
               update_config: str | None, poll_interval: float) -> None:
    """Run one gateway: components from local deployments or the deployment service."""
    from windfleet import jsonlog
    from windfleet.nucleus.recipe import RecipeError
    from windfleet.nucleus.runtime import DeviceRuntime, Settings
    from windfleet.nucleus.sources import DirectorySource, local_service

    # Everything a user typed is checked before anything is created (the root above all).
    _thing(thing)
    for group in thing_groups:
        _thing(group, "--thing-group")
    _hostport(broker, "--broker")
    _hostport(cloud_broker, "--cloud-broker")
    if not poll_interval > 0:
        _fail(f"--poll-interval {poll_interval}: must be above 0")
    if Path(root).exists() and not Path(root).is_dir():
        _fail(f"--root {root}: not a directory")
    if recipe_dir and home:
        _fail("use either --recipe-dir (local deployment) or --home (deployment service), not both")
    if home and not Path(home).is_dir():
        _fail(f"--home {home}: no such directory (the store `windfleet deploy` writes)")
    if broker_data and not broker_user and not Path(broker_data).is_dir():
        _fail(f"--broker-data {broker_data}: no such directory (the one `windfleet broker --data` uses)")
    if not recipe_dir and (merge or update_config or artifact_dir):
        _fail("--merge, --update-config and --artifact-dir need --recipe-dir")
    jsonlog.setup("windfleet.nucleus", stream=sys.stderr)
    try:
        if recipe_dir:
            if not merge:
                _fail("--recipe-dir needs at least one --merge Name=Version")
            updates = _update_config(update_config) or {}
            source = DirectorySource(recipe_dir, artifact_dir or Path(recipe_dir).parent / "artifacts",
                                     _merge_pairs(merge), updates)
        elif home:
            source = local_service(home)
        else:
            source = None
    except RecipeError as exc:
        _fail(str(exc))
    if broker_data and not broker_user:
        from windfleet.nucleus.broker import Broker

        b = Broker.attach(broker_data) or Broker(broker_data)
        broker_user, broker_password = b.credentials(thing)
        broker = broker or b.url
    fresh_root = not Path(root).exists()
    try:
        runtime = DeviceRuntime(thing, root, source, broker=broker, broker_user=broker_user,
                                broker_password=broker_password, cloud_broker=cloud_broker,
                                thing_groups=list(thing_groups), settings=Settings(poll_interval=poll_interval),
                                credentials_home=home or _home())  # the token exchange service's key (.tes)
    except (ValueError, OSError) as exc:
        if fresh_root:  # a refused command leaves nothing behind
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        _fail(f"cannot start the nucleus at {root}: {exc}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        runtime.run(stop)
    except (ValueError, OSError) as exc:
        _fail(f"the nucleus at {root} stopped: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ greengrass-cli verbs
# The same verbs, flags and output as greengrass-cli (aws-greengrass-cli's DeploymentCommand
# and ComponentCommand), over IPC with the token the nucleus writes to <root>/cli_ipc_info,
# so a README section on local testing reads the same for a laptop and a Pi.
def _cli_client(root: str):
    from awsiot.greengrasscoreipc import connect
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    info_dir = Path(root) / "cli_ipc_info"
    candidates = [info_dir / f"user-{os.geteuid()}", info_dir / f"group-{os.getegid()}"]
    candidates += sorted(info_dir.glob("*")) if info_dir.is_dir() else []
    for path in candidates:
        try:
            info = json.loads(path.read_text())
            return GreengrassCoreIPCClientV2(client=connect(ipc_socket=info["domain_socket_path"],
                                                            authtoken=info["cli_auth_token"], timeout=10.0))
        except (OSError, ValueError, KeyError):
            continue
        except Exception as exc:  # noqa: BLE001 - the SDK's connection errors
            _fail(f"cannot connect to the nucleus at {root}: {type(exc).__name__}: {exc}")
    _fail(f"no nucleus IPC info under {info_dir} (is `windfleet device run --root {root}` running?)")


def _ipc(call):
    try:
        return call()
    except click.ClickException:
        raise
    except Exception as exc:  # noqa: BLE001 - modelled IPC errors: one line, as greengrass-cli prints
        _fail(f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}")


@device.group("deployment")
def deployment_group() -> None:
    """Local deployments (greengrass-cli deployment ...)."""


@deployment_group.command("create")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="The nucleus root.")
@click.option("--recipeDir", "-r", "recipe_dir", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--artifactDir", "-a", "artifact_dir", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--merge", "-m", "merge", multiple=True, help="Name=Version to add or update.")
@click.option("--remove", "remove", multiple=True, help="Component to remove.")
@click.option("--update-config", "-c", "update_config", default=None,
              help='JSON {"Name": {"MERGE": {...}, "RESET": ["/ptr"]}}.')
@click.option("--groupId", "-g", "group", default=None)
@click.option("--failure-handling-policy", default=None, type=click.Choice(["ROLLBACK", "DO_NOTHING"]))
def deployment_create(root: str, recipe_dir: str | None, artifact_dir: str | None, merge: tuple[str, ...],
                      remove: tuple[str, ...], update_config: str | None, group: str | None,
                      failure_handling_policy: str | None) -> None:
    """Submit a local deployment."""
    configuration = _update_config(update_config)
    components = _merge_pairs(merge)
    client = _cli_client(root)
    response = _ipc(lambda: client.create_local_deployment(
        group_name=group, root_component_versions_to_add=components or None,
        root_components_to_remove=list(remove) or None, component_to_configuration=configuration,
        recipe_directory_path=str(Path(recipe_dir).resolve()) if recipe_dir else None,
        artifacts_directory_path=str(Path(artifact_dir).resolve()) if artifact_dir else None,
        failure_handling_policy=failure_handling_policy))
    click.echo(f"Local deployment submitted! Deployment Id: {response.deployment_id}")


@deployment_group.command("status")
@click.option("--root", required=True, type=click.Path(file_okay=False))
@click.option("--deploymentId", "-i", "deployment_id", required=True)
def deployment_status(root: str, deployment_id: str) -> None:
    """One local deployment's status."""
    d = _ipc(lambda: _cli_client(root).get_local_deployment_status(deployment_id=deployment_id)).deployment
    click.echo(f"{d.deployment_id}: {d.status}")
    click.echo(f"Created on: {d.created_on}")
    details = d.deployment_status_details
    if d.status == "FAILED" and details is not None:
        click.echo(f"Detailed Status: {details.detailed_deployment_status}")
        click.echo(f"Deployment Error Stack: {', '.join(details.deployment_error_stack or [])}")
        click.echo(f"Deployment Error Types: {', '.join(details.deployment_error_types or [])}")
        click.echo(f"Deployment Failure Cause: {details.deployment_failure_cause}")


@deployment_group.command("list")
@click.option("--root", required=True, type=click.Path(file_okay=False))
def deployment_list(root: str) -> None:
    """Every local deployment."""
    deployments = _ipc(lambda: _cli_client(root).list_local_deployments()).local_deployments or []
    click.echo("\n\n".join(f"Deployment ID: {d.deployment_id}\nCreated on: {d.created_on}\nStatus: {d.status}"
                            for d in deployments))


@device.group("component")
def component_group() -> None:
    """Components on a running nucleus (greengrass-cli component ...)."""


def _component_block(c) -> str:
    return (f"Component Name: {c.component_name}\n    Version: {c.version}\n    State: {c.state}\n"
            f"    Configuration: {json.dumps(c.configuration or {}, sort_keys=True)}")


@component_group.command("list")
@click.option("--root", required=True, type=click.Path(file_okay=False))
def component_list(root: str) -> None:
    components = _ipc(lambda: _cli_client(root).list_components()).components or []
    click.echo("Components currently running in Greengrass:")
    for c in components:
        click.echo(_component_block(c))


def _names(names: str) -> list[str]:
    out = [n.strip() for n in names.split(",") if n.strip()]
    if not out:
        _fail("--names: give at least one component name")
    return out


@component_group.command("details")
@click.option("--root", required=True, type=click.Path(file_okay=False))
@click.option("--name", "-n", "--names", "names", required=True)
def component_details(root: str, names: str) -> None:
    client = _cli_client(root)
    for name in _names(names):
        click.echo(_component_block(_ipc(lambda: client.get_component_details(component_name=name)).component_details))


@component_group.command("restart")
@click.option("--root", required=True, type=click.Path(file_okay=False))
@click.option("--names", "-n", "names", required=True, help="Comma-separated component names.")
def component_restart(root: str, names: str) -> None:
    _for_each(root, names, "restart_component")


@component_group.command("stop")
@click.option("--root", required=True, type=click.Path(file_okay=False))
@click.option("--names", "-n", "names", required=True, help="Comma-separated component names.")
def component_stop(root: str, names: str) -> None:
    _for_each(root, names, "stop_component")


def _for_each(root: str, names: str, operation: str) -> None:
    """greengrass-cli prints nothing for restart/stop; an error is one line and exit 1."""
    client = _cli_client(root)
    for name in _names(names):
        _ipc(lambda: getattr(client, operation)(component_name=name))


@click.group("fleet")
def fleet() -> None:
    """Many gateways on this machine."""


@fleet.command("run")
@click.option("--gateways", default=3, show_default=True, type=click.IntRange(1, 200))
@click.option("--turbines-per-gateway", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(min=1))
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Model package dir (default: the newest under $WINDFLEET_HOME/models).")
@click.option("--report", "report_path", required=True, type=click.Path(dir_okay=False))
@click.option("--broker", default="127.0.0.1:1883", show_default=True,
              help="Use the broker here if one runs (with --broker-data), else start one.")
@click.option("--broker-data", default=None, type=click.Path(file_okay=False))
@click.option("--work", "work_dir", default=None, type=click.Path(file_okay=False),
              help="Where gateways' roots and the build go (default: a new temporary dir).")
@click.option("--anomaly-every", default=20.0, show_default=True, type=float,
              help="Mean seconds between injected anomaly episodes per turbine.")
@click.option("--sample-rate", default=20.0, show_default=True, type=float)
def fleet_run(gateways: int, turbines_per_gateway: int, duration: float, model_dir: str | None,
              report_path: str, broker: str, broker_data: str | None, work_dir: str | None,
              anomaly_every: float, sample_rate: float) -> None:
    """Run N gateways with the four components for S seconds and write a JSON report."""
    from windfleet import jsonlog
    from windfleet.nucleus.fleet import FleetError, run_fleet

    _hostport(broker, "--broker", allow_any_port=True)
    if not Path(report_path).resolve().parent.is_dir():
        _fail(f"--report {report_path}: its directory does not exist")
    if broker_data and not Path(broker_data).is_dir():
        _fail(f"--broker-data {broker_data}: no such directory")
    jsonlog.setup("windfleet.fleet", stream=sys.stderr)
    try:
        report = run_fleet(gateways=gateways, turbines_per_gateway=turbines_per_gateway, duration=duration,
                           model_dir=model_dir, report_path=report_path, broker=broker, broker_data=broker_data,
                           work_dir=work_dir, anomaly_every=anomaly_every, sample_rate=sample_rate)
    except FleetError as exc:
        _fail(str(exc))
    click.echo(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))


def register(group: click.Group) -> None:
    group.add_command(build_cmd)
    group.add_command(broker_cmd)
    group.add_command(device)
    group.add_command(fleet)
