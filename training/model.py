"""The autoencoder: the convolutional autoencoder of DESIGN.md for each window's
*shape*, plus a small network that predicts each feature's *level* from the others.

Input and output: ``(batch, F, H, W)`` -- a window of ``H * W`` samples per feature
reshaped row-major (``(10, 10)`` for the default window of 100), so a 2x2 kernel
sees two neighbouring samples and the two samples ``W`` later.

Why two paths.  A plain autoencoder with room for a few numbers per feature learns
to copy each feature's level, so a fault that only breaks the *relation* between
features -- a misaligned rotor turning 40 % slower than the wind says it should, a
sagging voltage, an overspeed -- is reconstructed as faithfully as normal data.
Here each feature's level (its mean over the window) is predicted -- a mean mu and
a spread sigma, by one small network per feature -- from the *other* features'
coarse trajectories (their row means) and its own trajectory *minus its mean*,
never from its own level or its near-copies (``exclude``: rps is not predicted
from voltage, which is rps times a constant; see :func:`near_copies`).  The own
trajectory carries the feature's dynamics: a rotor lags the wind by seconds, so
the wind inside a window alone left its speed uncertain by ~0.2 rps (sigma at 5-8
m/s), and a rotor misaligned by 0.7 rad, steady at 55 % of what the wind says,
scored only 1.5 sigma; wind + "the rotor is still slowing down" pins the level
down (seed 0: yaw-misalignment recall 0.48 -> 0.95).
Sigma depends on the operating point (near cut-in the rotor may idle or spin for
the same wind), so the reconstruction error of a feature = (its shape error) +
((level - mu) / sigma)^2 measures both "does this feature look like normal data"
and "is it where the other sensors say it should be", equally strictly in every
regime -- as far as sigma, learnt on the training turbines, carries over to others.
Where it does not (an idling rotor spinning down from a gust below cut-in scores ~80 on
held-out turbines, partial load ~2), :meth:`ConvAutoencoder.calibrate_regimes` scales the
level residual per regime of mu on the calibration turbines (a step function baked into
the graph), so one threshold per feature fits every regime.

Features whose level the others cannot tell (``free``: yaw -- a nacelle may face any
way; roll/pitch -- tower sway's phase and each IMU's mounting offset; see
:func:`unpredictable_levels`) keep their own level.

The shape path sees the whole window (the operating point shapes tower sway and
vibration) but only its output's deviations from their mean are used.  It keeps
the sample's network shape (Conv2d F->32->64->128, kernel 2,
ConvTranspose back) with a bottleneck: the first and last layers are strided
(10 -> 5 -> 4 -> 3 cells) and a 1x1 convolution squeezes the code to ``code``
channels.  Other grid sizes are padded (replicate) to the next even size of at
least 6 and cropped back, so any near-square grid works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as fn

# A level's spread: 0.05 to 20 standard deviations.  Below 0.05 the networks grow sure of
# themselves where training saw one steady regime (rated power, an idle rotor) and a
# held-out turbine's first gust there scores 30 sigma: one feature's threshold then
# sits so high that it no longer sees a misaligned rotor (seed 6: 31 sigma -> 7).
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -3.0, 3.0
# Operating regimes per predicted level (bins of its predicted mean mu, equal-mass on the
# calibration windows) and the quantile of the level score that :meth:`ConvAutoencoder.
# calibrate_regimes` equalises across them.  16 bins keep an idling rotor's regimes from
# taking partial load near cut-in with them (seed 8, quick: yaw recall 0.85 with 8, 0.93 with 16).
REGIME_BINS, REGIME_QUANTILE = 16, 0.99


class GroupedLinear(nn.Module):
    """``groups`` independent linear layers applied to ``(B, groups, d_in)``: one small
    network per feature, in one matrix product (exported as a plain ONNX MatMul)."""

    def __init__(self, groups: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1.0 / d_in**0.5  # nn.Linear's initialisation
        self.weight = nn.Parameter(torch.empty(groups, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(2) @ self.weight).squeeze(2) + self.bias


class ConvAutoencoder(nn.Module):
    def __init__(self, features: int = 6, code: int = 16, channels: tuple[int, int, int] = (32, 64, 128),
                 shape: Sequence[int] = (10, 10), exclude: Sequence[Sequence[int]] | None = None,
                 free: Sequence[int] = (), hidden: int = 32):
        super().__init__()
        c1, c2, c3 = channels
        self.features, self.code, self.shape = features, code, tuple(int(s) for s in shape)
        self.padded = tuple(max(6, s + s % 2) for s in self.shape)
        self.encoder = nn.Sequential(
            nn.Conv2d(features, c1, kernel_size=2, stride=2), nn.ReLU(),  # 10 -> 5
            nn.Conv2d(c1, c2, kernel_size=2), nn.ReLU(),  # 5 -> 4
            nn.Conv2d(c2, c3, kernel_size=2), nn.ReLU(),  # 4 -> 3
            nn.Conv2d(c3, code, kernel_size=1),  # the bottleneck
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(code, c3, kernel_size=1), nn.ReLU(),
            nn.ConvTranspose2d(c3, c2, kernel_size=2), nn.ReLU(),  # 3 -> 4
            nn.ConvTranspose2d(c2, c1, kernel_size=2), nn.ReLU(),  # 4 -> 5
            nn.ConvTranspose2d(c1, features, kernel_size=2, stride=2),  # 5 -> 10
        )
        # mask[f, g] = 1 when feature g may be used to predict feature f's level
        mask = 1.0 - torch.eye(features)
        for f, others in enumerate(exclude or []):
            for g in others:
                mask[f, g] = 0.0
        self.exclude = [[g for g in range(features) if g != f and mask[f, g] == 0] for f in range(features)]
        self.free = sorted(int(f) for f in free)
        keep = torch.ones(features)
        keep[self.free] = 0.0
        self.register_buffer("mask", mask)
        self.register_buffer("predicted", keep)  # 1 = level predicted, 0 = level kept (free)
        # per feature, the level score's scale as a step function of mu: base + sum_k [mu > edge_k] * step_k
        # (1 until calibrate_regimes; elementwise ops only, so the ONNX graph stays plain)
        self.register_buffer("regime_base", torch.ones(features))
        self.register_buffer("regime_edges", torch.zeros(features, REGIME_BINS - 1))
        self.register_buffer("regime_steps", torch.zeros(features, REGIME_BINS - 1))
        rows = self.shape[0]
        # one network per feature (each learns its own relation, and keeps its own best
        # epoch); inputs: the others' row means (F x H) and its own minus their mean (H)
        self.level = nn.Sequential(GroupedLinear(features, features * rows + rows, hidden), nn.ReLU(),
                                   GroupedLinear(features, hidden, hidden), nn.ReLU(),
                                   GroupedLinear(features, hidden, 2))

    def _shape_path(self, s: torch.Tensor) -> torch.Tensor:
        (h, w), (ph, pw) = self.shape, self.padded
        if (ph, pw) != (h, w):
            s = fn.pad(s, (0, pw - w, 0, ph - h), mode="replicate")
        out = self.decoder(self.encoder(s))
        return out[..., :h, :w]

    def level_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The level networks' input ``(B, F, F*H + H)`` for windows ``x``: for each
        target feature the other features' coarse trajectories (row means; its own and
        its near-copies' masked out) and its own trajectory minus its mean -- where it
        is heading, not where it is: a rotor still slowing after a lull is told apart
        from one held back by a misaligned nacelle."""
        rows = x.mean(dim=3)  # (B, F, H): each feature's coarse trajectory
        others = rows.unsqueeze(1) * self.mask[None, :, :, None]  # (B, F_target, F, H)
        own = rows - rows.mean(dim=2, keepdim=True)
        return torch.cat([others.flatten(2), own], dim=2)

    def level_head(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log sigma) ``(B, F)`` of each feature's level from :meth:`level_inputs`."""
        out = self.level(inp)  # (B, F, 2)
        return out[..., 0], torch.clamp(out[..., 1], LOG_SIGMA_MIN, LOG_SIGMA_MAX)

    def level_nll(self, inp: torch.Tensor, level: torch.Tensor, per_feature: bool = False) -> torch.Tensor:
        """Gaussian negative log-likelihood of the predicted features' levels ``(B, F)``:
        the mean over them, or with ``per_feature`` each one's ``(F,)`` (0 for free ones)."""
        mu, log_sigma = self.level_head(inp)
        z = (level - mu) * torch.exp(-log_sigma)
        nll = (log_sigma + 0.5 * z * z).mean(dim=0) * self.predicted
        return nll if per_feature else nll.sum() / self.predicted.sum().clamp(min=1)

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(level (B,F,1,1), shape reconstruction (B,F,H,W) with zero mean, predicted level mu
        and log sigma (B,F) from the other features)."""
        level = x.mean(dim=(2, 3), keepdim=True)
        shape = self._shape_path(x)
        shape = shape - shape.mean(dim=(2, 3), keepdim=True)
        mu, log_sigma = self.level_head(self.level_inputs(x))
        return level, shape, mu, log_sigma

    def regime_scale(self, mu: torch.Tensor) -> torch.Tensor:
        """``(B, F)``: the spread multiplier of each level in the regime ``mu`` puts it in."""
        above = (mu.unsqueeze(-1) > self.regime_edges.unsqueeze(0)).to(mu.dtype)
        return self.regime_base.unsqueeze(0) + (above * self.regime_steps.unsqueeze(0)).sum(dim=-1)

    @torch.no_grad()
    def calibrate_regimes(self, x: torch.Tensor, bins: int = REGIME_BINS, quantile: float = REGIME_QUANTILE) -> dict:
        """Fit :meth:`regime_scale` on normal windows ``x`` of turbines training never saw.

        Each predicted level's score ``((level - mu) / sigma)^2`` is not equally heavy-tailed
        in every regime: an idling rotor, spinning down from a gust below cut-in, scores up to
        ~80 on held-out turbines where a rotor at partial load scores ~2 (seed 1, quick: 99.9 %
        quantiles), and one threshold per feature then sits where partial load's faults -- a
        yaw misalignment slowing the rotor by 15 % -- stay under it.  Per feature, windows are
        binned by mu (``bins`` equal-mass bins) and a bin whose ``quantile`` of the score is
        above the median bin's is scaled down to it (never up).  Returns the fit (the card's
        ``model.regimes``)."""
        mu, log_sigma = self.level_head(self.level_inputs(x))  # the level path alone: no shape to reconstruct
        z2 = ((x.mean(dim=(2, 3)) - mu) * torch.exp(-log_sigma)) ** 2
        base, edges, steps = torch.ones_like(self.regime_base), torch.zeros_like(self.regime_edges), \
            torch.zeros_like(self.regime_steps)
        out = {}
        for f in range(self.features):
            if not self.predicted[f] or len(x) < bins * 50:
                continue
            e = torch.quantile(mu[:, f], torch.linspace(0, 1, bins + 1)[1:-1])
            which = (mu[:, f].unsqueeze(-1) > e.unsqueeze(0)).sum(dim=-1)
            q = torch.stack([torch.quantile(z2[which == b, f], quantile) if (which == b).sum() >= 20
                             else torch.tensor(0.0) for b in range(bins)])
            scale = torch.sqrt(torch.clamp(q / torch.clamp(q.median(), min=1e-12), min=1.0))
            base[f], edges[f], steps[f] = scale[0], e, scale[1:] - scale[:-1]
            out[str(f)] = {"edges": [round(float(v), 5) for v in e], "scale": [round(float(v), 4) for v in scale]}
        self.regime_base.copy_(base)
        self.regime_edges.copy_(edges)
        self.regime_steps.copy_(steps)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The "reconstruction": the shape path's output plus, for each predicted
        feature, its level moved so that (input - output) at the level is the
        level's residual in units of its predicted spread, ``(level - mu) / sigma``.
        Its squared error is then as large in a gusty cut-in regime as at steady
        partial load for windows equally unusual there, so thresholds calibrated on
        some turbines hold on others (``model_contract.window_errors`` is unchanged)."""
        level, shape, mu, log_sigma = self._paths(x)
        lvl = level.flatten(1)
        moved = lvl - (lvl - mu) * torch.exp(-log_sigma) / self.regime_scale(mu)
        lvl = moved * self.predicted + lvl * (1 - self.predicted)
        return shape + lvl[:, :, None, None]

    def losses(self, x: torch.Tensor, level: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the shape path's mean squared error, the Gaussian negative log-likelihood of
        the predicted levels -- None unless ``level``): the two paths share no weights,
        each learns from its own."""
        lvl = x.mean(dim=(2, 3), keepdim=True)
        shape = self._shape_path(x)
        shape = shape - shape.mean(dim=(2, 3), keepdim=True)
        shape_mse = ((shape - (x - lvl)) ** 2).mean()
        return shape_mse, self.level_nll(self.level_inputs(x), lvl.flatten(1)) if level else None

    def path_state(self, path: str) -> dict:
        """A copy of the weights of one path (``"shape"`` or ``"level"``)."""
        keep = ("level.",) if path == "level" else ("encoder.", "decoder.")
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(keep)}

    def config(self) -> dict:
        return {"name": "ConvAutoencoder", "features": self.features, "code": self.code, "shape": list(self.shape),
                "level": {"excluded": self.exclude, "free": self.free}}


def near_copies(levels, threshold: float = 0.97) -> list[list[int]]:
    """For each feature, the later features whose window levels correlate with its
    own at ``|r| >= threshold`` on normal training windows ``(k, F)``: near-copies
    (voltage is rps times a constant) that would let the level path copy a fault
    instead of seeing it.  Only the first of a group is predicted without its
    copies (so it is checked against the rest of the machine: rps against the
    wind); the others are predicted from it (checked against each other: a
    sagging voltage against rps)."""
    import numpy as np

    lv = np.asarray(levels, dtype=np.float64)
    std = lv.std(axis=0)
    ok = std > 1e-9
    corr = np.zeros((lv.shape[1], lv.shape[1]))
    if ok.sum() > 1:
        corr[np.ix_(ok, ok)] = np.corrcoef(lv[:, ok], rowvar=False)
    return [[g for g in range(lv.shape[1]) if g > f and abs(corr[f, g]) >= threshold] for f in range(lv.shape[1])]


def unpredictable_levels(train, val, exclude: Sequence[Sequence[int]], min_r2: float = 0.8) -> list[int]:
    """Features whose window level a linear fit on the other features' coarse
    trajectories explains poorly (R^2 < ``min_r2`` on ``val``): a level mostly set by
    things no other sensor sees (tower sway's phase in a short window, a nacelle's
    heading) is kept rather than predicted, or its noise would mask the feature's faults."""
    import numpy as np

    def design(x, f):
        rows = x.mean(axis=3)  # (k, F, H)
        keep = [g for g in range(x.shape[1]) if g != f and g not in exclude[f]]
        return np.concatenate([rows[:, keep].reshape(len(x), -1), np.ones((len(x), 1))], axis=1)

    out = []
    lt, lv = train.mean(axis=(2, 3)), val.mean(axis=(2, 3))
    for f in range(train.shape[1]):
        coef, *_ = np.linalg.lstsq(design(train, f), lt[:, f], rcond=None)
        resid = lv[:, f] - design(val, f) @ coef
        var = lv[:, f].var()
        if var <= 1e-12 or 1.0 - resid.var() / var < min_r2:
            out.append(f)
    return out
