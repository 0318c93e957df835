"""``windfleet canary status|evaluate|promote|abort|configure`` (click).

The usual ``--backend local|aws``, ``--home``, ``--region``, ``--bucket``, ``--thing-group``
and ``--group`` options (:func:`windfleet.cloud.cli.backend_options`).  ``status`` prints JSON:
the canary, its configuration, the gates with their measured values, each canary device's
figures and the verdict; ``evaluate`` also acts on it (what the AWS schedule does).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import click

from . import canary
from .cli import _dump, backend_options
from .registry import DEFAULT_ACTOR, check_actor


def _canary_errors(f: Callable) -> Callable:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except canary.CanaryError as exc:
            raise click.ClickException(" ".join(str(exc).split())) from None

    return wrapper


_store_option = click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default=None,
                             help="local telemetry store [default: <home>/telemetry.sqlite]")


@click.group("canary")
def canary_group() -> None:
    """A new model proves itself on the canary gateways before the fleet gets it."""


@canary_group.command("status")
@backend_options
@_store_option
@_canary_errors
def status_cmd(backend, store: Path | None) -> None:
    """The running canary: gates, measured values per device, verdict (JSON)."""
    _dump(canary.status(backend, store=store))


@canary_group.command("evaluate")
@backend_options
@_store_option
@_canary_errors
def evaluate_cmd(backend, store: Path | None) -> None:
    """Evaluate the gates and promote or abort when the verdict says so (JSON)."""
    _dump(canary.step(backend, store=store))


def _decision(action: Callable) -> Callable:
    @backend_options
    @click.option("--reason", default="", help="why (recorded with the decision)")
    @click.option("--actor", default=DEFAULT_ACTOR, show_default=True, help="who decides")
    @_canary_errors
    def command(backend, reason: str, actor: str) -> None:
        check_actor(actor)
        _dump(action(backend, reason or f"{action.__name__} by {actor}", actor))

    return command


canary_group.command("promote", help="Promote the candidate to the whole fleet now.")(_decision(canary.promote))
canary_group.command("abort", help="Withdraw the candidate and reject its package now.")(_decision(canary.abort))


@canary_group.command("configure")
@backend_options
@click.option("--enable/--disable", "enabled", default=None, help="approval starts a canary (or goes straight "
                                                                    "to the fleet)")
@click.option("--devices", type=click.IntRange(min=1), default=None, help="canary size in gateways")
@click.option("--percent", type=click.FloatRange(min=0, max=100, min_open=True), default=None,
              help="canary size as a percentage of the fleet (overrides --devices)")
@click.option("--canary-thing-group", "thing_group_name", default=None,
              help="the canary thing group [default: <fleet group>-canary, which provisioning creates "
                   "and the Lambdas' roles cover]")
@click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE",
              help="any gate or window setting, e.g. min_seconds=600 (JSON value)")
@_canary_errors
def configure_cmd(backend, enabled: bool | None, devices: int | None, percent: float | None,
                  thing_group_name: str | None, pairs: tuple[str, ...]) -> None:
    """Store the model package group's canary settings; prints them all (JSON)."""
    updates: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--set")
        try:
            updates[key] = json.loads(value)
        except ValueError:
            updates[key] = value
    for key, value in (("enabled", enabled), ("devices", devices), ("percent", percent),
                       ("thing_group", thing_group_name)):
        if value is not None:
            updates[key] = value
    _dump(canary.save_config(backend, updates))


def register(group: click.Group) -> None:
    """Attach ``windfleet canary`` to the ``windfleet`` group."""
    group.add_command(canary_group)
