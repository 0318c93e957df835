"""Turbine simulation: physically plausible sensor streams with labelled anomalies.

One :class:`Turbine` is a small state machine advanced ``step(n)`` samples at a
time, so the same code serves offline training (``simulate``) and the live
simulator component.  Everything is deterministic for a seed.

Physics, per sample at ``rate`` Hz:

- wind: a slow mean-reverting drift (site weather), turbulence (Ornstein-Uhlenbeck,
  intensity ~12 %) and gusts (Poisson onsets, 1-cos shape); direction wanders slowly
  over the whole circle (the sample's IMU yaw spans it: std 1.81 rad);
- rotor speed follows a power curve (cut-in, rated, cut-out) through first-order
  inertia; voltage follows rotor speed (generator) as a 0-1023 ADC value;
- orientation quaternion: nacelle yaw tracks wind direction through a deadband yaw
  drive; roll/pitch carry tower sway (~0.35 Hz, grows with thrust), 1P/3P rotor
  harmonics and sensor noise;
- anemometer and rotor speed are pulse counts per second, as in the sample.

Units are chosen so long-run statistics match the sample's real turbine
(DESIGN.md): roll/pitch ~ 0.016 rad std, wind_speed_rps ~ 2.15 mean, rps ~ 1.6 mean,
voltage ~ 48 mean.

Drift (:class:`Drift`) is a slow change that is not a fault, so it is never labelled: a
sensor offset (a recalibrated or ageing sensor) or a change of wind regime (season, new
site).  Either ramps linearly from its start and then holds.  Drift draws no random
numbers, so a drifted turbine's stream equals the undrifted one up to its start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

KINDS = (
    "bearing_vibration",
    "rotor_imbalance",
    "voltage_fault",
    "stuck_sensor",
    "yaw_misalignment",
    "overspeed",
)
NORMAL = ""  # label of a normal sample

# Power curve, in m/s and rotor pulses per second.
CUT_IN, RATED, CUT_OUT = 3.0, 11.0, 25.0
RPS_PER_MS = 0.2  # rotor pulses/s per m/s below rated (constant tip-speed ratio)
ANEMO_PER_MS = 0.27  # anemometer pulses/s per m/s
VOLTS_PER_RPS = 29.5  # ADC counts per rotor pulse/s
STUCK_CHANNELS = ("wind_speed_rps", "rps", "voltage")
YAW_SLEW = 0.05  # rad/s (~3 deg/s): a small turbine's yaw drive (the sample's rotor turns ~1.6 rev/s)
# Fault effects, tuned so every kind is physically visible in the six model features
# (see the training report): a yaw fault steers 0.6-0.9 rad off the wind; a bearing
# fault adds a 6.3 Hz nacelle vibration of up to 0.035 rad; an imbalanced rotor rocks
# the nacelle once per turn by up to 0.045 rad (at least half of that at low wind).
YAW_FAULT_BASE, YAW_FAULT_SPAN = 0.3, 0.6
BEARING_AMP = 0.035
IMBALANCE_AMP = 0.045  # 1P nacelle rocking of an imbalanced rotor (was 0.03, floor 0.3 of rated thrust)


DRIFT_KINDS = ("sensor_offset", "wind_regime")
# Sensor channels an offset can drift (roll/pitch/yaw: an IMU remounted or recalibrated; they
# reach the quaternion).  Kept in range afterwards as the sensor would: the ADC in 0..1023,
# pulse counts >= 0, yaw wrapped to (-pi, pi].
DRIFT_CHANNELS = ("rps", "wind_speed_rps", "voltage", "roll", "pitch", "yaw", "temperature", "vibration",
                  "pitch_angle")
MAX_MEAN_WIND = 30.0  # m/s: beyond cut-out, the highest regime a drift may move a site to


@dataclass(frozen=True)
class Drift:
    """A gradual, unlabelled change of one turbine from sample ``start``: its effect ramps
    linearly from 0 to full over ``ramp`` samples (0: a step), then holds.

    ``sensor_offset``: ``channel`` reads ``offset`` (channel units) more at full effect.
    ``wind_regime``: the site's mean wind moves to ``mean_wind`` (m/s, in place of the
    turbine's configured mean; the turbine keeps its own deviation from that mean, its
    turbulence and gusts): a regime change, not a fault."""

    kind: str
    start: int
    ramp: int = 0
    channel: str = ""
    offset: float = 0.0
    mean_wind: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(DRIFT_KINDS)}")
        if self.start < 0 or self.ramp < 0:
            raise ValueError("start and ramp must be >= 0")
        if self.kind == "sensor_offset":
            if self.channel not in DRIFT_CHANNELS:
                raise ValueError(f"channel {self.channel!r} is not one of {', '.join(DRIFT_CHANNELS)}")
            if not math.isfinite(self.offset):
                raise ValueError("offset must be a finite number")
        elif not 0.0 <= self.mean_wind <= MAX_MEAN_WIND:
            raise ValueError(f"mean_wind must be in 0..{MAX_MEAN_WIND:g} m/s")

    def weight(self, i: int) -> float:
        """Fraction of the full effect at sample ``i``: 0 before ``start``, then up to 1."""
        if i < self.start:
            return 0.0
        return 1.0 if self.ramp == 0 or i >= self.start + self.ramp else (i - self.start) / self.ramp


@dataclass(frozen=True)
class Anomaly:
    """An injected fault covering samples ``start <= i < start + duration`` of one turbine."""

    kind: str
    start: int
    duration: int
    severity: float  # 0..1, scales the effect
    channel: str = ""  # stuck_sensor: which channel sticks

    @property
    def end(self) -> int:
        return self.start + self.duration


def random_schedule(
    rng: np.random.Generator,
    n_samples: int,
    rate: float,
    per_hour: float = 6.0,
    kinds: tuple[str, ...] = KINDS,
    min_seconds: float = 20.0,
    max_seconds: float = 90.0,
    start_after: float = 30.0,
) -> list[Anomaly]:
    """Non-overlapping anomalies at ``per_hour`` on average, kinds drawn uniformly."""
    out: list[Anomaly] = []
    t = int(start_after * rate)
    mean_gap = 3600.0 / per_hour * rate
    while True:
        t += int(rng.exponential(mean_gap)) + int(min_seconds * rate)
        duration = int(rng.uniform(min_seconds, max_seconds) * rate)
        if t + duration >= n_samples:
            return out
        kind = kinds[int(rng.integers(len(kinds)))]
        channel = STUCK_CHANNELS[int(rng.integers(len(STUCK_CHANNELS)))] if kind == "stuck_sensor" else ""
        out.append(Anomaly(kind, t, duration, float(rng.uniform(0.5, 1.0)), channel))
        t += duration


def _ou(x: float, mean: float, tau: float, sigma: float, dt: float, noise: float) -> float:
    """One exact Ornstein-Uhlenbeck step with stationary std ``sigma``."""
    a = math.exp(-dt / tau)
    return mean + (x - mean) * a + sigma * math.sqrt(1.0 - a * a) * noise


@dataclass
class Turbine:
    """One simulated turbine.  ``step(n)`` returns the next n samples as arrays."""

    turbine_id: str
    seed: int
    rate: float = 20.0
    anomalies: list[Anomaly] = field(default_factory=list)
    mean_wind: float = 8.0
    t0: float = 0.0  # epoch seconds of sample 0
    drift: list[Drift] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        r = self.rng
        self.i = 0
        self.site = self.mean_wind + r.normal(0, 0.8)
        self.slow = self.site + r.normal(0, 1.6)
        self.turb = 0.0
        self.direction = r.uniform(-math.pi, math.pi)
        self.yaw = self.direction + r.normal(0, 0.1)
        self.rotor = RPS_PER_MS * self.slow
        self.phase = r.uniform(0, 2 * math.pi)  # rotor azimuth
        self.sway = np.zeros(2)  # tower sway state (roll, pitch), damped oscillators
        self.sway_v = np.zeros(2)
        self.gust_left, self.gust_len, self.gust_amp = 0, 1, 0.0
        self.temperature = 25.0 + r.normal(0, 3)
        self.offsets = np.array([-0.008, 0.001]) + r.normal(0, 0.002, 2)
        self._stuck_value: dict[int, float] = {}
        self._wind_shift = 0.0  # m/s the site's mean has moved so far (wind_regime drift)

    def _active(self, i: int) -> Anomaly | None:
        for a in self.anomalies:
            if a.start <= i < a.end:
                return a
        return None

    # One row of standard normals per sample, drawn in one call per step(): numpy's
    # Generator fills them in order, so step(1) x n and step(n) produce the same
    # stream (the live simulator publishing small batches matches the offline one).
    _DRAWS = 11

    def step(self, n: int) -> dict[str, np.ndarray]:
        """Advance n samples.  Returns arrays keyed by sensor name plus ``label`` (kind or "")
        and ``misalignment`` (rad, wind direction - nacelle yaw: ground truth, not a sensor)."""
        dt = 1.0 / self.rate
        noise = self.rng.standard_normal((n, self._DRAWS)).tolist()
        cols = ("ts", "rps", "wind_speed_rps", "voltage", "roll", "pitch", "yaw",
                "temperature", "vibration", "pitch_angle", "misalignment")
        rows = [[0.0] * len(cols) for _ in range(n)]
        labels = np.empty(n, dtype=object)
        omega = 2 * math.pi * 0.35  # tower first mode
        # hoisted constants of the per-sample loop (it is the simulator's hot path)
        a_slow, a_turb, a_temp = math.exp(-dt / 900.0), math.exp(-dt / 4.0), math.exp(-dt / 600.0)
        k_slow, k_turb, k_temp = (math.sqrt(1 - a * a) for a in (a_slow, a_turb, a_temp))
        gust_z = _GUST_Z[round(self.rate, 6)] if round(self.rate, 6) in _GUST_Z else _upper_z(dt / 90.0)
        _GUST_Z[round(self.rate, 6)] = gust_z
        slew = YAW_SLEW * dt
        sway_r, sway_p = float(self.sway[0]), float(self.sway[1])
        v_r, v_p = float(self.sway_v[0]), float(self.sway_v[1])
        off_r, off_p = float(self.offsets[0]), float(self.offsets[1])
        rated_rps = RPS_PER_MS * RATED
        wind_shift, offsets = self._drift_plan(n) if self.drift else (None, ())
        for j in range(n):
            z = noise[j]
            i = self.i + j
            a = self._active(i) if self.anomalies else None
            kind = a.kind if a else NORMAL
            if wind_shift is not None:  # the site's mean (and the slow wind around it) moves together
                d = wind_shift[j] - self._wind_shift
                self.site += d
                self.slow += d
                self._wind_shift = wind_shift[j]
            # --- wind
            self.slow = self.site + (self.slow - self.site) * a_slow + 1.6 * k_slow * z[0]
            v_mean = max(self.slow, 0.0)
            self.turb = self.turb * a_turb + 0.12 * v_mean * k_turb * z[1]
            if self.gust_left <= 0 and z[8] > gust_z:
                self.gust_len = int((8.0 + 2.0 * max(-2.0, min(2.0, z[9]))) * self.rate)
                self.gust_left, self.gust_amp = self.gust_len, 2.25 + 0.6 * max(-2.0, min(2.0, z[10]))
            gust = 0.0
            if self.gust_left > 0:
                k = self.gust_len - self.gust_left
                gust = 0.5 * self.gust_amp * (1 - math.cos(2 * math.pi * k / self.gust_len))
                self.gust_left -= 1
            v = max(v_mean + self.turb + gust, 0.0)
            self.direction += 0.04 * math.sqrt(dt) * z[2]
            # --- yaw drive: deadband then a slew toward the wind (a yaw fault: toward an offset)
            target_yaw = self.direction + (YAW_FAULT_BASE + YAW_FAULT_SPAN * a.severity if kind == "yaw_misalignment" else 0.0)
            err = math.remainder(target_yaw - self.yaw, 2 * math.pi)
            if abs(err) > 0.12 or kind == "yaw_misalignment":
                self.yaw += math.copysign(min(slew, abs(err)), err)
            misalign = math.remainder(self.direction - self.yaw, 2 * math.pi)
            # --- rotor through the power curve with inertia
            if v < CUT_IN or v > CUT_OUT:
                target = 0.02
            else:
                target = RPS_PER_MS * min(v, RATED) * math.cos(misalign) ** 2
            if kind == "overspeed":
                target = max(target, rated_rps) * (1.35 + 0.5 * a.severity)
            self.rotor += (target - self.rotor) * (dt / 4.0)
            rps = max(self.rotor + 0.03 * z[3], 0.0)
            self.phase += 2 * math.pi * self.rotor * dt
            # --- tower sway: damped oscillator driven by turbulent thrust
            thrust = (self.rotor / rated_rps) ** 2
            acc_r = 0.6 * thrust * (0.5 + 1.6 * z[4]) * 0.02 * omega**2 - 0.1 * omega * v_r - omega**2 * sway_r
            acc_p = thrust * (0.5 + 1.6 * z[5]) * 0.02 * omega**2 - 0.1 * omega * v_p - omega**2 * sway_p
            v_r += acc_r * dt
            v_p += acc_p * dt
            sway_r += v_r * dt
            sway_p += v_p * dt
            harmonic = 0.0015 * thrust * math.sin(3 * self.phase)
            roll = off_r + sway_r + harmonic + 0.004 * z[6]
            pitch = off_p + sway_p + 0.5 * harmonic + 0.004 * z[7]
            vibration = 0.02 + 0.05 * thrust + 0.005 * abs(z[4])
            if kind == "bearing_vibration":
                amp = BEARING_AMP * a.severity
                hf = amp * math.sin(2 * math.pi * 6.3 * i * dt) * (1 + 0.3 * z[5])
                roll += hf
                pitch += 0.7 * hf
                vibration += 0.4 * a.severity
            elif kind == "rotor_imbalance":
                amp = IMBALANCE_AMP * a.severity * max(thrust, 0.5)
                roll += amp * math.sin(self.phase)
                pitch += 0.5 * amp * math.cos(self.phase)
                vibration += 0.2 * a.severity
            elif kind == "yaw_misalignment":
                # yawed inflow: each blade's angle of attack varies once per turn -> 1P
                # tilt/yaw moments on the nacelle, growing with the misalignment
                amp = 0.02 * abs(math.sin(misalign)) * max(thrust, 0.3)
                roll += amp * math.sin(self.phase + 1.0)
                pitch += amp * math.cos(self.phase + 1.0)
            voltage = VOLTS_PER_RPS * rps * (1 + 0.01 * z[3]) + 0.8 * abs(z[0])
            if kind == "voltage_fault":
                if (a.start // 7) % 2:  # a spike episode
                    voltage += (250 + 500 * a.severity) * (z[9] > 0.5244)  # ~30 % of samples
                else:  # a sag
                    voltage *= 1 - 0.7 * a.severity
            self.temperature = (20 + 25 * thrust) + (self.temperature - 20 - 25 * thrust) * a_temp + k_temp * z[2]
            row = rows[j]
            row[0] = self.t0 + i * dt
            row[1] = rps
            row[2] = ANEMO_PER_MS * v + 0.02 * z[1]
            row[3] = min(max(voltage, 0.0), 1023.0)
            row[4], row[5] = roll, pitch
            row[6] = math.remainder(self.yaw + 0.003 * z[7], 2 * math.pi)
            row[7], row[8] = self.temperature, vibration
            row[9] = max(0.0, (v - RATED) * 2.2) if v <= CUT_OUT else 90.0
            row[10] = misalign  # ground truth only (no sensor measures it): see training.data
            for c, values in offsets:  # before a stuck sensor: it sticks at what it reads
                if values[j]:
                    row[c] = _in_range(c, row[c] + values[j])
            if kind == "stuck_sensor":
                c = _COL[a.channel]
                row[c] = self._stuck_value.setdefault(a.start, row[c] * (1 - a.severity))
            labels[j] = kind
        self.sway[:] = (sway_r, sway_p)
        self.sway_v[:] = (v_r, v_p)
        self.i += n
        arr = np.array(rows, dtype=np.float64).reshape(n, len(cols))
        out = {k: arr[:, c].copy() for c, k in enumerate(cols)}
        out.update(_quaternion(out["roll"], out["pitch"], out["yaw"]))
        out["label"] = labels
        return out


    def _drift_plan(self, n: int) -> tuple[list[float] | None, list[tuple[int, list[float]]]]:
        """This step's drift, per sample: the wind regime's shift of the site mean (m/s; None
        without one) and, per drifted channel, its offset.  Regimes apply in start order, each
        moving the mean from the previous regime's to its own."""
        idx = range(self.i, self.i + n)
        shift = None
        previous = self.mean_wind
        for d in sorted((d for d in self.drift if d.kind == "wind_regime"), key=lambda d: d.start):
            step, previous = d.mean_wind - previous, d.mean_wind
            shift = [(shift[k] if shift else 0.0) + step * d.weight(i) for k, i in enumerate(idx)]
        offsets: dict[int, list[float]] = {}
        for d in self.drift:
            if d.kind == "sensor_offset" and d.start < self.i + n:
                c = _COL[d.channel]
                mine = [d.offset * d.weight(i) for i in idx]
                offsets[c] = [x + y for x, y in zip(offsets[c], mine)] if c in offsets else mine
        return shift, list(offsets.items())

    def drift_status(self) -> list[dict]:
        """The drifts that have started by the next sample: kind, what moves, and how far."""
        out = []
        for d in self.drift:
            if d.start <= self.i:
                w = d.weight(self.i)
                item = {"kind": d.kind, "progress": round(w, 4)}
                if d.kind == "sensor_offset":
                    item.update(channel=d.channel, offset=round(d.offset * w, 6), target_offset=d.offset)
                else:
                    item["mean_wind"] = d.mean_wind
                out.append(item)
        return out


_COL = {"rps": 1, "wind_speed_rps": 2, "voltage": 3, "roll": 4, "pitch": 5, "yaw": 6, "temperature": 7,
        "vibration": 8, "pitch_angle": 9}
_GUST_Z: dict[float, float] = {}


def _in_range(c: int, value: float) -> float:
    """A drifted reading where its sensor can put it (see :data:`DRIFT_CHANNELS`)."""
    if c == 3:
        return min(max(value, 0.0), 1023.0)
    if c in (1, 2):
        return max(value, 0.0)
    if c == 6:
        return math.remainder(value, 2 * math.pi)
    return value


def _upper_z(p: float) -> float:
    """z with P(N(0,1) > z) = p (bisection on erfc; called once per rate)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _quaternion(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> dict[str, np.ndarray]:
    """ZYX Euler angles -> unit quaternion (qw, qx, qy, qz), as an IMU reports it."""
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return {
        "qw": cr * cp * cy + sr * sp * sy,
        "qx": sr * cp * cy - cr * sp * sy,
        "qy": cr * sp * cy + sr * cp * sy,
        "qz": cr * cp * sy - sr * sp * cy,
    }


def turbine_seed(seed: int, index: int) -> int:
    """Independent per-turbine seed: turbines differ, runs repeat."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def simulate(
    turbines: int = 4,
    seconds: float = 3600.0,
    rate: float = 20.0,
    seed: int = 0,
    anomalies_per_hour: float = 6.0,
    kinds: tuple[str, ...] = KINDS,
    prefix: str = "sim",
    mean_wind: float | Sequence[float] = 8.0,
    drift: Mapping[int, Sequence[Drift]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Simulate a fleet offline.  Each item holds the sensor arrays, ``label`` and ``turbine_id``.

    ``mean_wind``: the sites' mean wind (m/s); a sequence gives turbine ``k`` the
    value ``mean_wind[k % len]`` (a fleet spread over the operating envelope).
    ``drift``: per turbine index, its :class:`Drift` list (sample indices); unlabelled.
    """
    n = int(seconds * rate)
    winds = [float(mean_wind)] if isinstance(mean_wind, (int, float)) else [float(v) for v in mean_wind]
    fleet = []
    for k in range(turbines):
        s = turbine_seed(seed, k)
        schedule = random_schedule(np.random.default_rng(s + 1), n, rate, anomalies_per_hour, kinds) if anomalies_per_hour > 0 else []
        t = Turbine(f"{prefix}-t{k:02d}", s, rate, schedule, winds[k % len(winds)],
                    drift=list((drift or {}).get(k, ())))
        data = t.step(n)
        data["turbine_id"] = t.turbine_id
        data["anomalies"] = schedule
        fleet.append(data)
    return fleet
