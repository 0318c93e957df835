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
    raise click.ClickException(msg)


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
        out[name] = version
    return out


@device.command("run")
@click.option("--thing", required=True, help="The core device's thing name.")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Runtime root (like /greengrass/v2).")
@click.option("--broker", default=None, envvar="WINDFLEET_BROKER", help="Local MQTT broker host:port.")
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

    jsonlog.setup("windfleet.nucleus", stream=sys.stderr)
    if recipe_dir and home:
        _fail("use either --recipe-dir (local deployment) or --home (deployment service), not both")
    try:
        if recipe_dir:
            if not merge:
                _fail("--recipe-dir needs at least one --merge Name=Version")
            try:
                updates = json.loads(update_config) if update_config else {}
            except ValueError as exc:
                _fail(f"--update-config is not JSON: {exc}")
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
    runtime = DeviceRuntime(thing, root, source, broker=broker, broker_user=broker_user,
                            broker_password=broker_password, cloud_broker=cloud_broker,
                            thing_groups=list(thing_groups), settings=Settings(poll_interval=poll_interval))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    runtime.run(stop)


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
