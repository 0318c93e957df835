"""The bus edge components use (see :mod:`.base`), and :func:`connect` to open it.

    from windfleet.components.bus import connect
    bus = connect("com.windfleet.LogForwarder")
    bus.subscribe(topics.scores(tid), handler)

There is one transport on the device: Greengrass IPC, whether the component
runs under the real nucleus or windfleet's local one (``windfleet device run``).
Both set ``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and ``SVCUID``.
"""

from __future__ import annotations

import os
from typing import Any

from .base import Bus

IPC_ENV = ("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "SVCUID")


class NotUnderNucleus(RuntimeError):
    """The process was not started by a Greengrass nucleus (no IPC environment)."""


def connect(component_name: str, client: Any = None, forward_logs: bool = True, **overrides: Any) -> Bus:
    """The bus for ``component_name`` over ``client`` (default: a ``GreengrassCoreIPCClientV2``
    connected with the nucleus' environment).  ``overrides`` go to :class:`~.ipc.IpcBus`.

    With ``forward_logs`` the process' warnings and errors also go to ``topics.logs(thing)``
    (:class:`~.logs.BusLogHandler`), where the LogForwarder picks them up for the cloud.
    """
    from .ipc import IpcBus

    if client is None:
        missing = [k for k in IPC_ENV if not os.environ.get(k)]
        if missing:
            raise NotUnderNucleus(f"{component_name} must run under a Greengrass nucleus (real, or "
                                  f"`windfleet device run`): {', '.join(missing)} not set")
        from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
        # executor=None: stream events run on the connection's thread, in arrival order
        # (the default thread pool could hand two readings of one turbine to two threads).
        client = GreengrassCoreIPCClientV2(executor=None)
    bus = IpcBus(component_name, client, **overrides)
    if forward_logs:
        import logging

        from .logs import BusLogHandler
        handler = BusLogHandler(bus)
        logging.getLogger().addHandler(handler)
        bus.on_close(lambda: logging.getLogger().removeHandler(handler))
    return bus


__all__ = ["Bus", "NotUnderNucleus", "connect"]
