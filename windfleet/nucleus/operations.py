"""The IPC operations the nucleus answers (all but local pub/sub, which :mod:`.ipc` routes).

:class:`IpcOperations` is mixed into :class:`~.runtime.DeviceRuntime`: each
``op_<Name>(component, request, stream)`` returns the response body or raises
:class:`~.ipc.IpcError` with the error the Java nucleus gives in the same case
(``ConfigStoreIPCEventStreamAgent``, ``LifecycleIPCEventStreamAgent``,
``MqttProxyIPCAgent``, and aws-greengrass-cli's ``CLIEventStreamAgent``).
Authorization is checked where the nucleus checks it: pub/sub, the MQTT proxy
and the CLI operations; configuration, state and component updates are not
authorized (developer guide, "Authorize components to perform IPC operations").
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import logging
import time
import uuid
from typing import Any

from windfleet import jsonlog

from . import authorization as authz
from .ipc import CLI_CLIENT, IpcError, Stream

log = logging.getLogger("windfleet.nucleus.ipc")

# Components whose CLI operations need no policy (the CLI itself, with its token).
_CLI_OPERATIONS = {"GetComponentDetails", "ListComponents", "RestartComponent", "StopComponent",
                   "CreateLocalDeployment", "GetLocalDeploymentStatus", "ListLocalDeployments",
                   "CancelLocalDeployment"}


def _created_on(ts: float) -> str:
    """greengrass-cli's createdOn format: ``dd-MM-uuuu HH:mm:ss z``."""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%d-%m-%Y %H:%M:%S UTC")


def _lookup(config: Any, path: list[str]) -> Any:
    node = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise IpcError("ResourceNotFoundError", "Key not found")
        node = node[key]
    return node


class IpcOperations:
    """IPC operations over the runtime's state; needs ``self.ipc`` (an IpcServer) and the runtime's members."""

    # ------------------------------------------------------------ dispatch
    def ipc_call(self, component: str, operation: str, request: dict, stream: Stream | None) -> dict:
        handler = getattr(self, f"op_{operation}", None)
        if handler is None:
            raise IpcError("ServiceError", f"{operation} is not supported by the windfleet local nucleus")
        if operation in _CLI_OPERATIONS and component != CLI_CLIENT:
            resource = request.get("componentName") or "*"
            self.ipc.authorize(component, authz.CLI, operation, resource)
        return handler(component, request, stream)

    # ------------------------------------------------------------ IoT Core
    def op_PublishToIoTCore(self, component: str, request: dict, stream: Stream | None) -> dict:
        topic = request.get("topicName")
        if not topic:
            raise IpcError("InvalidArgumentsError", "Topic is required")
        if request.get("payload") is None:
            raise IpcError("InvalidArgumentsError", "Payload is required")
        qos = str(request.get("qos")) if request.get("qos") is not None else None
        if qos is None:
            raise IpcError("InvalidArgumentsError", "QoS is required")
        if qos not in ("0", "1"):
            raise IpcError("InvalidArgumentsError", f"Invalid QoS value: {qos}")
        self.ipc.authorize(component, authz.MQTTPROXY, "PublishToIoTCore", topic)
        problem = authz.check_publish_topic(topic, iot_core=True)
        if problem:
            raise IpcError("ServiceError", f"Publish to topic {topic} failed: {problem}")
        try:
            payload = base64.b64decode(request["payload"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise IpcError("InvalidArgumentsError", "payload is not base64") from None
        iot = self.iot
        if iot is None:
            raise IpcError("ServiceError", f"Publish to topic {topic} failed: Cannot publish because device is "
                                           "configured to run offline")
        from .iotcore import SpoolFull
        try:
            iot.publish(topic, payload, int(qos))
        except SpoolFull as exc:
            raise IpcError("ServiceError", f"Publish to topic {topic} failed: {exc}") from None
        return {}

    def op_SubscribeToIoTCore(self, component: str, request: dict, stream: Stream | None) -> dict:
        topic = request.get("topicName")
        if not topic:
            raise IpcError("InvalidArgumentsError", "Topic is required")
        self.ipc.authorize(component, authz.MQTTPROXY, "SubscribeToIoTCore", topic)
        if self.iot is None:
            raise IpcError("ServiceError", f"Subscribe to topic {topic} failed: the device runs offline")

        def on_message(msg_topic: str, payload: bytes) -> None:
            stream.send({"message": {"topicName": msg_topic, "payload": base64.b64encode(payload).decode()}})
        stream.on_close.append(self.iot.subscribe(topic, int(request.get("qos") or 0), on_message))
        return {}

    # ------------------------------------------------------------ configuration
    # State, health and configuration reads take no runtime lock: the runtime holds it while it
    # stops components, and a component reporting its state on the way out must not wait for that.
    def _config_of(self, name: str) -> dict:
        configuration = self.configuration  # replaced whole by a deployment, never edited in place by one
        if name not in configuration and name not in self.components:
            raise IpcError("ResourceNotFoundError", "Key not found")
        return copy.deepcopy(configuration.get(name, {}))

    def op_GetConfiguration(self, component: str, request: dict, stream: Stream | None) -> dict:
        name = request.get("componentName") or component
        path = request.get("keyPath") or []
        value = _lookup(self._config_of(name), path)
        if not isinstance(value, dict):
            value = {path[-1]: value}  # a leaf comes back as {leafKey: value}
        return {"componentName": name, "value": value}

    def op_UpdateConfiguration(self, component: str, request: dict, stream: Stream | None) -> dict:
        if request.get("timestamp") is None:
            raise IpcError("InvalidArgumentsError", "Timestamp is required")
        if request.get("valueToMerge") is None:
            raise IpcError("InvalidArgumentsError", "ValueToMerge is required")
        path = list(request.get("keyPath") or [])
        value = request["valueToMerge"]
        if (path and path[0] == "accessControl") or (not path and isinstance(value, dict) and "accessControl" in value):
            raise IpcError("InvalidArgumentsError", "Config update is not allowed for following field [accessControl]")
        timestamp = float(request["timestamp"])
        with self._lock:
            if timestamp < self.config_modified.get(component, 0.0):
                raise IpcError("FailedUpdateConditionCheckError",
                               "Proposed timestamp is older than the config's latest modified timestamp")
            config = self.configuration.setdefault(component, {})
            node = config
            for key in path[:-1] if not isinstance(value, dict) else path:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise IpcError("InvalidArgumentsError", f"{key} is not a container")
            if isinstance(value, dict):
                _deep_merge(node, value)
            else:
                if not path:
                    raise IpcError("InvalidArgumentsError", "ValueToMerge must be an object at the root")
                node[path[-1]] = value
            self.config_modified[component] = timestamp
            self._config_changed(component, [path] if path else [[k] for k in value])
        return {}

    def op_SubscribeToConfigurationUpdate(self, component: str, request: dict, stream: Stream | None) -> dict:
        name = request.get("componentName") or component
        self._config_of(name)  # ResourceNotFoundError for an unknown component, as the nucleus
        path = list(request.get("keyPath") or [])
        entry = (name, path, stream)
        with self._lock:
            self.config_watchers.append(entry)
        stream.on_close.append(lambda: self._unwatch(entry))
        return {}

    def _unwatch(self, entry: tuple) -> None:
        with self._lock:
            if entry in self.config_watchers:
                self.config_watchers.remove(entry)

    def _config_changed(self, name: str, paths: list[list[str]]) -> None:
        """Tell configuration subscribers of ``name`` which key paths changed."""
        with self._lock:
            watchers = [(p, s) for n, p, s in self.config_watchers if n == name]
        for path in paths:
            for prefix, stream in watchers:
                if path[:len(prefix)] == prefix or prefix[:len(path)] == path:
                    stream.send({"configurationUpdateEvent": {"componentName": name, "keyPath": path}})

    def op_SubscribeToValidateConfigurationUpdates(self, component: str, request: dict,
                                                   stream: Stream | None) -> dict:
        return {}

    def op_SendConfigurationValidityReport(self, component: str, request: dict, stream: Stream | None) -> dict:
        return {}

    # ------------------------------------------------------------ lifecycle
    def op_UpdateState(self, component: str, request: dict, stream: Stream | None) -> dict:
        state = request.get("state")
        if state not in ("RUNNING", "ERRORED"):
            raise IpcError("InvalidArgumentsError", f"Invalid state {state!r}")
        target = self.components.get(component)
        if target is None:
            raise IpcError("ResourceNotFoundError", f"Component {component} not found")
        self.report_state(target, state)
        return {}

    def op_SubscribeToComponentUpdates(self, component: str, request: dict, stream: Stream | None) -> dict:
        with self._lock:
            if component not in self.components:
                raise IpcError("ResourceNotFoundError", f"Component {component} not found")
            self.update_watchers.setdefault(component, []).append(stream)

        def unwatch() -> None:
            with self._lock:
                streams = self.update_watchers.get(component, [])
                if stream in streams:
                    streams.remove(stream)
                if not streams:
                    self.update_watchers.pop(component, None)
        stream.on_close.append(unwatch)
        return {}

    def op_DeferComponentUpdate(self, component: str, request: dict, stream: Stream | None) -> dict:
        if component not in self.update_watchers:
            raise IpcError("InvalidArgumentsError", "Component is not subscribed to component update events")
        deployment_id = request.get("deploymentId")
        if not deployment_id:
            raise IpcError("InvalidArgumentsError", "Deployment id is required")
        with self._lock:
            pending = self.pending_update
            if pending is None or pending["deploymentId"] != deployment_id or component in pending["replies"]:
                raise IpcError("ServiceError", "Time limit to respond to PreComponentUpdateEvent exceeded")
            pending["replies"][component] = int(request.get("recheckAfterMs") or 0)
            jsonlog.event(log, "component deferred the update", component=component, deployment=deployment_id,
                          recheck_ms=pending["replies"][component], message=request.get("message"))
        return {}

    # ------------------------------------------------------------ components (CLI operations)
    def _details(self, name: str) -> dict:
        c = self.components.get(name)
        if c is None:
            raise IpcError("ResourceNotFoundError", f"Component with name {name} not found in Greengrass")
        return {"componentName": name, "version": c.version, "state": c.state,
                "configuration": copy.deepcopy(self.configuration.get(name, {}))}

    def op_GetComponentDetails(self, component: str, request: dict, stream: Stream | None) -> dict:
        name = request.get("componentName")
        if not name:
            raise IpcError("InvalidArgumentsError", "Component name cannot be empty")
        with self._lock:
            return {"componentDetails": self._details(name)}

    def op_ListComponents(self, component: str, request: dict, stream: Stream | None) -> dict:
        with self._lock:
            return {"components": [self._details(n) for n in self.components]}

    def op_RestartComponent(self, component: str, request: dict, stream: Stream | None) -> dict:
        name = request.get("componentName")
        if not name:
            raise IpcError("InvalidArgumentsError", "Component name cannot be empty")
        with self._lock:
            self._details(name)
            ok = self.request_restart(name)
        return {"restartStatus": "SUCCEEDED" if ok else "FAILED"}

    def op_StopComponent(self, component: str, request: dict, stream: Stream | None) -> dict:
        name = request.get("componentName")
        if not name:
            raise IpcError("InvalidArgumentsError", "Component name cannot be empty")
        with self._lock:
            self._details(name)
            self.request_stop_component(name)
        return {"stopStatus": "SUCCEEDED"}

    # ------------------------------------------------------------ local deployments
    def op_CreateLocalDeployment(self, component: str, request: dict, stream: Stream | None) -> dict:
        group = request.get("groupName")
        if group and ":" in group:
            raise IpcError("InvalidArgumentsError", "Group name cannot contain ':'")
        policy = (request.get("failureHandlingPolicy") or "DO_NOTHING").upper()
        if policy not in ("ROLLBACK", "DO_NOTHING"):
            raise IpcError("InvalidArgumentsError", f"Invalid failure handling policy {policy}")
        deployment_id = str(uuid.uuid4())
        record = {"deploymentId": deployment_id, "status": "QUEUED", "createdOn": _created_on(time.time()),
                  "request": request, "failureHandlingPolicy": policy}
        with self._lock:
            self.local_deployments[deployment_id] = record
            self.local_queue.append(deployment_id)
        jsonlog.event(log, "local deployment queued", deployment=deployment_id,
                      add=request.get("rootComponentVersionsToAdd"), remove=request.get("rootComponentsToRemove"))
        return {"deploymentId": deployment_id}

    def _local_view(self, record: dict) -> dict:
        out = {"deploymentId": record["deploymentId"], "status": record["status"], "createdOn": record["createdOn"]}
        if record.get("reason") or record["status"] == "FAILED":
            out["deploymentStatusDetails"] = {
                "detailedDeploymentStatus": record.get("detailed", "FAILED_NO_STATE_CHANGE"),
                "deploymentErrorStack": [], "deploymentErrorTypes": [],
                "deploymentFailureCause": record.get("reason") or ""}
        return out

    def op_GetLocalDeploymentStatus(self, component: str, request: dict, stream: Stream | None) -> dict:
        deployment_id = request.get("deploymentId") or ""
        try:
            uuid.UUID(deployment_id)
        except ValueError:
            raise IpcError("InvalidArgumentsError", "Invalid deploymentId: must be a UUID") from None
        with self._lock:
            record = self.local_deployments.get(deployment_id)
            if record is None:
                raise IpcError("ResourceNotFoundError", "Cannot find deployment", resourceType="LocalDeployment",
                               resourceName=deployment_id)
            return {"deployment": self._local_view(record)}

    def op_ListLocalDeployments(self, component: str, request: dict, stream: Stream | None) -> dict:
        with self._lock:
            return {"localDeployments": [
                {k: v for k, v in self._local_view(r).items() if k != "deploymentStatusDetails"}
                for r in self.local_deployments.values()]}


def _deep_merge(into: dict, value: dict) -> None:
    for key, item in value.items():
        if isinstance(item, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], item)
        else:
            into[key] = copy.deepcopy(item)


__all__ = ["IpcOperations"]
