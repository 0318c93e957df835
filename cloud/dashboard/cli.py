"""``windfleet dashboard`` and ``windfleet ingest``.

``dashboard`` serves the operator pages on loopback; when a local broker is
running (``--broker-dir``, default ``<home>/broker``) or ``--broker HOST:PORT``
is given, it also runs the ingest service in the same process, so one command
shows a live fleet.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

import click

from windfleet import jsonlog
from windfleet.cloud.ingest import IngestService, TelemetryStore


def default_home() -> Path:
    return Path(os.environ.get("WINDFLEET_HOME", "~/.windfleet")).expanduser()


def local_cloud(home: Path) -> tuple[Any, Any]:
    """``(registry, greengrass)`` of the local backend rooted at ``home``; ``(None, None)``
    for the parts that are not available (the pages then say so)."""
    registry = greengrass = None
    try:
        from windfleet.cloud.backends import Backend  # CLOUD helper's API
    except ImportError:
        return None, None
    backend = Backend.local(home)
    greengrass = getattr(backend, "greengrassv2", None)
    try:
        from windfleet.cloud.registry import Registry

        registry = Registry(backend)
    except ImportError:
        registry = None
    return registry, greengrass


def parse_broker(broker: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` = 127.0.0.1) or a one-line ``click.ClickException``."""
    from windfleet.hostport import check_hostport

    try:
        return check_hostport(broker, require_port=True)
    except ValueError as exc:
        raise click.ClickException(f"--broker: {exc}") from None


def _broker_target(broker: str | None, broker_dir: Path | None) -> tuple[str, int, str | None, str | None] | None:
    if broker:
        host, port = parse_broker(broker)
        return (host, port, os.environ.get("WINDFLEET_BROKER_USER"), os.environ.get("WINDFLEET_BROKER_PASSWORD"))
    if broker_dir and broker_dir.is_dir():
        try:
            from windfleet.nucleus.broker import Broker
        except ImportError:
            return None
        running = Broker.attach(broker_dir)
        if running is not None:
            user, password = running.cloud_credentials()
            return running.host, running.port, user, password
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """Bind the dashboard's socket before anything is created, so a bad --host or a
    busy --port is a one-line error that leaves no files."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise click.ClickException(f"cannot resolve --host {host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _first_missing(path: Path) -> Path | None:
    """The outermost ancestor of ``path`` (or itself) that does not exist yet."""
    missing = None
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


def _remove_new(paths: list[Path]) -> None:
    """Undo what a refused start created (files that did not exist before it)."""
    for p in paths:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        except OSError:
            pass


def load_tokens(path: Path) -> dict[str, str]:
    """A tokens file: a JSON object ``{"<actor name>": "<token>", ...}``, readable by its owner
    only (like an SSH key); one-line ``click.ClickException`` otherwise."""
    from windfleet.cloud.registry import check_actor

    try:
        mode = path.stat().st_mode
        data = json.loads(path.read_text())
    except OSError as exc:
        raise click.ClickException(f"cannot read --tokens-file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise click.ClickException(f"--tokens-file {path} is not JSON: {exc}") from None
    if mode & 0o077:
        raise click.ClickException(f"--tokens-file {path} is readable by others: chmod 600 {path}")
    if not isinstance(data, dict) or not data:
        raise click.ClickException(f'--tokens-file {path} must be a JSON object {{"<name>": "<token>", ...}}')
    for name, token in data.items():
        try:
            check_actor(name)
        except ValueError as exc:
            raise click.ClickException(f"--tokens-file {path}: {exc}") from None
        if not isinstance(token, str) or len(token) < 16 or any(c.isspace() for c in token):
            raise click.ClickException(f"--tokens-file {path}: the token of {name!r} must be a string of at least "
                                       "16 characters without spaces")
    if len(set(data.values())) != len(data):
        raise click.ClickException(f"--tokens-file {path}: two names share a token")
    return data


def register(group: click.Group) -> None:
    @group.command("dashboard")
    @click.option("--port", "-p", default=8050, show_default=True, type=click.IntRange(0, 65535))
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to bind; anything but loopback requires the token for every request.")
    @click.option("--home", type=click.Path(path_type=Path), default=None,
                  help="Local backend store (registry, deployments); default $WINDFLEET_HOME or ~/.windfleet.")
    @click.option("--store", type=click.Path(path_type=Path), default=None,
                  help="Telemetry SQLite file; default <home>/telemetry.sqlite.")
    @click.option("--broker", default=None, help="HOST:PORT to ingest telemetry from (credentials from "
                  "WINDFLEET_BROKER_USER/WINDFLEET_BROKER_PASSWORD).")
    @click.option("--broker-dir", type=click.Path(path_type=Path), default=None,
                  help="Directory of a running local broker (default <home>/broker); its cloud account is used.")
    @click.option("--no-ingest", is_flag=True, help="Serve the store only; do not subscribe to telemetry.")
    @click.option("--token", envvar="WINDFLEET_DASHBOARD_TOKEN", default=None,
                  help="Token for approve/reject (default: random, printed at start).")
    @click.option("--token-name", envvar="WINDFLEET_DASHBOARD_TOKEN_NAME", default=None, metavar="NAME",
                  help="Who --token belongs to: recorded as the actor of its approvals and rejections "
                       "[default: the login name].")
    @click.option("--tokens-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
                  help='JSON {"<name>": "<token>", ...} (mode 600): one token per engineer, each decision '
                       "recorded under its token's name.")
    def dashboard(port: int, host: str, home: Path | None, store: Path | None, broker: str | None,
                  broker_dir: Path | None, no_ingest: bool, token: str | None, token_name: str | None,
                  tokens_file: Path | None) -> None:
        """Serve the operator dashboard (fleet, turbines, anomalies, registry).

        Reads need no token only from this machine with a localhost/127.0.0.1/[::1]
        Host; everything else needs the token; approve/reject always do, and record the
        token's name with the reason and the time."""
        import uvicorn

        from windfleet.cloud.cli import default_actor
        from windfleet.cloud.dashboard.app import create_app
        from windfleet.cloud.registry import check_actor

        # everything that can be refused is refused before a file is created
        tokens = load_tokens(tokens_file) if tokens_file else None
        try:
            token_name = check_actor(token_name or default_actor())
        except ValueError as exc:
            raise click.ClickException(f"--token-name: {exc}") from None
        target_arg = parse_broker(broker) if broker else None
        sock = _listen(host, port)
        home = (home or default_home()).absolute()
        store_path = (store or home / "telemetry.sqlite").absolute()
        created = [p for p in {_first_missing(store_path), _first_missing(home)} if p is not None]
        created += [Path(f"{store_path}{suffix}") for suffix in ("-wal", "-shm", "-journal")
                    if not Path(f"{store_path}{suffix}").exists()]
        telemetry = None
        try:
            try:
                telemetry = TelemetryStore(store_path)
            except (OSError, sqlite3.Error) as exc:
                raise click.ClickException(f"cannot open the telemetry store {store_path}: "
                                           f"{getattr(exc, 'strerror', None) or exc}") from None
            try:
                registry, greengrass = local_cloud(home)
            except OSError as exc:
                raise click.ClickException(f"cannot open the local backend in {home}: "
                                           f"{exc.strerror or exc}") from None
            target = None if no_ingest else (
                (*target_arg, os.environ.get("WINDFLEET_BROKER_USER"), os.environ.get("WINDFLEET_BROKER_PASSWORD"))
                if target_arg else _broker_target(None, broker_dir or home / "broker"))
        except BaseException:
            sock.close()
            if telemetry is not None:
                telemetry.close()
            _remove_new(created)
            raise
        log = jsonlog.setup("windfleet.dashboard")
        loopback = _is_loopback(host)
        app = create_app(telemetry, registry=registry, greengrass=greengrass, token=token,
                         token_name=token_name, tokens=tokens)
        service = None
        if target:
            service = IngestService(telemetry, *target, client_id=f"windfleet-dashboard-ingest").start(
                wait_connected=None)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        started = threading.Event()

        def announce() -> None:
            started.wait()
            bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
            click.echo(f"windfleet dashboard: http://{host if ':' not in host else f'[{host}]'}:{bound}/")
            if tokens and not token:
                click.echo(f"tokens (approve/reject): {len(tokens)} from {tokens_file} ({', '.join(tokens)})")
            else:
                click.echo(f"token (approve/reject): {app.state.token}")
                click.echo(f"decisions with it are recorded as: {token_name}")
            jsonlog.event(log, "dashboard started", host=host, port=bound, store=str(telemetry.path),
                          ingest=f"{target[0]}:{target[1]}" if target else None,
                          registry=registry is not None, deployments=greengrass is not None)

        if not loopback:
            click.echo(f"warning: bound to {host}; requests from other machines need the token "
                       "(plain HTTP: put TLS in front, or use an SSH tunnel)", err=True)

        original_startup = server.startup

        async def startup(sockets=None):  # announce once the port is really bound
            await original_startup(sockets=sockets)
            started.set()

        server.startup = startup
        threading.Thread(target=announce, daemon=True).start()
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
            if service:
                service.stop()
            telemetry.close()

    @group.command("ingest")
    @click.option("--home", type=click.Path(path_type=Path), default=None)
    @click.option("--store", type=click.Path(path_type=Path), default=None,
                  help="Telemetry SQLite file; default <home>/telemetry.sqlite.")
    @click.option("--broker", default=None, help="HOST:PORT (credentials from WINDFLEET_BROKER_USER/PASSWORD).")
    @click.option("--broker-dir", type=click.Path(path_type=Path), default=None,
                  help="Directory of a running local broker (default <home>/broker).")
    @click.option("--max-age-days", default=7.0, show_default=True, type=click.FloatRange(min=0.001))
    @click.option("--max-score-rows", default=5_000_000, show_default=True, type=click.IntRange(min=1000))
    def ingest(home: Path | None, store: Path | None, broker: str | None, broker_dir: Path | None,
               max_age_days: float, max_score_rows: int) -> None:
        """Store fleet telemetry from the broker in SQLite (the dashboard's data)."""
        from windfleet.cloud.ingest import run_ingest

        jsonlog.setup("windfleet.ingest")
        home = home or default_home()
        target = _broker_target(broker, broker_dir or home / "broker")
        if target is None:
            raise click.ClickException("no broker: pass --broker HOST:PORT or start the local broker")
        run_ingest(*target, store or home / "telemetry.sqlite", max_age_s=max_age_days * 86400,
                   max_score_rows=max_score_rows)
