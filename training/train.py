"""Training loop: Adam, early stopping on validation loss, seedable.

``fit(train, val)`` takes prepared windows ``(k, F, H, W)`` float32 of normal
data and returns the model with the best validation loss of each path restored.
The two paths of :class:`ConvAutoencoder` share no weights and are trained one
after the other: the shape path on its mean squared error (the costly part), then
the level networks on their likelihood from inputs computed once
(:func:`fit_levels`), for LEVEL_PASSES times as many epochs: they need many more
steps than the shape path to learn the power curve's dynamics tightly (seed 0:
yaw-misalignment recall from the rotor's level alone 0.31 after 12 epochs, 0.97
after 36), and such steps cost little.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .model import ConvAutoencoder, near_copies, unpredictable_levels


MIN_BATCHES = 40  # per epoch
LEVEL_PASSES = 3  # level-network epochs per shape-path epoch (see the module docstring)


def set_threads() -> int:
    """At most two intra-op threads: the machines we train on have 2 cores and are
    shared, and this network is too small to gain from more (override with
    ``WINDFLEET_TORCH_THREADS``)."""
    n = int(os.environ.get("WINDFLEET_TORCH_THREADS", min(2, os.cpu_count() or 1)))
    torch.set_num_threads(max(1, n))
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)  # the shape path's mean squared error
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    level_val_nll: list[float] = field(default_factory=list)  # the level network's, per level epoch

    def as_dict(self) -> dict:
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "best_epoch": self.best_epoch,
                "epochs": len(self.train_loss), "stopped_early": self.stopped_early,
                "level_val_nll": self.level_val_nll}


def _shape_loss(model: ConvAutoencoder, x: torch.Tensor, batch: int = 4096) -> float:
    """Validation mean squared error of the shape path."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            total += float(model.losses(xb, level=False)[0]) * len(xb)
    return total / max(1, len(x))


def _batches(n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    # an epoch is at least MIN_BATCHES batches: a short recording's few windows
    # (a 300-row CSV has ~150) would otherwise get a few dozen steps in all
    reps = -(-MIN_BATCHES * batch_size // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])


def fit(train: np.ndarray, val: np.ndarray, *, seed: int = 0, epochs: int = 40, patience: int = 5,
        batch_size: int = 64, lr: float = 3e-3, code: int = 16, progress: bool = True,
        min_delta: float = 1e-4, free: Sequence[int] = (),
        check: np.ndarray | None = None) -> tuple[ConvAutoencoder, History]:
    """Train a :class:`ConvAutoencoder` on normal windows ``(k, F, H, W)``: the shape
    path until its validation loss has not improved by ``min_delta`` (relative) for
    ``patience`` epochs, then the level networks (:func:`fit_levels`).

    ``free``: features whose level is kept, not predicted (angles such as yaw).
    ``check``: normal windows of *other* machines (default ``val``) on which
    :func:`unpredictable_levels` judges which levels the other features explain: a
    level they explain on the training turbines only -- a per-machine sensor
    offset, such as a tilted IMU's roll -- is kept rather than predicted."""
    set_threads()
    seed_everything(seed)
    xt, xv = torch.from_numpy(np.ascontiguousarray(train)), torch.from_numpy(np.ascontiguousarray(val))
    exclude = near_copies(train.mean(axis=(2, 3)))
    free = sorted(set(free) | set(unpredictable_levels(train, val if check is None else check, exclude)))
    model = ConvAutoencoder(features=train.shape[1], code=code, shape=train.shape[2:], exclude=exclude, free=free)
    params = [p for name, p in model.named_parameters() if not name.startswith("level.")]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=lr / 20)
    gen = torch.Generator().manual_seed(seed)
    history, waited, best, state = History(), 0, math.inf, None
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order = _batches(len(xt), batch_size, gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            xb = xt[order[i : i + batch_size]]
            loss = model.losses(xb, level=False)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xb)
        sched.step()
        history.train_loss.append(total / len(order))
        history.val_loss.append(_shape_loss(model, xv))
        bar.set_postfix(train=f"{history.train_loss[-1]:.4f}", val=f"{history.val_loss[-1]:.4f}")
        if state is None or history.val_loss[-1] < best - min_delta * abs(best):
            best, state, history.best_epoch, waited = history.val_loss[-1], model.path_state("shape"), epoch, 0
        else:
            waited += 1
            if waited >= patience:
                history.stopped_early = True
                break
    bar.close()
    model.load_state_dict(state, strict=False)
    history.level_val_nll = fit_levels(model, xt, xv, seed=seed, epochs=LEVEL_PASSES * epochs,
                                       patience=LEVEL_PASSES * patience, batch_size=batch_size, lr=lr,
                                       min_delta=min_delta, progress=progress)
    model.eval()
    return model, history


def fit_levels(model: ConvAutoencoder, train: torch.Tensor, val: torch.Tensor, *, seed: int = 0, epochs: int = 36,
               patience: int = 15, batch_size: int = 64, lr: float = 3e-3, min_delta: float = 1e-4,
               progress: bool = False) -> list[float]:
    """Train ``model``'s level networks alone on their negative log-likelihood; the
    inputs (:meth:`ConvAutoencoder.level_inputs`) are computed once, so an epoch costs
    a few small matrix products.  Each feature's network keeps the epoch with its
    best validation likelihood (one feature's noisy epoch must not pick another's);
    stops when none has improved for ``patience`` epochs.  Returns the mean
    validation likelihood per epoch."""
    with torch.no_grad():
        inp_t, inp_v = model.level_inputs(train), model.level_inputs(val)
        lvl_t, lvl_v = train.mean(dim=(2, 3)), val.mean(dim=(2, 3))
    opt = torch.optim.Adam(model.level.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=lr / 20)
    gen = torch.Generator().manual_seed(seed + 1)
    features = model.features
    best = torch.full((features,), math.inf)
    state = model.path_state("level")  # every tensor's first axis is the feature
    out, waited = [], 0
    for _ in tqdm(range(epochs), desc="levels", unit="epoch", disable=not progress, leave=False):
        model.train()
        order = _batches(len(inp_t), batch_size, gen)
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            loss = model.level_nll(inp_t[b], lvl_t[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            v = model.level_nll(inp_v, lvl_v, per_feature=True)
        out.append(float(v.sum() / model.predicted.sum().clamp(min=1)))
        better = ~torch.isfinite(best) | (v < best - min_delta * best.abs())
        if better.any():
            current = model.path_state("level")
            for name, t in state.items():
                t[better] = current[name][better]
            best = torch.where(better, v, best)
            waited = 0
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(state, strict=False)
    return out


def calibrate_regimes(model: ConvAutoencoder, x: np.ndarray) -> dict:
    """:meth:`ConvAutoencoder.calibrate_regimes` on prepared normal windows of turbines
    training never saw (the calibration fleet), before the thresholds are set on them."""
    model.eval()
    return model.calibrate_regimes(torch.from_numpy(np.ascontiguousarray(x)))


def reconstruct(model: nn.Module, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Torch eager reconstructions of prepared windows (evaluation, parity checks)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))).numpy())
    return np.concatenate(out) if out else np.empty_like(x)
