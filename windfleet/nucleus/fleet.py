"""``windfleet fleet run``: many gateways on one machine, and a report of how they did.

:func:`run_fleet` builds the suite, starts (or reuses) the broker, starts one
``windfleet device run`` process per gateway deploying the four components from
the build (a local deployment, as ``greengrass-cli`` does), listens on the cloud
side (telemetry, health and the simulator's ground-truth labels), stops
everything after ``duration`` seconds or on Ctrl-C, and writes a JSON report.

Every gateway runtime is its own session (process group); components are their
runtime's process groups.  Stopping sends SIGTERM to each runtime (which stops
its components in reverse dependency order), then SIGKILLs whatever is left:
the runtime's group and every component group listed in its ``status.json``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from windfleet import jsonlog, model_contract, payloads, topics
from windfleet.hostport import parse_hostport

log = logging.getLogger("windfleet.fleet")

SIMULATOR = "com.windfleet.TurbineSimulator"
DETECTOR = "com.windfleet.AnomalyDetector"
FORWARDER = "com.windfleet.LogForwarder"
MODEL = "com.windfleet.AnomalyModel"


class FleetError(RuntimeError):
    """A fleet run that cannot start (one-line reason)."""


# ------------------------------------------------------------------ the cloud side
def confirm(client: Any, raw: bytes) -> None:
    """Acknowledge a telemetry message to its device (``payloads.telemetry_ack``): the cloud
    side's half of the forwarder's ``delivery: cloud_ack``."""
    try:
        body = payloads.validate_telemetry(payloads.decode(raw))
    except payloads.MalformedPayload:
        return
    client.publish(topics.telemetry_ack(body["thing"]), payloads.encode(payloads.telemetry_ack(body["thing"],
                                                                                               body["seq"])), qos=1)


class FleetCollector:
    """What the cloud sees: telemetry sequence numbers, scores, labels, health.

    Thread-safe; feed it with :meth:`on_message` (a paho callback) or directly.
    """

    def __init__(self, window: int = model_contract.WINDOW):
        self.window = window
        self._lock = threading.Lock()
        self.seqs: dict[str, set[int]] = collections.defaultdict(set)
        self.duplicates = 0
        self.malformed = 0
        self.scores: dict[tuple[str, int], bool] = {}     # (turbine, window_end_seq) -> anomaly
        self.score_seen: dict[tuple[str, int], tuple[float, str | None]] = {}  # -> (arrival time, model version)
        self.labels: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        self.health: dict[tuple[str, str], dict] = {}     # (thing, component) -> last health
        self.drift: dict[str, dict] = {}                   # turbine -> its newest drift record
        self.drift_first_flagged: dict[str, float] = {}    # turbine -> ts of its first drifted record
        # counters of earlier incarnations of a restarted component, (thing, component, name) -> total
        self.counter_base: dict[tuple[str, str, str], int] = collections.defaultdict(int)

    def on_message(self, client, userdata, msg) -> None:  # noqa: ARG002 - paho signature
        self.handle(msg.topic, msg.payload)
        if msg.topic.endswith("/telemetry"):
            confirm(client, msg.payload)

    def handle(self, topic: str, raw: bytes) -> None:
        try:
            body = payloads.decode(raw)
            kind = topic.rsplit("/", 1)[-1]
            with self._lock:
                if kind == "telemetry":
                    self._telemetry(payloads.validate_telemetry(body))
                elif kind == "labels":
                    lab = payloads.validate_label(body)
                    episode = (lab["start_seq"], lab["end_seq"])
                    if episode not in self.labels[lab["turbine_id"]]:
                        self.labels[lab["turbine_id"]].append(episode)
                elif kind == "health":
                    h = payloads.validate_health(body)
                    self._carry_counters(self.health.get((h["thing"], h["component"])), h)
                    self.health[(h["thing"], h["component"])] = h
        except payloads.MalformedPayload:
            with self._lock:
                self.malformed += 1

    def _carry_counters(self, old: dict | None, new: dict) -> None:
        """A counter that went down means the component restarted: keep what it had counted."""
        if not old or old.get("ts", 0) > new.get("ts", 0):
            return
        before, after = old.get("counters") or {}, new.get("counters") or {}
        for name, value in before.items():
            if isinstance(value, (int, float)) and isinstance(after.get(name), (int, float)) and after[name] < value:
                self.counter_base[(new["thing"], new["component"], name)] += int(value)

    def _telemetry(self, body: dict) -> None:
        thing, seq = body["thing"], body["seq"]
        if seq in self.seqs[thing]:
            self.duplicates += 1
            return
        self.seqs[thing].add(seq)
        for record in body["records"]:
            rec = record["body"]
            if record["type"] == "score" and "turbine_id" in rec and "window_end_seq" in rec:
                key = (rec["turbine_id"], int(rec["window_end_seq"]))
                self.scores[key] = bool(rec.get("anomaly"))
                self.score_seen.setdefault(key, (time.time(), rec.get("model_version")))
            elif record["type"] == "drift" and "turbine_id" in rec:
                old = self.drift.get(rec["turbine_id"])
                if old is None or rec.get("ts", 0) >= old.get("ts", 0):
                    self.drift[rec["turbine_id"]] = rec
                if rec.get("drifted"):
                    first = self.drift_first_flagged.get(rec["turbine_id"])
                    self.drift_first_flagged[rec["turbine_id"]] = min(first or rec["ts"], rec["ts"])
            elif record["type"] == "health" and "component" in rec and "thing" in rec:
                # components' health reaches the cloud only inside telemetry (the forwarder)
                key = (rec["thing"], rec["component"])
                old = self.health.get(key)
                if old is None or rec.get("ts", 0) >= old.get("ts", 0):
                    self._carry_counters(old, rec)
                    self.health[key] = rec

    def drift_status(self) -> dict[str, dict]:
        """Per turbine, its newest drift record (what the dashboard shows as the current state)."""
        with self._lock:
            return {t: dict(r) for t, r in self.drift.items()}

    def telemetry_summary(self) -> dict[str, dict]:
        """Per thing: received, lost (gaps between the first and last sequence seen)."""
        with self._lock:
            out = {}
            for thing, seqs in self.seqs.items():
                span = max(seqs) - min(seqs) + 1
                out[thing] = {"received": len(seqs), "lost": span - len(seqs), "first_seq": min(seqs),
                              "last_seq": max(seqs)}
            return out

    def detection(self) -> dict[str, Any]:
        """Window-level precision/recall of the scores against the injected labels, and
        the share of labelled episodes with at least one anomalous window.  Windows in a
        turbine's recovery after an episode (``payloads.LABEL_RECOVERY_SAMPLES``) count as
        neither: the turbine is not normal yet, and the fault is over."""
        with self._lock:
            scores, labels = dict(self.scores), {t: list(e) for t, e in self.labels.items()}
        tp = fp = fn = tn = 0
        recovery = payloads.LABEL_RECOVERY_SAMPLES
        detected: set[tuple[str, int, int]] = set()
        for (turbine, end), flagged in scores.items():
            episodes = labels.get(turbine, ())
            hits = [(s, e) for s, e in episodes if payloads.in_episode(end, self.window, s, e)]
            if not hits and any(payloads.in_episode(end, self.window, s, e, recovery) for s, e in episodes):
                continue
            if hits and flagged:
                tp += 1
                detected.update((turbine, s, e) for s, e in hits)
            elif hits:
                fn += 1
            elif flagged:
                fp += 1
            else:
                tn += 1
        episodes = sum(len(e) for e in labels.values())
        return {
            "windows_scored_seen": len(scores), "true_positives": tp, "false_positives": fp,
            "false_negatives": fn, "true_negatives": tn,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "episodes_labelled": episodes,
            "episode_recall": round(len(detected) / episodes, 4) if episodes else None,
        }

    def windows_lost(self, since: float = 0.0, until: float = float("inf"),
                     stride: int = model_contract.STRIDE) -> dict[str, int]:
        """Per turbine: windows missing from its score sequence among the scores that
        arrived in ``[since, until]`` (a gap that straddles a model swap counts)."""
        with self._lock:
            ends: dict[str, list[int]] = collections.defaultdict(list)
            for (turbine, end), (seen, _) in self.score_seen.items():
                if since <= seen <= until:
                    ends[turbine].append(end)
        return {t: (max(e) - min(e)) // stride + 1 - len(set(e)) for t, e in ends.items()}

    def scoring_versions(self, since: float) -> dict[str, set[str]]:
        """Per gateway: model versions its turbines' scores carried since ``since``."""
        with self._lock:
            seen = [(t, v) for (t, _), (at, v) in self.score_seen.items() if at >= since and v]
        out: dict[str, set[str]] = collections.defaultdict(set)
        for turbine, version in seen:
            out[topics.gateway_of(turbine)].add(version)
        return out

    def counter(self, component: str, *names: str) -> int:
        """Sum over gateways of the first of ``names`` present in ``component``'s last health counters."""
        with self._lock:
            total = 0
            for (thing, comp), h in self.health.items():
                if comp != component:
                    continue
                counters = h.get("counters") or {}
                name = next((n for n in names if n in counters), None)
                if name is not None:
                    total += int(counters[name]) + self.counter_base[(thing, comp, name)]
            return total

    def malformed_dropped(self) -> int:
        with self._lock:
            return sum(int(v) for h in self.health.values() for k, v in (h.get("counters") or {}).items()
                       if k.startswith("malformed") and isinstance(v, (int, float)))


def subscribe_cloud(collector: FleetCollector, host: str, port: int, user: str, password: str):
    """A cloud-side MQTT client (persistent session, QoS1) feeding ``collector``."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"windfleet-fleet-cloud-{os.getpid()}",
                         clean_session=False)
    client.username_pw_set(user, password)
    subscribed = threading.Event()

    def on_connect(c, userdata, flags, rc, props):  # noqa: ARG001
        c.subscribe([(topics.ALL_TELEMETRY, 1), (topics.ALL_HEALTH, 1),
                     (f"{topics.PREFIX}/turbines/+/labels", 1)])

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = collector.on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    if not subscribed.wait(15):
        client.loop_stop()
        raise FleetError(f"cloud subscriber could not subscribe at {host}:{port}")
    return client


# ------------------------------------------------------------------ processes
def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def device_status(root: str | Path) -> dict:
    """A device runtime's ``status.json`` (its components' states, versions and last health,
    its last deployment), {} until the runtime has written it."""
    try:
        return json.loads((Path(root) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _newest_model() -> Path | None:
    home = Path(os.environ.get("WINDFLEET_HOME", Path.home() / ".windfleet"))
    cards = sorted((home / "models").glob("*/model.json"), key=lambda p: p.stat().st_mtime)
    return cards[-1].parent if cards else None


def anomaly_schedule(turbines: int, seconds: float, every: float, warmup: float = 10.0,
                     duration: float | None = None) -> list[dict]:
    """The simulator's explicit ``anomalies``: per turbine, an episode every ``every``
    seconds lasting ``duration`` (default: half of ``every``, at most 10 s, so a period
    longer than 35 s leaves the turbine normal after its recovery, ``payloads.LABEL_RECOVERY_SAMPLES``),
    kinds in turn, turbines staggered so episodes overlap normal data on other turbines.
    Explicit (not the simulator's random rate, whose first episode comes after a minute)
    so a short run is scored against labels too."""
    from windfleet.simulation import KINDS

    if every <= 0:
        return []
    duration = min(every / 2, 10.0) if duration is None else duration
    out, n = [], 0
    for t in range(turbines):
        start = warmup + (t * every / max(turbines, 1)) % every
        while start < seconds:
            out.append({"turbine": t, "kind": KINDS[n % len(KINDS)], "start_s": round(start, 2),
                         "duration_s": round(duration, 2), "severity": 0.9})
            start += every
            n += 1
    return out


def component_config(turbines: int, sample_rate: float, anomaly_every: float, seconds: float,
                     health_interval: float = 2.0, capture_endpoint: str | None = None,
                     capture_batch_interval: float = 10.0, anomaly_seconds: float | None = None) -> dict:
    """greengrass-cli ``--update-config`` for a fleet run's gateways (anomalies: :func:`anomaly_schedule`).

    ``capture_endpoint``: the local S3 endpoint (``cloud/local/s3_server.py``) the forwarders
    upload captured windows to, every ``capture_batch_interval`` s; without one the detectors
    capture nothing (a local fleet has no AWS S3 to send them to)."""
    common = {"turbines": turbines, "health_interval_s": health_interval}
    capture = ({"capture_endpoint": capture_endpoint, "capture_batch_interval_s": capture_batch_interval}
               if capture_endpoint else {})
    return {
        SIMULATOR: {"MERGE": {**common, "rate": sample_rate, "anomalies_per_hour": 0,
                              "anomalies": anomaly_schedule(turbines, seconds, anomaly_every,
                                                                duration=anomaly_seconds)}},
        DETECTOR: {"MERGE": {**common, "capture": bool(capture_endpoint)}},
        FORWARDER: {"MERGE": {**common, **capture}},
        MODEL: {"RESET": [""]},  # the version's own OnnxSha256 (see cloud.settings.MODEL_CONFIGURATION_UPDATE)
    }


def run_fleet(*, gateways: int, turbines_per_gateway: int, duration: float, report_path: str | Path,
              model_dir: str | Path | None = None, broker: str = "127.0.0.1:1883",
              broker_data: str | Path | None = None, work_dir: str | Path | None = None,
              anomaly_every: float = 20.0, sample_rate: float = 20.0, startup_timeout: float = 240.0,
              drain_seconds: float = 5.0, stop: threading.Event | None = None,
              build_dir: str | Path | None = None, components: dict[str, str] | None = None,
              update_config: dict | None = None, collector: FleetCollector | None = None,
              on_running: Callable[[dict], None] | None = None) -> dict:
    """Run the fleet and return (and write) the report.  See the module docstring.

    ``build_dir``/``components``/``update_config`` replace the suite built from this
    project (tests use stand-in components); ``stop`` ends the run early (Ctrl-C does too).
    ``collector`` replaces the cloud side's :class:`FleetCollector` (e.g. a subclass that
    records more); ``on_running(info)`` is called once every deployment finished, just
    before the ``duration`` starts, with ``things``, ``roots``, ``runtime_pids``,
    ``broker_pid`` (None for a reused broker), ``started_at`` and ``duration`` (benchmarks
    sample the processes from there; it must return promptly).
    """
    from windfleet.build import BuildError, build
    from windfleet.nucleus.broker import Broker, free_port

    work = Path(work_dir or tempfile.mkdtemp(prefix="windfleet-fleet-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    things = [f"gw{i:02d}" for i in range(1, gateways + 1)]

    if build_dir is None:
        model_dir = Path(model_dir) if model_dir else _newest_model()
        if model_dir is None:
            raise FleetError("no model package: pass --model DIR (model.onnx + model.json)")
        build_dir = work / "greengrass-build"
        try:
            components = build(build_dir, model_dir)
        except BuildError as exc:
            raise FleetError(str(exc)) from None
        # the schedule covers start-up too: gateways start their simulators at different times
        update_config = component_config(turbines_per_gateway, sample_rate, anomaly_every,
                                         duration + startup_timeout)
    build_dir = Path(build_dir)
    components = components or {}

    # Broker: reuse a running windfleet broker (its data dir holds the accounts), else start one.
    host, port = parse_hostport(broker)
    data = Path(broker_data) if broker_data else work / "broker"
    mq = Broker.attach(data)
    own_broker = mq is None
    if own_broker:
        mq = Broker(data, port=port if not _port_in_use(host, port) else free_port(host), host=host)
        mq.start()
    jsonlog.event(log, "fleet starting", gateways=gateways, turbines_per_gateway=turbines_per_gateway,
                  broker=mq.url, own_broker=own_broker, work=str(work))

    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[sig] = signal.signal(sig, lambda *_: stop.set())

    collector = collector if collector is not None else FleetCollector()
    procs: dict[str, subprocess.Popen] = {}
    roots = {t: work / "devices" / t for t in things}
    cloud = None
    started_at = ended_at = None
    try:
        cloud = subscribe_cloud(collector, mq.host, mq.port, *mq.cloud_credentials())
        args = ["--recipe-dir", str(build_dir / "recipes"), "--artifact-dir", str(build_dir / "artifacts"),
                "--update-config", json.dumps(update_config or {}), "--poll-interval", "1"]
        for name, version in components.items():
            args += ["--merge", f"{name}={version}"]
        for thing in things:
            procs[thing] = start_device(thing, roots[thing], mq.url, mq.add_device(thing, turbines_per_gateway), args)

        # Wait for every gateway's deployment to finish (bounded), then run for `duration`.
        deadline = time.monotonic() + startup_timeout
        while not stop.is_set() and time.monotonic() < deadline:
            statuses = {t: (device_status(roots[t]).get("deployment") or {}).get("status") for t in things}
            if all(s not in (None, "IN_PROGRESS") for s in statuses.values()):
                break
            dead = [t for t, p in procs.items() if p.poll() is not None]
            if dead:
                raise FleetError(f"device runtime(s) exited: {dead} (see {roots[dead[0]] / 'runtime.out'})")
            stop.wait(0.5)
        started_at = time.time()
        jsonlog.event(log, "fleet running", deployments={t: (device_status(roots[t]).get("deployment") or {})
                                                        .get("status") for t in things})
        if on_running is not None:
            on_running({"things": list(things), "roots": dict(roots), "runtime_pids": {t: p.pid for t, p in procs.items()},
                        "broker_pid": mq.pid if own_broker else None, "started_at": started_at,
                        "duration": duration})
        stop.wait(duration)
        ended_at = time.time()
    finally:
        stop_devices(procs, roots)
        if cloud is not None:
            time.sleep(drain_seconds if started_at else 0)  # let in-flight telemetry arrive
            cloud.loop_stop()
            cloud.disconnect()
        if own_broker:
            mq.stop()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    report = build_report(collector, things, roots, gateways, turbines_per_gateway,
                          (ended_at - started_at) if started_at and ended_at else 0.0, stop.is_set())
    report["work_dir"] = str(work)
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(report, indent=2, sort_keys=True))
    jsonlog.event(log, "fleet report written", path=str(report_path))
    return report


def start_device(thing: str, root: Path, broker_url: str, credentials: tuple[str, str],
                 args: list[str]) -> subprocess.Popen:
    """``windfleet device run`` for ``thing`` in its own session (so it can be stopped as a group),
    its output in ``root/runtime.out``; ``args`` choose where its deployments come from."""
    root.mkdir(parents=True, exist_ok=True)
    user, password = credentials
    env = {**os.environ, "WINDFLEET_BROKER_USER": user, "WINDFLEET_BROKER_PASSWORD": password}
    with open(root / "runtime.out", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "windfleet.nucleus", "device", "run", "--thing", thing,
                                 "--root", str(root), "--broker", broker_url, *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop_devices(procs: dict[str, subprocess.Popen], roots: dict[str, Path], grace: float = 40.0) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            _kill_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for thing, proc in procs.items():
        _kill_group(proc.pid, signal.SIGKILL)
        for comp in (device_status(roots[thing]).get("components") or {}).values():
            for pgid in comp.get("pgids") or []:
                _kill_group(int(pgid), signal.SIGKILL)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def build_report(collector: FleetCollector, things: list[str], roots: dict[str, Path], gateways: int,
                 turbines_per_gateway: int, duration: float, interrupted: bool) -> dict:
    telemetry = collector.telemetry_summary()
    per_gateway = {}
    restarts = 0
    for thing in things:
        st = device_status(roots[thing])
        comps = st.get("components") or {}
        restarts += int(st.get("restarts") or 0)
        det_health = collector.health.get((thing, DETECTOR)) or {}
        per_gateway[thing] = {
            "deployment": st.get("deployment"),
            "states": {n: c.get("state") for n, c in comps.items()},
            "component_restarts": int(st.get("restarts") or 0),
            "model_version": (comps.get(DETECTOR) or {}).get("model_version") or det_health.get("model_version"),
            "model_component_version": (comps.get(MODEL) or {}).get("version"),
            "telemetry": telemetry.get(thing, {"received": 0, "lost": 0}),
        }
    detection = collector.detection()
    return {
        "gateways": gateways, "turbines_per_gateway": turbines_per_gateway, "duration_s": round(duration, 1),
        "interrupted": interrupted,
        "readings_published": collector.counter(SIMULATOR, "readings_published"),
        "readings_scored": collector.counter(DETECTOR, "readings_scored"),
        "windows_scored": collector.counter(DETECTOR, "windows_scored"),
        "telemetry_received": sum(t["received"] for t in telemetry.values()),
        "telemetry_lost": sum(t["lost"] for t in telemetry.values()),
        "telemetry_duplicates": collector.duplicates,
        "malformed_dropped": collector.malformed_dropped(),
        "cloud_malformed": collector.malformed,
        "component_restarts": restarts,
        "model_version": {t: g["model_version"] for t, g in per_gateway.items()},
        "precision": detection["precision"], "recall": detection["recall"],
        "detection": detection,
        "per_gateway": per_gateway,
    }


def final_counters(roots: dict[str, Path]) -> dict[str, Any]:
    """Exact totals from the components' own logs after they stopped: each incarnation of the
    simulator and the detector logs its counters when it stops (``"<x> stopped"``), so the sum
    over incarnations counts every reading, across restarts and model swaps.  Incarnations
    that died without that line (SIGKILL) are counted in ``incarnations_without_totals``."""
    totals: dict[str, int] = collections.Counter()
    missing = 0
    for root in roots.values():
        for component, prefix in ((SIMULATOR, "simulator"), (DETECTOR, "detector")):
            started = stopped = 0
            try:
                lines = (root / "logs" / f"{component}.log").read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                if f'"{prefix} st' not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("msg") == f"{prefix} started":
                    started += 1
                elif entry.get("msg") == f"{prefix} stopped":
                    stopped += 1
                    for key, value in entry.items():
                        if key not in ("ts", "level", "logger", "msg") and isinstance(value, int):
                            totals[key] += value
            missing += max(0, started - stopped)
    return {**totals, "incarnations_without_totals": missing}


def leftover_processes(work: str | Path) -> list[str]:
    """Processes still running whose command line names ``work`` (a run's directory), as
    ``"pid: command"``; after a run has stopped there should be none."""
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(work) in cmd and proc.pid != os.getpid():
            out.append(f"{proc.pid}: {cmd[:200]}")
    return out
