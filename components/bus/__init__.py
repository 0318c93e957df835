"""The bus edge components use (see :mod:`.base`), and :func:`connect` to pick a transport.

    from windfleet.components.bus import connect
    bus = connect("com.windfleet.LogForwarder")
    bus.subscribe(topics.scores(tid), handler)
"""

from __future__ import annotations

import os
from typing import Any

from .base import Bus

IPC_ENV = ("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "SVCUID")


def connect(component_name: str, **overrides: Any) -> Bus:
    """The bus for ``component_name``.

    Greengrass IPC when the nucleus environment is present (both of ``IPC_ENV``),
    else MQTT configured from the environment the local runtime sets:
    ``WINDFLEET_THING``, ``WINDFLEET_BROKER`` (host:port), ``WINDFLEET_BROKER_USER``,
    ``WINDFLEET_BROKER_PASSWORD``, ``WINDFLEET_CLOUD_BROKER`` (host:port, default: the
    local broker), ``WINDFLEET_CLOUD_BROKER_USER``/``_PASSWORD`` (default: the device
    account), ``WINDFLEET_CONFIG_FILE``.

    ``overrides`` are keyword arguments of :class:`~.mqtt.MqttBus` (``thing``, ``broker``,
    ``user``, ...) or, with ``transport="ipc"``, ``client`` (an IPC client) and ``thing``.
    """
    env = os.environ
    transport = overrides.pop("transport", None)
    if transport is None:
        transport = "ipc" if all(env.get(k) for k in IPC_ENV) else "mqtt"
    if transport == "ipc":
        from .ipc import IpcBus
        client = overrides.pop("client", None)
        if client is None:
            from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
            client = GreengrassCoreIPCClientV2()
        return IpcBus(component_name, client, **overrides)
    if transport != "mqtt":
        raise ValueError(f"unknown transport {transport!r} (mqtt or ipc)")

    from .mqtt import MqttBus
    settings: dict[str, Any] = {
        "thing": env.get("WINDFLEET_THING") or env.get("AWS_IOT_THING_NAME"),
        "broker": env.get("WINDFLEET_BROKER", "127.0.0.1:1883"),
        "user": env.get("WINDFLEET_BROKER_USER"),
        "password": env.get("WINDFLEET_BROKER_PASSWORD"),
        "cloud_broker": env.get("WINDFLEET_CLOUD_BROKER") or None,
        "cloud_user": env.get("WINDFLEET_CLOUD_BROKER_USER") or None,
        "cloud_password": env.get("WINDFLEET_CLOUD_BROKER_PASSWORD") or None,
        "config_file": env.get("WINDFLEET_CONFIG_FILE") or None,
    }
    settings.update(overrides)
    if not settings["thing"]:
        raise ValueError("no thing name: set WINDFLEET_THING (or pass thing=...)")
    return MqttBus(component_name, **settings)


__all__ = ["Bus", "connect"]
