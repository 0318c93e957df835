"""Every knob of the cloud layer, in one documented place.

Names
    ``MODEL_GROUP``, ``BUCKET``, ``THING_GROUP`` are the defaults every command
    uses; each can be overridden on the command line or through the
    ``WINDFLEET_MODEL_GROUP`` / ``WINDFLEET_BUCKET`` / ``WINDFLEET_THING_GROUP``
    environment variables (the Lambda functions are configured that way).

Component versions
    An approval of model package version ``N`` becomes component version
    ``MODEL_COMPONENT_VERSION.format(n=N)`` (``1.0.N``).  Component versions are
    immutable in Greengrass, so each package version maps to exactly one
    component version and a repeated approval maps to the same one (idempotent).
    The suite's own bundled model recipe must therefore not use ``1.0.N`` with
    ``N >= 1`` (use ``1.0.0`` or ``0.x``).

Deployment policies (``DEPLOYMENT_POLICIES``)
    ``failureHandlingPolicy: ROLLBACK`` -- a device whose deployment fails goes
    back to its previous component set.  ``componentUpdatePolicy``
    ``NOTIFY_COMPONENTS`` with ``timeoutInSeconds`` -- components may defer an
    update (the detector does while it saves its window tails) but never for
    longer than the timeout.  ``configurationValidationPolicy`` bounds how long
    components may take to validate a configuration change.

IoT job rollout (``IOT_JOB_CONFIGURATION``)
    Exponential rollout starting at ``baseRatePerMinute`` devices per minute,
    multiplied by ``incrementFactor`` each time ``numberOfSucceededThings``
    more devices succeeded, never above ``maximumPerMinute``.  The deployment is
    cancelled for the rest of the fleet when more than ``thresholdPercentage``
    of at least ``minNumberOfExecutedThings`` devices FAILED or TIMED_OUT.
    A device that does not finish within ``inProgressTimeoutInMinutes`` is
    TIMED_OUT, so a deployment never hangs.

Canary (``CANARY_*``, :mod:`.canary`)
    An approved model first goes to the canary thing group (``<fleet group>-canary``)
    as component ``CANARY_COMPONENT``; the detector there scores it in shadow and
    reports statistics.  ``CANARY_DEFAULTS`` are the per-model-package-group
    defaults (``windfleet canary configure`` stores overrides): the group's size
    (``devices`` or ``percent`` of the fleet), the observation window
    (``min_seconds`` since the canary started and ``min_windows`` scored per
    device) and the gates (candidate alarm rate <= ``alarm_rate_factor`` x
    current + ``alarm_rate_epsilon``; ``min_agreement``; recall not below the
    current model's minus ``recall_tolerance``; false-alarm rate outside labelled
    episodes <= ``false_alarm_factor`` x current + ``false_alarm_epsilon`` + ``false_alarm_z``
    Poisson sigmas of the current count; ``max_errors``; candidate
    inference p99 <= ``max_infer_ms_p99``).  ``CANARY_SCHEDULE`` is how often the
    AWS Lambda evaluates.

Waiting for a component (``COMPONENT_POLL_*``)
    ``create_component_version`` is asynchronous: the deployer polls
    ``describe_component`` every ``COMPONENT_POLL_INTERVAL`` seconds (backing off
    to ``COMPONENT_POLL_MAX_INTERVAL``) for at most ``COMPONENT_POLL_TIMEOUT``
    seconds until the version is DEPLOYABLE.
"""

from __future__ import annotations

import os

MODEL_GROUP = os.environ.get("WINDFLEET_MODEL_GROUP", "windfleet-anomaly")
BUCKET = os.environ.get("WINDFLEET_BUCKET", "windfleet-artifacts")
THING_GROUP = os.environ.get("WINDFLEET_THING_GROUP", "windfleet-fleet")

# Greengrass component names of the suite (DESIGN.md "Components").
SIMULATOR = "com.windfleet.TurbineSimulator"
DETECTOR = "com.windfleet.AnomalyDetector"
FORWARDER = "com.windfleet.LogForwarder"
MODEL_COMPONENT = "com.windfleet.AnomalyModel"
# The candidate under canary: the same recipe (artifacts, OnnxSha256, ModelVersion, self-check)
# under a second name, so canary devices hold both models side by side.
CANARY_COMPONENT = "com.windfleet.AnomalyModelCandidate"
SUITE = (SIMULATOR, DETECTOR, FORWARDER, MODEL_COMPONENT)
# Every deployment of a model version resets the model component's configuration to that
# version's defaults: the nucleus keeps a component's running configuration over a new
# version's DefaultConfiguration, and the detector finds its model by the OnnxSha256 there.
MODEL_CONFIGURATION_UPDATE = {"reset": [""]}

MODEL_COMPONENT_VERSION = "1.0.{n}"
COMPONENT_PUBLISHER = "windfleet"

# S3 key layout (same on AWS and in the local store).
MODEL_PREFIX = "models/{group}/{digest}/"  # registry copies, content-addressed by the ONNX sha256
COMPONENT_PREFIX = "{name}/{version}/"  # like `gdk component publish`: s3://bucket/Name/Version/file

DEPLOYMENT_POLICIES = {
    "failureHandlingPolicy": "ROLLBACK",
    "componentUpdatePolicy": {"action": "NOTIFY_COMPONENTS", "timeoutInSeconds": 60},
    "configurationValidationPolicy": {"timeoutInSeconds": 30},
}

IOT_JOB_CONFIGURATION = {
    "jobExecutionsRolloutConfig": {
        "exponentialRate": {
            "baseRatePerMinute": 5,
            "incrementFactor": 2.0,
            "rateIncreaseCriteria": {"numberOfSucceededThings": 5},
        },
        "maximumPerMinute": 50,
    },
    "abortConfig": {
        "criteriaList": [
            {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 20.0,
             "minNumberOfExecutedThings": 3},
            {"failureType": "TIMED_OUT", "action": "CANCEL", "thresholdPercentage": 20.0,
             "minNumberOfExecutedThings": 3},
        ]
    },
    # at least the longest Install Timeout of any recipe (1800 s on armv7l, where pip builds
    # wheels) plus the downloads; tests/test_deploy_greengrass.py checks it against the recipes
    "timeoutConfig": {"inProgressTimeoutInMinutes": 60},
}

CANARY_GROUP_SUFFIX = "-canary"  # a fleet group's canary group is <fleet group>-canary (canary_thing_group)
CANARY_THING_GROUP = THING_GROUP + CANARY_GROUP_SUFFIX
CANARY_DEFAULTS = {
    "enabled": True,             # approval deploys to the canary group first
    "devices": 1,                # canary size: this many gateways ...
    "percent": None,             # ... or this percentage of the fleet (rounded up), when set
    "min_seconds": 600.0,        # observation window: at least this long since the canary started
    "min_windows": 500,          # ... and this many windows scored by both models on every canary device
    "alarm_rate_factor": 2.0,    # candidate alarm rate <= k x current + epsilon
    "alarm_rate_epsilon": 0.01,
    # false-alarm rate on windows outside labelled episodes (where turbines publish labels):
    # candidate <= k x current + epsilon
    "false_alarm_factor": 1.5,
    "false_alarm_epsilon": 0.005,
    "false_alarm_z": 2.0,        # ... + z Poisson sigmas of the current model's false-alarm count
    "min_clean_windows": 20,     # where labels arrive, wait for this many windows outside their episodes
    "min_agreement": 0.5,        # flagged by both / flagged by either (1.0 when neither flags)
    "recall_tolerance": 0.0,     # candidate recall on labelled episodes >= current's - tolerance
    "max_errors": 0,             # candidate scoring errors
    "max_infer_ms_p99": 50.0,    # candidate inference p99 (ms per window)
}
CANARY_PREFIX = "canary/{group}/"  # config.json and state.json in the artifact bucket (both backends)
CANARY_METRIC_NAMESPACE = "windfleet/canary"
CANARY_SCHEDULE = "rate(5 minutes)"

COMPONENT_POLL_INTERVAL = 1.0
COMPONENT_POLL_MAX_INTERVAL = 10.0
COMPONENT_POLL_TIMEOUT = 300.0

# AWS provisioning names (``windfleet cloud provision``).
APPROVAL_RULE = "windfleet-model-approved"
APPROVAL_FUNCTION = "windfleet-approval"
INGEST_FUNCTION = "windfleet-ingest"
CANARY_RULE = "windfleet-canary-evaluate"
CANARY_FUNCTION = "windfleet-canary"
TELEMETRY_RULE = "windfleet_telemetry"  # IoT rule names allow no '-'
LAMBDA_ROLE = "windfleet-lambda"
LAMBDA_RUNTIME = "python3.12"
LAMBDA_TIMEOUT = 300  # the approval handler waits for a component to become DEPLOYABLE
LOG_GROUP = "/windfleet/telemetry"
LOG_RETENTION_DAYS = 30
DASHBOARD = "windfleet"


def canary_thing_group(fleet_group: str) -> str:
    """The canary thing group of fleet group ``fleet_group`` (unless configured otherwise)."""
    return fleet_group + CANARY_GROUP_SUFFIX


def model_component_version(package_version: int | str) -> str:
    """Model package version ``N`` -> component version ``1.0.N``."""
    return MODEL_COMPONENT_VERSION.format(n=int(package_version))
