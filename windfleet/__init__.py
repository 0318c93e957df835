"""windfleet: an edge-ML fleet manager for wind turbines on AWS IoT Greengrass v2.

The package is assembled from the project's top-level folders (see pyproject.toml):

- ``windfleet`` (this folder): contracts and libraries shared by every side --
  topics, payloads, the model contract, the turbine simulation and preprocessing.
- ``windfleet.components``: what runs on the device (one package per component + the bus).
- ``windfleet.cloud``: what runs in the account (registry, deployer, ingest, dashboard).
- ``windfleet.training``: what runs on the data scientist's machine.
"""

__version__ = "0.1.0"
