"""The convolutional autoencoder of DESIGN.md, with a bottleneck.

Input and output: ``(batch, F, 10, 10)`` -- a window of 100 samples per feature
reshaped row-major, so a 2x2 kernel sees two neighbouring samples and the two
samples 10 later (0.5 s at 20 Hz).

The sample's network (Conv2d F->32->64->128, kernel 2, stride 1, then
ConvTranspose back) has no bottleneck: 128 x 7 x 7 = 6,272 activations for a
600-value input, so it learns to copy anything -- faults included -- and its
reconstruction error barely separates them.  We keep its shape (the same
channels and kernel 2, Conv2d down and ConvTranspose2d up) but
stride the first and last layers (10 -> 5 -> 4 -> 3 cells) and squeeze the code
through a 1x1 convolution to ``code`` channels (default 16 x 3 x 3 = 144 numbers),
so the network must learn what normal turbine windows look like.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvAutoencoder(nn.Module):
    def __init__(self, features: int = 6, code: int = 16, channels: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        c1, c2, c3 = channels
        self.features, self.code = features, code
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def config(self) -> dict:
        return {"name": "ConvAutoencoder", "features": self.features, "code": self.code}
