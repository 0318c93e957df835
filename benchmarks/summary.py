"""The headline figures of every benchmark, in one file.

Reads whatever results exist in ``benchmarks/results/`` (``detector.json``, ``fleet.json``,
``training.json``, ``seeds.json``, ``dashboard.json``, ``ota.json``, ``ipc.json``, ``drift.json``) and writes
``benchmarks/results/summary.json``: one value per key (``null`` when its source is
missing or lacks it) and, under ``sources``, for each key the file it came from, where in
that file, the file's modification time and the run's own time stamp when it has one
(``created_at`` / ``started``) -- so a stale figure is visible as such.

    .venv/bin/python benchmarks/summary.py [--results DIR] [--out FILE]

Keys:

- ``detector_speedup_vs_sample``          detector.json: our streaming path / the AWS sample's loop (readings/s)
- ``detector_ratio_to_onnxruntime_floor`` detector.json: our streaming path / onnxruntime alone
- ``detector_rss_mb``                     detector.json: peak RSS of the real detector process
- ``detector_saturated_readings_per_s``   detector.json: the real detector process under an IPC server, saturated
- ``detector_process_readings_per_s``     detector.json: the same figure under the name issue 13 gives it (real
                                          process, one core, saturated, over Greengrass IPC; goal >= 20,000)
- ``shadow_throughput_ratio``             detector.json: the streaming path with a canary candidate scoring in
                                          shadow / without one, same run (goal >= 0.5)
- ``fleet_readings_per_s``                fleet.json: end-to-end readings/s of the best point with 0 telemetry
                                          lost (among those that keep up, when any does: no backlog building)
- ``fleet_telemetry_lost``                fleet.json: telemetry messages lost at that point
- ``fleet_point``, ``fleet_offered_readings_per_s``, ``fleet_ratio_to_offered``   that point's shape and load
- ``fleet_reading_to_cloud_p99_s``        fleet.json: that point's reading -> cloud latency, 99th percentile
- ``fleet_keeps_up``                      fleet.json: whether that point keeps up
- ``rollout_seconds_10_gateways``         ota.json: rollout time of the point with 10 gateways
- ``swap_readings_lost``                  ota.json: readings lost across a model swap (the worst point)
- ``training_quick_wall_s``, ``onnxruntime_over_torch_batch_1``   training.json
- ``training_seeds_meeting_targets``      seeds.json: seeds 0-9 of ``train --quick`` with held-out F1 >= 0.95
                                          and FAR <= 1 %
- ``training_seeds_per_kind_recall_ok``  seeds.json: of those seeds, how many have recall >= 0.90 on every kind
- ``ingest_records_per_s``, ``dashboard_overview_ms``             dashboard.json
- ``dashboard_overview_200_gateways_ms``  dashboard.json: fleet page (first 50 of 200 gateways) load
- ``ipc_sync_msgs_per_s``, ``ipc_pipelined_msgs_per_s``           ipc.json: local pub/sub over the nucleus' IPC server
- ``ipc_pipelined_ratio_to_mosquitto_qos1``                        ipc.json: pipelined IPC / Mosquitto QoS1, same run
- ``drift_us_per_reading``                drift.json: drift monitoring's cost per reading on the detector's path
                                          (the handler's update + one drift record per turbine every 10 s)
- ``drift_cost_ratio``                    drift.json: that / the detector's cost per reading without drift, same run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def _get(obj: Any, path: str) -> Any:
    """``a.b.c`` into nested dicts; None when any step is missing."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _num(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return round(value, 4) if isinstance(value, float) else value


class Sources:
    def __init__(self, results: Path):
        self.results = results
        self.cache: dict[str, tuple[dict | None, str | None, str]] = {}

    def load(self, name: str) -> tuple[dict | None, str | None, str]:
        """(data, modification time, status) with status ``ok``, ``missing`` or ``unreadable``."""
        if name not in self.cache:
            path = self.results / name
            try:
                mtime = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(path.stat().st_mtime))
                data = json.loads(path.read_text())
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self.cache[name] = (data, mtime, "ok")
            except FileNotFoundError:
                self.cache[name] = (None, None, "missing")
            except (OSError, ValueError) as exc:
                print(f"warning: cannot read {path}: {exc}", file=sys.stderr)
                self.cache[name] = (None, None, "unreadable")
        return self.cache[name]


# ------------------------------------------------------------------ per-source pickers
# Each returns (value, where) with ``where`` naming the place in the file the value came from.
def _fleet_best(data: dict) -> tuple[dict | None, str]:
    """The point with the most end-to-end readings/s among those with 0 telemetry lost that
    also keep up (``keeps_up``: no backlog building); if none keeps up, among those with 0 lost."""
    points = [p for p in data.get("points") or [] if isinstance(p, dict)]
    ok = [p for p in points if p.get("telemetry_lost") == 0 and _num(p.get("e2e_readings_per_s")) is not None]
    steady = [p for p in ok if p.get("keeps_up") is True]
    if steady:
        return max(steady, key=lambda p: p["e2e_readings_per_s"]), "telemetry_lost == 0 and keeps_up"
    return (max(ok, key=lambda p: p["e2e_readings_per_s"]) if ok else None), "telemetry_lost == 0"


def _fleet(field: str) -> Callable[[dict], tuple[Any, str | None]]:
    def pick(data: dict):
        best, rule = _fleet_best(data)
        if best is None:
            return None, None
        value = _get(best, field)
        return (value if isinstance(value, (str, bool)) else _num(value)), \
            f"points[point={best.get('point')}].{field} (best point with {rule})"
    return pick


def _ota_rollout_10(data: dict):
    points = [p for p in data.get("points") or [] if isinstance(p, dict)]
    ten = [p for p in points if p.get("gateways") == 10 and _num(p.get("rollout_seconds")) is not None]
    if not ten:
        return None, None
    return _num(ten[-1]["rollout_seconds"]), "points[gateways=10].rollout_seconds"


def _ota_swap_lost(data: dict):
    points = [p for p in data.get("points") or [] if isinstance(p, dict)]
    lost = [(p.get("gateways"), p["readings_lost"]) for p in points if _num(p.get("readings_lost")) is not None]
    if not lost:
        return None, None
    g, worst = max(lost, key=lambda gl: (gl[1], gl[0] or 0))  # ties: the largest fleet
    return _num(worst), f"points[gateways={g}].readings_lost (worst of {len(lost)} points)"


def _path(path: str) -> Callable[[dict], tuple[Any, str | None]]:
    def pick(data: dict):
        value = _num(_get(data, path))
        return value, (path if value is not None else None)
    return pick


def _first(*paths: str) -> Callable[[dict], tuple[Any, str | None]]:
    def pick(data: dict):
        for path in paths:
            value = _num(_get(data, path))
            if value is not None:
                return value, path
        return None, None
    return pick


KEYS: list[tuple[str, str, Callable[[dict], tuple[Any, str | None]]]] = [
    ("detector_speedup_vs_sample", "detector.json", _path("detector_speedup_vs_sample")),
    ("detector_ratio_to_onnxruntime_floor", "detector.json", _path("detector_ratio_to_onnxruntime_floor")),
    ("detector_rss_mb", "detector.json", _first("detector_rss_mb", "sustained.rss_mb")),
    ("detector_saturated_readings_per_s", "detector.json", _path("sustained.saturated.readings_per_s")),
    ("detector_process_readings_per_s", "detector.json", _path("sustained.saturated.readings_per_s")),
    ("shadow_throughput_ratio", "detector.json", _path("shadow_throughput_ratio")),
    ("fleet_readings_per_s", "fleet.json", _fleet("e2e_readings_per_s")),
    ("fleet_telemetry_lost", "fleet.json", _fleet("telemetry_lost")),
    ("fleet_point", "fleet.json", _fleet("point")),
    ("fleet_offered_readings_per_s", "fleet.json", _fleet("offered_readings_per_s")),
    ("fleet_ratio_to_offered", "fleet.json", _fleet("ratio_to_offered")),
    ("fleet_reading_to_cloud_p99_s", "fleet.json", _fleet("latency_s.reading_to_cloud.p99")),
    ("fleet_keeps_up", "fleet.json", _fleet("keeps_up")),
    ("rollout_seconds_10_gateways", "ota.json", _ota_rollout_10),
    ("swap_readings_lost", "ota.json", _ota_swap_lost),
    ("training_quick_wall_s", "training.json", _path("training.quick.wall_s")),
    ("onnxruntime_over_torch_batch_1", "training.json", _path("scoring.batch_1.ratio_onnxruntime_over_torch")),
    ("training_seeds_meeting_targets", "seeds.json", _path("training_seeds_meeting_targets")),
    ("training_seeds_per_kind_recall_ok", "seeds.json", _path("training_seeds_per_kind_recall_ok")),
    ("ingest_records_per_s", "dashboard.json", _path("ingest.batched_records_per_s")),
    ("dashboard_overview_ms", "dashboard.json", _path("pages_loaded.overview_ms")),
    ("dashboard_overview_200_gateways_ms", "dashboard.json", _path("pages_200_gateways.overview_ms")),
    ("ipc_sync_msgs_per_s", "ipc.json", _path("results.ipc_sync.messages_per_s")),
    ("ipc_pipelined_msgs_per_s", "ipc.json", _path("results.ipc_pipelined.messages_per_s")),
    ("ipc_pipelined_ratio_to_mosquitto_qos1", "ipc.json", _path("results.ipc_pipelined.ratio_to_mosquitto_qos1")),
    ("drift_us_per_reading", "drift.json", _path("drift_us_per_reading")),
    ("drift_cost_ratio", "drift.json", _path("drift_cost_ratio")),
]


def summarize(results: Path = RESULTS) -> dict:
    src = Sources(results)
    out: dict[str, Any] = {}
    sources: dict[str, dict] = {}
    for key, name, pick in KEYS:
        data, mtime, status = src.load(name)
        value, where = (None, None)
        if data is not None:
            try:
                value, where = pick(data)
            except Exception as exc:  # a file in an unexpected shape: that key is null, the others stand
                print(f"warning: {name}: cannot read {key}: {exc!r}", file=sys.stderr)
        out[key] = value
        created = next((data[k] for k in ("created_at", "started", "generated") if isinstance((data or {}).get(k), str)),
                       None)
        sources[key] = {"file": name, "status": status, "modified": mtime, "created": created, "field": where}
    out["generated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out["sources"] = sources
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS), help="directory holding the results JSONs")
    ap.add_argument("--out", default=None, help="where to write (default RESULTS/summary.json)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    summary = summarize(results)
    out = Path(args.out) if args.out else results / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(k) for k, _, _ in KEYS)
    for key, name, _ in KEYS:
        value = summary[key]
        shown = "null" if value is None else (f"{value:,.4g}" if isinstance(value, float) else str(value))
        status = summary["sources"][key]["status"]
        print(f"{key:{width}s}  {shown:>12s}  ({name}{'' if status == 'ok' else ', ' + status})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
