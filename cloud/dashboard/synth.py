"""Synthetic fleet telemetry, built with the real payload builders.

For dashboard demos, tests and benchmarks when no fleet is running: each
turbine gets a score every ``period_s`` with feature errors around a fraction of
its thresholds, and an optional injected anomaly episode pushes chosen features
over their thresholds.  Messages look exactly like the forwarder's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

from windfleet import payloads, topics
from windfleet.model_contract import FEATURES

THRESHOLDS = {"roll": 0.08, "pitch": 0.08, "yaw": 0.12, "wind_speed_rps": 0.1, "rps": 0.1, "voltage": 0.15}
COMPONENTS = ("com.windfleet.TurbineSimulator", "com.windfleet.AnomalyDetector", "com.windfleet.LogForwarder")


@dataclass
class Episode:
    """Scores of ``turbine_id`` in ``[start, end)`` get ``features`` over threshold."""

    turbine_id: str
    start: float
    end: float
    features: tuple[str, ...] = ("rps", "voltage")
    severity: float = 3.0


def fleet_messages(
    things: list[str],
    turbines_per_thing: int,
    start: float,
    duration_s: float,
    period_s: float = 0.5,
    records_per_message: int = 20,
    model_version: str | dict[str, str] = "1.0.0",
    episodes: list[Episode] = (),
    seed: int = 0,
    first_seq: int = 0,
) -> Iterator[tuple[str, dict]]:
    """Yield ``(topic, telemetry payload)`` in time order, one health record per
    component per gateway at the start of its stream and every minute after."""
    rng = random.Random(seed)
    versions = model_version if isinstance(model_version, dict) else {t: model_version for t in things}
    seqs = {t: first_seq for t in things}
    pending: dict[str, list[dict]] = {t: [] for t in things}
    steps = int(duration_s / period_s)
    window_seq = 0
    for step in range(steps):
        ts = start + step * period_s
        window_seq += 10
        for thing in things:
            version = versions[thing]
            if step % max(1, int(60 / period_s)) == 0:
                for component in COMPONENTS:
                    extra = {"model_version": version} if component.endswith("Detector") else {}
                    pending[thing].append({"type": "health", "body": payloads.health(
                        thing, component, "1.0.0", "RUNNING", ts, {"uptime_s": step * period_s}, **extra)})
            for n in range(turbines_per_thing):
                turbine = topics.turbine_id(thing, n)
                errors = {f: THRESHOLDS[f] * (0.25 + 0.15 * math.sin(ts / 7 + n) + 0.1 * rng.random())
                          for f in FEATURES}
                for ep in episodes:
                    if ep.turbine_id == turbine and ep.start <= ts < ep.end:
                        for f in ep.features:
                            errors[f] = THRESHOLDS[f] * ep.severity * (0.8 + 0.4 * rng.random())
                pending[thing].append({"type": "score", "body": payloads.score(
                    turbine, ts, version, window_seq, errors, THRESHOLDS)})
            while len(pending[thing]) >= records_per_message:
                batch, pending[thing] = pending[thing][:records_per_message], pending[thing][records_per_message:]
                yield topics.telemetry(thing), payloads.telemetry(thing, seqs[thing], ts, batch)
                seqs[thing] += 1
    for thing in things:
        if pending[thing]:
            yield topics.telemetry(thing), payloads.telemetry(
                thing, seqs[thing], start + steps * period_s, pending[thing])
            seqs[thing] += 1
