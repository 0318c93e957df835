"""Training loop: Adam on MSE, early stopping on validation loss, seedable.

``fit(train, val)`` takes prepared windows ``(k, F, H, W)`` float32 of normal
data and returns the model with the best validation loss restored.
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

from .model import LEVEL_WEIGHT, ConvAutoencoder, near_copies, unpredictable_levels


MIN_BATCHES = 40  # per epoch


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
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    def as_dict(self) -> dict:
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "best_epoch": self.best_epoch,
                "epochs": len(self.train_loss), "stopped_early": self.stopped_early}


def _losses(model: ConvAutoencoder, x: torch.Tensor, batch: int = 4096) -> tuple[float, float]:
    """Validation (shape mean squared error, level negative log-likelihood)."""
    model.eval()
    shape, level = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            s, n = model.losses(xb)
            shape, level = shape + float(s) * len(xb), level + float(n) * len(xb)
    return shape / max(1, len(x)), level / max(1, len(x))


def fit(train: np.ndarray, val: np.ndarray, *, seed: int = 0, epochs: int = 40, patience: int = 5,
        batch_size: int = 64, lr: float = 3e-3, code: int = 16, progress: bool = True,
        min_delta: float = 1e-4, free: Sequence[int] = ()) -> tuple[ConvAutoencoder, History]:
    """Train a :class:`ConvAutoencoder` on normal windows ``(k, F, H, W)``; stop when the
    validation loss has not improved by ``min_delta`` (relative) for ``patience`` epochs.

    ``free``: features whose level is kept, not predicted (angles such as yaw)."""
    set_threads()
    seed_everything(seed)
    xt, xv = torch.from_numpy(np.ascontiguousarray(train)), torch.from_numpy(np.ascontiguousarray(val))
    exclude = near_copies(train.mean(axis=(2, 3)))
    free = sorted(set(free) | set(unpredictable_levels(train, val, exclude)))
    model = ConvAutoencoder(features=train.shape[1], code=code, shape=train.shape[2:], exclude=exclude, free=free)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=lr / 20)
    gen = torch.Generator().manual_seed(seed)
    history, waited = History(), 0
    # each path keeps its own best epoch: the level path's likelihood is noisy from
    # epoch to epoch and must not decide when the shape path has learnt enough
    best = {"shape": math.inf, "level": math.inf}
    states: dict[str, dict] = {}
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        # an epoch is at least MIN_BATCHES batches: a short recording's few windows
        # (a 300-row CSV has ~150) would otherwise get a few dozen steps in all
        reps = -(-MIN_BATCHES * batch_size // len(xt))
        order = torch.cat([torch.randperm(len(xt), generator=gen) for _ in range(reps)])
        total = 0.0
        for i in range(0, len(order), batch_size):
            xb = xt[order[i : i + batch_size]]
            loss = model.loss(xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xb)
        sched.step()
        history.train_loss.append(total / len(order))
        v_shape, v_level = _losses(model, xv)
        history.val_loss.append(v_shape + LEVEL_WEIGHT * v_level)
        bar.set_postfix(train=f"{history.train_loss[-1]:.4f}", val=f"{history.val_loss[-1]:.4f}")
        improved = False
        for path, v in (("shape", v_shape), ("level", v_level)):
            if not math.isfinite(best[path]) or v < best[path] - min_delta * abs(best[path]):
                best[path], states[path], improved = v, model.path_state(path), True
                if path == "shape":
                    history.best_epoch = epoch
        waited = 0 if improved else waited + 1
        if waited >= patience:
            history.stopped_early = True
            break
    bar.close()
    for state in states.values():
        model.load_state_dict(state, strict=False)
    model.eval()
    return model, history


def reconstruct(model: nn.Module, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Torch eager reconstructions of prepared windows (evaluation, parity checks)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))).numpy())
    return np.concatenate(out) if out else np.empty_like(x)
