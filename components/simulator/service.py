"""com.windfleet.TurbineSimulator: the simulation library as a service on the bus.

Configuration (component configuration; ``main.py`` arguments override):

``turbines``            number of turbines; ids are ``topics.turbine_id(thing, i)``
``rate``                samples per second per turbine (20)
``batch``               samples per readings message (20: one message a second at 20 Hz)
``readings_version``    2 (default): columnar batches (``payloads.readings_batch``); 1: one
                        object per sample (``payloads.readings``), as devices before it sent
``seed``                with the thing name, seeds every turbine: a run repeats exactly
``anomalies_per_hour``  random anomalies per turbine per hour (0 = none)
``anomalies``           explicit list of ``{turbine, kind, start_s, duration_s, severity[, channel]}``
                        (``turbine``: index or id)
``drift``               list of drift scenarios (never labelled: drift is not a fault), each on
                        ``turbines`` (indices, or ids -- ids of other gateways are skipped, so one
                        fleet-wide configuration can name any turbine) from ``start_s`` after the start, ramping
                        linearly over ``ramp_s`` (default 0: a step) and then holding:
                        ``{"kind": "sensor_offset", "turbines": [0, 3], "channel": "voltage",
                        "offset": 60, "start_s": 30, "ramp_s": 10}`` (``channel`` one of
                        ``simulation.DRIFT_CHANNELS``, ``offset`` in its units) or
                        ``{"kind": "wind_regime", "turbines": [1], "mean_wind": 16, "start_s": 30,
                        "ramp_s": 20}`` (the site's mean wind moves to ``mean_wind`` m/s)
``mean_wind``           the sites' mean wind, m/s (8)
``realtime``            pace to the wall clock (true) or publish as fast as possible (false)
``duration_s``          stop after this much simulated time (none = until stopped)
``health_interval_s``   seconds between health messages (10)
``start_ts``            epoch seconds of sample 0 (default: the start time)

Readings go to ``topics.readings(id)`` (QoS1) as ``payloads.readings_batch`` with ``seq``
numbering samples from 0; each injected anomaly is announced on ``topics.labels(id)``
when its first sample is published (drift never is).  Pacing is against absolute deadlines
(start + k * batch / rate), so it does not drift; when the process falls behind it
catches up without sleeping and counts ``late_batches``.  Health messages carry ``drift``:
per turbine with a started drift, ``[{kind, progress (0..1), channel, offset (now),
target_offset | mean_wind}]``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from windfleet import jsonlog, payloads, topics
from windfleet.simulation import (DRIFT_KINDS, KINDS, STUCK_CHANNELS, Anomaly, Drift, Turbine, random_schedule,
                                 turbine_seed)

COMPONENT = "com.windfleet.TurbineSimulator"
FIELDS = payloads.SAMPLE_FIELDS + payloads.EXTRA_SAMPLE_FIELDS
DAY = 86_400.0

log = logging.getLogger("windfleet.simulator")


class ConfigError(ValueError):
    """A configuration the simulator cannot run (one-line reason)."""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    if isinstance(value, int):
        return bool(value)
    raise ConfigError(f"not a boolean: {value!r}")


@dataclass
class SimConfig:
    turbines: int = 1
    rate: float = 20.0
    batch: int = 20
    readings_version: int = payloads.BATCH_VERSION
    seed: int = 0
    anomalies_per_hour: float = 0.0
    anomalies: list[dict] = field(default_factory=list)
    drift: list[dict] = field(default_factory=list)
    realtime: bool = True
    duration_s: float | None = None
    health_interval_s: float = 10.0
    start_ts: float | None = None
    mean_wind: float = 8.0

    @classmethod
    def from_configuration(cls, config: dict, **overrides: Any) -> "SimConfig":
        merged = {**(config or {}), **{k: v for k, v in overrides.items() if v is not None}}
        known = {f for f in cls.__dataclass_fields__}
        try:
            c = cls(**{k: v for k, v in merged.items() if k in known})
            c.turbines, c.batch, c.seed = int(c.turbines), int(c.batch), int(c.seed)
            c.readings_version = int(c.readings_version)
            c.rate, c.anomalies_per_hour = float(c.rate), float(c.anomalies_per_hour)
            c.realtime = _bool(c.realtime)
            c.duration_s = None if c.duration_s in (None, "", 0) else float(c.duration_s)
            c.health_interval_s = float(c.health_interval_s)
            c.mean_wind = float(c.mean_wind)
            c.start_ts = None if c.start_ts in (None, "") else float(c.start_ts)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad simulator configuration: {exc}") from None
        if c.turbines < 1 or c.batch < 1 or c.rate <= 0:
            raise ConfigError("turbines and batch must be >= 1 and rate > 0")
        if c.readings_version not in payloads.BATCH_VERSIONS:
            raise ConfigError(f"readings_version must be one of {payloads.BATCH_VERSIONS}")
        if not isinstance(c.anomalies, list):
            raise ConfigError("anomalies must be a list")
        if not isinstance(c.drift, list):
            raise ConfigError("drift must be a list")
        return c


def thing_seed(seed: int, thing: str) -> int:
    """One seed per (configured seed, gateway): gateways differ, reruns repeat."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{thing}".encode()).digest()[:4], "big")


def explicit_schedule(entries: list[dict], ids: list[str], rate: float) -> dict[str, list[Anomaly]]:
    """Configuration ``anomalies`` -> per-turbine schedules; ConfigError names the bad entry."""
    out: dict[str, list[Anomaly]] = {t: [] for t in ids}
    for n, e in enumerate(entries):
        try:
            turbine = e["turbine"]
            tid = ids[turbine] if isinstance(turbine, int) else str(turbine)
            if tid not in out:
                raise ValueError(f"unknown turbine {turbine!r}")
            kind = e["kind"]
            if kind not in KINDS:
                raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
            channel = e.get("channel") or (STUCK_CHANNELS[0] if kind == "stuck_sensor" else "")
            if kind == "stuck_sensor" and channel not in STUCK_CHANNELS:
                raise ValueError(f"channel {channel!r} is not one of {', '.join(STUCK_CHANNELS)}")
            start, duration = int(float(e["start_s"]) * rate), int(float(e["duration_s"]) * rate)
            if start < 0 or duration < 1:
                raise ValueError("start_s must be >= 0 and duration_s > 0")
            out[tid].append(Anomaly(kind, start, duration, float(e.get("severity", 0.8)), channel))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ConfigError(f"anomalies[{n}]: {exc}") from None
    return out


_DRIFT_KEYS = {"sensor_offset": {"channel", "offset"}, "wind_regime": {"mean_wind"}}


def _number(e: dict, key: str, default: float | None = None) -> float:
    value = e.get(key, default)
    if value is None:
        raise ValueError(f"{key} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a finite number, not {value!r}")
    try:
        number = float(value)  # a JSON integer may exceed a float
    except OverflowError:
        raise ValueError(f"{key} is out of range") from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number, not {value!r}")
    return number


def drift_schedule(entries: list[dict], ids: list[str], rate: float) -> dict[str, list[Drift]]:
    """Configuration ``drift`` -> per-turbine :class:`Drift` lists; ConfigError names the bad entry."""
    out: dict[str, list[Drift]] = {t: [] for t in ids}
    here = topics.gateway_of(ids[0]) if ids else None
    for n, e in enumerate(entries):
        try:
            if not isinstance(e, dict):
                raise ValueError("each entry must be an object")
            kind = e.get("kind")
            if kind not in DRIFT_KINDS:
                raise ValueError(f"kind {kind!r} is not one of {', '.join(DRIFT_KINDS)}")
            unknown = set(e) - {"kind", "turbines", "start_s", "ramp_s"} - _DRIFT_KEYS[kind]
            if unknown:
                raise ValueError(f"unknown key(s) for {kind}: {', '.join(sorted(map(str, unknown)))}")
            turbines = e.get("turbines")
            if not isinstance(turbines, list) or not turbines:
                raise ValueError("turbines must be a non-empty list of turbine indices or ids")
            targets = []
            for t in turbines:
                if isinstance(t, bool) or not isinstance(t, (int, str)):
                    raise ValueError(f"turbine {t!r} is neither an index nor an id")
                tid = (ids[t] if 0 <= t < len(ids) else None) if isinstance(t, int) else t
                if isinstance(t, str) and topics.gateway_of(t) != here:
                    continue  # one fleet-wide configuration names turbines of every gateway
                if tid not in out:
                    raise ValueError(f"unknown turbine {t!r} (this gateway has {len(ids)})")
                targets.append(tid)
            start_s, ramp_s = _number(e, "start_s"), _number(e, "ramp_s", 0.0)
            if start_s < 0 or ramp_s < 0:
                raise ValueError("start_s and ramp_s must be >= 0")
            if kind == "sensor_offset":
                drift = Drift(kind, round(start_s * rate), round(ramp_s * rate), channel=e.get("channel"),
                              offset=_number(e, "offset"))
            else:
                drift = Drift(kind, round(start_s * rate), round(ramp_s * rate), mean_wind=_number(e, "mean_wind"))
        except ValueError as exc:
            raise ConfigError(f"drift[{n}]: {exc}") from None
        for tid in dict.fromkeys(targets):
            out[tid].append(drift)
    return out


class _Schedule:
    """One turbine's anomalies, random ones generated a day at a time (so a long run
    never holds a huge list and ``Turbine`` only ever scans the few near ``i``)."""

    def __init__(self, explicit: list[Anomaly], rng: np.random.Generator, per_hour: float, rate: float):
        self.explicit = sorted(explicit, key=lambda a: a.start)
        self.rng, self.per_hour, self.rate = rng, per_hour, rate
        self.random: list[Anomaly] = []
        self.horizon = 0  # random anomalies are generated up to this sample

    def window(self, start: int, end: int) -> list[Anomaly]:
        """Anomalies overlapping samples ``[start, end)``."""
        while self.per_hour > 0 and self.horizon < end + int(self.rate * 120):
            day = int(DAY * self.rate)
            chunk = random_schedule(self.rng, day, self.rate, self.per_hour,
                                    start_after=30.0 if self.horizon == 0 else 0.0)
            self.random.extend(Anomaly(a.kind, a.start + self.horizon, a.duration, a.severity, a.channel)
                               for a in chunk)
            self.horizon += day
            self.random = [a for a in self.random if a.end > start]
        explicit = [a for a in self.explicit if a.start < end and a.end > start]
        # An explicit anomaly wins over a random one it overlaps.
        rand = [a for a in self.random if a.start < end and a.end > start
                and not any(x.start < a.end and a.start < x.end for x in self.explicit)]
        return explicit + rand


class Simulator:
    """Steps every turbine ``batch`` samples at a time and publishes readings and labels."""

    def __init__(self, bus, config: SimConfig):
        self.bus, self.config = bus, config
        self.thing = bus.thing_name
        self.version = getattr(bus, "version", None) or "0.0.0"
        self.ids = [topics.turbine_id(self.thing, i) for i in range(config.turbines)]
        base = thing_seed(config.seed, self.thing)
        explicit = explicit_schedule(config.anomalies, self.ids, config.rate)
        drift = drift_schedule(config.drift, self.ids, config.rate)
        self.t0 = config.start_ts if config.start_ts is not None else time.time()
        self.turbines: list[Turbine] = []
        self.schedules: list[_Schedule] = []
        for i, tid in enumerate(self.ids):
            s = turbine_seed(base, i)
            self.turbines.append(Turbine(tid, s, config.rate, [], config.mean_wind, self.t0, drift[tid]))
            self.schedules.append(_Schedule(explicit[tid], np.random.default_rng(s + 1),
                                            config.anomalies_per_hour, config.rate))
        self.counters = dict.fromkeys(("readings_published", "messages_published", "labels_published",
                                       "late_batches", "publish_errors"), 0)
        self.behind_s = 0.0
        self.seq = 0  # next sample index (same for every turbine)

    def step(self) -> None:
        """Advance every turbine one batch and publish it."""
        n, start = self.config.batch, self.seq
        for turbine, schedule in zip(self.turbines, self.schedules):
            active = schedule.window(start, start + n)
            turbine.anomalies = active
            for a in active:
                if start <= a.start < start + n:
                    label = payloads.label(turbine.turbine_id, a.kind, a.start, a.end, round(a.severity, 4))
                    self._publish(topics.labels(turbine.turbine_id), label, "labels_published")
                    # ground truth is for the cloud, where runs are scored (IoT Core, spooled by the nucleus)
                    if not self.bus.publish_cloud(topics.labels(turbine.turbine_id), payloads.encode(label), qos=1):
                        self.counters["publish_errors"] += 1
            for d in turbine.drift:
                if start <= d.start < start + n:  # no label (drift is no fault): a log line says when
                    jsonlog.event(log, "drift started", turbine_id=turbine.turbine_id, kind=d.kind, seq=d.start,
                                  ramp_s=d.ramp / self.config.rate, channel=d.channel or None,
                                  offset=d.offset if d.kind == "sensor_offset" else None,
                                  mean_wind=d.mean_wind if d.kind == "wind_regime" else None)
            data = turbine.step(n)
            if self.config.readings_version == payloads.BATCH_VERSION:
                body = payloads.readings_batch(turbine.turbine_id, start, {f: data[f] for f in FIELDS})
            else:
                columns = [data[f].tolist() for f in FIELDS]
                body = payloads.readings(turbine.turbine_id, start, [dict(zip(FIELDS, row)) for row in zip(*columns)])
            if self._publish(topics.readings(turbine.turbine_id), body, "messages_published"):
                self.counters["readings_published"] += n
        self.seq += n

    def _publish(self, topic: str, body: dict, counter: str) -> bool:
        try:
            self.bus.publish(topic, body, qos=1)
        except Exception as exc:
            self.counters["publish_errors"] += 1
            jsonlog.event(log, "publish failed", logging.WARNING, topic=topic, error=repr(exc)[:200])
            return False
        self.counters[counter] += 1
        return True

    def health(self, state: str = "RUNNING") -> dict:
        drift = {t.turbine_id: status for t in self.turbines if (status := t.drift_status())}
        return payloads.health(self.thing, COMPONENT, self.version, state, time.time(), self.counters,
                               turbines=len(self.ids), seq=self.seq, behind_s=round(self.behind_s, 3),
                               realtime=self.config.realtime, drift=drift)

    def run(self, stop: threading.Event) -> dict:
        """Publish until ``stop`` or ``duration_s`` of simulated time; returns the counters."""
        c = self.config
        period = c.batch / c.rate
        last_seq = None if c.duration_s is None else int(c.duration_s * c.rate)
        started = time.monotonic()
        next_health = started
        k = 0
        while not stop.is_set() and (last_seq is None or self.seq < last_seq):
            if c.realtime:
                due = started + k * period  # absolute deadline: no drift
                wait = due - time.monotonic()
                if wait > 0:
                    if stop.wait(wait):
                        break
                elif -wait > period:
                    self.counters["late_batches"] += 1
                self.behind_s = max(0.0, -wait)
            self.step()
            k += 1
            now = time.monotonic()
            if now >= next_health:
                next_health = now + c.health_interval_s
                self._health()
        self._health()
        return dict(self.counters)

    def _health(self) -> None:
        try:
            self.bus.publish(topics.health(self.thing), self.health(), qos=1)
        except Exception as exc:
            jsonlog.event(log, "health publish failed", logging.WARNING, error=repr(exc)[:200])


def run(bus, stop: threading.Event | None = None, **overrides: Any) -> int:
    """Run the simulator on ``bus`` with its configuration (``overrides`` win); exit code."""
    stop = stop or threading.Event()
    try:
        config = SimConfig.from_configuration(bus.get_configuration(), **overrides)
        sim = Simulator(bus, config)
    except ConfigError as exc:
        jsonlog.event(log, "cannot start", logging.ERROR, reason=str(exc))
        bus.update_state("ERRORED", reason=str(exc))
        bus.close()
        return 2
    bus.update_state("RUNNING", turbines=len(sim.ids))
    jsonlog.event(log, "simulator started", turbines=len(sim.ids), rate=config.rate, batch=config.batch,
                  realtime=config.realtime, duration_s=config.duration_s,
                  anomalies_per_hour=config.anomalies_per_hour, explicit_anomalies=len(config.anomalies),
                  drift_scenarios=len(config.drift))
    try:
        sim.run(stop)
    finally:
        bus.close()
    jsonlog.event(log, "simulator stopped", **sim.counters)
    return 0
