"""The fault suite (``pytest -m fault``): one gateway running the real component suite
(simulator -> detector -> forwarder, the model component) under the local device runtime
(``windfleet device run`` deploying a ``windfleet build``), with a real Mosquitto standing in
for IoT Core, and faults injected for real:

- IoT Core (its stand-in Mosquitto) SIGKILLed and restarted mid-run;
- ``kill -9`` of each component process in turn;
- the cloud link cut for ``WINDFLEET_LINK_CUT_S`` seconds (default 60, the issue's figure);
- the forwarder's spool on a filesystem that fills up (a small tmpfs in a user+mount
  namespace: a real ENOSPC), first by the spool itself, then by another writer.

Components talk only Greengrass IPC to the nucleus, which routes local pub/sub in memory
and holds the device's one MQTT connection (developer guide, "Publish/subscribe local
messages" and "Publish/subscribe AWS IoT Core MQTT messages").  Two consequences the
figures below follow from:

- local pub/sub keeps no queue: what a component publishes while its subscriber is down is
  lost (a component restart costs the readings or scores of its downtime);
- PublishToIoTCore succeeds once the message is in the nucleus' spooler (in memory,
  ``mqtt.spooler.maxSizeInBytes``, 2.5 MiB by default; developer guide, "Greengrass nucleus"
  component): a cloud outage is absorbed there until it is full, then the forwarder's own
  SQLite spool takes over.  A runtime kill -9 loses what only the nucleus' spooler held.

Each test asserts its figures: what the cloud received (telemetry sequence gaps, scored
windows per turbine), what was dropped and whether it was counted, and that the device
is healthy again (every component RUNNING, scoring resumed).

Window accounting: the detector scores a window every ``mc.STRIDE`` samples per turbine;
``lost_windows`` counts the window ends missing between a turbine's first and last score
at the cloud.  The simulator is a deterministic replay (same seed, same samples), so a
restarted simulator replays from sample 0 and the detector drops what it already has
until the replay catches up: its restart loses no window.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import yaml

from windfleet import model_contract as mc
from windfleet import payloads, topics
from windfleet.nucleus.runtime import Settings

from tests.ipc_fixtures import Nucleus, Publisher, Watcher, read_log, recipe_access_control
from tests.mqtt_fixtures import (  # noqa: F401 (fixtures)
    REPO, TelemetryCollector, cloud_broker, score_payload, wait_until,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(420)]

THING = "gwf"
TURBINES = [topics.turbine_id(THING, i) for i in range(2)]
SIM, DET, FWD, MODEL = ("com.windfleet.TurbineSimulator", "com.windfleet.AnomalyDetector",
                        "com.windfleet.LogForwarder", "com.windfleet.AnomalyModel")
PROCESS_COMPONENTS = (SIM, DET, FWD)
LINK_CUT_S = float(os.environ.get("WINDFLEET_LINK_CUT_S", "60"))
RATE = 20  # samples per second per turbine (the simulator's configuration below)


# ====================================================================== the device
@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One ``windfleet build`` (with a model package) for every device of this module."""
    from windfleet.build import build

    from tests.detector_fixtures import build_model_package

    root = tmp_path_factory.mktemp("suite")
    components = build(root / "greengrass-build", build_model_package(root / "model", "1.0.0"))
    return root / "greengrass-build", components


class Device:
    """A gateway: ``windfleet device run`` deploying the suite, IoT Core's stand-in, and the cloud's view."""

    def __init__(self, tmp_path: Path, cloud, suite):
        self.cloud = cloud
        self.build_dir, self.components = suite
        self.root = tmp_path / "device"
        self.root.mkdir()
        self.user, self.password = cloud.add_device(THING, TURBINES)
        self.collector = TelemetryCollector(cloud)  # persistent session, subscribed before anything is sent
        self.proc: subprocess.Popen | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 180.0, wait_cloud: bool = True) -> None:
        common = {"turbines": len(TURBINES), "health_interval_s": 1}
        update = {SIM: {"MERGE": {**common, "rate": RATE, "batch": 10, "anomalies_per_hour": 0}},
                  DET: {"MERGE": common},
                  FWD: {"MERGE": {**common, "batch_interval_s": 0.5}}}
        # The nucleus' one MQTT connection goes to --broker (as `windfleet fleet run` starts devices).
        cmd = [sys.executable, "-m", "windfleet.nucleus", "device", "run", "--thing", THING,
               "--root", str(self.root), "--broker", self.cloud.url,
               "--recipe-dir", str(self.build_dir / "recipes"), "--artifact-dir", str(self.build_dir / "artifacts"),
               "--update-config", json.dumps(update), "--poll-interval", "0.5"]
        for name, version in self.components.items():
            cmd += ["--merge", f"{name}={version}"]
        env = {**os.environ, "WINDFLEET_BROKER_USER": self.user, "WINDFLEET_BROKER_PASSWORD": self.password,
               "PYTHONUNBUFFERED": "1"}
        self._out = open(self.root / "runtime.out", "ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.deployment_status() == "SUCCEEDED" or self._dead(), timeout, interval=0.5,
                   message="the suite deployed")
        assert self.deployment_status() == "SUCCEEDED", self.status()
        self.wait_healthy()
        if not wait_cloud:
            return
        for tid in TURBINES:
            wait_until(lambda: self.score_ends(tid), 60, interval=0.5, message=f"first score of {tid}")

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the runtime stops its components
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in children:  # only what this device started
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        for comp in (self.status().get("components") or {}).values():
            for pgid in comp.get("pgids") or []:
                try:
                    os.killpg(int(pgid), signal.SIGKILL)
                except OSError:
                    pass
        self._out.close()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.collector.close()

    # ------------------------------------------------------------ what the runtime says
    def status(self) -> dict:
        try:
            return json.loads((self.root / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def deployment_status(self) -> str | None:
        return (self.status().get("deployment") or {}).get("status")

    def component(self, name: str) -> dict:
        return (self.status().get("components") or {}).get(name) or {}

    def local_counters(self, name: str) -> dict:
        """A component's counters from its last health on local pub/sub, as the nucleus read them."""
        return self.component(name).get("counters") or {}

    def healthy(self) -> bool:
        """Every process component RUNNING (its process alive and reporting RUNNING), the
        model component FINISHED."""
        comps = self.status().get("components") or {}
        if (comps.get(MODEL) or {}).get("state") != "FINISHED":
            return False
        for name in PROCESS_COMPONENTS:
            c = comps.get(name) or {}
            if c.get("state") != "RUNNING" or c.get("reported_state") != "RUNNING" or not c.get("pid"):
                return False
            if not psutil.pid_exists(c["pid"]):
                return False
        return True

    def wait_healthy(self, timeout: float = 90.0) -> None:
        wait_until(self.healthy, timeout, interval=0.1, message=f"device healthy: {self.status().get('components')}")

    def log(self, name: str) -> list[dict]:
        return read_log(self.root / "logs" / f"{name}.log")

    def runtime_log(self) -> list[dict]:
        return read_log(self.root / "runtime.out")

    # ------------------------------------------------------------ what the cloud received
    def scores(self) -> list[dict]:
        return [r["body"] for r in self.collector.records(THING, "score")]

    def score_ends(self, turbine: str) -> list[int]:
        return sorted({s["window_end_seq"] for s in self.scores() if s["turbine_id"] == turbine})

    def lost_windows(self) -> dict[str, list[int]]:
        """Per turbine: window ends missing between its first and last score at the cloud."""
        lost = {}
        for tid in TURBINES:
            ends = set(self.score_ends(tid))
            lost[tid] = sorted(set(range(min(ends), max(ends) + 1, mc.STRIDE)) - ends) if ends else []
        return lost

    def health(self, component: str) -> list[dict]:
        return [r["body"] for r in self.collector.records(THING, "health") if r["body"]["component"] == component]

    def wait_scoring_past(self, ends: dict[str, int], windows: int = 3, timeout: float = 120.0) -> None:
        """Scores for every turbine reach ``windows`` windows beyond ``ends`` (scoring resumed)."""
        for tid in TURBINES:
            target = ends[tid] + windows * mc.STRIDE
            wait_until(lambda: (self.score_ends(tid) or [-1])[-1] >= target, timeout, interval=0.5,
                       message=f"{tid} scored past window {target}")

    def last_ends(self) -> dict[str, int]:
        return {tid: (self.score_ends(tid) or [-1])[-1] for tid in TURBINES}


@pytest.fixture
def device(tmp_path, cloud_broker, suite):  # noqa: F811
    d = Device(tmp_path, cloud_broker, suite)
    try:
        d.start()
        yield d
    finally:
        d.close()


def _iot_events(dev: Device, msg: str, since: float) -> int:
    return sum(1 for e in dev.runtime_log() if e.get("msg") == msg and e.get("ts", 0) >= since)


def _counter_totals(healths: list[dict], name: str) -> int:
    """A counter summed over a component's incarnations (a restart starts it from zero)."""
    total, last = 0, 0
    for h in sorted(healths, key=lambda h: h["ts"]):
        value = h["counters"].get(name, 0)
        if value < last:
            total += last
        last = value
    return total + last


# ====================================================================== IoT Core SIGKILL
def test_iot_core_killed_and_restarted_mid_run_the_nucleus_reconnects_and_nothing_is_lost(device):
    """Components no longer hold MQTT connections: the nucleus does, for all of them.  IoT
    Core's stand-in SIGKILLed (no persistence save, every connection dropped) and back 3 s
    later: the nucleus reconnects and resends from its spooler; no component notices
    (same processes, no restart, no failed publish) and the cloud has every window."""
    dev = device
    time.sleep(6)  # past Mosquitto's autosave interval (5 s): the collector's session is on disk
    before = dev.last_ends()
    seq_before = max(dev.collector.seqs(THING))
    pids = {n: dev.component(n)["pid"] for n in PROCESS_COMPONENTS}
    t_kill = time.time()
    dev.cloud.kill()  # SIGKILL
    time.sleep(3)     # the forwarder keeps publishing to IoT Core: the nucleus spools
    dev.cloud.start()

    wait_until(lambda: _iot_events(dev, "IoT Core connection lost", t_kill) >= 1, 30, interval=0.5,
               message="the nucleus saw the connection drop")
    wait_until(lambda: _iot_events(dev, "connected to IoT Core", t_kill) >= 1, 60, interval=0.5,
               message="the nucleus reconnected")
    dev.wait_scoring_past(before, windows=10)
    dev.wait_healthy()
    status = dev.status()
    assert status["restarts"] == 0, "no component crashed"
    assert {n: status["components"][n]["pid"] for n in PROCESS_COMPONENTS} == pids, "the same processes"
    # figures at the cloud
    assert dev.collector.gaps(THING) == [], "telemetry sequence without a gap"
    assert max(dev.collector.seqs(THING)) > seq_before
    lost = dev.lost_windows()
    assert lost == {tid: [] for tid in TURBINES}, f"windows lost across the IoT Core crash: {lost}"
    det = dev.health(DET)[-1]["counters"]
    assert det["queue_dropped"] == 0 and det["malformed_dropped"] == 0
    fwd = dev.health(FWD)[-1]["counters"]
    assert fwd["dropped_spool_full"] == 0 and fwd["dropped_disk_full"] == 0 and fwd["malformed_dropped"] == 0
    # PublishToIoTCore succeeds once the message is in the nucleus' spooler: never failed
    assert fwd["cloud_failures"] == 0, fwd
    print(f"IoT Core SIGKILL: the nucleus reconnected, telemetry seq {seq_before} -> "
          f"{max(dev.collector.seqs(THING))} without gaps, 0 windows lost, 0 failed publishes")


# ====================================================================== kill -9 of each component
def test_kill_9_of_each_component_is_restarted_by_the_runtime_and_the_fleet_is_healthy_again(device):
    dev = device
    figures = {}
    for name in PROCESS_COMPONENTS:
        before = dev.component(name)
        pid, restarts = before["pid"], before["restarts"]
        ends = dev.last_ends()
        lost_before = {t: len(v) for t, v in dev.lost_windows().items()}
        seq_before = max(dev.collector.seqs(THING))
        t0 = time.monotonic()
        os.killpg(pid, signal.SIGKILL)  # the component's process group: sh -> exec python
        wait_until(lambda: dev.component(name).get("restarts") == restarts + 1
                   and dev.component(name).get("pid") not in (None, pid), 60, interval=0.1,
                   message=f"{name} restarted")
        dev.wait_healthy()  # health comes after a component subscribed: it receives again from here
        healthy_s = time.monotonic() - t0
        dev.wait_scoring_past(ends, windows=3, timeout=180)
        resumed_s = time.monotonic() - t0
        assert max(dev.collector.seqs(THING)) > seq_before
        assert dev.collector.gaps(THING) == [], f"telemetry gap after kill -9 of {name}"
        lost = {t: len(v) - lost_before[t] for t, v in dev.lost_windows().items()}
        figures[name] = {"back_healthy_s": round(healthy_s, 1), "scoring_resumed_s": round(resumed_s, 1),
                         "lost_windows": lost}
        if name == SIM:
            # the simulator replays deterministically (the detector drops what it has): nothing lost
            assert lost == dict.fromkeys(TURBINES, 0), f"kill -9 of {name} lost windows: {figures}"
        else:
            # Local pub/sub keeps no queue (developer guide, "Publish/subscribe local messages"):
            # what was published while the component was down is lost -- the readings of its
            # downtime (the detector also loses the window tails it held in memory, at most
            # WINDOW/STRIDE window ends), or the scores of its downtime (the forwarder's spool
            # on disk keeps everything it had received).  Nothing more.
            tail = mc.WINDOW if name == DET else 0
            bound = math.ceil((tail + healthy_s * RATE) / mc.STRIDE) + 2
            assert all(n <= bound for n in lost.values()), (bound, figures)
    status = dev.status()
    # The simulator depends on the detector: depending on the dependency type, the detector's
    # restart may restart it too; every other component was restarted exactly once.
    assert {n: status["components"][n]["restarts"] for n in (DET, FWD)} == {DET: 1, FWD: 1}
    assert status["components"][SIM]["restarts"] >= 1
    assert all(status["components"][n]["state"] == "RUNNING" for n in PROCESS_COMPONENTS)
    assert dev.deployment_status() == "SUCCEEDED"
    # the forwarder's restart kept its sequence (spool on disk): no gap, at most resent duplicates
    seqs = dev.collector.seqs(THING)
    assert sorted(set(seqs)) == list(range(min(seqs), max(seqs) + 1))
    # every drop counted: none, over every incarnation of each component
    for component, counter in ((DET, "queue_dropped"), (DET, "malformed_dropped"), (FWD, "dropped_spool_full"),
                               (FWD, "dropped_disk_full"), (FWD, "malformed_dropped"), (SIM, "publish_errors")):
        assert _counter_totals(dev.health(component), counter) == 0, (component, counter)
    print(f"kill -9 figures: {json.dumps(figures)}")


# ====================================================================== cloud link cut
@pytest.mark.timeout(300 + 3 * LINK_CUT_S)
def test_cloud_link_cut_with_a_device_restart_in_the_middle_loses_no_telemetry(device):
    """IoT Core unreachable for LINK_CUT_S seconds, and the device restarted half-way through.

    The forwarder keeps handing telemetry to the nucleus, whose PublishToIoTCore succeeds once
    the message is in its spooler (developer guide, "Publish/subscribe AWS IoT Core MQTT
    messages"): in memory, 2.5 MiB by default, and gone when the device restarts.  What carries
    the data across is the forwarder's ``delivery: cloud_ack``: a message leaves its SQLite
    spool only when the cloud confirms it stored it, so after the restart it is sent again
    with the same seq.  When the link is back, the cloud has every telemetry message, in
    order, each window once."""
    dev = device
    seq_before = max(dev.collector.seqs(THING))
    ends_before = dev.last_ends()
    fwd_before = dev.local_counters(FWD)
    dev.cloud.stop()  # IoT Core unreachable: the nucleus' connection drops
    t_cut = time.monotonic()
    time.sleep(LINK_CUT_S / 2)
    during = dev.local_counters(FWD)  # its health on local pub/sub, as the nucleus read it
    handed_over = during["messages_sent"] - fwd_before["messages_sent"]
    # the nucleus' spooler took what was sent (no failed publish) but nothing came back confirmed:
    # the message in flight was sent again, and everything scored since waits in the forwarder's spool
    assert during["cloud_failures"] == 0 and during["ack_timeouts"] >= 1, during
    spooled_at_restart = during["spooled"]
    assert spooled_at_restart >= int(LINK_CUT_S / 2 * RATE / mc.STRIDE) * len(TURBINES) // 2, during

    dev.stop()                       # the device restarts: the nucleus' in-memory spooler is gone
    dev.start(wait_cloud=False)
    time.sleep(max(0.0, LINK_CUT_S - (time.monotonic() - t_cut)))
    cut_s = time.monotonic() - t_cut
    last_seq = dev.local_counters(FWD)["last_seq"]
    dev.cloud.start()
    wait_until(lambda: dev.local_counters(FWD).get("spooled", 1) == 0, 180, interval=0.5,
               message="the forwarder's spool confirmed empty")
    dev.wait_scoring_past(dev.last_ends(), windows=3)
    dev.wait_healthy()

    seqs = dev.collector.seqs(THING)
    assert dev.collector.gaps(THING) == [], "a telemetry message was lost"
    assert max(seqs) >= max(last_seq, seq_before + 1)
    arrival = list(dict.fromkeys(seqs))
    assert arrival == sorted(arrival), "telemetry arrived in sequence order"
    per_turbine: dict[str, list[int]] = {t: [] for t in TURBINES}
    for m in dev.collector.unique(THING):
        for r in m["records"]:
            if r["type"] == "score":
                per_turbine[r["body"]["turbine_id"]].append(r["body"]["window_end_seq"])
    for tid, ends in per_turbine.items():
        assert len(ends) == len(set(ends)), f"{tid}: a window delivered twice"
    # what was scored before the restart, during the cut, all reached the cloud
    first_half = {t: sum(1 for e in per_turbine[t] if e > ends_before[t]) for t in TURBINES}
    assert all(n >= int(LINK_CUT_S / 2 * RATE / mc.STRIDE) - 5 for n in first_half.values()), first_half
    fwd = dev.health(FWD)[-1]["counters"]
    assert fwd["dropped_spool_full"] == 0 and fwd["dropped_disk_full"] == 0, "the spool's bound was not reached"
    print(f"cloud link cut {cut_s:.0f} s with a device restart at {LINK_CUT_S / 2:.0f} s: "
          f"{handed_over} messages handed to the nucleus (unconfirmed) before the restart, {spooled_at_restart} records "
          f"still in the forwarder's spool then; delivered in order, 0 telemetry lost; windows per turbine "
          f"from before the restart {first_half}")


# ====================================================================== spool disk full
EMULATE_DISK_ENV = "WINDFLEET_FAULT_EMULATE_DISK"


def _tmpfs_probe() -> str | None:
    """None when a tmpfs can be mounted in a user+mount namespace (unprivileged where the
    kernel allows); else why not."""
    if not shutil.which("unshare"):
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs \"$d\" && umount \"$d\"; r=$?; "
                            "rmdir \"$d\"; exit $r"], capture_output=True, text=True, timeout=30)
    return None if probe.returncode == 0 else f"unshare --user --mount + tmpfs failed: {probe.stderr.strip()[-300:]}"


def _tmpfs_available() -> bool:
    """Whether the disk-full tests fill a real disk (a tmpfs in a user+mount namespace: a real
    ENOSPC).  Where they cannot, they FAIL, loudly: an emulation is a different test.  Only
    ``WINDFLEET_FAULT_EMULATE_DISK=1`` asks for the emulated full disk (SQLite's
    max_page_count, so SQLITE_FULL and never ENOSPC) -- and the test then says so."""
    if os.environ.get(EMULATE_DISK_ENV) == "1":
        warnings.warn(f"{EMULATE_DISK_ENV}=1: the disk-full test runs on an EMULATED full disk "
                      "(SQLITE_FULL via max_page_count), not a real ENOSPC", stacklevel=2)
        return False
    why = _tmpfs_probe()
    if why is not None:
        pytest.fail(f"cannot fill a real disk here ({why}); this test needs an unprivileged user+mount "
                    f"namespace (kernel.unprivileged_userns_clone=1 / no AppArmor restriction on unshare). "
                    f"Set {EMULATE_DISK_ENV}=1 to run the emulated variant instead (SQLITE_FULL, not ENOSPC).",
                    pytrace=False)
    return True


DISK_MB = 8
MIN_FREE = 2 * 1024 * 1024


_SPOOL_ON_A_FULL_DISK = r"""
import json, os, sys
from windfleet import payloads
from windfleet.components.forwarder.spool import Spool
from tests.mqtt_fixtures import score_payload
d, emulate = sys.argv[1], sys.argv[2] == "1"
sp = Spool(d + "/spool.sqlite", max_records=10**6, max_bytes=10**9, min_free_bytes=0 if emulate else 2 << 20)
if emulate:
    sp._db.execute("PRAGMA max_page_count=1500")
body = payloads.encode(score_payload("gw1-t00", 1))
out, added, sent, raised = {}, 0, 0, 0
def add(n):
    global added, raised
    for _ in range(n):
        try:
            sp.add("score", body)
        except Exception:
            raised += 1
        added += 1
def send(n):
    global sent, raised
    for _ in range(n):
        try:
            m = sp.head() or sp.build("gw1", 100, 96 * 1024)
            if m is None:
                return
            sp.ack(m.seq)
            sent += m.n_records
        except Exception:
            raised += 1  # build/ack may refuse while the disk is full (the sender retries)
def phase(name):
    out[name] = {"added": added, "records": sp.records, "dropped_disk_full": sp.dropped_disk_full,
                 "dropped_spool_full": sp.dropped_spool_full, "disk_errors": sp.disk_errors, "sent": sent}
add(30000); phase("filled")
filler = d + "/filler"
if not emulate:
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (65536, 4096, 512, 1):
            try:
                while fh.write(b"\0" * chunk):
                    pass
            except OSError:
                pass
    out["free_when_full"] = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
add(3000); send(50); phase("full")
if not emulate:
    os.unlink(filler)
add(1000); send(10**6); phase("freed")
next_seq = sp.next_seq
sp.close()
sp = Spool(d + "/spool.sqlite", min_free_bytes=0)
out.update(raised=raised, added=added, sent=sent, left=sp.records, persisted_dropped_disk_full=sp.dropped_disk_full,
           persisted_dropped_spool_full=sp.dropped_spool_full, next_seq=next_seq, reopened_next_seq=sp.next_seq)
print(json.dumps(out))
"""


def test_spool_on_a_full_disk_never_raises_from_add_and_accounts_for_every_record(tmp_path):
    """The spool alone, on an 8 MB tmpfs (a real ENOSPC; SQLITE_FULL via max_page_count only
    when WINDFLEET_FAULT_EMULATE_DISK=1 asks for it; without a user namespace the test
    fails): 30,000 records (more than fit), another writer takes every byte left, 3,000
    more records and sending while full, then space freed and everything sent.
    Nothing raises (the reserve and the low-space guard keep room for SQLite's own writes);
    every record is sent or counted in a drop counter, and the counters survive a reopen."""
    real_fs = _tmpfs_available()
    d = tmp_path / "disk"
    d.mkdir()
    script = tmp_path / "spool_on_a_full_disk.py"
    script.write_text(_SPOOL_ON_A_FULL_DISK)
    cmd = (["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f'mount -t tmpfs -o size={DISK_MB}m tmpfs "{d}" && exec "{sys.executable}" "{script}" "{d}" 0']
           if real_fs else [sys.executable, str(script), str(d), "1"])
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    if real_fs:
        assert r["free_when_full"] < 64 * 1024
    assert r["filled"]["dropped_disk_full"] > 0, r  # more than the disk holds: the oldest went
    assert r["full"]["added"] == 33000 and r["full"]["dropped_disk_full"] > r["filled"]["dropped_disk_full"]
    assert r["full"]["sent"] > r["filled"]["sent"], "sending goes on while the disk is full"
    assert r["raised"] == 0, "add, build and ack never raised"
    assert r["freed"]["records"] == 0 and r["left"] == 0
    # every record: sent, or counted as dropped (by kind)
    assert r["added"] == 34000 == r["sent"] + r["persisted_dropped_disk_full"] + r["persisted_dropped_spool_full"], r
    assert r["persisted_dropped_disk_full"] == r["freed"]["dropped_disk_full"], "counters persisted"
    assert r["reopened_next_seq"] == r["next_seq"]
    print(f"spool on a full disk ({'tmpfs ENOSPC' if real_fs else 'emulated'}): {json.dumps(r)}")


def _small_disk_forwarder(build_dir: Path, mount: Path, real_fs: bool) -> None:
    """A recipe for the forwarder whose spool is on an 8 MB filesystem: the project recipe's
    configuration and access control, a Run that mounts a tmpfs at ``mount`` in a user+mount
    namespace (only the forwarder sees it) -- or, only when WINDFLEET_FAULT_EMULATE_DISK=1 asks for it,
    runs the same forwarder code with the full disk emulated inside SQLite (max_page_count, so
    SQLITE_FULL)."""
    source = yaml.safe_load((REPO / "recipes" / f"{FWD}.yaml").read_text())
    spool_args = (f"--batch-records 100 --batch-interval 0.2 --health-interval 0.5 "
                  f"--min-free-bytes {MIN_FREE}")
    if real_fs:
        run = (f"exec unshare --user --map-root-user --mount sh -c 'mount -t tmpfs -o size={DISK_MB}m tmpfs \"$0\" "
               f"&& exec python3 -m windfleet.components.forwarder.main --spool \"$0/spool.sqlite\" {spool_args}' "
               f"\"{mount}\"")
    else:
        script = build_dir / "emulated_disk_forwarder.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(_EMULATED_DISK.format(pages=(DISK_MB * 1024 * 1024 - MIN_FREE) // 4096))
        run = f"exec python3 \"{script}\" --spool \"{mount}/spool.sqlite\" {spool_args}"
    recipe = {"RecipeFormatVersion": "2020-01-25", "ComponentName": FWD, "ComponentVersion": "1.0.0",
              "ComponentPublisher": "tests", "ComponentConfiguration": source["ComponentConfiguration"],
              "Manifests": [{"Platform": {"os": "linux"},
                             "Lifecycle": {"Setenv": {"PYTHONUNBUFFERED": "1"}, "Run": run}}]}
    (build_dir / "recipes").mkdir(parents=True, exist_ok=True)
    (build_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    (build_dir / "recipes" / f"{FWD}-1.0.0.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False, width=1000))


def test_spool_disk_full_keeps_the_forwarder_running_and_counts_every_drop(tmp_path, cloud_broker):  # noqa: F811
    """The forwarder (under the nucleus) with its spool on an 8 MB filesystem, the cloud link
    down: nothing is confirmed, so the forwarder's spool grows until ``min_free_bytes`` (2 MB) is left, then each new record replaces the
    oldest (``dropped_disk_full``); another writer then takes every byte left (ENOSPC) and
    the forwarder keeps accepting and counting; the link comes back while the disk is still
    full and delivery goes on; space freed: what is still spooled is delivered with no
    sequence gap, and received == delivered + dropped, to the record."""
    real_fs = _tmpfs_available()
    mount = tmp_path / "disk"  # inside the forwarder's namespace a tmpfs; outside an empty directory
    mount.mkdir()
    _small_disk_forwarder(tmp_path / "build", mount, real_fs)
    credentials = cloud_broker.add_device(THING, TURBINES)
    collector = TelemetryCollector(cloud_broker)
    nucleus = Nucleus(THING, tmp_path / "device", broker=cloud_broker, credentials=credentials,
                      settings=Settings(restart_backoff=0.5, stop_grace=90))
    try:
        detector = nucleus.publisher(DET, recipe_access_control(DET))  # the detector's stand-in
        local = nucleus.watcher(topics.health(THING))
        nucleus.deploy(tmp_path / "build", {FWD: "1.0.0"}, {FWD: {"MERGE": {"turbines": len(TURBINES)}}})
        wait_until(lambda: _fwd_health(local), 30, message="the forwarder's first health")
        pid = nucleus.component(FWD)["pid"]
        # the forwarder's view of its filesystem (the tmpfs exists only in its namespace)
        disk = wait_until(lambda: _mounted_view(pid, mount), 30, message="tmpfs mounted") if real_fs else None
        cloud_broker.stop()  # link down: nothing is confirmed, the forwarder's spool grows
        body_size = len(payloads.encode(_padded_score(TURBINES[0], 0)))
        n_fill = int(1.5 * DISK_MB * 1024 * 1024 / body_size)  # more than the disk holds
        sent = _publish(detector, 0, n_fill)
        wait_until(lambda: _fwd_health(local)[-1]["counters"]["received"] >= n_fill, 180, interval=0.5,
                   message="every score received")
        low = _fwd_health(local)[-1]["counters"]
        assert low["dropped_disk_full"] > 0 and low["dropped_spool_error"] == 0, low
        # delivery cloud_ack: the message in flight waits for the cloud's word (sent again on each
        # timeout) and everything else waits in the forwarder's own spool, not the nucleus'
        assert low["spooled"] > 0 and nucleus.runtime.iot.counters["refused_spool_full"] == 0, low
        if disk is not None:
            free = shutil.disk_usage(disk).free
            assert free >= MIN_FREE // 2, f"the spool left only {free} bytes free"
            _fill(disk / "filler")  # another writer takes every byte left: ENOSPC from now on
            assert shutil.disk_usage(disk).free < 64 * 1024
        more = n_fill // 10
        sent = _publish(detector, sent, more)
        wait_until(lambda: _fwd_health(local)[-1]["counters"]["received"] >= n_fill + more, 120, interval=0.5,
                   message="received while the disk is full")
        full = _fwd_health(local)[-1]["counters"]
        fwd = nucleus.component(FWD)
        assert fwd["pid"] == pid and fwd["restarts"] == 0 and fwd["state"] == "RUNNING", \
            "the forwarder keeps running on a full disk"
        cloud_broker.start()  # the link comes back while the disk is still full: sending must go on
        wait_until(lambda: len(_score_numbers(collector)) >= n_fill // 10, 120, interval=0.5,
                   message="delivery while the disk is full")
        if disk is not None:
            assert shutil.disk_usage(disk).free < MIN_FREE
            (disk / "filler").unlink()
        wait_until(lambda: _fwd_health(local)[-1]["counters"]["spooled"] < 100, 180, interval=0.5,
                   message="spool drained after the disk and the link came back")
        wait_until(lambda: _score_numbers(collector) and max(_score_numbers(collector)) == sent - 1, 60,
                   interval=0.5, message="the newest score at the cloud")
        # greengrass-cli component stop: SIGTERM; it flushes the rest, then reports its final counters
        assert nucleus.cli().stop_component_async(component_name=FWD).result(30).stop_status == "SUCCEEDED"
        wait_until(lambda: nucleus.component(FWD).get("state") == "FINISHED", 120, message="the forwarder stopped")
        wait_until(lambda: _fwd_health(local)[-1]["counters"]["spooled"] == 0, 10, message="its final health")
        assert nucleus.runtime.ipc.counters.get("send_timeouts", 0) == 0, "no local message dropped on its way"
        assert any(e.get("msg") == "forwarder stopped" for e in nucleus.log(FWD))
        h = _fwd_health(local)[-1]["counters"]
    finally:
        nucleus.stop()
        collector.close()
    delivered = sorted(set(_score_numbers(collector)))
    health_delivered = _non_scores(collector)
    dropped = h["dropped_spool_full"] + h["dropped_disk_full"] + h["dropped_spool_error"]
    assert h["spooled"] == 0 and h["malformed_dropped"] == 0 and h["dropped_spool_error"] == 0, h
    assert h["received"] == h["sent"] + dropped, f"every record delivered or counted as dropped: {h}"
    assert h["sent"] == len(delivered) + health_delivered, "the cloud has exactly what was sent"
    assert collector.gaps(THING) == [], "spool drops never make sequence gaps"
    assert delivered[-1] == sent - 1 and len(delivered) < sent, "drop OLDEST: the newest kept"
    print(f"spool disk full ({'tmpfs, real ENOSPC' if disk else 'emulated SQLITE_FULL'}): {h['received']} received "
          f"({sent} scores), {len(delivered)} scores + {health_delivered} health delivered, dropped_disk_full "
          f"{h['dropped_disk_full']} (while filling {low['dropped_disk_full']}, once full "
          f"{full['dropped_disk_full'] - low['dropped_disk_full']} more), dropped_spool_full "
          f"{h['dropped_spool_full']}, write errors on a full disk {h['spool_disk_errors']}, "
          f"sender retries {h['spool_errors']}, publishes the nucleus refused {h['cloud_failures']}")


_EMULATED_DISK = """
import sqlite3, sys
from windfleet.components.forwarder import spool as S
_init = S.Spool.__init__
def init(self, *a, **k):
    _init(self, *a, **k)
    self._db.execute("PRAGMA max_page_count={pages}")
S.Spool.__init__ = init
from windfleet.components.forwarder.main import main
sys.exit(main(sys.argv[1:]))
"""


def _mounted_view(pid: int, mount: Path) -> Path | None:
    view = Path(f"/proc/{pid}/root") / str(mount).lstrip("/")
    try:
        return view if os.statvfs(view).f_blocks * os.statvfs(view).f_frsize <= DISK_MB * 1024 * 1024 else None
    except OSError:
        return None


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem refuses (unbuffered: nothing left to flush)."""
    with open(path, "wb", buffering=0) as fh:
        for chunk in (65536, 4096, 512, 1):
            try:
                while fh.write(b"\0" * chunk):
                    pass
            except OSError:
                pass


def _padded_score(turbine: str, n: int) -> dict:
    """A valid score of about 2 KB (an extra field): the disk fills in a few thousand messages."""
    return {**score_payload(turbine, n), "note": "x" * 2000}


def _publish(detector: Publisher, start: int, n: int) -> int:
    for i in range(start, start + n):
        tid = TURBINES[i % 2]
        detector.publish(topics.scores(tid), payloads.encode(_padded_score(tid, i)))
    return start + n


def _fwd_health(local: Watcher) -> list[dict]:
    return [h for h in local.json() if h["component"] == FWD]


def _score_numbers(collector: TelemetryCollector) -> list[int]:
    return [r["body"]["window_end_seq"] for r in collector.records(THING, "score")]


def _non_scores(collector: TelemetryCollector) -> int:
    return sum(1 for r in collector.records(THING) if r["type"] != "score")
