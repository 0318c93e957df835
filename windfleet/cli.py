"""The ``windfleet`` command line (click).

Each area registers its own commands so this file stays a table of contents:
``training`` (train, score), ``nucleus`` (build, broker, device, fleet),
``cloud`` (registry, deployments, cloud, publish, deploy, dashboard) and ``demo``.
"""

from __future__ import annotations

import importlib
import os

import click

# module path -> it must define ``register(group: click.Group) -> None``
AREAS = (
    "windfleet.training.cli",
    "windfleet.training.sagemaker_cli",  # pipeline
    "windfleet.nucleus.cli",
    "windfleet.cloud.cli",
    "windfleet.cloud.canary_cli",
    "windfleet.cloud.dashboard.cli",
    "windfleet.demo",
)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


class OneLineErrors(click.Group):
    """Every error is one line on stderr and a non-zero exit, never a traceback.

    Click's usage errors (several lines: usage, hint, error) and anything a command
    did not expect become ``Error: <one line>``; ``WINDFLEET_DEBUG=1`` re-raises the
    unexpected ones with their traceback.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise click.ClickException(one_line(f"{exc.format_message()} (see '{path} --help')")) from None
        except click.ClickException as exc:
            if "\n" in exc.format_message():
                exc.message = one_line(exc.format_message())
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place nothing may escape as a traceback
            if os.environ.get("WINDFLEET_DEBUG"):
                raise
            raise click.ClickException(one_line(f"{type(exc).__name__}: {exc}")) from None


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="windfleet")
def main() -> None:
    """windfleet: edge-ML fleet manager for wind turbines (AWS IoT Greengrass v2)."""


for _area in AREAS:
    try:
        _module = importlib.import_module(_area)
    except ModuleNotFoundError as exc:  # an area not built yet; never hide a real import bug
        if exc.name != _area and not _area.startswith(str(exc.name)):
            raise
        continue
    _module.register(main)


if __name__ == "__main__":
    main()
