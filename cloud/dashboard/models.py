"""What the approval page shows about model versions, and which one the fleet runs.

``model_row(entry, card, evaluation, size)`` turns a registry entry plus its model
card into one flat row (model version, package id, status, held-out F1 and
false-alarm rate, per-kind recall, the baselines' F1, training data, features,
window, lineage, size, sha256, decisions, actions).  Cards grow keys over time and
older ones lack some: every field is read defensively and is ``None`` when absent
(the page shows "—").

``fleet_model(...)`` answers "what does the fleet run now?", from the best source
available, in this order:

1. **devices**: the ``com.windfleet.AnomalyModel`` version each core device of the
   thing group reports installed (greengrassv2 ``ListInstalledComponents``) -- the
   devices' own word, after rollbacks;
2. **deployment**: the thing group's latest deployment's model component version --
   what the fleet was told to run;
3. **telemetry**: the model version the gateways stamp on their scores.

A component version maps back to its package through the recipe's
``DefaultConfiguration`` (``ModelPackageArn``, ``OnnxSha256``), written by the
deployer for every approval.

``compare(candidate, deployed)`` lines two rows up: metric deltas and each feature's
threshold.  ``canary_view(...)`` adds the shadow statistics of the version's canary
(:mod:`windfleet.cloud.canary`: gates, verdict, per-device figures) when one has
reported any; otherwise it says "no canary data" (``available: false``) -- nothing is
ever invented.
"""

from __future__ import annotations

import collections
import json
from typing import Any

from windfleet.cloud import settings

ACTIONS = {"PendingManualApproval": ["approve", "reject"]}  # decided versions are final on the page
CANARY_NOTE = "no canary data: no canary of this version has reported shadow statistics"


def _get(obj: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _per_kind(card: dict, evaluation: dict | None, key: str) -> dict[str, float] | None:
    """Per fault kind ``key`` (recall, f1) from the card (``metrics.per_kind_<key>``) or the evaluation."""
    found = _get(card, "metrics", f"per_kind_{key}")
    if isinstance(found, dict) and found:
        return {k: v for k, v in ((k, _num(v)) for k, v in found.items()) if v is not None}
    kinds = _get(evaluation or {}, "detectors", "autoencoder", "per_kind")
    if isinstance(kinds, dict) and kinds:
        out = {k: _num(_get(v, key)) for k, v in kinds.items()}
        return {k: v for k, v in out.items() if v is not None} or None
    return None


def _training(card: dict) -> dict | None:
    data = _get(card, "training", "data")
    if not isinstance(data, dict):
        return None
    kind = data.get("kind")
    out = {"source": kind, "seed": _get(card, "training", "seed")}
    if kind == "csv":
        out.update(file=data.get("file"), rows=data.get("rows"))
        out["summary"] = f"CSV {data.get('file') or '?'}, {data.get('rows') or '?'} rows"
    else:
        out.update(turbines=data.get("turbines"), hours=data.get("hours"))
        out["summary"] = (f"{kind or 'unknown'}: {data.get('turbines') if data.get('turbines') is not None else '?'}"
                          f" turbines x {data.get('hours') if data.get('hours') is not None else '?'} h")
    if out["seed"] is not None:
        out["summary"] += f", seed {out['seed']}"
    return out


def _lineage(card: dict) -> str | None:
    """Parent model / lineage as one line, from whichever key the card uses."""
    for value in (card.get("lineage"), card.get("parent"), _get(card, "training", "parent"),
                  _get(card, "training", "lineage")):
        if value in (None, "", [], {}):
            continue
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("captures"), list):  # retrained from captures
            return (f"parent {value.get('parent') or '?'}, {len(value['captures'])} capture objects, "
                    f"{value.get('capture_windows', '?')} windows")[:300]
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in value.items() if isinstance(v, (str, int, float)))[:300] or None
        if isinstance(value, list):
            return " <- ".join(str(v.get("version", v) if isinstance(v, dict) else v) for v in value)[:300]
        return str(value)[:300]
    return None


def model_row(entry: dict, card: dict | None, evaluation: dict | None = None, size: int | None = None) -> dict:
    """One registry row for the page (see the module docstring); ``entry`` is ``Registry.list()``'s."""
    card = card if isinstance(card, dict) else {}
    metrics = card.get("metrics") if isinstance(card.get("metrics"), dict) else {}
    flat = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
    window = card.get("window") if isinstance(card.get("window"), dict) else {}
    baselines = {name: _num(m.get("f1")) for name, m in metrics.items()
                 if name != "autoencoder" and isinstance(m, dict) and "f1" in m}
    status = entry.get("status")
    return {
        "version": None if entry.get("version") is None else str(entry["version"]),  # the package id
        "model_version": _first(entry.get("model_version"), card.get("version")),
        "status": status,
        "created": _first(entry.get("created_at"), entry.get("created")),
        "f1": _first(_num(_get(metrics, "autoencoder", "f1")), _num(flat.get("autoencoder.f1")),
                     _num(metrics.get("f1")), _num(flat.get("f1"))),
        "false_alarm_rate": _first(_num(_get(metrics, "autoencoder", "false_alarm_rate")),
                                   _num(flat.get("autoencoder.false_alarm_rate")),
                                   _num(metrics.get("false_alarm_rate")), _num(flat.get("false_alarm_rate"))),
        "per_kind_recall": _per_kind(card, evaluation, "recall"),
        "per_kind_f1": _per_kind(card, evaluation, "f1"),
        "baselines_f1": baselines or None,
        "training": _training(card),
        "features": card.get("features") if isinstance(card.get("features"), list) else None,
        "window": _first(window.get("size"), window.get("length")),
        "stride": window.get("stride"),
        "window_shape": window.get("shape"),
        "thresholds": card.get("thresholds") if isinstance(card.get("thresholds"), dict) else None,
        "lineage": _lineage(card),
        "size_bytes": size,
        "sha256": _first(entry.get("sha256"), card.get("onnx_sha256")),
        "component_version": entry.get("component_version"),
        "decisions": entry.get("decisions") or [],
        "description": entry.get("description") or entry.get("reason") or "",
        "actions": ACTIONS.get(status, []),
        "card_available": bool(card),
    }


def registry_rows(registry: Any, entries: list[dict]) -> list[dict]:
    """Rows for every entry, reading each card (and evaluation, size) when the registry can."""
    rows = []
    for entry in entries:
        card = registry.card(entry) if hasattr(registry, "card") else None
        evaluation = registry.evaluation(entry) if hasattr(registry, "evaluation") else None
        size = registry.artifact_size(entry) if hasattr(registry, "artifact_size") else None
        rows.append({**model_row(entry, card, evaluation, size), "metrics": entry.get("metrics")})
    return rows


# ------------------------------------------------------------------ what the fleet runs
def _component_versions(greengrass: Any, target_arn: str) -> collections.Counter:
    things, token = [], None
    while True:
        kwargs: dict[str, Any] = {"thingGroupArn": target_arn}
        if token:
            kwargs["nextToken"] = token
        page = greengrass.list_core_devices(**kwargs)
        things += [d["coreDeviceThingName"] for d in page.get("coreDevices", [])]
        token = page.get("nextToken")
        if not token:
            break
    counts: collections.Counter = collections.Counter()
    for thing in things:
        try:
            installed = greengrass.list_installed_components(coreDeviceThingName=thing).get("installedComponents", [])
        except Exception:  # noqa: BLE001 - a device the service no longer knows: it reports nothing
            continue
        version = next((c.get("componentVersion") for c in installed
                        if c.get("componentName") == settings.MODEL_COMPONENT), None)
        counts[version or "none"] += 1
    return counts


def _latest_deployed_version(greengrass: Any, target_arn: str) -> str | None:
    items = greengrass.list_deployments(targetArn=target_arn, historyFilter="LATEST_ONLY").get("deployments", [])
    items = [d for d in items if d.get("targetArn", target_arn) == target_arn]
    if not items:
        return None
    dep = greengrass.get_deployment(deploymentId=items[0]["deploymentId"])
    return _get(dep.get("components") or {}, settings.MODEL_COMPONENT, "componentVersion")


def _package_of_component(registry: Any, greengrass: Any, version: str, entries: list[dict]) -> tuple[dict | None, dict | None]:
    """``(registry entry, card)`` of model component ``version``: through its recipe's
    ModelPackageArn / OnnxSha256; the card from the recipe's model.json when no package matches."""
    from windfleet.cloud.deployer import component_arn

    backend = getattr(registry, "backend", None)
    try:
        arn = component_arn(backend, settings.MODEL_COMPONENT, version)
        recipe = json.loads(greengrass.get_component(arn=arn, recipeOutputFormat="JSON")["recipe"])
    except Exception:  # noqa: BLE001 - no recipe to read: fall back on the version number
        recipe = {}
    config = _get(recipe, "ComponentConfiguration", "DefaultConfiguration") or {}
    for entry in entries:
        if (config.get("ModelPackageArn") and entry.get("arn") == config["ModelPackageArn"]) or (
                config.get("OnnxSha256") and entry.get("sha256") == config["OnnxSha256"]):
            return entry, None
    if not recipe:
        match = [e for e in entries if e.get("component_version") == version]
        return (match[0], None) if len(match) == 1 else (None, None)
    uri = next((a.get("Uri") for m in recipe.get("Manifests") or [] for a in m.get("Artifacts") or []
                if str(a.get("Uri", "")).endswith("/model.json")), None)
    card = registry.read_json(uri) if uri and hasattr(registry, "read_json") else None
    return None, card


def fleet_model(registry: Any, greengrass: Any, store: Any, entries: list[dict]) -> dict:
    """What the fleet runs now: ``{"source", "detail", "component_version", "devices", "row"}``
    (``row`` is a :func:`model_row`, None when the model is unknown)."""
    backend = getattr(registry, "backend", None)
    target = backend.thing_group_arn() if backend is not None and greengrass is not None else None
    if target:
        try:
            counts = _component_versions(greengrass, target)
        except Exception:  # noqa: BLE001
            counts = collections.Counter()
        reported = {v: n for v, n in counts.items() if v != "none"}
        if reported:
            version, n = max(reported.items(), key=lambda vn: (vn[1], vn[0]))
            entry, card = _package_of_component(registry, greengrass, version, entries)
            return _fleet_answer("devices", f"{n} of {sum(counts.values())} core devices in {backend.thing_group} "
                                 f"report {settings.MODEL_COMPONENT} {version} installed", version, dict(counts),
                                 registry, entry, card)
        try:
            version = _latest_deployed_version(greengrass, target)
        except Exception:  # noqa: BLE001
            version = None
        if version:
            entry, card = _package_of_component(registry, greengrass, version, entries)
            return _fleet_answer("deployment", f"the latest deployment to {backend.thing_group} carries "
                                 f"{settings.MODEL_COMPONENT} {version} (no device reports one installed yet)",
                                 version, dict(counts), registry, entry, card)
    gateways = store.fleet()["gateways"] if store is not None else []
    versions = collections.Counter(g["model_version"] for g in gateways if g.get("model_version"))
    if versions:
        model_version, n = versions.most_common(1)[0]
        match = [e for e in entries if e.get("model_version") == model_version]
        entry = match[-1] if match else None
        return _fleet_answer("telemetry", f"{n} of {len(gateways)} gateways score with model {model_version}",
                             entry.get("component_version") if entry else None, dict(versions), registry, entry,
                             None, model_version=model_version)
    return {"source": None, "detail": "no device, deployment or telemetry names a model yet",
            "component_version": None, "devices": {}, "row": None}


def _fleet_answer(source: str, detail: str, version: str | None, devices: dict, registry: Any,
                  entry: dict | None, card: dict | None, model_version: str | None = None) -> dict:
    if entry is not None:
        row = registry_rows(registry, [entry])[0]
    elif card is not None:
        row = {**model_row({"status": "not in the registry", "component_version": version}, card), "actions": []}
    elif model_version is not None:
        row = {**model_row({"status": "not in the registry", "model_version": model_version}, None), "actions": []}
    else:
        row = None
    return {"source": source, "detail": detail, "component_version": version, "devices": devices, "row": row}


# ------------------------------------------------------------------ comparison
def _delta(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else round(a - b, 6)


def compare(candidate: dict, deployed: dict | None) -> dict:
    """Metric deltas (candidate - deployed) and each feature's thresholds, side by side."""
    deployed = deployed or {}
    kinds = sorted(set(candidate.get("per_kind_recall") or {}) | set(deployed.get("per_kind_recall") or {}))
    baselines = sorted(set(candidate.get("baselines_f1") or {}) | set(deployed.get("baselines_f1") or {}))
    features = list(candidate.get("features") or deployed.get("features") or [])
    features += [f for f in (deployed.get("thresholds") or {}) if f not in features]
    ct, dt = candidate.get("thresholds") or {}, deployed.get("thresholds") or {}
    metrics = [{"metric": "held-out F1", "key": "f1", "candidate": candidate.get("f1"), "deployed": deployed.get("f1")},
               {"metric": "false-alarm rate", "key": "false_alarm_rate", "candidate": candidate.get("false_alarm_rate"),
                "deployed": deployed.get("false_alarm_rate")}]
    metrics += [{"metric": f"recall: {k}", "key": f"recall:{k}", "candidate": (candidate.get("per_kind_recall") or {}).get(k),
                 "deployed": (deployed.get("per_kind_recall") or {}).get(k)} for k in kinds]
    metrics += [{"metric": f"baseline F1: {b}", "key": f"baseline:{b}", "candidate": (candidate.get("baselines_f1") or {}).get(b),
                 "deployed": (deployed.get("baselines_f1") or {}).get(b)} for b in baselines]
    for m in metrics:
        m["delta"] = _delta(m["candidate"], m["deployed"])
    return {
        "metrics": metrics,
        "thresholds": [{"feature": f, "candidate": _num(ct.get(f)), "deployed": _num(dt.get(f)),
                        "ratio": (round(ct[f] / dt[f], 4) if _num(ct.get(f)) is not None and _num(dt.get(f))
                                  else None)} for f in features],
    }


def canary_view(registry: Any, store: Any, version: str) -> dict:
    """The shadow statistics of ``version``'s canary, when it has any (see the module docstring)."""
    backend = getattr(registry, "backend", None)
    try:
        from windfleet.cloud import canary

        status = canary.status(backend, store=getattr(store, "path", None))
    except Exception as exc:  # noqa: BLE001 - no canary support, state or statistics: say so
        return {"available": False, "note": CANARY_NOTE, "error": f"{type(exc).__name__}: {exc}"[:200]}
    state = status.get("canary") or {}
    if str(state.get("package_version")) != str(version):
        return {"available": False, "note": CANARY_NOTE}
    devices = status.get("devices") or {}
    reported = {t: m for t, m in devices.items() if m}
    base = {"state": state.get("status"), "devices": devices, "thing_group": state.get("thing_group"),
            "verdict": status.get("verdict"), "reason": status.get("reason") or state.get("reason")}
    if not reported:
        return {**base, "available": False,
                "note": f"no canary data yet: the canary of this version runs on {len(state.get('devices') or [])} "
                        "devices, none has reported shadow statistics"}
    return {**base, "available": True, "gates": status.get("gates") or [], "pooled": status.get("pooled"),
            "note": f"shadow statistics from {len(reported)} of {len(devices)} canary devices"}


MAX_SERIES_POINTS = 600  # the canary chart's points (older ones thinned evenly)


def canary_page(registry: Any, store: Any) -> dict:
    """The canary page's data: ``canary.status`` (state, configuration, gates, per-device
    figures, verdict) of the model package group's current or last canary, plus ``series``:
    the pooled figures the gates read -- both models' alarm rates and their agreement --
    after each health report of a canary device, oldest first."""
    from windfleet.cloud import canary

    backend = getattr(registry, "backend", None)
    status = canary.status(backend, store=getattr(store, "path", None), group=getattr(registry, "group", None))
    state = status.get("canary") or {}
    series: list[dict] = []
    if state.get("started") and state.get("model_version"):
        rows = store.shadow_series(since=float(state["started"]) - 1.0, candidate_version=state["model_version"])
        devices, end = set(state.get("devices") or ()), state.get("finished")
        latest: dict[str, dict] = {}
        for row in rows:
            if row["thing"] not in devices or (end and row["ts"] > float(end) + 1.0):
                continue
            latest[row["thing"]] = row["shadow"]
            pooled = canary._pooled(list(latest.values()))  # noqa: SLF001 - the gates' own pooling
            series.append({"ts": row["ts"], "windows": pooled["windows"],
                           "current_alarm_rate": pooled["current_alarm_rate"],
                           "candidate_alarm_rate": pooled["candidate_alarm_rate"], "agreement": pooled["agreement"]})
        if len(series) > MAX_SERIES_POINTS:
            step = len(series) / MAX_SERIES_POINTS
            series = [series[int(i * step)] for i in range(MAX_SERIES_POINTS - 1)] + [series[-1]]
    return {**status, "series": series}
