"""Detector scoring speed, all measured in one run on the same data and the same model:

(a) ``streaming``: our path -- columnar readings payloads (``payloads.readings_batch``,
    the simulator's default batch) through ``Detector.handle`` (decode, whole-batch
    validation, features, per-turbine windows) and ``score_available`` (batched prepare +
    one onnxruntime call per batch + one score batch message per turbine), N turbines
    interleaved;
(b) ``sample_loop``: a re-implementation of the AWS sample's loop -- per turbine a buffer
    of the last 500 readings; for EVERY new reading: quaternion -> Euler row by row, wavelet
    denoise of the whole buffer (db6, up to 5 levels, per feature), z-score, the last
    110 rows -> one window, one batch-1 ``session.run``, MAE;
(c) ``onnxruntime_floor``: ``session.run`` alone on already-prepared windows, at (a)'s
    mean batch size.

All in readings/s (a window is scored every STRIDE readings), so
``detector_speedup_vs_sample = a / b`` and ``detector_ratio_to_onnxruntime_floor = a / c``.

(a') ``shadow``: (a) again with a canary's candidate (another Conv-AE package) loaded in
    shadow -- both models score every window, as on a canary gateway -- interleaved with
    (a) runs: ``shadow_throughput_ratio = a' / a`` (``--shadow-only`` runs just this and
    updates those keys of the output).

``--sustained`` (default on) also runs the real detector process (``python -m
windfleet.components.detector.main``) under windfleet's Greengrass IPC server
(``windfleet.nucleus.ipc.IpcServer`` with a minimal host answering GetConfiguration,
UpdateState and the configuration / component-update subscriptions), pinned to one core:
100 turbines at 20 Hz from the real simulator process under the same server (does it keep
up, at what CPU and RSS), then a saturating publisher -- a child process publishing
pre-encoded readings with the real ``GreengrassCoreIPCClientV2.publish_to_topic_async``
-- with the scores counted by a real subscribed client (what it sustains).  The IPC
server, the subscriber, the simulator and the publisher run on the other core(s).

    .venv/bin/python benchmarks/bench_detector.py [--turbines 100] [--seconds 60] [--model-dir DIR]
    .venv/bin/python benchmarks/bench_detector.py --profile 15 --no-sustained   # + cProfile of (a)
    .venv/bin/python benchmarks/bench_detector.py --shadow-only   # (a') only, ~1 min

``detector_process_readings_per_s`` is the saturated real process's figure (scored windows
received by the subscriber x STRIDE per second).

Writes benchmarks/results/detector.json and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from windfleet import model_contract as mc  # noqa: E402
from windfleet import payloads, topics  # noqa: E402
from windfleet.components.detector import Detector, load_model  # noqa: E402
from windfleet.components.simulator.service import SimConfig  # noqa: E402
from windfleet.preprocessing import prepare, raw_features, sliding_windows  # noqa: E402
from windfleet.simulation import Turbine, turbine_seed  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
FIELDS = payloads.SAMPLE_FIELDS + payloads.EXTRA_SAMPLE_FIELDS
BATCH = SimConfig().batch  # samples per readings message, as the simulator sends them


class NullBus:
    """Accepts publishes and encodes them (the cost a real bus pays before the socket)."""

    thing_name, version = "bench", "0.0.0"

    def __init__(self):
        self.published = 0

    def publish(self, topic, payload, qos=0):
        if isinstance(payload, dict):
            payloads.encode(payload)
        self.published += 1

    def subscribe(self, topic, handler):
        pass

    def update_state(self, state, **extra):
        pass

    def close(self):
        pass


def model_package(arg: str | None, version: str = "1.0.0", seed: int = 0) -> Path:
    if arg:
        return Path(arg)
    # An untrained Conv-AE of the contract's shape costs exactly what a trained one does.
    # Built in a child process so torch never sits in this process's memory.
    out = Path(tempfile.mkdtemp(prefix="wf-bench-model-")) / "model"
    code = ("import sys; sys.path.insert(0, %r); from tests.detector_fixtures import build_model_package; "
            "build_model_package(%r, %r, seed=%d)" % (str(REPO), str(out), version, seed))
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, cwd=REPO)
    return out


def simulate(turbines: int, samples: int) -> list[dict]:
    return [Turbine(topics.turbine_id("bench", i), turbine_seed(42, i), 20.0, [], 8.0, 1.7e9).step(samples)
            for i in range(turbines)]


def encode_messages(streams: list[dict], batch: int = BATCH, seq0: int = 0) -> list[tuple[str, bytes]]:
    """Columnar readings messages in arrival order: every turbine's k-th batch, then the (k+1)-th, ..."""
    per = []
    for i, data in enumerate(streams):
        tid = topics.turbine_id("bench", i)
        n = len(data["ts"])
        per.append([(topics.readings(tid), payloads.encode(payloads.readings_batch(
            tid, seq0 + s, {f: data[f][s:s + batch] for f in FIELDS}))) for s in range(0, n, batch)])
    return [m for k in range(len(per[0])) for m in (p[k] for p in per)]


# ---------------------------------------------------------------- (a) our streaming path
def bench_streaming(model_dir: Path, msgs: list[tuple[str, bytes]], turbines: int, readings: int,
                    shadow_dir: Path | None = None) -> dict:
    """(a); with ``shadow_dir`` a canary's candidate scores every batch in shadow beside the model."""
    det = Detector(NullBus(), load_model(model_dir), [topics.turbine_id("bench", i) for i in range(turbines)],
                   tempfile.mkdtemp(), queue_size=1_000_000)  # the detector's default max_batch
    if shadow_dir is not None:
        assert det.shadow_candidate(shadow_dir).active
    t0 = time.perf_counter()
    for k, (topic, raw) in enumerate(msgs, 1):
        det.handle(topic, raw)
        if k % turbines == 0:  # one arrival round (every turbine sent one message): score what is ready
            while det.score_available(timeout=0):
                pass
    while det.score_available(timeout=0):
        pass
    elapsed = time.perf_counter() - t0
    c = det.snapshot()
    assert c["malformed_dropped"] == 0 and c["readings_received"] == readings
    out = {"readings_per_s": readings / elapsed, "seconds": elapsed, "windows": c["windows_scored"],
           "mean_batch": c["windows_scored"] / c["score_batches"]}
    if shadow_dir is not None:
        stats = det.shadow.stats()
        assert stats["windows"] == c["windows_scored"] and stats["errors"] == 0
        out["shadow_ms_per_window_p50"] = {"current": stats["current"]["infer_ms_p50"],
                                           "candidate": stats["candidate"]["infer_ms_p50"]}
    return out


# ------------------------------------------------ (a') the same with a candidate in shadow
def bench_shadow(model_dir: Path, candidate_dir: Path, msgs: list[tuple[str, bytes]], turbines: int,
                 readings: int, repeat: int) -> dict:
    """(a) without and with a candidate in shadow, interleaved, best of ``repeat`` each."""
    plain, shadow = [], []
    for _ in range(repeat):
        plain.append(bench_streaming(model_dir, msgs, turbines, readings))
        shadow.append(bench_streaming(model_dir, msgs, turbines, readings, shadow_dir=candidate_dir))
    best_plain = max(plain, key=lambda r: r["readings_per_s"])
    best_shadow = max(shadow, key=lambda r: r["readings_per_s"])
    return {"without": {**best_plain, "runs": [round(r["readings_per_s"]) for r in plain]},
            "with": {**best_shadow, "runs": [round(r["readings_per_s"]) for r in shadow]},
            "shadow_throughput_ratio": best_shadow["readings_per_s"] / best_plain["readings_per_s"]}


def print_shadow(shadow: dict) -> None:
    print(f"{'(a) without a shadow model':40s} {shadow['without']['readings_per_s']:12,.0f}")
    print(f"{'(a) with a candidate in shadow':40s} {shadow['with']['readings_per_s']:12,.0f}")
    print(f"shadow_throughput_ratio              {shadow['shadow_throughput_ratio']:8.2f}   (target >= 0.5)")


# ---------------------------------------------------------------- (b) the sample's loop
class SampleLoop:
    """The AWS sample's detector loop for one turbine, as it was written (see module doc)."""

    BUFFER, TIME_STEPS, STEP = 500, 100, 10

    def __init__(self, session, card):
        self.session = session
        stats = card["statistics"]
        self.mean, self.std = np.asarray(stats["mean"]), np.asarray(stats["std"])
        self.raw_std = np.asarray(stats["std"])  # the sample denoises raw data with its raw std
        self.buffer: collections.deque = collections.deque(maxlen=self.BUFFER)
        self.thresholds = np.asarray([card["thresholds"][f] for f in mc.FEATURES]) \
            if isinstance(card["thresholds"], dict) else np.asarray(card["thresholds"])

    @staticmethod
    def euler(x, y, z, w):
        t0, t1 = 2.0 * (w * x + y * z), 1.0 - 2.0 * (x * x + y * y)
        t2 = max(-1.0, min(1.0, 2.0 * (w * y - z * x)))
        t3, t4 = 2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z)
        return math.atan2(t0, t1), math.asin(t2), math.atan2(t3, t4)

    @staticmethod
    def wavelet_denoise(data, wavelet, noise_sigma):
        import pywt
        w = pywt.Wavelet(wavelet)
        levels = min(5, int(np.floor(np.log2(data.shape[0]))))
        coeffs = pywt.wavedec(data, w, level=levels)
        threshold = noise_sigma * np.sqrt(2 * np.log2(data.size))
        return pywt.waverec([pywt.threshold(c, threshold, mode="soft") for c in coeffs], w)

    def on_reading(self, reading: dict):
        self.buffer.append(reading)
        if len(self.buffer) < self.BUFFER:
            return None
        rows = []
        for d in self.buffer:  # data prep of the whole buffer, every time
            roll, pitch, yaw = self.euler(d["qx"], d["qy"], d["qz"], d["qw"])
            rows.append([roll, pitch, yaw, d["wind_speed_rps"], d["rps"], d["voltage"]])
        data = np.array(rows)
        data = np.array([self.wavelet_denoise(data[:, i], "db6", self.raw_std[i]) for i in range(data.shape[1])]).T
        data = (data - self.mean) / self.std
        data = data[-(self.TIME_STEPS + self.STEP):]
        x = np.array([data[i:i + self.TIME_STEPS] for i in range(0, len(data) - self.TIME_STEPS, self.STEP)])
        x = np.transpose(x, (0, 2, 1)).reshape(x.shape[0], data.shape[1], 10, 10).astype(np.float32)
        p = self.session.run(None, {self.session.get_inputs()[0].name: x})[0]
        a = x.reshape(x.shape[0], data.shape[1], 100).transpose((0, 2, 1))
        b = p.reshape(p.shape[0], data.shape[1], 100).transpose((0, 2, 1))
        values = np.mean(np.mean(np.abs(b - a), axis=1), axis=0)
        return values > self.thresholds


def bench_sample(model_dir: Path, stream: dict, readings: int) -> dict:
    model = load_model(model_dir)
    loop = SampleLoop(model.session, model.card)
    cols = [stream[f].tolist() for f in FIELDS]
    rows = [dict(zip(FIELDS, r)) for r in zip(*cols)]
    for r in rows[:SampleLoop.BUFFER - 1]:  # fill the buffer first: measure the steady state
        loop.on_reading(r)
    todo = rows[SampleLoop.BUFFER - 1:SampleLoop.BUFFER - 1 + readings]
    t0 = time.perf_counter()
    for r in todo:
        loop.on_reading(r)
    elapsed = time.perf_counter() - t0
    return {"readings_per_s": len(todo) / elapsed, "seconds": elapsed, "readings": len(todo)}


# ---------------------------------------------------------------- (c) the onnxruntime floor
def bench_floor(model_dir: Path, streams: list[dict], batch: int) -> dict:
    model = load_model(model_dir)
    x = np.concatenate([prepare(sliding_windows(raw_features(s))[0], model.statistics) for s in streams])
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        model.session.run([mc.OUTPUT_NAME], {mc.INPUT_NAME: x[i:i + batch]})
    elapsed = time.perf_counter() - t0
    windows_per_s = len(x) / elapsed
    return {"readings_per_s": windows_per_s * mc.STRIDE, "windows_per_s": windows_per_s, "batch": batch,
            "seconds": elapsed}


# ---------------------------------------------------------------- (d) the real process under IPC
DETECTOR = "com.windfleet.AnomalyDetector"
SIMULATOR = "com.windfleet.TurbineSimulator"
PUBLISHER, SUBSCRIBER = "bench.ReadingsPublisher", "bench.ScoresSubscriber"


class SustainedHost:
    """Just enough nucleus for the detector (and the simulator) under windfleet's IpcServer:
    GetConfiguration from ``configs``, UpdateState recorded, configuration / component-update
    subscriptions accepted (nothing is ever sent on them); every principal may use local
    pub/sub on any topic.  Response shapes as ``windfleet.nucleus.operations``."""

    def __init__(self, thing: str, configs: dict[str, dict]):
        from windfleet.nucleus.authorization import Authorizer

        self.thing, self.configs, self.states = thing, configs, {}
        self.authorizer = Authorizer(thing)
        for name in (DETECTOR, SIMULATOR, PUBLISHER, SUBSCRIBER):
            self.authorizer.set_component(name, {"accessControl": {"aws.greengrass.ipc.pubsub": {
                f"{name}:bench": {"operations": ["*"], "resources": ["*"]}}}})

    def ipc_call(self, component, operation, request, stream):  # noqa: ANN001 - NucleusHost
        from windfleet.nucleus.ipc import IpcError

        if operation == "GetConfiguration":
            name = request.get("componentName") or component
            value = self.configs.get(name, {})
            for key in request.get("keyPath") or []:
                if not isinstance(value, dict) or key not in value:
                    raise IpcError("ResourceNotFoundError", "Key not found")
                value = value[key]
            if not isinstance(value, dict):
                value = {request["keyPath"][-1]: value}
            return {"componentName": name, "value": value}
        if operation == "UpdateState":
            self.states[component] = request.get("state")
            return {}
        if operation in ("SubscribeToConfigurationUpdate", "SubscribeToComponentUpdates",
                         "SubscribeToValidateConfigurationUpdates"):
            return {}
        raise IpcError("ServiceError", f"{operation} not served by the benchmark host")


def _ipc_client(sock: Path, token: str):
    from awsiot.greengrasscoreipc import connect
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    return GreengrassCoreIPCClientV2(client=connect(ipc_socket=str(sock), authtoken=token), executor=None)


def publisher_child(sock: str, token: str, messages_file: str) -> int:
    """Child process of the saturation phase: pre-encoded readings through the real
    ``GreengrassCoreIPCClientV2.publish_to_topic_async``, every reply awaited at the end.
    Prints ``ready`` once connected, waits for a line on stdin, then publishes and prints
    one JSON line (publish seconds, errors)."""
    import pickle

    from awsiot.greengrasscoreipc.model import BinaryMessage, PublishMessage

    msgs = pickle.loads(Path(messages_file).read_bytes())
    ready = [(t, PublishMessage(binary_message=BinaryMessage(message=raw))) for t, raw in msgs]
    client = _ipc_client(Path(sock), token)
    print("ready", flush=True)
    sys.stdin.readline()
    t0, cpu0 = time.perf_counter(), time.process_time()
    futures = [client.publish_to_topic_async(topic=t, publish_message=m) for t, m in ready]
    errors = 0
    for future in futures:
        try:
            future.result(300)
        except Exception:  # noqa: BLE001 - counted
            errors += 1
    print(json.dumps({"published": len(futures), "errors": errors, "seconds": time.perf_counter() - t0,
                      "cpu_s": time.process_time() - cpu0}), flush=True)
    client.close()
    return 0


def bench_sustained(model_dir: Path, turbines: int, seconds: float, saturate_seconds: float) -> dict:
    """The real detector process under an IPC server, pinned to one core (see the module doc).

    This process hosts windfleet's ``IpcServer`` (with :class:`SustainedHost`) and a real
    ``GreengrassCoreIPCClientV2`` subscribed to every turbine's scores; it, the simulator and
    the publisher run on the other core(s).  Affinity is restored on return."""
    import pickle
    import threading

    import psutil

    from windfleet.nucleus.ipc import IpcServer

    tmp = Path(tempfile.mkdtemp(prefix="wf-bench-sustained-"))
    thing = "bench"
    out: dict = {"turbines": turbines, "transport": "Greengrass IPC (windfleet.nucleus.ipc.IpcServer, "
                                                    "GreengrassCoreIPCClientV2 clients)"}
    host = SustainedHost(thing, {
        DETECTOR: {"turbines": turbines, "health_interval_s": 1.0},
        SIMULATOR: {"turbines": turbines},
    })
    sock = tmp / "ipc.sock"
    server = IpcServer(sock, host)
    server.start()

    cores = sorted(os.sched_getaffinity(0))
    det_core = cores[-1] if len(cores) > 1 else None
    harness_cores = [c for c in cores if c != det_core] or cores
    saved_affinity = set(cores)
    os.sched_setaffinity(0, harness_cores)  # this process (server, subscriber) and its children stay off the detector's core
    me = psutil.Process()

    health: list[dict] = []
    unsubscribe_health = server.local_subscribe(topics.health(thing), lambda _t, data: health.append(json.loads(data)))
    # (received at, seconds from the publication of the window's last readings batch to its ts),
    # one per scored window: the simulator publishes a batch at its first sample's time
    scores: list[tuple[float, float]] = []
    score_lock = threading.Lock()

    def on_score(event) -> None:
        now = time.time()
        try:
            body = json.loads(bytes(event.binary_message.message))
            ends, ts = body["window_end_seq"], body["ts"]
            ends, ts = (ends, ts) if isinstance(ts, list) else ([ends], [ts])  # a batch, or one window
            rows = [(now, float(t) - (e % BATCH) / 20.0) for e, t in zip(ends, ts)]
        except Exception:  # noqa: BLE001
            rows = [(now, float("nan"))]
        with score_lock:
            scores.extend(rows)

    def score_count() -> int:
        with score_lock:
            return len(scores)

    def detector_health():
        return [h for h in health if h["component"] == DETECTOR]

    def env_for(principal: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WINDFLEET_")}
        env.update(AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT=str(sock), SVCUID=server.issue_token(principal),
                   AWS_IOT_THING_NAME=thing, PYTHONUNBUFFERED="1")
        return env

    subscriber = _ipc_client(sock, server.issue_token(SUBSCRIBER))
    subscriber.subscribe_to_topic(topic="windfleet/turbines/+/scores", on_stream_event=on_score)
    pin = ["taskset", "-c", str(det_core)] if det_core is not None else []
    det = subprocess.Popen([*pin, sys.executable, "-m", "windfleet.components.detector.main",
                            "--model-dir", str(model_dir), "--work-dir", str(tmp / "work")],
                           env=env_for(DETECTOR), cwd=REPO, stdout=open(tmp / "detector.log", "wb"),
                           stderr=subprocess.STDOUT)
    sim = pub = None
    try:
        deadline = time.monotonic() + 60
        while not any(h["state"] == "RUNNING" for h in detector_health()):
            if time.monotonic() > deadline or det.poll() is not None:
                raise RuntimeError(f"detector did not start; see {tmp / 'detector.log'}")
            time.sleep(0.1)
        out["detector_state_via_ipc"] = host.states.get(DETECTOR)
        proc = psutil.Process(det.pid)

        # 1) real time: the simulator process (under the same IPC server), N turbines at 20 Hz
        sim = subprocess.Popen([sys.executable, "-m", "windfleet.components.simulator.main",
                                "--turbines", str(turbines), "--duration", str(seconds), "--seed", "1"],
                               env=env_for(SIMULATOR), cwd=REPO, stdout=open(tmp / "simulator.log", "wb"),
                               stderr=subprocess.STDOUT)
        # warm up past the first full window (WINDOW samples at 20 Hz): scores flow at their steady rate from there
        time.sleep(min(mc.WINDOW / 20.0 + 1.0, seconds / 2))
        c0, h0, t0, n0 = proc.cpu_times(), detector_health()[-1]["counters"], time.monotonic(), score_count()
        rss = []
        while sim.poll() is None:
            rss.append(proc.memory_info().rss)
            time.sleep(0.5)
        c1, t1, n1 = proc.cpu_times(), time.monotonic(), score_count()
        h1 = detector_health()[-1]["counters"]
        time.sleep(2.5)
        final = detector_health()[-1]
        with score_lock:
            lags = sorted(r - published for r, published in scores[n0:n1] if published == published)
        out["realtime"] = {
            "offered_readings_per_s": turbines * 20.0,
            "readings_per_s": (h1["readings_scored"] - h0["readings_scored"]) / (t1 - t0),
            "scores_received_readings_per_s": (n1 - n0) * mc.STRIDE / (t1 - t0),
            "publish_to_score_s": {"p50": lags[len(lags) // 2], "p99": lags[int(len(lags) * 0.99)]} if lags else None,
            "cpu_fraction_of_one_core": ((c1.user + c1.system) - (c0.user + c0.system)) / (t1 - t0),
            "rss_mb": max(rss) / 2**20,
            "readings_received": final["counters"]["readings_received"],
            "queue_dropped": final["counters"]["queue_dropped"],
            "malformed_dropped": final["counters"]["malformed_dropped"],
        }

        # 2) saturation: pre-encoded readings as fast as the IPC server takes them
        samples = -(-int(saturate_seconds * 20) // BATCH) * BATCH
        streams = simulate(turbines, samples)
        # seq continues after the realtime run so nothing is taken for a stream restart; encoded
        # before the clock starts: measure the detector, not us.  Turbine ids are thing "bench"'s.
        ready = encode_messages(streams, seq0=int(seconds * 20))
        (tmp / "readings.pickle").write_bytes(pickle.dumps(ready))
        pub = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--publisher-child", str(sock),
                                server.issue_token(PUBLISHER), str(tmp / "readings.pickle")],
                               cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if pub.stdout.readline().strip() != "ready":
            raise RuntimeError("publisher did not connect")
        c0, h0, t0, n0 = proc.cpu_times(), detector_health()[-1]["counters"], time.monotonic(), score_count()
        hc0 = me.cpu_times()
        pub.stdin.write("go\n")
        pub.stdin.flush()
        # Every readings message continues its turbine's stream: BATCH / STRIDE windows each.
        expected_windows = len(ready) * BATCH // mc.STRIDE
        expected_scores = n0 + expected_windows
        deadline = time.monotonic() + 300
        last_n, last_change = score_count(), (time.monotonic(), proc.cpu_times(), me.cpu_times())
        while last_n < expected_scores and time.monotonic() < deadline \
                and time.monotonic() - last_change[0] < 5.0:  # nothing more for 5 s: lost
            time.sleep(0.05)
            n = score_count()
            if n != last_n:
                last_n, last_change = n, (time.monotonic(), proc.cpu_times(), me.cpu_times())
            rss.append(proc.memory_info().rss)
        t1, c1, hc1 = last_change  # the detector's CPU over the same span as the scores
        publish = json.loads(pub.stdout.readline() or "{}")
        pub.wait(60)
        time.sleep(1.5)  # one more health message
        h1 = detector_health()[-1]["counters"]
        with score_lock:
            window = scores[n0:]
        t0_wall = time.time() - (time.monotonic() - t0)
        span = (window[-1][0] - t0_wall) if window else float("nan")
        out["saturated"] = {
            "readings_per_s": len(window) * mc.STRIDE / span if window else 0.0,
            "what": "scored windows received by a subscribed GreengrassCoreIPCClientV2 (in score batches) "
                    "x STRIDE, from the publisher's start to the last score",
            "seconds": span,
            "windows_received": len(window),
            "windows_expected": expected_windows,
            "readings_messages": len(ready),
            "samples_per_message": BATCH,
            "score_messages": h1.get("score_messages", 0) - h0.get("score_messages", 0),
            "readings_offered": turbines * len(streams[0]["ts"]),
            "readings_received_by_detector": h1["readings_received"] - h0["readings_received"],
            "publish": publish,
            "cpu_fraction_of_one_core": ((c1.user + c1.system) - (c0.user + c0.system)) / (t1 - t0),
            "harness_cpu_fraction": {
                "ipc_server_and_subscriber": round(((hc1.user + hc1.system) - (hc0.user + hc0.system)) / (t1 - t0), 3),
                "publisher_process": round(publish.get("cpu_s", float("nan")) / (t1 - t0), 3),
                "cores": harness_cores},
            "rss_mb": max(rss) / 2**20,
            "queue_dropped": h1["queue_dropped"],
            "malformed_dropped": h1["malformed_dropped"],
            "pinned_to_core": det_core,
        }
        out["ipc_server_counters"] = dict(server.counters)
        out["rss_mb"] = max(rss) / 2**20
    finally:
        for p in (pub, sim, det):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        unsubscribe_health()
        try:
            subscriber.close()
        except Exception:  # noqa: BLE001
            pass
        server.close()
        os.sched_setaffinity(0, saved_affinity)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--publisher-child"]:  # bench_sustained's publisher process
        return publisher_child(*argv[1:4])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turbines", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60.0, help="simulated seconds per turbine for (a)/(c)")
    ap.add_argument("--sample-readings", type=int, default=1500, help="readings through the sample's loop")
    ap.add_argument("--model-dir")
    ap.add_argument("--repeat", type=int, default=3, help="runs of (a) and (c), best kept")
    ap.add_argument("--no-sustained", dest="sustained", action="store_false")
    ap.add_argument("--sustained-seconds", type=float, default=30.0)
    ap.add_argument("--saturate-seconds", type=float, default=60.0, help="simulated seconds per turbine pushed")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N cProfile entries of (a)")
    ap.add_argument("--candidate-dir", help="the shadow model (default: another untrained Conv-AE)")
    ap.add_argument("--shadow-only", action="store_true",
                    help="measure only (a) with/without a shadow model; updates the shadow keys of --out")
    ap.add_argument("--out", default=str(RESULTS / "detector.json"))
    args = ap.parse_args(argv)

    model_dir = model_package(args.model_dir)
    candidate_dir = model_package(args.candidate_dir, "1.0.1", seed=1)
    samples = int(args.seconds * 20)
    streams = simulate(args.turbines, max(samples, SampleLoop.BUFFER + args.sample_readings))
    streams_a = [{k: v[:samples] for k, v in s.items()} for s in streams]
    msgs = encode_messages(streams_a)
    readings = args.turbines * samples
    if args.shadow_only:
        shadow = bench_shadow(model_dir, candidate_dir, msgs, args.turbines, readings, args.repeat)
        print_shadow(shadow)
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.is_file() else {}
        result.update(shadow=shadow, shadow_throughput_ratio=shadow["shadow_throughput_ratio"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"updated {args.out}")
        return 0

    # Shared 2-core machine: interleave (a) and (c) and keep each one's best of --repeat runs,
    # so a neighbour's burst does not decide the ratio.
    a_runs, c_runs = [], []
    for _ in range(args.repeat):
        a_runs.append(bench_streaming(model_dir, msgs, args.turbines, readings))
        c_runs.append(bench_floor(model_dir, streams_a, max(1, round(a_runs[0]["mean_batch"]))))
    if args.profile:
        import cProfile
        import io
        import pstats
        profiler = cProfile.Profile()
        profiler.runcall(bench_streaming, model_dir, msgs, args.turbines, readings)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile)
        print(text.getvalue())
    a = max(a_runs, key=lambda r: r["readings_per_s"])
    c = max(c_runs, key=lambda r: r["readings_per_s"])
    a["runs"] = [round(r["readings_per_s"]) for r in a_runs]
    c["runs"] = [round(r["readings_per_s"]) for r in c_runs]
    b = bench_sample(model_dir, streams[0], args.sample_readings)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "model_dir": str(model_dir), "turbines": args.turbines, "readings": readings,
        "streaming": a, "sample_loop": b, "onnxruntime_floor": c,
        "detector_speedup_vs_sample": a["readings_per_s"] / b["readings_per_s"],
        "detector_ratio_to_onnxruntime_floor": a["readings_per_s"] / c["readings_per_s"],
    }
    result["shadow"] = bench_shadow(model_dir, candidate_dir, msgs, args.turbines, readings, args.repeat)
    result["shadow_throughput_ratio"] = result["shadow"]["shadow_throughput_ratio"]
    if args.sustained:
        result["sustained"] = bench_sustained(model_dir, args.turbines, args.sustained_seconds, args.saturate_seconds)
        result["detector_rss_mb"] = result["sustained"]["rss_mb"]
        result["detector_process_readings_per_s"] = result["sustained"]["saturated"]["readings_per_s"]

    rows = [("(a) streaming batched (ours)", a["readings_per_s"], f"mean batch {a['mean_batch']:.0f}"),
            ("(b) sample loop (batch 1 / reading)", b["readings_per_s"], f"{b['readings']} readings"),
            ("(c) onnxruntime floor", c["readings_per_s"], f"batch {c['batch']}, {c['windows_per_s']:.0f} windows/s")]
    print(f"{'path':40s} {'readings/s':>12s}  note")
    for name, rate, note in rows:
        print(f"{name:40s} {rate:12,.0f}  {note}")
    print(f"detector_speedup_vs_sample           {result['detector_speedup_vs_sample']:8.1f}x  (target >= 50x)")
    print(f"detector_ratio_to_onnxruntime_floor  {result['detector_ratio_to_onnxruntime_floor']:8.2f}   (target >= 0.5)")
    print_shadow(result["shadow"])
    if args.sustained:
        s = result["sustained"]
        rt, sat = s["realtime"], s["saturated"]
        lag = rt.get("publish_to_score_s") or {}
        print(f"real process under IPC, {s['turbines']} turbines @ 20 Hz: {rt['readings_per_s']:,.0f} readings/s "
              f"scored of {rt['offered_readings_per_s']:,.0f} offered ({rt['readings_per_s'] / rt['offered_readings_per_s']:.3f}), "
              f"CPU {rt['cpu_fraction_of_one_core']:.0%} of one core, RSS {rt['rss_mb']:.0f} MB, "
              f"dropped {rt['queue_dropped']}, readings publish -> score received p50/p99 {lag.get('p50', float('nan')):.3f}/{lag.get('p99', float('nan')):.3f} s")
        print(f"real process under IPC, saturated, one core: {sat['readings_per_s']:,.0f} readings/s "
              f"(x {sat['readings_per_s'] / result['streaming']['readings_per_s']:.2f} of (a) in process), CPU "
              f"{sat['cpu_fraction_of_one_core']:.0%}, RSS {sat['rss_mb']:.0f} MB (target <= 120 MB), "
              f"dropped {sat['queue_dropped']}; harness CPU {sat['harness_cpu_fraction']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
