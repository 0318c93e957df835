"""The ``windfleet`` command line (click).

Each area registers its own commands so this file stays a table of contents:
``training`` (train, score), ``nucleus`` (build, broker, device, fleet),
``cloud`` (registry, deployments, cloud, publish, deploy, dashboard) and ``demo``.
"""

from __future__ import annotations

import importlib

import click

# module path -> it must define ``register(group: click.Group) -> None``
AREAS = (
    "windfleet.training.cli",
    "windfleet.nucleus.cli",
    "windfleet.cloud.cli",
    "windfleet.cloud.dashboard.cli",
    "windfleet.demo",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
