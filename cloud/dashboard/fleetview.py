"""The fleet page at a glance: each gateway's state, the counts, a deployment's progress.

A gateway is, in this order of precedence:

* **offline** -- no telemetry for ``offline_after_s`` (the forwarder sends health every
  10 s and batches every second, so a minute of silence means the link or the device is down);
* **broken** -- a component is ``BROKEN`` (the nucleus gave up restarting it);
* **degraded** -- a component is not ``RUNNING``/``FINISHED`` (``ERRORED``, starting...),
  no component has reported health yet, or the device's latest deployment FAILED,
  TIMED_OUT or was REJECTED (it rolled back and runs its previous set);
* **healthy** -- otherwise.

A turbine has an *open anomaly* while its latest scored window is anomalous, and is
*drifted* while its newest drift record names a feature over its threshold.

Deployments in progress: each device's latest deployment (greengrassv2
``ListEffectiveDeployments``), grouped, with the devices counted per execution status.
"""

from __future__ import annotations

STATES = ("broken", "offline", "degraded", "healthy")  # most urgent first: the table's order
OK_COMPONENT_STATES = {"RUNNING", "FINISHED"}
FAILED_DEPLOYMENT = {"FAILED", "TIMED_OUT", "REJECTED"}
DONE_DEPLOYMENT = {"SUCCEEDED", "COMPLETED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELED", "NOT_RECEIVED"}
DEFAULT_OFFLINE_AFTER_S = 60.0


def _short(component: str) -> str:
    return component.replace("com.windfleet.", "")


def classify(gateway: dict, deployment: dict | None, offline_after_s: float = DEFAULT_OFFLINE_AFTER_S) -> tuple[str, str]:
    """``(state, reason)`` of one gateway of ``TelemetryStore.fleet()`` (see the module docstring)."""
    age = gateway.get("last_seen_age_s")
    if age is not None and age > offline_after_s:
        return "offline", f"no telemetry for {int(age)} s"
    components = gateway.get("components") or []
    broken = [c for c in components if str(c.get("state")).upper() == "BROKEN"]
    if broken:
        return "broken", "; ".join(f"{_short(c['component'])} BROKEN" for c in broken)
    unwell = [c for c in components if str(c.get("state")).upper() not in OK_COMPONENT_STATES]
    if unwell:
        return "degraded", "; ".join(f"{_short(c['component'])} {c.get('state')}" for c in unwell)
    if not components:
        return "degraded", "no component health reported yet"
    status = (deployment or {}).get("coreDeviceExecutionStatus")
    if status in FAILED_DEPLOYMENT:
        return "degraded", f"deployment {deployment.get('deploymentName') or deployment.get('deploymentId')} {status}"
    return "healthy", ""


def errors(gateway: dict) -> list[dict]:
    """The gateway's component error texts, full (the page shows one line and the rest on
    demand; a deployment's reason is shown with the deployment)."""
    return [{"source": _short(c["component"]), "text": c["reason"]} for c in gateway.get("components") or []
            if c.get("reason") and str(c.get("state")).upper() not in OK_COMPONENT_STATES]


def deployment_progress(per_device: dict[str, dict | None]) -> list[dict]:
    """Every deployment that is some device's latest, with its devices counted per status:
    in progress first, then newest first (a canary group's deployment shows beside the fleet's)."""
    by_id: dict[str, list[dict]] = {}
    for d in per_device.values():
        if isinstance(d, dict) and d.get("deploymentId"):
            by_id.setdefault(d["deploymentId"], []).append(d)
    out = []
    for dep_id, mine in by_id.items():
        counts: dict[str, int] = {}
        for d in mine:
            status = d.get("coreDeviceExecutionStatus") or "UNKNOWN"
            counts[status] = counts.get(status, 0) + 1
        done = sum(n for s, n in counts.items() if s in DONE_DEPLOYMENT)
        out.append({"deploymentId": dep_id, "deploymentName": mine[0].get("deploymentName"),
                    "targetArn": mine[0].get("targetArn"), "created": mine[0].get("creationTimestamp"),
                    "devices": len(mine), "done": done, "counts": counts,
                    "failed": sum(n for s, n in counts.items() if s in FAILED_DEPLOYMENT),
                    "in_progress": done < len(mine)})
    out.sort(key=lambda d: str(d["created"] or ""), reverse=True)
    out.sort(key=lambda d: not d["in_progress"])
    return out


def annotate(fleet: dict, per_device: dict[str, dict | None], offline_after_s: float = DEFAULT_OFFLINE_AFTER_S) -> dict:
    """``fleet`` with each gateway's ``state``, ``state_reason``, ``errors``, ``deployment``,
    ``open_anomalies``, ordered most urgent first, plus a ``summary``."""
    by_state = {s: 0 for s in STATES}
    open_turbines = 0
    for g in fleet["gateways"]:
        dep = per_device.get(g["thing"])
        g["deployment"] = dep
        g["state"], g["state_reason"] = classify(g, dep, offline_after_s)
        g["errors"] = errors(g)
        g["open_anomalies"] = sum(1 for t in g.get("turbines") or [] if t.get("anomaly"))
        by_state[g["state"]] += 1
        open_turbines += g["open_anomalies"]
    fleet["gateways"].sort(key=lambda g: (STATES.index(g["state"]), g["thing"]))
    fleet["summary"] = {
        "gateways": len(fleet["gateways"]), "by_state": by_state,
        "turbines": sum(len(g.get("turbines") or []) for g in fleet["gateways"]),
        "turbines_open_anomalies": open_turbines,
        "turbines_drifted": sum(1 for g in fleet["gateways"] for t in g.get("turbines") or [] if t.get("drifted")),
        "gateways_open_anomalies": sum(1 for g in fleet["gateways"] if g["open_anomalies"]),
        "deployments": deployment_progress(per_device),
        "offline_after_s": offline_after_s,
    }
    return fleet


def page(fleet: dict, state: str | None = None, query: str | None = None, offset: int = 0,
         limit: int | None = None) -> dict:
    """Keep the gateways matching ``state`` and ``query`` (a substring of the name), then one page."""
    gateways = fleet["gateways"]
    if state:
        gateways = [g for g in gateways if g["state"] == state]
    if query:
        q = query.lower()
        gateways = [g for g in gateways if q in g["thing"].lower()]
    fleet["total"] = len(gateways)
    fleet["offset"], fleet["limit"] = offset, limit
    fleet["gateways"] = gateways[offset:offset + limit] if limit else gateways[offset:]
    return fleet
