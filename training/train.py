"""Training loop: Adam on MSE, early stopping on validation loss, seedable.

``fit(train, val)`` takes prepared windows ``(k, F, 10, 10)`` float32 of normal
data and returns the model with the best validation loss restored.
"""

from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .model import ConvAutoencoder


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


def _loss(model: nn.Module, x: torch.Tensor, batch: int = 4096) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            total += float(((model(xb) - xb) ** 2).sum())
    return total / max(1, x.numel())


def fit(train: np.ndarray, val: np.ndarray, *, seed: int = 0, epochs: int = 40, patience: int = 5,
        batch_size: int = 64, lr: float = 3e-3, code: int = 16, progress: bool = True,
        min_delta: float = 1e-4) -> tuple[ConvAutoencoder, History]:
    """Train a :class:`ConvAutoencoder` on normal windows; stop when the validation loss
    has not improved by ``min_delta`` (relative) for ``patience`` epochs."""
    set_threads()
    seed_everything(seed)
    xt, xv = torch.from_numpy(np.ascontiguousarray(train)), torch.from_numpy(np.ascontiguousarray(val))
    model = ConvAutoencoder(features=train.shape[1], code=code)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=lr / 20)
    gen = torch.Generator().manual_seed(seed)
    history, best, best_state, waited = History(), math.inf, None, 0
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch_size):
            xb = xt[order[i : i + batch_size]]
            loss = ((model(xb) - xb) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xb)
        sched.step()
        history.train_loss.append(total / len(xt))
        v = _loss(model, xv)
        history.val_loss.append(v)
        bar.set_postfix(train=f"{history.train_loss[-1]:.4f}", val=f"{v:.4f}")
        if v < best * (1 - min_delta):
            best, best_state, waited, history.best_epoch = v, copy.deepcopy(model.state_dict()), 0, epoch
        else:
            waited += 1
            if waited >= patience:
                history.stopped_early = True
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
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
