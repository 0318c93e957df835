"""Every topic name windfleet uses, in one place.

Local topics travel on the device's bus (Greengrass IPC pub/sub or the local
Mosquitto); ``telemetry`` goes to the cloud (IoT Core, or the local broker's
cloud account).  Turbine ids are ``{thing}-t{n:02d}`` so the broker ACL can grant
a gateway exactly its own turbines.
"""

import re

PREFIX = "windfleet"

# AWS IoT CreateThing: thingName "Length Constraints: Minimum length of 1. Maximum length of 128.
# Pattern: [a-zA-Z0-9:_-]+" (thing group names follow the same rule).  Nothing else may name a
# device: a thing name becomes an MQTT topic level, a client id, a broker account and a path.
THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")


def validate_thing(name: object, what: str = "thing name") -> str:
    """``name`` if AWS IoT would accept it as a thing name, else ValueError (one line)."""
    if not isinstance(name, str) or not THING_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not valid: use 1-128 of a-z A-Z 0-9 : _ - (as AWS IoT allows)")
    return name



def readings(turbine_id: str) -> str:
    """Simulator -> detector: batches of sensor samples."""
    return f"{PREFIX}/turbines/{turbine_id}/readings"


def labels(turbine_id: str) -> str:
    """Simulator -> anyone scoring a run: ground truth of injected anomalies."""
    return f"{PREFIX}/turbines/{turbine_id}/labels"


def scores(turbine_id: str) -> str:
    """Detector -> forwarder: one message per scored window."""
    return f"{PREFIX}/turbines/{turbine_id}/scores"


def drift(turbine_id: str) -> str:
    """Detector -> forwarder: how far a turbine's inputs have moved from the model's training data."""
    return f"{PREFIX}/turbines/{turbine_id}/drift"


def capture(thing: str) -> str:
    """Detector -> forwarder: sampled raw windows, uploaded in batches to S3 for retraining."""
    return f"{PREFIX}/devices/{thing}/capture"


def health(thing: str) -> str:
    """Each component -> forwarder (and the local runtime): state and counters."""
    return f"{PREFIX}/devices/{thing}/health"


def logs(thing: str) -> str:
    """Components -> forwarder: warnings and errors worth sending to the cloud."""
    return f"{PREFIX}/devices/{thing}/logs"


def telemetry(thing: str) -> str:
    """Forwarder -> cloud (IoT Core topic): sequenced batches."""
    return f"{PREFIX}/fleet/{thing}/telemetry"


def telemetry_ack(thing: str) -> str:
    """Cloud -> forwarder (IoT Core topic): which telemetry messages the cloud has stored."""
    return f"{PREFIX}/fleet/{thing}/ack"


def turbine_id(thing: str, index: int) -> str:
    return f"{thing}-t{index:02d}"


def gateway_of(turbine: str) -> str:
    """The gateway of a :func:`turbine_id` (thing names contain no ``-t<digits>`` suffix)."""
    return turbine.rsplit("-t", 1)[0]


def turbine_of(topic: str) -> str:
    """``windfleet/turbines/{id}/...`` -> ``id``; ValueError for anything else."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != PREFIX or parts[1] != "turbines":
        raise ValueError(f"not a turbine topic: {topic!r}")
    return parts[2]


def thing_of(topic: str) -> str:
    """``windfleet/{devices|fleet}/{thing}/...`` -> ``thing``."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != PREFIX or parts[1] not in ("devices", "fleet"):
        raise ValueError(f"not a device topic: {topic!r}")
    return parts[2]


# Wildcard forms for subscribers that serve many turbines or devices (MQTT syntax).
ALL_TELEMETRY = f"{PREFIX}/fleet/+/telemetry"
ALL_HEALTH = f"{PREFIX}/devices/+/health"
