"""The local Greengrass nucleus: what the nucleus does, for one gateway, and many of them.

``eventstream`` (IPC framing), ``ipc`` (the IPC server and local pub/sub),
``operations`` (the IPC operations), ``authorization`` (accessControl as the
nucleus reads it), ``iotcore`` (the device's one MQTT connection), ``recipe``
(manifests, variables, configuration), ``sources`` (where deployments come
from), ``deployments``, ``runtime`` (lifecycle; ties it together), ``fleet``
(many gateways on one machine), ``broker`` (Mosquitto as IoT Core) and ``cli``.
"""
