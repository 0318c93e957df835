"""Fleet scale: end-to-end readings/s, loss, latency and footprint of real fleets on one machine.

For each sweep point (``GATEWAYSxTURBINES``), :func:`windfleet.nucleus.fleet.run_fleet`
runs a real Mosquitto (the IoT Core stand-in), one real device runtime (local nucleus) per
gateway and the four real components (simulator -> detector -> forwarder -> the cloud side,
model component as artifact), every turbine sampling at ``--rate`` Hz.  On the device the
components speak only Greengrass IPC: local pub/sub is routed in memory by each gateway's
runtime, which holds the gateway's one MQTT connection (the forwarder's telemetry goes out
through ``PublishToIoTCore``); component health reaches the cloud inside that telemetry.  Measured in the steady phase (from ``--warmup``
seconds after every deployment finished, for ``--duration`` seconds):

- ``offered_readings_per_s``   gateways x turbines x rate (what the simulators are asked for)
- ``published_per_s``          readings the simulators published (health counter deltas)
- ``scored_per_s``             readings the detectors scored (health counter deltas)
- ``e2e_readings_per_s``       windows whose score reached the cloud x STRIDE / seconds (the
                               end-to-end figure); ``ratio_to_offered`` = e2e / offered
- ``delivered_ratio``          of the windows whose last readings were published in the window,
                               the share that reached the cloud at all (exact per turbine)
- ``keeps_up``                 delivered_ratio >= 0.99, 0 telemetry lost, and reading -> cloud
                               p50 not growing (last quarter - first quarter < 1 s)
- loss: ``telemetry_lost`` (gaps in the forwarders' per-device sequence), ``windows_missing``
  (gaps in each turbine's scored windows), ``malformed_dropped``, the detector's
  ``queue_dropped``, the forwarder's ``dropped_spool_full``, the simulator's ``late_batches``
- latency (per score that reached the cloud): from the moment the simulator published the
  readings batch holding the window's last sample to (a) the forwarder building the telemetry
  message (``reading_to_send``: scoring + spooling + batching) and (b) the cloud receiving it
  (``reading_to_cloud``).  Scores carry the window's last sample timestamp ``ts``; the
  simulator publishes a batch of ``batch`` samples (columnar, ``payloads.readings_batch``) at
  the nominal time of its FIRST sample, so the batch holding sample ``end`` left
  ``(end % batch) / rate`` seconds before that timestamp; latencies are measured from there
  (exact while the simulator keeps its pace; its lag, if any, is included).
- ``cpu_us_per_reading``       CPU microseconds per published reading, per component kind;
                               ``simulator_cost_ratio_to_detector`` = simulator / detector (< 1:
                               the simulator is not the bottleneck)
- CPU% (of one core) and RSS per component kind -- TurbineSimulator, AnomalyDetector,
  LogForwarder, the device runtime, mosquitto, and this process (the cloud side) -- sampled
  with psutil every second during the steady phase; the machine's total CPU and the share of
  it used by processes that are not ours (other work on a shared machine) too.

Baselines in the same run (machines are noisy, so compare ratios): the offered rate (above),
and the detector alone, as one real process under windfleet's IPC server, pinned to one core and
saturated (``bench_detector.bench_sustained``); ``detector_ratio_to_saturated`` is the fleet's
scored readings/s over that single-process rate, ``detector_cpu_efficiency_ratio`` the
detectors' readings per CPU-second in the fleet over the saturated process's.

    .venv/bin/python benchmarks/bench_fleet.py                   # default sweep, 40 s per point
    .venv/bin/python benchmarks/bench_fleet.py --points 1x5,3x20 --duration 20
    .venv/bin/python benchmarks/bench_fleet.py --quick          # tiny sweep, short points
    .venv/bin/python benchmarks/bench_fleet.py --model DIR      # a model package (else one is trained)

Prints a table, writes benchmarks/results/fleet.json and fleet_*.png.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import psutil  # noqa: E402

from windfleet import model_contract as mc  # noqa: E402
from windfleet import payloads  # noqa: E402
from windfleet.nucleus import fleet as fleet_mod  # noqa: E402
from windfleet.nucleus.broker import free_port  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_POINTS = "1x5,3x20,10x25,10x50,10x55,10x60"  # 10x50 is the target load; past it, where it breaks
QUICK_POINTS = "1x5,2x10"
def _recipe_default(component: str, key: str):
    import yaml
    recipe = yaml.safe_load((REPO / "recipes" / f"{component}.yaml").read_text())
    return recipe["ComponentConfiguration"]["DefaultConfiguration"][key]


SIM_BATCH = int(_recipe_default("com.windfleet.TurbineSimulator", "batch"))  # samples per readings message
TARGET_READINGS_PER_S = 10000.0  # issue 13: 10,000 readings/s fleet-wide on 2 cores, 0 telemetry lost
KEEPS_UP_DELIVERED = 0.99  # share of the windows produced in the measured window that reached the cloud
KEEPS_UP_GROWTH_S = 1.0   # reading -> cloud p50, last quarter of the window minus the first

KINDS = {
    fleet_mod.SIMULATOR: "simulator",
    fleet_mod.DETECTOR: "detector",
    fleet_mod.FORWARDER: "forwarder",
    fleet_mod.MODEL: "model",
}
KIND_ORDER = ("simulator", "detector", "forwarder", "runtime", "mosquitto", "cloud_side")
# cloud_side is this process: the cloud collector (paho + JSON), and bench_detector's imports
# (numpy, onnxruntime) for the baseline -- not a fleet component.
KIND_LABEL = {"runtime": "device runtime", "cloud_side": "this bench (cloud side)"}


def log(msg: str) -> None:
    print(f"[bench_fleet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_points(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        g, _, t = part.partition("x")
        if not (g.isdigit() and t.isdigit()) or int(g) < 1 or int(t) < 1:
            raise SystemExit(f"bad point {part!r}: use GATEWAYSxTURBINES, e.g. 3x20")
        out.append((int(g), int(t)))
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist(values: list[float]) -> dict:
    return {"n": len(values), "p50": _r(pct(values, 0.5), 3), "p90": _r(pct(values, 0.9), 3),
            "p99": _r(pct(values, 0.99), 3), "max": _r(max(values) if values else None, 3),
            "min": _r(min(values) if values else None, 3)}


def _r(x, nd=1):
    return None if x is None else round(float(x), nd)


# ------------------------------------------------------------------ the cloud side, with timings
class BenchCollector(fleet_mod.FleetCollector):
    """The fleet's collector, also keeping every health message (counter time series)
    and each score's arrival time and latencies."""

    def __init__(self, batch: int, rate: float):
        super().__init__()
        self.batch, self.sample_rate = batch, rate
        self.health_series: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
        # (arrival, reading->cloud, reading->forwarder send or None)
        self.score_times: list[tuple[float, float, float | None]] = []
        self.window_ts: dict[tuple[str, int], float] = {}  # (turbine, window_end_seq) -> its last sample's ts

    def handle(self, topic: str, raw: bytes) -> None:
        super().handle(topic, raw)
        if topic.endswith("/health"):
            try:
                h = payloads.validate_health(payloads.decode(raw))
            except payloads.MalformedPayload:
                return
            with self._lock:
                self.health_series[(h["thing"], h["component"])].append(h)

    def _telemetry(self, body: dict) -> None:  # called under self._lock
        fresh = body["seq"] not in self.seqs[body["thing"]]
        super()._telemetry(body)
        if not fresh:
            return
        now = time.time()
        sent = body.get("ts") if isinstance(body.get("ts"), (int, float)) else None
        for record in body["records"]:
            rec = record["body"]
            ts = rec.get("ts")
            if record["type"] == "health" and isinstance(rec.get("thing"), str) \
                    and isinstance(rec.get("component"), str):
                # Over IPC the components' health stays on the device: it reaches the cloud only
                # inside the forwarder's telemetry (fresh telemetry only, so each record once).
                self.health_series[(rec["thing"], rec["component"])].append(rec)
                continue
            if record["type"] == "score" and isinstance(ts, (int, float)) and not isinstance(ts, bool):
                published = ts - self.offset(rec.get("window_end_seq"))
                self.score_times.append((now, now - published, None if sent is None else sent - published))
                if isinstance(rec.get("turbine_id"), str) and isinstance(rec.get("window_end_seq"), int):
                    self.window_ts.setdefault((rec["turbine_id"], rec["window_end_seq"]), float(ts))

    def offset(self, end: object) -> float:
        """Seconds from the publication of the readings batch holding sample ``end`` to that
        sample's ``ts``: the simulator publishes a batch at the nominal time of its first
        sample, and batches start at multiples of ``batch``."""
        position = end % self.batch if isinstance(end, int) and not isinstance(end, bool) else self.batch - 1
        return position / self.sample_rate

    # -------------------------------------------------------------- steady-phase figures
    def rate(self, component: str, counter: str, since: float, until: float) -> tuple[float, int]:
        """Sum over gateways of ``counter``'s rate between the first and the last health
        message stamped in [since, until]; also how many gateways contributed."""
        total, n = 0.0, 0
        with self._lock:
            series = {k: list(v) for k, v in self.health_series.items() if k[1] == component}
        for _, hs in series.items():
            inside = sorted((h for h in hs if since <= float(h.get("ts", 0)) <= until
                             and isinstance((h.get("counters") or {}).get(counter), (int, float))),
                            key=lambda h: float(h["ts"]))
            if len(inside) < 2:
                continue
            a, b = inside[0], inside[-1]
            dt = float(b["ts"]) - float(a["ts"])
            delta = b["counters"][counter] - a["counters"][counter]
            if dt > 0 and delta >= 0:
                total += delta / dt
                n += 1
        return total, n

    def series_max(self, component: str, key: str, since: float, until: float) -> float | None:
        """Max of a health field (top level or counter) over the messages stamped in [since, until]."""
        best = None
        with self._lock:
            hs = [h for (_, c), v in self.health_series.items() if c == component for h in v]
        for h in hs:
            if not since <= float(h.get("ts", 0)) <= until:
                continue
            v = h.get(key, (h.get("counters") or {}).get(key))
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                best = v if best is None else max(best, v)
        return best

    def last_counter(self, component: str, name: str) -> int:
        """Sum over gateways of a counter in the component's last health (0 when absent)."""
        return self.counter(component, name)

    def delivered(self, since: float, until: float, rate: float, turbines: int) -> tuple[int, int]:
        """(windows produced, windows that reached the cloud) among the windows whose last
        readings batch was published in [since, until], whenever they arrived.

        Exact per turbine: windows end every STRIDE samples and sample k is stamped
        ``t0 + k / rate``, so one received window fixes which window ends fall in the
        interval.  A turbine with no window received at all counts as all missing."""
        with self._lock:
            items = list(self.window_ts.items())
        by_turbine: dict[str, dict[int, float]] = collections.defaultdict(dict)
        for (turbine, end), ts in items:
            by_turbine[turbine][end] = ts
        produced = received = 0
        for ends in by_turbine.values():
            ref_end, ref_ts = min(ends.items())
            period = mc.STRIDE / rate

            def published(k: int) -> float:  # when window ref_end + k * STRIDE's last batch left
                end = ref_end + k * mc.STRIDE
                return ref_ts + k * period - self.offset(end)

            k_lo = math.ceil((since - ref_ts) / period - 1e-6) - 1
            while published(k_lo) < since - 1e-6:
                k_lo += 1
            k_hi = math.floor((until + self.batch / rate - ref_ts) / period + 1e-6) + 1
            while published(k_hi) > until + 1e-6:
                k_hi -= 1
            produced += max(0, k_hi - k_lo + 1)
            received += sum(1 for end in ends if (end - ref_end) % mc.STRIDE == 0
                            and k_lo <= (end - ref_end) // mc.STRIDE <= k_hi)
        produced += max(0, turbines - len(by_turbine)) * round((until - since) * rate / mc.STRIDE)
        return produced, received

    def windows_arrived(self, since: float, until: float) -> int:
        with self._lock:
            return sum(1 for at, _, _ in self.score_times if since <= at <= until)

    def latencies(self, since: float, until: float) -> tuple[list[float], list[float]]:
        with self._lock:
            rows = [r for r in self.score_times if since <= r[0] <= until]
        return [r[1] for r in rows], [r[2] for r in rows if r[2] is not None]


# ------------------------------------------------------------------ process sampling
class ProcSampler(threading.Thread):
    """Samples CPU and RSS of every process of the fleet, per kind, once a second, from
    ``warmup`` seconds after ``info['started_at']`` to the end of ``info['duration']``
    (run_fleet's ``on_running`` info)."""

    def __init__(self, info: dict, interval: float = 1.0, warmup: float = 0.0):
        super().__init__(name="bench-fleet-sampler", daemon=True)
        self.info, self.interval, self.warmup = info, interval, warmup
        self.stop_event = threading.Event()
        self.ticks: list[dict] = []
        self._procs: dict[int, tuple[str, psutil.Process]] = {}
        self._prev: dict[int, float] = {}
        self.me = os.getpid()

    def _groups(self) -> dict[int, str]:
        groups: dict[int, str] = {}
        for thing, root in self.info["roots"].items():
            try:
                status = json.loads((Path(root) / "status.json").read_text())
            except (OSError, ValueError):
                continue
            for name, comp in (status.get("components") or {}).items():
                for pgid in comp.get("pgids") or []:
                    groups[int(pgid)] = KINDS.get(name, name)
        for pid in self.info["runtime_pids"].values():
            groups[int(pid)] = "runtime"  # each runtime leads its own session / group
        return groups

    def _refresh(self) -> None:
        groups = self._groups()
        seen = set()
        for p in psutil.process_iter(["pid"]):
            pid = p.info["pid"]
            try:
                pgid = os.getpgid(pid)
            except OSError:
                continue
            kind = groups.get(pgid)
            if pid == self.info.get("broker_pid"):
                kind = "mosquitto"
            elif pid == self.me:
                kind = "cloud_side"
            if kind is None:
                continue
            seen.add(pid)
            if pid not in self._procs:
                self._procs[pid] = (kind, p)
        for pid in list(self._procs):
            if pid not in seen:
                self._procs.pop(pid)
                self._prev.pop(pid, None)

    def run(self) -> None:
        begin = self.info["started_at"] + self.warmup
        if self.stop_event.wait(max(0.0, begin - time.time())):
            return
        end = self.info["started_at"] + self.info["duration"]
        ncpu = psutil.cpu_count() or 1
        last_t = time.monotonic()
        sys_prev = psutil.cpu_times()
        self._refresh()
        for pid, (_, p) in list(self._procs.items()):
            try:
                t = p.cpu_times()
                self._prev[pid] = t.user + t.system
            except psutil.Error:
                pass
        while not self.stop_event.wait(self.interval) and time.time() < end:
            now = time.monotonic()
            dt = now - last_t
            last_t = now
            sys_now = psutil.cpu_times()
            busy = lambda c: c.user + c.nice + c.system + c.irq + c.softirq + getattr(c, "steal", 0.0)  # noqa: E731
            total = lambda c: busy(c) + c.idle + getattr(c, "iowait", 0.0)  # noqa: E731
            span = total(sys_now) - total(sys_prev)
            machine_pct = 100.0 * ncpu * (busy(sys_now) - busy(sys_prev)) / span if span > 0 else 0.0
            sys_prev = sys_now
            tick = {"t": time.time(), "cpu": collections.Counter(), "rss": collections.Counter(),
                    "count": collections.Counter(), "machine_cpu_pct": machine_pct}
            self._refresh()
            for pid, (kind, p) in list(self._procs.items()):
                try:
                    ct = p.cpu_times()
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                cpu = ct.user + ct.system
                if pid in self._prev:
                    tick["cpu"][kind] += 100.0 * (cpu - self._prev[pid]) / dt
                self._prev[pid] = cpu
                tick["rss"][kind] += rss / 2**20
                tick["count"][kind] += 1
            self.ticks.append(tick)

    def summary(self) -> dict:
        ticks = self.ticks[1:] or self.ticks  # the first tick's new processes have no previous sample
        out: dict = {"samples": len(ticks), "kinds": {}}
        if not ticks:
            return out
        kinds = sorted({k for t in ticks for k in t["count"]}, key=lambda k: KIND_ORDER.index(k)
                       if k in KIND_ORDER else len(KIND_ORDER))
        for kind in kinds:
            cpu = [t["cpu"][kind] for t in ticks]
            rss = [t["rss"][kind] for t in ticks]
            count = max(t["count"][kind] for t in ticks) or 1
            instances = count
            out["kinds"][kind] = {
                "processes": count,
                "cpu_pct_total": _r(sum(cpu) / len(cpu)),
                "cpu_pct_total_max": _r(max(cpu)),
                "cpu_pct_per_process": _r(sum(cpu) / len(cpu) / instances),
                "rss_mb_total": _r(sum(rss) / len(rss)),
                "rss_mb_per_process": _r(sum(rss) / len(rss) / instances),
                "rss_mb_per_process_max": _r(max(t["rss"][kind] / max(t["count"][kind], 1) for t in ticks)),
            }
        machine = [t["machine_cpu_pct"] for t in ticks]
        ours = [sum(t["cpu"].values()) for t in ticks]
        out["machine_cpu_pct"] = _r(sum(machine) / len(machine))
        out["ours_cpu_pct"] = _r(sum(ours) / len(ours))
        out["others_cpu_pct"] = _r(max(0.0, out["machine_cpu_pct"] - out["ours_cpu_pct"]))
        out["machine_capacity_pct"] = 100 * (psutil.cpu_count() or 1)
        return out


# ------------------------------------------------------------------ baseline
def detector_baseline(model_dir: Path, turbines: int, saturate_seconds: float) -> dict:
    """The detector alone, one real process under an IPC server, pinned to one core, saturated
    (bench_detector.bench_sustained: a short real-time phase, then a saturating publisher)."""
    import bench_detector

    t0 = time.monotonic()
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("wf-bench-sustained-*"))
    try:
        out = bench_detector.bench_sustained(model_dir, turbines, seconds=5.0, saturate_seconds=saturate_seconds)
    finally:  # bench_sustained leaves its broker/work directory behind
        for leftover in set(tmp.glob("wf-bench-sustained-*")) - before:
            shutil.rmtree(leftover, ignore_errors=True)
    sat = out["saturated"]
    cpu = sat.get("cpu_fraction_of_one_core") or 0.0
    return {
        "what": "bench_detector.bench_sustained: one detector process under windfleet's IPC server, pinned to "
                "one core, saturated by a GreengrassCoreIPCClientV2 publisher (publish_to_topic_async)",
        "turbines": turbines,
        "saturated_readings_per_s": _r(sat["readings_per_s"]),
        "saturated_cpu_fraction_of_one_core": _r(cpu, 3),
        "saturated_readings_per_cpu_s": _r(sat["readings_per_s"] / cpu) if cpu else None,
        "saturated_rss_mb": _r(sat["rss_mb"]),
        "queue_dropped": sat.get("queue_dropped"),
        "seconds": _r(time.monotonic() - t0),
    }


# ------------------------------------------------------------------ one point
def run_point(gateways: int, turbines: int, args, model_dir: Path, scratch: Path) -> dict:
    rate = args.rate
    offered = gateways * turbines * rate
    work = scratch / f"fleet-{gateways}x{turbines}"
    collector = BenchCollector(SIM_BATCH, rate)
    holder: dict = {}

    def on_running(info: dict) -> None:
        holder["info"] = info
        holder["sampler"] = ProcSampler(info, interval=1.0, warmup=args.warmup)
        holder["sampler"].start()

    t0 = time.time()
    report = fleet_mod.run_fleet(
        gateways=gateways, turbines_per_gateway=turbines, duration=args.warmup + args.duration,
        report_path=work / "report.json", model_dir=model_dir, broker=f"127.0.0.1:{free_port()}",
        work_dir=work, sample_rate=rate, startup_timeout=args.startup_timeout,
        collector=collector, on_running=on_running)
    wall = time.time() - t0
    sampler: ProcSampler | None = holder.get("sampler")
    if sampler is not None:
        sampler.stop_event.set()
        sampler.join(10)
    info = holder.get("info")
    if info is None:
        raise RuntimeError(f"point {gateways}x{turbines} never reached the running phase (see {work})")
    # the measurement window: after the warm-up, to the end of the run (shorter if interrupted)
    since = info["started_at"] + args.warmup
    until = info["started_at"] + float(report["duration_s"] or 0.0)
    if until - since < 1.0:
        raise RuntimeError(f"point {gateways}x{turbines} ended before its warm-up did")
    seconds = until - since

    published, n_sim = collector.rate(fleet_mod.SIMULATOR, "readings_published", since, until)
    scored, n_det = collector.rate(fleet_mod.DETECTOR, "readings_scored", since, until)
    e2e = collector.windows_arrived(since, until) * mc.STRIDE / seconds
    produced, delivered = collector.delivered(since, until, rate, gateways * turbines)
    to_cloud, to_send = collector.latencies(since, until)
    # A backlog that builds shows as latency growing through the window: compare its quarters.
    quarter = seconds / 4
    first_q = pct(collector.latencies(since, since + quarter)[0], 0.5)
    last_q = pct(collector.latencies(until - quarter, until)[0], 0.5)
    growth = None if first_q is None or last_q is None else last_q - first_q
    procs = sampler.summary() if sampler else {}
    det = (procs.get("kinds") or {}).get("detector") or {}
    windows_lost = getattr(collector, "windows_lost", None)
    missing = sum(windows_lost().values()) if callable(windows_lost) else None

    point = {
        "point": f"{gateways}x{turbines}", "gateways": gateways, "turbines_per_gateway": turbines,
        "turbines": gateways * turbines, "sample_rate": rate,
        "offered_readings_per_s": offered,
        "run_seconds": report["duration_s"], "measured_seconds": _r(seconds), "warmup_seconds": args.warmup,
        "startup_seconds": _r(info["started_at"] - t0), "wall_seconds": _r(wall),
        "published_per_s": _r(published), "scored_per_s": _r(scored),
        "e2e_readings_per_s": _r(e2e),
        "readings_per_s_report": _r(report["readings_scored"] / report["duration_s"]) if report["duration_s"] else None,
        "ratio_to_offered": _r(e2e / offered, 3),
        "windows_produced": produced, "windows_delivered": delivered,
        "delivered_ratio": _r(delivered / produced, 4) if produced else None,
        "published_ratio_to_offered": _r(published / offered, 3),
        "gateways_reporting": {"simulator": n_sim, "detector": n_det},
        "readings_published": report["readings_published"], "readings_scored": report["readings_scored"],
        "windows_scored": report["windows_scored"],
        "telemetry_received": report["telemetry_received"], "telemetry_lost": report["telemetry_lost"],
        "telemetry_duplicates": report["telemetry_duplicates"],
        "malformed_dropped": report["malformed_dropped"], "cloud_malformed": report["cloud_malformed"],
        "windows_missing": missing,
        "detector_queue_dropped": collector.last_counter(fleet_mod.DETECTOR, "queue_dropped"),
        "detector_queue_depth_max": collector.series_max(fleet_mod.DETECTOR, "queue_depth", since, until),
        "detector_publish_errors": collector.last_counter(fleet_mod.DETECTOR, "publish_errors"),
        "forwarder_dropped_spool_full": collector.last_counter(fleet_mod.FORWARDER, "dropped_spool_full"),
        "simulator_late_batches": collector.last_counter(fleet_mod.SIMULATOR, "late_batches"),
        "simulator_behind_s_max": collector.series_max(fleet_mod.SIMULATOR, "behind_s", since, until),
        "component_restarts": report["component_restarts"],
        "precision": report["precision"], "recall": report["recall"],
        "latency_s": {"reading_to_cloud": dist(to_cloud), "reading_to_send": dist(to_send),
                      "reading_to_cloud_p50_first_quarter": _r(first_q, 3),
                      "reading_to_cloud_p50_last_quarter": _r(last_q, 3),
                      "growth": _r(growth, 3)},
        "processes": procs,
        "work_dir": str(work),
    }
    det_cpu = (det.get("cpu_pct_total") or 0.0) / 100.0
    point["detector_readings_per_cpu_s"] = _r(scored / det_cpu) if det_cpu else None
    # What a reading costs each kind (CPU microseconds per reading published): the simulator
    # must not be the fleet's bottleneck, i.e. cost less than the detector.
    kinds = procs.get("kinds") or {}
    point["cpu_us_per_reading"] = {k: _r(v["cpu_pct_total"] / 100.0 / published * 1e6, 2)
                                   for k, v in kinds.items() if published and v.get("cpu_pct_total") is not None}
    sim_us, det_us = point["cpu_us_per_reading"].get("simulator"), point["cpu_us_per_reading"].get("detector")
    point["simulator_cost_ratio_to_detector"] = _r(sim_us / det_us, 3) if sim_us and det_us else None
    # Keeps up: (nearly) every window produced in the window reached the cloud, nothing
    # lost, no backlog building.
    point["keeps_up"] = bool(point["delivered_ratio"] is not None and point["delivered_ratio"] >= KEEPS_UP_DELIVERED
                             and report["telemetry_lost"] == 0 and (growth is None or growth < KEEPS_UP_GROWTH_S))
    if procs.get("kinds"):
        busiest = max(procs["kinds"].items(), key=lambda kv: kv[1]["cpu_pct_total"] or 0)
        point["busiest_kind"] = busiest[0]
    return point


def apply_baseline(points: list[dict], baseline: dict) -> None:
    """Ratios of each point's detectors to the single saturated detector process."""
    sat, per_cpu = baseline.get("saturated_readings_per_s"), baseline.get("saturated_readings_per_cpu_s")
    for p in points:
        scored = p.get("scored_per_s") or 0.0
        if sat:
            p["detector_ratio_to_saturated"] = _r(scored / sat, 3)
            p["detector_utilisation_per_process"] = _r(scored / p["gateways"] / sat, 3)
        if per_cpu and p.get("detector_readings_per_cpu_s"):
            p["detector_cpu_efficiency_ratio"] = _r(p["detector_readings_per_cpu_s"] / per_cpu, 3)


# ------------------------------------------------------------------ output
def table(points: list[dict]) -> str:
    cols = [("point", "point", "{}"), ("offered/s", "offered_readings_per_s", "{:,.0f}"),
            ("published/s", "published_per_s", "{:,.0f}"), ("scored/s", "scored_per_s", "{:,.0f}"),
            ("e2e/s", "e2e_readings_per_s", "{:,.0f}"), ("e2e/offer", "ratio_to_offered", "{:.3f}"),
            ("delivered", "delivered_ratio", "{:.4f}"),
            ("det/sat", "detector_ratio_to_saturated", "{:.2f}"),
            ("tel rx", "telemetry_received", "{}"), ("tel lost", "telemetry_lost", "{}"),
            ("win miss", "windows_missing", "{}"), ("malformed", "malformed_dropped", "{}"),
            ("q drop", "detector_queue_dropped", "{}"), ("keeps up", "keeps_up", "{}")]
    rows = [[h for h, _, _ in cols]]
    for p in points:
        rows.append([("-" if p.get(k) is None else f.format(p[k])) for _, k, f in cols])
    lat = [["point", "send p50", "send p99", "cloud p50", "cloud p99", "p50 growth", "machine cpu%", "others cpu%"]]
    for p in points:
        L = p["latency_s"]
        pr = p.get("processes") or {}
        lat.append([p["point"], *(("-" if L[a][q] is None else f"{L[a][q]:.2f}s")
                                  for a in ("reading_to_send", "reading_to_cloud") for q in ("p50", "p99")),
                    "-" if L.get("growth") is None else f"{L['growth']:+.2f}s", str(pr.get("machine_cpu_pct", "-")), str(pr.get("others_cpu_pct", "-"))])
    kinds = [k for k in KIND_ORDER if any(k in ((p.get("processes") or {}).get("kinds") or {}) for p in points)]
    res = [["point", *(f"{k} cpu%/rss" for k in kinds)]]
    for p in points:
        ks = (p.get("processes") or {}).get("kinds") or {}
        res.append([p["point"], *((f"{ks[k]['cpu_pct_total']:.0f}% / {ks[k]['rss_mb_per_process']:.0f}MB"
                                   f" x{ks[k]['processes']}") if k in ks else "-" for k in kinds)])

    def fmt(rows):
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)

    return "\n\n".join([fmt(rows), fmt(lat), "CPU% (sum over processes, of one core) / RSS per process:\n" + fmt(res)])


def plot(points: list[dict], out_dir: Path, note: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    pts = sorted(points, key=lambda p: p["offered_readings_per_s"])
    x = [p["offered_readings_per_s"] for p in pts]
    labels = [p["point"] for p in pts]

    # 1. readings/s vs offered
    fig, ax = plt.subplots(figsize=(7, 5))
    lo, hi = min(x) * 0.7, max(x + [p["e2e_readings_per_s"] or 0 for p in pts]) * 1.4
    ax.plot([lo, hi], [lo, hi], ls="--", c="grey", lw=1, label="offered (ideal)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.plot(x, [p["published_per_s"] for p in pts], "s-", label="published (simulators)")
    ax.plot(x, [p["scored_per_s"] for p in pts], "^-", label="scored (detectors)")
    ax.plot(x, [p["e2e_readings_per_s"] for p in pts], "o-", lw=2, label="end to end (scores at the cloud x stride)")
    ax.axhline(TARGET_READINGS_PER_S, c="red", lw=0.8, ls=":", label=f"target {TARGET_READINGS_PER_S:,.0f}/s")
    for i, (xi, p) in enumerate(zip(x, pts)):
        lost = f", lost {p['telemetry_lost']}" if p["telemetry_lost"] else ""
        ax.annotate(f"{p['point']}{lost}", (xi, p["e2e_readings_per_s"] or 0), textcoords="offset points",
                    xytext=(6, -12) if i % 2 == 0 else (-34, 8), fontsize=8)
    if all(p["telemetry_lost"] == 0 for p in pts):
        ax.text(0.98, 0.02, "telemetry lost: 0 at every point", transform=ax.transAxes, ha="right", fontsize=8)
    ax.set_xlabel("offered readings/s (gateways x turbines x rate)")
    ax.set_ylabel("readings/s")
    ax.set_title("Fleet throughput vs offered load (log-log)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, note, fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    files.append(_save(fig, out_dir / "fleet_throughput.png"))

    # 2. latency vs offered
    fig, ax = plt.subplots(figsize=(7, 5))
    for key, style, name in (("reading_to_cloud", "o", "reading -> cloud"), ("reading_to_send", "s", "reading -> forwarder send")):
        for q, ls in (("p50", "-"), ("p99", "--")):
            ys = [p["latency_s"][key][q] for p in pts]
            ax.plot(x, [float("nan") if y is None else y for y in ys], marker=style, ls=ls, label=f"{name} {q}")
    for i, (xi, p) in enumerate(zip(x, pts)):
        ax.annotate(p["point"], (xi, p["latency_s"]["reading_to_cloud"]["p99"] or 0), textcoords="offset points",
                    xytext=(4, 6) if i % 2 == 0 else (-20, -14), fontsize=8)
    ax.text(0.02, 0.55, "send and cloud curves nearly coincide: the forwarder -> cloud hop is milliseconds;\n"
            "p50 ~ half the forwarder's 1 s batch interval", transform=ax.transAxes, fontsize=7, va="center")
    ax.set_xlabel("offered readings/s")
    ax.set_xscale("log")
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.set_title("Reading -> score latency vs offered load")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.text(0.01, 0.01, note, fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    files.append(_save(fig, out_dir / "fleet_latency.png"))

    # 3. CPU (stacked, total per kind) and RSS per process per kind
    kinds = [k for k in KIND_ORDER if any(k in ((p.get("processes") or {}).get("kinds") or {}) for p in pts)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5))
    bottom = [0.0] * len(pts)
    for k in kinds:
        vals = [(((p.get("processes") or {}).get("kinds") or {}).get(k) or {}).get("cpu_pct_total") or 0.0 for p in pts]
        a1.bar(labels, vals, bottom=bottom, label=KIND_LABEL.get(k, k))
        bottom = [b + v for b, v in zip(bottom, vals)]
    others = [((p.get("processes") or {}).get("others_cpu_pct") or 0.0) for p in pts]
    a1.bar(labels, others, bottom=bottom, label="not ours (other work)", color="lightgrey", hatch="//")
    cap = max(((p.get("processes") or {}).get("machine_capacity_pct") or 0) for p in pts) or 100
    a1.axhline(cap, c="red", ls=":", lw=1, label=f"machine capacity ({cap}%)")
    a1.set_ylabel("CPU % of one core (mean over the steady phase)")
    a1.set_xlabel("gateways x turbines per gateway")
    a1.set_title("CPU per component kind (sum over processes)")
    a1.legend(fontsize=8)
    width = 0.8 / max(len(kinds), 1)
    for i, k in enumerate(kinds):
        vals = [(((p.get("processes") or {}).get("kinds") or {}).get(k) or {}).get("rss_mb_per_process") or 0.0
                for p in pts]
        a2.bar([j + i * width for j in range(len(pts))], vals, width, label=KIND_LABEL.get(k, k))
    a2.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(pts))], labels)
    a2.set_ylabel("RSS MB per process (mean)")
    a2.set_xlabel("gateways x turbines per gateway")
    a2.set_title("Memory per process, by kind")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=0.3, axis="y")
    fig.text(0.01, 0.01, note, fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    files.append(_save(fig, out_dir / "fleet_resources.png"))
    return files


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def train_model(scratch: Path) -> Path:
    """One small trained package (the test suite's fast call), trained once for the whole run,
    in a child process so torch never sits in this process (its RSS is the cloud side's)."""
    import subprocess

    out = scratch / "model"
    code = ("from windfleet.training.pipeline import train_simulated; "
            f"train_simulated({str(out)!r}, seed=7, turbines=1, hours=0.25, epochs=3, version='1.0.0', "
            "evaluate=False, progress=False, log=lambda *_: None)")
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, cwd=REPO)
    return out


def leftovers(scratch: Path) -> list[str]:
    """Processes still running from this run's scratch directory (should be none)."""
    from windfleet.nucleus.fleet import leftover_processes

    return leftover_processes(scratch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default=None, help=f"GxT list (default {DEFAULT_POINTS})")
    ap.add_argument("--duration", type=float, default=None, help="steady seconds per point (default 40; --quick 15)")
    ap.add_argument("--quick", action="store_true", help=f"tiny sweep ({QUICK_POINTS}), 15 s per point")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds run before measuring, after every deployment finished (default 10; --quick 6)")
    ap.add_argument("--rate", type=float, default=20.0, help="samples per second per turbine")
    ap.add_argument("--model", help="model package directory (model.onnx + model.json); else one is trained")
    ap.add_argument("--startup-timeout", type=float, default=240.0)
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the saturated single-detector baseline")
    ap.add_argument("--baseline-turbines", type=int, default=100)
    ap.add_argument("--baseline-seconds", type=float, default=20.0, help="simulated seconds per turbine pushed")
    ap.add_argument("--keep", action="store_true", help="keep the work directories (device roots, logs)")
    ap.add_argument("--out", default=str(RESULTS / "fleet.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the PNGs from --out (no run)")
    ap.add_argument("--plots", default=str(RESULTS), help="directory for the PNGs ('' to skip)")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.out).read_text())
        note = (f"{saved['machine']['cpus']} cores, shared machine; {saved['duration_s']:g} s per point; "
                f"{saved['started'][:16].replace('T', ' ')}")
        for f in plot(saved["points"], Path(args.plots or RESULTS), note):
            print(f"wrote {f}")
        return 0
    points = parse_points(args.points or (QUICK_POINTS if args.quick else DEFAULT_POINTS))
    args.duration = args.duration or (15.0 if args.quick else 40.0)
    args.warmup = (6.0 if args.quick else 10.0) if args.warmup is None else args.warmup

    scratch = Path(tempfile.mkdtemp(prefix="wf-bench-fleet-"))
    started = time.time()
    load_start = os.getloadavg()
    try:
        if args.model:
            model_dir = Path(args.model).resolve()
        else:
            log("training a small model package (once)")
            model_dir = train_model(scratch)
        baselines: list[dict] = []

        def measure_baseline(when: str) -> None:
            log(f"baseline ({when}): one detector process saturated ({args.baseline_turbines} turbines)")
            b = detector_baseline(model_dir, args.baseline_turbines, args.baseline_seconds)
            b["when"] = when
            baselines.append(b)
            log(f"baseline ({when}): {b['saturated_readings_per_s']:,.0f} readings/s at "
                f"{b['saturated_cpu_fraction_of_one_core']:.0%} of one core")

        if args.baseline:
            measure_baseline("before the sweep")
        results = []
        for g, t in points:
            log(f"point {g}x{t}: {g * t} turbines at {args.rate:g} Hz = {g * t * args.rate:,.0f} readings/s offered, "
                f"{args.duration:g} s")
            p = run_point(g, t, args, model_dir, scratch)
            results.append(p)
            log(f"point {g}x{t}: e2e {p['e2e_readings_per_s']:,.0f}/s ({p['ratio_to_offered']:.2f} of offered), "
                f"telemetry lost {p['telemetry_lost']}, cloud p99 {p['latency_s']['reading_to_cloud']['p99']} s, "
                f"busiest {p.get('busiest_kind')}; startup {p['startup_seconds']} s")
            left = leftovers(scratch)
            if left:
                log(f"WARNING: processes left after {g}x{t}: {left}")
            if not args.keep:
                shutil.rmtree(p["work_dir"], ignore_errors=True)
        if args.baseline:
            measure_baseline("after the sweep")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    # Shared machine: the baseline is measured before and after the sweep, and the better of
    # the two kept (a neighbour's burst should not decide the ratios).
    baseline = max(baselines, key=lambda b: b["saturated_readings_per_s"] or 0) if baselines else None
    if baseline:
        apply_baseline(results, baseline)
    # the best point: 0 telemetry lost and keeping up (no backlog building); else 0 lost
    ok = [p for p in results if p["telemetry_lost"] == 0 and p["keeps_up"]] \
        or [p for p in results if p["telemetry_lost"] == 0]
    best = max(ok, key=lambda p: p["e2e_readings_per_s"] or 0) if ok else None
    result = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "loadavg_at_start": [round(v, 2) for v in load_start],
                    "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "model_dir": str(model_dir) if args.model else "trained per run (train_simulated, 3 epochs)",
        "sample_rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
        "baseline": {"offered": "gateways x turbines x sample_rate", "detector_saturated": baseline,
                     "detector_saturated_runs": baselines},
        "points": results,
        "best": None if best is None else {
            "point": best["point"], "e2e_readings_per_s": best["e2e_readings_per_s"], "keeps_up": best["keeps_up"],
            "scored_per_s": best["scored_per_s"], "telemetry_lost": best["telemetry_lost"],
            "offered_readings_per_s": best["offered_readings_per_s"], "ratio_to_offered": best["ratio_to_offered"]},
        "target": {"readings_per_s": TARGET_READINGS_PER_S, "telemetry_lost": 0,
                   "met": bool(best and (best["e2e_readings_per_s"] or 0) >= TARGET_READINGS_PER_S)},
    }
    print()
    print(table(results))
    if baseline:
        print(f"\nbaseline: one detector process, saturated, one core: {baseline['saturated_readings_per_s']:,.0f} "
              f"readings/s ({baseline['saturated_readings_per_cpu_s']:,.0f} per CPU-second)")
    if best:
        print(f"best point (0 telemetry lost{', keeps up' if best['keeps_up'] else ''}): {best['point']} -> {best['e2e_readings_per_s']:,.0f} readings/s end "
              f"to end (target {TARGET_READINGS_PER_S:,.0f}: {'met' if result['target']['met'] else 'MISSED'})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if args.plots and results:
        note = (f"{os.cpu_count()} cores, shared machine; {args.duration:g} s per point; "
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}")
        for f in plot(results, Path(args.plots), note):
            print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
