"""Tiny models whose smoothed classifiers are known in closed form, shared by the coverage tests.

Images are ``(1, 2, 2)`` float64 at ``X`` (every pixel 0.5); noise is never clipped (docs/design.md,
"Units and conventions"), so the probabilities below are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy.stats import norm

SHAPE = (1, 2, 2)
X = torch.full(SHAPE, 0.5, dtype=torch.float64)


class OnePixelVote(torch.nn.Module):
    """Two logits ``[z, -z]``, ``z = x_0 - 0.5 - threshold``: under ``x_0 + sigma * xi`` class 0 wins with
    probability ``Phi((x_0 - 0.5 - threshold) / sigma)`` exactly."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    @classmethod
    def with_vote_probability(cls, probability: float, sigma: float) -> OnePixelVote:
        """The model whose class 0 wins with ``probability`` at ``X`` under noise ``sigma``."""
        return cls(-sigma * float(norm.ppf(probability)))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        z = batch[:, 0, 0, 0] - 0.5 - self.threshold
        return torch.stack([z, -z], dim=1)


def antisymmetric_linear(scale: float, offset: float) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """Logits ``[t, -t]``, ``t = scale * (sum(x) - 2 + offset)``, and the exact L2 Lipschitz constant.

    ``W = scale * [1; -1]`` over four pixels has ``||W||_2 = scale * sqrt(2) * 2``. The margin
    ``M_0 = 2 t`` is exactly Gaussian under Gaussian noise, with mean ``2 scale offset`` at ``X`` and
    Lipschitz constant ``sqrt(2) L``: the concentration inequality of the smoothed margin [RC, Ch. 3]
    is used at full strength.
    """

    def model(batch: torch.Tensor) -> torch.Tensor:
        t = scale * (batch.flatten(1).sum(dim=1) - 2.0 + offset)
        return torch.stack([t, -t], dim=1)

    return model, scale * math.sqrt(2.0) * 2.0


class DrawRecorder:
    """A ``logits_callback`` that keeps every batch of noisy logits, selection draws first."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> None:
        self.batches.append(logits.detach().clone())

    def rows(self) -> torch.Tensor:
        return torch.cat(self.batches, dim=0)
