"""Streaming per-channel statistics of the activations entering a linear layer.

FLAP scores an input channel by how much it *fluctuates* over the calibration tokens, so it
needs, per channel, the mean (for bias compensation) and the sample variance (for the IFV and
WIFV metrics) or the mean square (for WIFN) over every calibration token.

The statistics are accumulated in float64 with Chan et al.'s parallel merge of (count, mean,
M2): each batch's mean and centred sum of squares are computed from the batch alone (two
passes over the batch, no cancellation), then merged into the running values. The result is
the same whatever the batch size or order, up to float64 rounding.

The reference implementation (``lib/layerwrapper.py``, ``BiasGPT.add_batch``) differs: it
weights each *sequence* equally rather than each token, sets the variance to 0 after the first
sequence (dropping that sequence's within-sequence fluctuation) and, because
``old_baseline_inp`` aliases the running mean that is then updated in place, uses the new mean
twice in its update. We compute the textbook unbiased variance over all tokens instead.
"""

from __future__ import annotations

import torch


class ChannelStats:
    """Running count, mean, unbiased variance and mean square per channel (last dimension).

    Args:
        num_channels: size of the last dimension of every tensor passed to :meth:`update`.

    Example:
        >>> s = ChannelStats(3)
        >>> s.update(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
        >>> s.mean.tolist(), s.var.tolist(), s.count
        ([2.0, 2.0, 2.0], [2.0, 0.0, 2.0], 2)
    """

    def __init__(self, num_channels: int) -> None:
        self.num_channels = int(num_channels)
        self.count = 0
        self._mean = torch.zeros(self.num_channels, dtype=torch.float64)
        self._m2 = torch.zeros(self.num_channels, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add every row of ``x`` (shape ``[..., C]``; all leading dims are samples).

        Args:
            x: activations; any float dtype and device (moved to CPU float64 here).
        """
        if x.shape[-1] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels, got shape {tuple(x.shape)}")
        xb = x.detach().reshape(-1, self.num_channels).to(device="cpu", dtype=torch.float64)  # (N, C)
        n_b = xb.shape[0]
        if n_b == 0:
            return
        mean_b = xb.mean(dim=0)  # (C,)
        m2_b = (xb - mean_b).square_().sum(dim=0)  # (C,)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        # Chan, Golub & LeVeque (1979): merge two (count, mean, M2) summaries.
        self._mean += delta * (n_b / n)
        self._m2 += m2_b + delta.square() * (n_a * n_b / n)
        self.count = n

    def merge(self, other: ChannelStats) -> None:
        """Fold another summary of the same channels into this one (parallel merge).

        Args:
            other: statistics gathered on disjoint samples.
        """
        if other.num_channels != self.num_channels:
            raise ValueError("cannot merge statistics of different channel counts")
        if other.count == 0:
            return
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other._mean - self._mean
        self._mean += delta * (n_b / n)
        self._m2 += other._m2 + delta.square() * (n_a * n_b / n)
        self.count = n

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean, float64 ``[C]``."""
        return self._mean.clone()

    @property
    def var(self) -> torch.Tensor:
        """Per-channel unbiased sample variance ``M2 / (count - 1)``, float64 ``[C]``."""
        if self.count < 2:
            return torch.zeros_like(self._m2)
        return self._m2 / (self.count - 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        """Per-channel mean of squares ``E[x^2] = mean^2 + M2 / count``, float64 ``[C]``."""
        if self.count == 0:
            return torch.zeros_like(self._m2)
        return self._mean.square() + self._m2 / self.count
