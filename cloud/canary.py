"""Canary: an approved model proves itself on a few gateways before the fleet gets it.

The mechanics are Greengrass's own, so they work on a real nucleus:

* **A second model component.**  The candidate ships as ``com.windfleet.AnomalyModelCandidate``
  (:data:`settings.CANARY_COMPONENT`): the same recipe, artifacts and configuration
  (``OnnxSha256``, ``ModelVersion``) as ``com.windfleet.AnomalyModel`` and the same
  self-check at Install.  The detector finds it beside the model and scores it in shadow.
* **A canary thing group** (``<fleet group>-canary``), a subset of the fleet sized by
  ``devices`` or ``percent`` (:func:`canary_size`).  Its deployment holds the candidate
  only: a core device runs the union of its groups' deployments (the nucleus keeps each
  group's root components), so canary devices keep the fleet's suite and add the candidate.

Lifecycle (state in ``s3://<bucket>/canary/<model group>/state.json``, configuration in
``config.json`` beside it -- the same objects on both backends):

1. approval (:mod:`.approval`) -> :func:`start`: the model component version is created
   (what a promotion deploys), the canary group is filled, the candidate deployed to it;
2. the detector on canary devices reports :func:`windfleet.payloads.shadow_stats` in its
   health payload; locally the ingest keeps it (``TelemetryStore.latest_shadow``), on AWS
   the ingest Lambda puts it to CloudWatch (:func:`shadow_metric_data`) and
   :func:`cloudwatch_stats` reads it back;
3. :func:`evaluate` (pure) turns each canary device's latest statistics into gates and a
   verdict -- ``wait`` (window not complete), ``promote`` or ``abort`` -- with the measured reason;
4. :func:`promote` merges ``com.windfleet.AnomalyModel@1.0.N`` into the fleet's deployment
   (the usual rollout configuration) and withdraws the candidate from the canary group;
   :func:`abort` withdraws it (the canary devices return to the current model alone) and
   marks the package Rejected with the measured reason (the registry's audit trail).

:func:`step` evaluates and acts; on AWS :func:`handler` is the Lambda an EventBridge schedule
(``settings.CANARY_SCHEDULE``) invokes.  ``windfleet canary status|promote|abort|evaluate``
is :mod:`.canary_cli`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from botocore.exceptions import ClientError

from windfleet import jsonlog
from windfleet.model_contract import CARD_FILE

from . import deployer, settings
from .backends import Backend, lambda_backend
from .registry import set_approval

log = logging.getLogger("windfleet.cloud.canary")

CONFIG_FILE, STATE_FILE = "config.json", "state.json"
ACTOR = "windfleet-canary"  # who the registry's audit trail names for an abort
VERDICTS = ("wait", "promote", "abort")

# CloudWatch metric name -> how to read it from a shadow object (the ingest Lambda puts them,
# cloudwatch_stats reads them back; dimensions Thing and CandidateVersion).
METRICS: dict[str, tuple[str, ...]] = {
    "Windows": ("windows",), "CurrentAlarms": ("current", "alarms"), "CandidateAlarms": ("candidate", "alarms"),
    "EitherFlagged": ("either_flagged",), "BothFlagged": ("both_flagged",),
    "LabelledEpisodes": ("labelled_episodes",), "CurrentDetected": ("current_detected",),
    "CandidateDetected": ("candidate_detected",), "Errors": ("errors",),
    "CurrentInferMsP99": ("current", "infer_ms_p99"), "CandidateInferMsP99": ("candidate", "infer_ms_p99"),
    "CurrentAlarmRate": ("current", "alarm_rate"), "CandidateAlarmRate": ("candidate", "alarm_rate"),
    "Agreement": ("agreement",), "CleanWindows": ("clean_windows",),
    "CurrentFalseAlarms": ("current", "false_alarms"), "CandidateFalseAlarms": ("candidate", "false_alarms"),
}
METRIC_PERIOD = 60


class CanaryError(Exception):
    """A canary operation that cannot be done (no canary running, unknown setting, ...)."""


# ------------------------------------------------------------------------- config and state
def _key(backend: Backend, name: str, group: str | None = None) -> str:
    return settings.CANARY_PREFIX.format(group=group or backend.model_group) + name


def _read_json(backend: Backend, key: str) -> dict | None:
    try:
        body = backend.s3.get_object(Bucket=backend.bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    return json.loads(body)


def _write_json(backend: Backend, key: str, value: dict) -> None:
    backend.s3.put_object(Bucket=backend.bucket, Key=key, Body=json.dumps(value, sort_keys=True).encode(),
                          ContentType="application/json")


def load_config(backend: Backend, group: str | None = None) -> dict:
    """The model package group's canary settings: ``settings.CANARY_DEFAULTS`` plus what was stored."""
    return {**settings.CANARY_DEFAULTS, "thing_group": None, **(_read_json(backend, _key(backend, CONFIG_FILE, group))
                                                                or {})}


def save_config(backend: Backend, updates: Mapping[str, Any], group: str | None = None) -> dict:
    """Store ``updates`` over the group's canary settings (unknown keys are refused)."""
    known = set(settings.CANARY_DEFAULTS) | {"thing_group"}
    unknown = set(updates) - known
    if unknown:
        raise CanaryError(f"unknown canary settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    stored = _read_json(backend, _key(backend, CONFIG_FILE, group)) or {}
    stored.update(updates)
    _write_json(backend, _key(backend, CONFIG_FILE, group), stored)
    return {**settings.CANARY_DEFAULTS, "thing_group": None, **stored}


def load_state(backend: Backend, group: str | None = None) -> dict | None:
    """The group's current (or last) canary, or None."""
    return _read_json(backend, _key(backend, STATE_FILE, group))


def _save_state(backend: Backend, state: dict, group: str | None = None) -> None:
    _write_json(backend, _key(backend, STATE_FILE, group), state)


def canary_group(backend: Backend, config: Mapping[str, Any]) -> str:
    """The canary thing group's name: configured, else ``<fleet group>-canary``."""
    return config.get("thing_group") or settings.canary_thing_group(backend.thing_group)


# ------------------------------------------------------------------------------- membership
def canary_size(fleet_size: int, config: Mapping[str, Any]) -> int:
    """How many gateways the canary takes: ``percent`` of the fleet (rounded up) when set, else
    ``devices``; at least one, never the whole fleet when it has more than one gateway."""
    if fleet_size <= 1:
        return fleet_size
    percent = config.get("percent")
    wanted = math.ceil(fleet_size * float(percent) / 100.0) if percent else int(config.get("devices") or 1)
    return max(1, min(wanted, fleet_size - 1))


def _iot(backend: Backend) -> Any:
    """IoT's thing-group membership calls: boto3's iot client, or the local deployment service."""
    return backend.greengrassv2 if backend.is_local else backend.iot


def _things_in(backend: Backend, group: str) -> list[str]:
    """Members of thing group ``group`` (IoT ListThingsInThingGroup; on AWS the group must exist:
    provisioning creates the default canary group).  Not greengrassv2 ListCoreDevices, which lists
    only devices that already deployed the group's deployment."""
    things, token = [], None
    while True:
        page = _iot(backend).list_things_in_thing_group(thingGroupName=group, **({"nextToken": token} if token
                                                                                 else {}))
        things += page.get("things", [])
        token = page.get("nextToken")
        if not token:
            return things


def populate(backend: Backend, config: Mapping[str, Any]) -> list[str]:
    """Fill the canary thing group from the fleet's core devices (members kept, the rest in name
    order); returns its members that are in the fleet."""
    group = canary_group(backend, config)
    fleet = sorted(deployer.group_things(backend, backend.thing_group_arn()))
    members = [t for t in sorted(_things_in(backend, group)) if t in fleet]
    want = canary_size(len(fleet), config)
    iot = _iot(backend)
    for thing in [t for t in fleet if t not in members][:max(0, want - len(members))]:
        iot.add_thing_to_thing_group(thingGroupName=group, thingName=thing)
        members.append(thing)
    return sorted(members)


# ------------------------------------------------------------------------------------ start
def start(backend: Backend, package_version: int | str, files: dict[str, bytes], package_arn: str,
          config: Mapping[str, Any] | None = None, group: str | None = None) -> dict | None:
    """Deploy the candidate to the canary group and record the canary; a repeated approval of
    the running candidate changes nothing (``status`` ``unchanged``).  None when the fleet has
    no core device to try it on (the caller deploys to the fleet, whose devices come later)."""
    config = config or load_config(backend, group)
    devices = populate(backend, config)
    if not devices:
        jsonlog.event(log, "no gateway for a canary: straight to the fleet", logging.WARNING,
                      fleet=backend.thing_group)
        return None
    thing_group = canary_group(backend, config)
    outcome = deployer.deploy_candidate(backend, package_version, files, canary_group=thing_group,
                                        package_arn=package_arn)
    state = load_state(backend, group)
    card = json.loads(files.get(CARD_FILE) or b"{}")
    if not (outcome["status"] == "unchanged" and state and state.get("status") == "running"
            and state.get("package_arn") == package_arn):
        state = {"status": "running", "package_arn": package_arn, "package_version": int(package_version),
                 "component_version": outcome["componentVersion"], "model_version": str(card.get("version", "")),
                 "thing_group": thing_group, "devices": devices, "started": time.time(),
                 "deployment_id": outcome["deploymentId"]}
        _save_state(backend, state, group)
        jsonlog.event(log, "canary started", version=state["model_version"], devices=devices, group=thing_group)
    return {"status": "canary" if outcome["status"] == "deployed" else "unchanged",
            "deploymentId": outcome["deploymentId"], "canaryGroup": thing_group, "devices": state["devices"],
            "candidateVersion": outcome["componentVersion"], "canaryTargetArn": outcome["targetArn"]}


# --------------------------------------------------------------------------------- the gates
def _sum(stats: Sequence[Mapping], *path: str) -> float:
    total = 0.0
    for s in stats:
        value: Any = s
        for p in path:
            value = value.get(p, 0) if isinstance(value, Mapping) else 0
        total += float(value or 0)
    return total


def _rate(num: float, den: float, empty: float = 0.0) -> float:
    return num / den if den else empty


def measured(shadow: Mapping[str, Any]) -> dict:
    """What the gates read from one device's (or a pooled) shadow object."""
    windows = float(shadow.get("windows", 0))
    either = float(shadow.get("either_flagged", 0))
    episodes = float(shadow.get("labelled_episodes", 0))
    clean = float(shadow.get("clean_windows", 0) or 0)
    return {
        "windows": int(windows),
        "current_alarm_rate": _rate(_sum([shadow], "current", "alarms"), windows),
        "candidate_alarm_rate": _rate(_sum([shadow], "candidate", "alarms"), windows),
        "agreement": _rate(float(shadow.get("both_flagged", 0)), either, 1.0),
        "clean_windows": int(clean),
        "current_false_alarm_rate": _rate(_sum([shadow], "current", "false_alarms"), clean) if clean else None,
        "candidate_false_alarm_rate": _rate(_sum([shadow], "candidate", "false_alarms"), clean) if clean else None,
        "labelled_episodes": int(episodes),
        "current_recall": _rate(float(shadow.get("current_detected", 0)), episodes) if episodes else None,
        "candidate_recall": _rate(float(shadow.get("candidate_detected", 0)), episodes) if episodes else None,
        "errors": int(shadow.get("errors", 0)),
        "candidate_infer_ms_p99": float((shadow.get("candidate") or {}).get("infer_ms_p99", 0.0)),
        "current_infer_ms_p99": float((shadow.get("current") or {}).get("infer_ms_p99", 0.0)),
        "error": shadow.get("error") if isinstance(shadow.get("error"), str) else None,  # the device's reason
    }


def _pooled(stats: Sequence[Mapping]) -> dict:
    """The canary devices' figures added up (rates over all their windows; p99: the worst device)."""
    pooled = {k: _sum(stats, k) for k in ("windows", "either_flagged", "both_flagged", "labelled_episodes",
                                           "current_detected", "candidate_detected", "errors", "clean_windows")}
    pooled["current"] = {"alarms": _sum(stats, "current", "alarms"), "false_alarms": _sum(stats, "current", "false_alarms"),
                         "infer_ms_p99": max((_sum([s], "current", "infer_ms_p99") for s in stats), default=0.0)}
    pooled["candidate"] = {"alarms": _sum(stats, "candidate", "alarms"),
                           "false_alarms": _sum(stats, "candidate", "false_alarms"),
                           "infer_ms_p99": max((_sum([s], "candidate", "infer_ms_p99") for s in stats), default=0.0)}
    pooled["error"] = next((s["error"] for s in stats if isinstance(s.get("error"), str)), None)
    return measured(pooled)


def _gate(name: str, rule: str, passed: bool, measured_value: Any, limit: Any, detail: str) -> dict:
    return {"gate": name, "rule": rule, "measured": measured_value, "limit": limit, "passed": bool(passed),
            "detail": detail}


def gates(m: Mapping[str, Any], config: Mapping[str, Any]) -> list[dict]:
    """The gates over measured figures ``m`` (:func:`measured`), each with its measured value."""
    k, eps = float(config["alarm_rate_factor"]), float(config["alarm_rate_epsilon"])
    limit = k * m["current_alarm_rate"] + eps
    out = [_gate("alarm_rate", f"candidate alarm rate <= {k:g} x current + {eps:g}",
                 m["candidate_alarm_rate"] <= limit, round(m["candidate_alarm_rate"], 6), round(limit, 6),
                 f"candidate alarm rate {m['candidate_alarm_rate']:.4f} vs limit {limit:.4f} "
                 f"({k:g} x current {m['current_alarm_rate']:.4f} + {eps:g})")]
    k, eps = float(config["false_alarm_factor"]), float(config["false_alarm_epsilon"])
    z = float(config["false_alarm_z"])
    rule = (f"candidate false-alarm rate <= {k:g} x current + {eps:g} + {z:g} sigma of the current count "
            "(windows outside labelled episodes)")
    if m["clean_windows"]:
        # counting noise: over a few dozen clean windows one false alarm is several percent, so the
        # limit allows z Poisson standard deviations of the current model's count (negligible over
        # the thousands of windows of a real canary)
        clean = m["clean_windows"]
        current = m["current_false_alarm_rate"] * clean
        limit = (k * current + z * math.sqrt(max(current, 1.0))) / clean + eps
        out.append(_gate("false_alarm_rate", rule, m["candidate_false_alarm_rate"] <= limit,
                         round(m["candidate_false_alarm_rate"], 6), round(limit, 6),
                         f"candidate false-alarm rate {m['candidate_false_alarm_rate']:.4f} vs limit {limit:.4f} "
                         f"on {m['clean_windows']} windows outside labelled episodes"))
    else:
        out.append(_gate("false_alarm_rate", rule, True, None, None,
                         "no labels received: not applicable (the alarm-rate and agreement gates still apply)"))
    a = float(config["min_agreement"])
    out.append(_gate("agreement", f"agreement >= {a:g}", m["agreement"] >= a, round(m["agreement"], 6), a,
                     f"agreement {m['agreement']:.3f} vs minimum {a:g}"))
    tol = float(config["recall_tolerance"])
    if m["labelled_episodes"]:
        floor = m["current_recall"] - tol
        out.append(_gate("recall", f"candidate recall >= current recall - {tol:g}", m["candidate_recall"] >= floor,
                         round(m["candidate_recall"], 6), round(floor, 6),
                         f"candidate recall {m['candidate_recall']:.3f} vs current {m['current_recall']:.3f} "
                         f"on {m['labelled_episodes']} labelled episodes"))
    else:
        out.append(_gate("recall", f"candidate recall >= current recall - {tol:g}", True, None, None,
                         "no labelled episodes seen: not applicable"))
    e = int(config["max_errors"])
    out.append(_gate("errors", f"candidate errors <= {e}", m["errors"] <= e, m["errors"], e,
                     f"{m['errors']} candidate scoring errors (at most {e})"
                     + (f": {m['error'][:200]}" if m["errors"] and m.get("error") else "")))
    p = float(config["max_infer_ms_p99"])
    out.append(_gate("infer_ms_p99", f"candidate inference p99 <= {p:g} ms", m["candidate_infer_ms_p99"] <= p,
                     round(m["candidate_infer_ms_p99"], 3), p,
                     f"candidate inference p99 {m['candidate_infer_ms_p99']:.2f} ms (at most {p:g})"))
    return out


def evaluate(stats: Mapping[str, Mapping | None], devices: Sequence[str], config: Mapping[str, Any],
             elapsed_s: float) -> dict:
    """The verdict over the canary devices' latest shadow statistics (pure).

    ``stats``: thing -> its latest shadow object (None/missing: nothing reported yet).  The gates
    apply to the devices' pooled figures.  Errors abort at once; otherwise the verdict waits until
    ``min_seconds`` have passed and every device scored ``min_windows`` windows, then is
    ``abort`` when a gate fails, else (where labels arrive, once ``min_clean_windows`` windows
    outside labelled episodes have settled: the false-alarm gate's evidence) ``promote``.  Returns ``{"verdict", "reason", "gates",
    "devices": {thing: measured | None}, "pooled", "seconds", "candidate_alarm_rate",
    "current_alarm_rate", "agreement"}``.
    """
    present = [stats[t] for t in devices if stats.get(t)]
    per_device = {t: (measured(stats[t]) if stats.get(t) else None) for t in devices}
    pooled = _pooled(present)
    checked = gates(pooled, config)
    out = {"seconds": round(elapsed_s, 3), "devices": per_device, "pooled": pooled, "gates": checked,
           "candidate_alarm_rate": pooled["candidate_alarm_rate"], "current_alarm_rate": pooled["current_alarm_rate"],
           "agreement": pooled["agreement"]}
    errors = next(g for g in checked if g["gate"] == "errors")
    if not errors["passed"]:
        return {**out, "verdict": "abort", "reason": errors["detail"]}
    waiting = []
    if elapsed_s < float(config["min_seconds"]):
        waiting.append(f"{elapsed_s:.0f} of {float(config['min_seconds']):g} s observed")
    for thing, m in per_device.items():
        if m is None:
            waiting.append(f"{thing} has reported no shadow statistics")
        elif m["windows"] < int(config["min_windows"]):
            waiting.append(f"{thing} scored {m['windows']} of {int(config['min_windows'])} windows")
    if waiting:
        return {**out, "verdict": "wait", "reason": "; ".join(waiting)}
    # the false-alarm gate's evidence is the clean windows: until there are enough it neither
    # fails nor lets the candidate through, but another gate failing aborts at once
    few_clean = bool(pooled["labelled_episodes"]) and pooled["clean_windows"] < int(config["min_clean_windows"])
    failed = [g["detail"] for g in checked if not g["passed"] and not (few_clean and g["gate"] == "false_alarm_rate")]
    if failed:
        return {**out, "verdict": "abort", "reason": "; ".join(failed)}
    if few_clean:
        return {**out, "verdict": "wait", "reason": f"{pooled['clean_windows']} of {int(config['min_clean_windows'])} "
                                                    "windows outside labelled episodes settled"}
    return {**out, "verdict": "promote",
            "reason": "every gate passed: " + "; ".join(g["detail"] for g in checked)}


# ------------------------------------------------------------------------------- statistics
def shadow_metric_data(thing: str, shadow: Mapping[str, Any], ts: float | None = None) -> list[dict]:
    """One health report's shadow statistics as CloudWatch ``MetricData`` (:data:`METRICS`)."""
    when = datetime.fromtimestamp(ts if ts is not None else time.time(), timezone.utc)
    dims = [{"Name": "Thing", "Value": thing}, {"Name": "CandidateVersion", "Value": shadow["candidate_version"]}]
    out = []
    for name, path in METRICS.items():
        value: Any = shadow
        for p in path:
            value = value.get(p) if isinstance(value, Mapping) else None
        if value is None:  # a figure an older detector does not report
            continue
        out.append({"MetricName": name, "Dimensions": dims, "Timestamp": when, "Value": float(value),
                    "Unit": "Count" if name not in ("CurrentInferMsP99", "CandidateInferMsP99") else "Milliseconds"})
    return out


def cloudwatch_stats(backend: Backend, state: Mapping[str, Any], now: float | None = None) -> dict[str, dict]:
    """Each canary device's latest statistics, read back from CloudWatch (the newest datapoint of
    every metric since the canary started) as a shadow-shaped object; devices without data are left out."""
    now = time.time() if now is None else now
    queries, index = [], {}
    for thing in state["devices"]:
        dims = [{"Name": "Thing", "Value": thing}, {"Name": "CandidateVersion", "Value": state["model_version"]}]
        for name in METRICS:
            qid = f"m{len(queries)}"
            index[qid] = (thing, name)
            queries.append({"Id": qid, "ReturnData": True, "MetricStat": {
                "Metric": {"Namespace": settings.CANARY_METRIC_NAMESPACE, "MetricName": name, "Dimensions": dims},
                "Period": METRIC_PERIOD, "Stat": "Maximum"}})
    values: dict[str, dict[str, float]] = {}
    start = datetime.fromtimestamp(float(state["started"]) - METRIC_PERIOD, timezone.utc)
    end = datetime.fromtimestamp(now + METRIC_PERIOD, timezone.utc)
    for i in range(0, len(queries), 500):  # GetMetricData takes at most 500 queries
        kwargs: dict[str, Any] = {"MetricDataQueries": queries[i:i + 500], "StartTime": start, "EndTime": end}
        while True:
            page = backend.cloudwatch.get_metric_data(**kwargs)
            for result in page.get("MetricDataResults", []):
                if result.get("Values"):
                    newest = max(range(len(result["Values"])), key=lambda j: result["Timestamps"][j])
                    thing, name = index[result["Id"]]
                    values.setdefault(thing, {})[name] = float(result["Values"][newest])
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
    out = {}
    for thing, metrics in values.items():
        shadow: dict[str, Any] = {"current": {}, "candidate": {}}
        for name, value in metrics.items():
            path = METRICS[name]
            (shadow[path[0]] if len(path) == 2 else shadow)[path[-1]] = value
        out[thing] = shadow
    return out


def local_stats(state: Mapping[str, Any], store_path: str | Path) -> dict[str, dict]:
    """Each canary device's latest statistics from the local telemetry store (what ingest kept)."""
    from .ingest import TelemetryStore

    with TelemetryStore(store_path) as store:
        latest = store.latest_shadow(since=float(state["started"]) - 1.0, candidate_version=state["model_version"])
    return {thing: row["shadow"] for thing, row in latest.items() if thing in state["devices"]}


# ---------------------------------------------------------------------------- status and acts
def status(backend: Backend, stats: Mapping[str, Mapping] | None = None, *, store: str | Path | None = None,
           group: str | None = None, now: float | None = None) -> dict:
    """The canary as JSON: its state, configuration, gates, per-device figures and verdict.

    ``stats`` (thing -> shadow) when the caller has them; else from ``store`` (a local
    telemetry store) or, on AWS, from CloudWatch.
    """
    config = load_config(backend, group)
    state = load_state(backend, group)
    out: dict[str, Any] = {"model_group": group or backend.model_group, "config": config, "canary": state}
    if not state or state.get("status") != "running":
        return {**out, "verdict": None, "reason": "no canary is running"}
    now = time.time() if now is None else now
    if stats is None:
        if backend.is_local:
            stats = local_stats(state, store or Path(backend.home) / "telemetry.sqlite")
        else:
            stats = cloudwatch_stats(backend, state, now)
    return {**out, **evaluate(stats, state["devices"], config, now - float(state["started"]))}


def _running(backend: Backend, group: str | None) -> dict:
    state = load_state(backend, group)
    if not state or state.get("status") != "running":
        raise CanaryError(f"no canary is running for {group or backend.model_group}")
    return state


def _finish(backend: Backend, state: dict, group: str | None, verdict: str, reason: str, actor: str,
            result: Mapping[str, Any] | None) -> dict:
    state.update(status=verdict, finished=time.time(), reason=reason, actor=actor)
    for key in ("seconds", "candidate_alarm_rate", "current_alarm_rate", "agreement"):
        if result and key in result:
            state[key] = result[key]
    _save_state(backend, state, group)
    jsonlog.event(log, f"canary {verdict}", version=state["model_version"], reason=reason, actor=actor)
    return state


def promote(backend: Backend, reason: str = "promoted by hand", actor: str = ACTOR, *, group: str | None = None,
            result: Mapping[str, Any] | None = None) -> dict:
    """Merge the candidate into the fleet's deployment as the model, then withdraw it from the canary group."""
    state = _running(backend, group)
    fleet = deployer.roll_out(backend, state["component_version"])
    withdrawn = deployer.withdraw_candidate(backend, state["thing_group"])
    state = _finish(backend, state, group, "promoted", reason, actor, result)
    return {"status": "promoted", "canary": state, "deployment": fleet, "canary_deployment": withdrawn}


def abort(backend: Backend, reason: str = "aborted by hand", actor: str = ACTOR, *, group: str | None = None,
          result: Mapping[str, Any] | None = None) -> dict:
    """Withdraw the candidate from the canary group and mark its package Rejected with ``reason``."""
    state = _running(backend, group)
    withdrawn = deployer.withdraw_candidate(backend, state["thing_group"])
    set_approval(backend.sagemaker, state["package_arn"], "Rejected", f"canary aborted: {reason}", actor)
    state = _finish(backend, state, group, "aborted", reason, actor, result)
    return {"status": "aborted", "canary": state, "canary_deployment": withdrawn}


def step(backend: Backend, stats: Mapping[str, Mapping] | None = None, *, store: str | Path | None = None,
         group: str | None = None, now: float | None = None) -> dict:
    """Evaluate the running canary and act on a ``promote`` / ``abort`` verdict."""
    result = status(backend, stats, store=store, group=group, now=now)
    verdict = result.get("verdict")
    if verdict == "promote":
        result["action"] = promote(backend, result["reason"], group=group, result=result)
    elif verdict == "abort":
        result["action"] = abort(backend, result["reason"], group=group, result=result)
    return result


def handler(event: Any, context: Any = None, *, backend: Backend | None = None) -> dict:
    """The scheduled Lambda (EventBridge ``settings.CANARY_SCHEDULE``): :func:`step` over the
    metrics the ingest Lambda put.  Returns the verdict (logged as one JSON line)."""
    backend = backend or lambda_backend()
    result = step(backend)
    summary = {k: result.get(k) for k in ("verdict", "reason", "seconds")}
    jsonlog.event(log, "canary evaluated", **summary)
    return {**summary, "status": (result.get("action") or {}).get("status")}
