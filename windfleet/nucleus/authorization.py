"""IPC authorization as the Greengrass nucleus does it, ported from aws-greengrass-nucleus.

Sources (``src/main/java/com/aws/greengrass/``): ``authorization/AuthorizationHandler``,
``AuthorizationModule``, ``WildcardTrie``, ``AuthorizationPolicyParser``; callers
``builtin/services/pubsub/PubSubIPCEventStreamAgent`` (+ ``SubscriptionTrie``) and
``builtin/services/mqttproxy/MqttProxyIPCAgent``; ``{iot:thingName}`` from
``componentmanager/KernelConfigResolver``.  Developer guide: "Authorize components to perform
IPC operations" (wildcards, escapes) and "Greengrass nucleus configuration"
(``interpolateComponentConfiguration``).

Guarantees:

* Resource matching is a line-by-line port of ``WildcardTrie`` (quirks included), so a policy
  allows here exactly what it allows on a nucleus.  Pub/sub and every service except mqttproxy
  use its STANDARD lookup: ``*`` is the only wildcard, anywhere in the string; ``${*}``,
  ``${?}``, ``${$}`` are literal ``*``, ``?``, ``$``; ``+`` and ``#`` are plain characters, so a
  SubscribeToTopic filter ``a/+`` is allowed by a policy resource ``a/+`` or ``a/*`` but not by
  ``a/b``.  mqttproxy uses the MQTT_STYLE lookup (``MqttProxyIPCAgent``): ``+`` and ``#`` in a
  policy are MQTT wildcards where used validly (whole level; ``#`` last), plus ``*``.
* A request is allowed iff a permission exists for (component or ``*``) x (operation or ``*``)
  whose resources match, and the operation is registered for the service
  (``AuthorizationHandler.isAuthorized``).  Unknown components have no permissions: denied.
* Loading never raises.  Policy shapes the nucleus would refuse are skipped at the same
  granularity as the nucleus (whole component, whole service, one policy or one resource),
  with the reason in :attr:`Authorizer.errors`.
* ``{iot:thingName}`` in ``accessControl`` is replaced by the thing name only when
  ``interpolate=True`` (nucleus 2.6.0+ option ``interpolateComponentConfiguration``);
  otherwise it stays literal text and matches only itself.

Known divergence: where the nucleus' ``matchingChildren`` HashMap lets two trie branches
overwrite each other (same remaining string), Java's hash order decides which is tried; this
port keeps the later one in insertion order.  It needs two policy resources that share a
wildcard prefix and diverge after it on overlapping text, and can only deny there.
"""

from __future__ import annotations

import json
import unicodedata

PUBSUB = "aws.greengrass.ipc.pubsub"
MQTTPROXY = "aws.greengrass.ipc.mqttproxy"
CLI = "aws.greengrass.Cli"              # AuthorizationHandler.CLI_SERVICE_NAME
SECRETS_MANAGER = "aws.greengrass.SecretManager"
SHADOW_MANAGER = "aws.greengrass.ShadowManager"
LIFECYCLE = "aws.greengrass.ipc.lifecycle"
COMPONENT_METRIC = "aws.greengrass.ipc.componentmetric"
CLIENT_DEVICE_AUTH = "aws.greengrass.clientdevices.Auth"
TOKEN_EXCHANGE = "aws.greengrass.TokenExchangeService"

ANY = "*"
PUBLISH_TO_TOPIC = "aws.greengrass#PublishToTopic"
SUBSCRIBE_TO_TOPIC = "aws.greengrass#SubscribeToTopic"
PUBLISH_TO_IOT_CORE = "aws.greengrass#PublishToIoTCore"
SUBSCRIBE_TO_IOT_CORE = "aws.greengrass#SubscribeToIoTCore"
TES_OPERATION = "getCredentials"        # TokenExchangeService.AUTHZ_TES_OPERATION

# MqttProxyIPCAgent answers every denial with this UnauthorizedError message (and logs the
# detailed text at INFO); PubSubIPCEventStreamAgent sends the detailed text to the client.
MQTTPROXY_UNAUTHORIZED_MESSAGE = "Not Authorized"


def _ops(*names: str) -> frozenset[str]:
    return frozenset(f"aws.greengrass#{n}" for n in names) | {ANY}


# Services and the operations registered for them in the AuthorizationHandler constructor;
# a service missing here cannot be authorized at all ("Component not registered").
SERVICE_OPERATIONS: dict[str, frozenset[str]] = {
    TOKEN_EXCHANGE: frozenset({TES_OPERATION}),
    PUBSUB: _ops("PublishToTopic", "SubscribeToTopic"),
    MQTTPROXY: _ops("PublishToIoTCore", "SubscribeToIoTCore"),
    SECRETS_MANAGER: _ops("GetSecretValue"),
    SHADOW_MANAGER: _ops("GetThingShadow", "UpdateThingShadow", "DeleteThingShadow",
                         "ListNamedShadowsForThing"),
    LIFECYCLE: _ops("PauseComponent", "ResumeComponent"),
    CLIENT_DEVICE_AUTH: _ops("SubscribeToCertificateUpdates", "VerifyClientDeviceIdentity",
                             "GetClientDeviceAuthToken", "AuthorizeClientDeviceAction"),
    CLI: _ops("GetComponentDetails", "ListComponents", "RestartComponent", "StopComponent",
              "CreateLocalDeployment", "GetLocalDeploymentStatus", "ListLocalDeployments",
              "CreateDebugPassword"),
    COMPONENT_METRIC: _ops("PutComponentMetric"),
}

# Only MqttProxyIPCAgent asks for ResourceLookupPolicy.MQTT_STYLE.
MQTT_STYLE_SERVICES = frozenset({MQTTPROXY})

THING_NAME_PLACEHOLDER = "{iot:thingName}"


def _is_empty(text: str | None) -> bool:
    """``Utils.isEmpty(String)``: null, or only Unicode space separators (not tabs/newlines)."""
    return text is None or all(unicodedata.category(c) in ("Zs", "Zl", "Zp") for c in text)


def _java_str(value: object) -> str:
    """How Jackson coerces a scalar into a String field."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- WildcardTrie ------------------------------------------------------------------------

_GLOB, _MULTI, _SINGLE, _SEP = "*", "#", "+", "/"


def _actual_char(text: str) -> str:
    """``WildcardTrie.getActualChar``: ``c`` if text starts with ``${c}``, else ``""``."""
    if len(text) >= 4 and text[0] == "$" and text[1] == "{" and text[3] == "}":
        return text[2]
    return ""


def _resource_error(resource: str | None) -> str | None:
    """``AuthorizationModule.validateResource``: why a policy resource is refused, if it is."""
    if resource is None:
        return None
    if _is_empty(resource):
        return "Resource cannot be empty"
    i, length = 0, len(resource)
    while i < length:
        char = resource[i]
        if char == "$" and i + 1 < length and resource[i + 1] == "{":
            actual = _actual_char(resource[i:])
            if not actual:
                return "Resource contains an invalid escape sequence. You can use ${*}, ${$}, or ${?}"
            if actual not in "*$?":
                return (f"Resource contains an invalid escape sequence: ${{{actual}}}. "
                        "You can use ${*}, ${$}, or ${?}")
            i += 3
        if char == "?":
            return ("Resource contains invalid character: '?'. Use an escape sequence: ${?}. "
                    "The '?' character isn't supported as a wildcard")
        i += 1
    return None


class _Trie:
    """One ``WildcardTrie`` node; the method bodies follow the Java statement by statement."""

    __slots__ = ("terminal", "terminal_level", "wildcard", "mqtt_wildcard", "match_all", "children")

    def __init__(self) -> None:
        self.terminal = self.terminal_level = self.wildcard = False
        self.mqtt_wildcard = self.match_all = False
        self.children: dict[str, _Trie] = {}

    def _child(self, key: str) -> _Trie:
        # DefaultConcurrentHashMap.get creates missing children.
        node = self.children.get(key)
        if node is None:
            node = self.children[key] = _Trie()
        return node

    def add(self, subject: str | None) -> None:
        if subject is None:
            return
        if subject == _GLOB:
            node = self._child(_GLOB)
            node.match_all = node.terminal = node.wildcard = True
            return
        if subject == _MULTI:
            node = self._child(_MULTI)
            node.match_all = node.terminal = node.mqtt_wildcard = True
            return
        if subject == _SINGLE:
            node = self._child(_SINGLE)
            node.terminal = node.mqtt_wildcard = True
            return
        if subject.startswith(_SINGLE + _SEP):
            node = self._child(_SINGLE)
            node.mqtt_wildcard = True
            node._add(subject[1:], True)
        self._add(subject, True)

    def _add(self, subject: str, is_terminal: bool) -> _Trie:
        if not subject:
            self.terminal |= is_terminal
            return self
        n = len(subject)
        current = self
        sb: list[str] = []
        i = 0
        while i < n:
            char = subject[i]
            # Wildcards get their own node; the literal text before them is re-added, which is
            # why an escape before a later wildcard is read again (a nucleus quirk, kept).
            if char == _GLOB:
                current = current._add("".join(sb), False)._child(_GLOB)
                current.wildcard = True
                if i == n - 1:
                    current.terminal = is_terminal
                    return current
                return current._add(subject[i + 1:], True)
            if char == _MULTI:
                terminal_level = current._add("".join(sb), False)
                current = terminal_level._child(_MULTI)
                if i == n - 1:
                    current.terminal = True
                    if i > 0 and subject[i - 1] == _SEP:
                        current.mqtt_wildcard = current.match_all = True
                        terminal_level.terminal_level = True
                    return current
                return current._add(subject[i + 1:], True)
            if char == _SINGLE:
                current = current._add("".join(sb), False)._child(_SINGLE)
                if i == n - 1:
                    current.terminal = True
                    if i > 0 and subject[i - 1] == _SEP:
                        current.mqtt_wildcard = True
                    return current
                if i > 0 and subject[i - 1] == _SEP and subject[i + 1] == _SEP:
                    current.mqtt_wildcard = True
                return current._add(subject[i + 1:], True)
            if char == "$":
                actual = _actual_char(subject[i:])
                if actual:
                    sb.append(actual)
                    i += 4
                    continue
            sb.append(char)
            i += 1
        current = current._child("".join(sb))
        current.terminal |= is_terminal
        return current

    def matches_standard(self, text: str | None) -> bool:
        if text is None:
            return True
        if (self.wildcard and self.terminal) or (self.terminal and not text):
            return True
        pending: dict[str, _Trie] = {}
        for key, value in self.children.items():
            if value.wildcard and key == _GLOB:
                if value.matches_standard(text):
                    return True
                continue
            if text.startswith(key) and value.matches_standard(text[len(key):]):
                return True
            if self.wildcard:
                # A wildcard may swallow any number of characters before the child's text.
                found = text.find(key)
                while found >= 0:
                    pending[text[found + len(key):]] = value
                    found = text.find(key, found + 1)
        if self.wildcard and pending:
            return any(node.matches_standard(rest) for rest, node in pending.items())
        return False

    def matches_mqtt(self, text: str | None) -> bool:
        if text is None:
            return True
        if (self.wildcard and self.terminal) or (self.terminal and not text):
            return True
        if self.mqtt_wildcard and (self.match_all or (self.terminal and _SEP not in text)):
            return True
        pending: dict[str, _Trie] = {}
        for key, value in self.children.items():
            if (value.wildcard and key == _GLOB) or (value.mqtt_wildcard and key in (_SINGLE, _MULTI)):
                if value.matches_mqtt(text):
                    return True
                continue
            if text.startswith(key) and value.matches_mqtt(text[len(key):]):
                return True
            # "abc/#" also matches "abc": compare without the level's trailing "/".
            terminal_key = key[:-1]
            if value.terminal_level:
                if text == terminal_key:
                    return True
                if text.endswith(terminal_key):
                    key = terminal_key
            if self.wildcard:
                found = text.find(key)
                while 0 <= found < len(text):
                    pending[text[found + len(key):]] = value
                    found = text.find(key, found + 1)
            if self.mqtt_wildcard:
                # "+" swallows characters, but never a "/".
                found = text.find(key)
                while 0 <= found < len(text) and _SEP not in text[:found]:
                    pending[text[found + len(key):]] = value
                    found = text.find(key, found + 1)
        if (self.wildcard or self.mqtt_wildcard) and pending:
            return any(node.matches_mqtt(rest) for rest, node in pending.items())
        return False


def resource_matches(resources: list[str], resource: str | None, mqtt_style: bool = False) -> bool:
    """Whether any policy resource allows ``resource`` (a fresh ``WildcardTrie`` of them).

    Resources are added as given: validate them first (the nucleus skips invalid ones)."""
    trie = _Trie()
    for pattern in resources:
        trie.add(pattern)
    return trie.matches_mqtt(resource) if mqtt_style else trie.matches_standard(resource)


# --- policies ------------------------------------------------------------------------------

class _Policy:
    __slots__ = ("policy_id", "operations", "resources")

    def __init__(self, policy_id: str, operations: list[str | None], resources: list[str] | None):
        self.policy_id, self.operations, self.resources = policy_id, operations, resources


_POLICY_FIELDS = ("policydescription", "operations", "resources")


def _interpolate(value: object, thing_name: str) -> object:
    """``KernelConfigResolver.interpolate`` restricted to ``{iot:thingName}``: string values
    anywhere in the tree, never map keys."""
    if isinstance(value, str):
        return value.replace(THING_NAME_PLACEHOLDER, thing_name)
    if isinstance(value, dict):
        return {k: _interpolate(v, thing_name) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, thing_name) for v in value]
    return value


def _string_set(value: object, what: str) -> list[str | None] | None:
    """Jackson ``Set<String>``: a list of scalars (coerced to text); None stays missing."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, not {type(value).__name__}")
    out: list[str | None] = []
    for item in value:
        if isinstance(item, (dict, list)):
            raise ValueError(f"{what} must hold strings, not {type(item).__name__}")
        text = None if item is None else _java_str(item)
        if text not in out:
            out.append(text)
    return out


def _parse_access_control(component: str, access_control: object) -> dict[str, list[_Policy]]:
    """``AuthorizationPolicyParser.parseAllPoliciesForComponent``: service -> policies.

    Any shape error drops the component's whole ``accessControl`` (Jackson fails the whole
    conversion), raised as ValueError.  Empty operations drop only that policy (in
    :meth:`Authorizer._rebuild`, as the nucleus does)."""
    if isinstance(access_control, str):
        # A leaf value is read as JSON ("be flexible and do best to understand customer intent").
        try:
            access_control = json.loads(access_control)
        except ValueError as exc:
            raise ValueError(f"accessControl is not valid JSON: {exc}") from None
    if not isinstance(access_control, dict):
        raise ValueError(f"accessControl must be a map, not {type(access_control).__name__}")
    parsed: dict[str, list[_Policy]] = {}
    for service, policies in access_control.items():
        # The nucleus throws a NullPointerException on a null service or policy map, which
        # aborts loading; refusing the component is the nearest harmless equivalent.
        if not isinstance(policies, dict):
            raise ValueError(f"{service}: policies must be a map of policy id to policy")
        out = parsed[str(service)] = []
        for policy_id, body in policies.items():
            if not isinstance(body, dict):
                raise ValueError(f"{service}.{policy_id}: policy must be a map")
            fields: dict[str, object] = {}
            for key, value in body.items():
                lowered = str(key).lower()   # ACCEPT_CASE_INSENSITIVE_PROPERTIES
                if lowered not in _POLICY_FIELDS:
                    raise ValueError(f"{service}.{policy_id}: unknown field {key!r}")
                if value is None:            # @NonNull setters reject an explicit null
                    raise ValueError(f"{service}.{policy_id}: {key} must not be null")
                fields[lowered] = value
            if isinstance(fields.get("policydescription"), (dict, list)):
                raise ValueError(f"{service}.{policy_id}: policyDescription must be a string")
            operations = _string_set(fields.get("operations"), f"{service}.{policy_id}.operations")
            resources = _string_set(fields.get("resources"), f"{service}.{policy_id}.resources")
            out.append(_Policy("" if policy_id is None else str(policy_id), operations or [], resources))
    return parsed


class Authorizer:
    """Policies of every deployed component, from each component's configuration key accessControl.

    Mirrors ``AuthorizationHandler``: policies from all components are merged per service and
    the whole table is rebuilt on every change (the nucleus reloads everything too).
    """

    def __init__(self, thing_name: str, interpolate: bool = False):
        self.thing_name = thing_name
        self.interpolate = interpolate
        self.errors: list[str] = []
        self._operations: dict[str, set[str]] = {s: set(ops) for s, ops in SERVICE_OPERATIONS.items()}
        self._policies: dict[str, dict[str, list[_Policy]]] = {}
        self._parse_errors: dict[str, str] = {}
        # service -> principal -> operation -> trie (AuthorizationModule.resourceAuthZCompleteMap)
        self._table: dict[str, dict[str, dict[str, _Trie]]] = {}
        self._rebuild()

    def register_service(self, service: str, operations: set[str] | frozenset[str]) -> None:
        """``AuthorizationHandler.registerComponent``: let a plugin service define operations."""
        self._operations.setdefault(service, set()).update(set(operations) | {ANY})
        self._rebuild()

    def set_component(self, component: str, configuration: dict | None) -> None:
        """(Re)load ``accessControl`` from one component's configuration; never raises."""
        self._policies.pop(component, None)
        self._parse_errors.pop(component, None)
        access_control = (configuration or {}).get("accessControl") if isinstance(configuration, dict) else None
        if access_control is not None:
            if self.interpolate:
                access_control = _interpolate(access_control, self.thing_name)
            try:
                self._policies[component] = _parse_access_control(component, access_control)
            except ValueError as exc:
                self._parse_errors[component] = (
                    f"{component}: unable to deserialize access control map, ignored: {exc}")
        self._rebuild()

    def remove_component(self, component: str) -> None:
        self._policies.pop(component, None)
        self._parse_errors.pop(component, None)
        self._rebuild()

    def _rebuild(self) -> None:
        errors = list(self._parse_errors.values())
        merged: dict[str, list[tuple[str, _Policy]]] = {}
        for component, services in self._policies.items():
            for service, policies in services.items():
                merged.setdefault(service, []).extend((component, p) for p in policies)
        # getDefaultPolicies() replaces whatever components declared for token exchange.
        merged[TOKEN_EXCHANGE] = [(ANY, _Policy("default", [TES_OPERATION], None))]

        table: dict[str, dict[str, dict[str, _Trie]]] = {}
        for service, entries in merged.items():
            if _is_empty(service) or service not in self._operations:
                errors.append(f"{service}: not a service that takes authorization policies; its policies are ignored")
                continue
            if any(_is_empty(policy.policy_id) for _, policy in entries):
                # One empty policy id anywhere voids the whole service's reload, for every
                # component, and the previous permissions stay (loadAuthorizationPolicies).
                errors.append(f"{service}: a policy has an empty policy id; previous permissions kept")
                if service in self._table:
                    table[service] = self._table[service]
                continue
            permissions = table[service] = {}
            for principal, policy in entries:
                if not policy.operations:
                    errors.append(f"{principal}: {service}.{policy.policy_id}: "
                                  "Policy operations are missing or invalid")
                    continue
                unknown = [op for op in policy.operations if op not in self._operations[service]]
                if unknown:
                    # The nucleus only logs this and still loads the policy.
                    errors.append(f"{principal}: {service}.{policy.policy_id}: operation(s) {unknown} "
                                  f"not registered with {service}")
                for operation in policy.operations:
                    if _is_empty(operation):
                        errors.append(f"{principal}: {service}.{policy.policy_id}: empty operation skipped")
                        continue
                    trie = permissions.setdefault(principal, {}).setdefault(operation, _Trie())
                    for resource in policy.resources or [None]:
                        reason = _resource_error(resource)
                        if reason:
                            errors.append(f"{principal}: {service}.{policy.policy_id}: "
                                          f"resource {resource!r} skipped: {reason}")
                            continue
                        trie.add(resource)
        self._table = table
        self.errors = errors

    def check(self, component: str, service: str, operation: str, resource: str | None) -> str | None:
        """None if allowed, else the ``AuthorizationException`` message the nucleus would raise."""
        if _is_empty(service):
            return f"Component name is not specified: {service}"
        if service not in self._operations:
            return f"Component not registered: {service}"
        if operation not in self._operations[service]:
            return f"Component {service} not registered for operation {operation}"
        if _is_empty(component) or _is_empty(operation):
            return "Invalid arguments"
        if resource is not None and _is_empty(resource):
            return "Resource cannot be empty"
        mqtt_style = service in MQTT_STYLE_SERVICES
        permissions = self._table.get(service, {})
        # Most specific first, as AuthorizationHandler.isAuthorized tries them.
        for principal, op in ((component, operation), (component, ANY), (ANY, operation), (ANY, ANY)):
            trie = permissions.get(principal, {}).get(op)
            if trie is not None and (trie.matches_mqtt(resource) if mqtt_style else trie.matches_standard(resource)):
                return None
        return self.denial_message(component, service, operation, resource)

    def is_authorized(self, component: str, service: str, operation: str, resource: str | None) -> bool:
        """``operation`` is the full name, e.g. ``aws.greengrass#PublishToTopic``."""
        return self.check(component, service, operation, resource) is None

    @staticmethod
    def denial_message(component: str, service: str, operation: str, resource: str | None) -> str:
        """The nucleus' text: pub/sub returns it as the UnauthorizedError message, mqttproxy
        logs it and returns :data:`MQTTPROXY_UNAUTHORIZED_MESSAGE`."""
        return (f"Principal {component} is not authorized to perform {service}:{operation} "
                f"on resource {'null' if resource is None else resource}")


# --- topics ------------------------------------------------------------------------------

def check_publish_topic(topic: str | None, iot_core: bool = False) -> str | None:
    """None if the topic passes the nucleus' publish checks, else its error message.

    Local (``PubSubIPCEventStreamAgent``): InvalidArgumentsError "Publish topic must not be
    null" / "Publish topic must not contain a wildcard." (``+``, ``#`` or ``*`` anywhere).
    IoT Core (``iot_core=True``): InvalidArgumentsError "Topic is required" for a missing
    topic; ``+``/``#`` fail later in ``IotCoreTopicValidator`` and reach the client as
    ``ServiceError("Publish to topic <t> failed: <message>")``.

    The nucleus authorizes *before* these checks, so call :meth:`Authorizer.check` first: an
    empty topic never gets here, it is refused by authorization ("Resource cannot be empty",
    UnauthorizedError), and a wildcard topic the policy does not allow is UnauthorizedError.
    """
    if iot_core:
        if topic is None:
            return "Topic is required"
        if "#" in topic or "+" in topic:
            return "Publish topics must not contain wildcard characters of '#' or '+'"
        return None
    if topic is None:
        return "Publish topic must not be null"
    if any(c in topic for c in "+#*"):
        return "Publish topic must not contain a wildcard."
    return None


def _levels(topic: str) -> list[str]:
    """Java ``topic.split("/")``: trailing empty levels are dropped ("" stays [""])."""
    parts = topic.split(_SEP)
    if topic == "":
        return parts
    while parts and parts[-1] == "":
        parts.pop()
    return parts


def mqtt_topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a local SubscribeToTopic filter receives a PublishToTopic topic.

    Follows the nucleus' ``SubscriptionTrie.get``, which differs from the MQTT spec in three
    places: ``a/#`` does not receive ``a`` (only ``a/...``), a ``#`` that is not last acts
    like ``+``, and trailing ``/`` are ignored on both sides (Java's split), so ``a/b/`` and
    ``a/b`` are the same topic.  ``+`` matches exactly one level, also an empty one.
    For valid MQTT filters this is also how ``MqttClient`` hands IoT Core messages to
    SubscribeToIoTCore subscribers (``MqttTopic.isSupersetOf``: ``a/#`` does not get ``a``
    there either); the two differ only on invalid filters (a ``#`` not last).
    """
    flt, top = _levels(topic_filter), _levels(topic)
    if not top:
        return False     # the nucleus throws on such a topic ("/", "//")
    for depth, level in enumerate(top):
        if depth >= len(flt):
            return False
        if flt[depth] == _MULTI and depth == len(flt) - 1:
            return True
        if flt[depth] not in (level, _SINGLE, _MULTI):
            return False
    return len(flt) == len(top)


def is_wildcard_filter(topic_filter: str) -> bool:
    """``SubscriptionTrie.isWildcard``: a SubscribeToTopic without receiveMode on such a filter
    defaults to RECEIVE_MESSAGES_FROM_OTHERS (the subscriber does not get its own messages);
    any other filter defaults to RECEIVE_ALL_MESSAGES."""
    levels = _levels(topic_filter)
    return any(level == _SINGLE or (level == _MULTI and i == len(levels) - 1)
               for i, level in enumerate(levels))
