"""Streaming statistics of activations, accumulated where the activations are.

Every accumulator keeps a handful of float64 tensors (float32 on devices without float64)
on the compute device and folds each mini-batch in without copying activations to the host:
a batch is reduced in float32 (float64 inputs stay float64), and only its per-channel results
join the float64 running totals.
Each one can merge another summary of disjoint samples, which is how the data-parallel mode
combines ranks (:mod:`prunecli.calibrate.distributed`): summaries are gathered and merged in
rank order, so the result does not depend on which process finished first.

- :class:`ChannelStats`: count, mean and centred sum of squares per channel (Chan, Golub &
  LeVeque 1979 parallel merge); gives the mean, unbiased variance and mean square that FLAP
  uses. Each batch's mean and centred sum are computed from the batch alone (two passes over
  the batch, no cancellation).
- :class:`SumSquares`: count and per-channel sum of squares (Wanda's ``||X_j||_2``, CFSP's
  activation norm).
- :class:`AngularDistance`: mean over tokens of ``arccos(cos(x_in, x_out)) / pi`` between a
  block's input and output hidden states (CFSP's block importance).

The reference FLAP implementation (``lib/layerwrapper.py``, ``BiasGPT.add_batch``) differs
from :class:`ChannelStats`: it weights each *sequence* equally rather than each token, sets
the variance to 0 after the first sequence and, because ``old_baseline_inp`` aliases the
running mean that is then updated in place, uses the new mean twice in its update. We compute
the textbook unbiased variance over all tokens instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prunecli.errors import InputError


def acc_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where the device has it (CPU, CUDA), float32 elsewhere (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _rows(x: Tensor, channels: int | None) -> Tensor:
    """``x`` as ``[samples, channels]`` in the batch-reduction dtype (float32, or float64 as given).

    One batch is reduced in float32 (torch's sums are pairwise, so the relative error stays
    near 1e-7 for a batch of thousands of tokens); only the running totals are float64. A
    float64 copy of every hooked activation cost more than the matmul it observed.
    """
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"expected {channels} channels, got shape {tuple(x.shape)}")
    x = x.detach()
    x = x.reshape(-1, x.shape[-1])
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class Accumulator:
    """Base class: ``update`` with a batch, ``merge`` another summary, ``state`` for transport."""

    def state(self) -> list[Tensor]:
        """The summary as tensors (gathered across ranks by the distributed mode)."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: list[Tensor]) -> Accumulator:
        """Rebuild a summary from :meth:`state`."""
        raise NotImplementedError

    def merge(self, other: Accumulator) -> None:
        """Fold in a summary of disjoint samples."""
        raise NotImplementedError

    @property
    def count(self) -> int:
        raise NotImplementedError


class ChannelStats(Accumulator):
    """Running count, mean, unbiased variance and mean square per channel (last dimension).

    Args:
        num_channels: size of the last dimension of every tensor passed to :meth:`update`
            (``None``: taken from the first batch).

    Example:
        >>> s = ChannelStats(3)
        >>> s.update(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
        >>> s.mean.tolist(), s.var.tolist(), s.count
        ([2.0, 2.0, 2.0], [2.0, 0.0, 2.0], 2)
    """

    def __init__(self, num_channels: int | None = None) -> None:
        self.num_channels = None if num_channels is None else int(num_channels)
        self._count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    @property
    def count(self) -> int:
        return self._count

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add every row of ``x`` (shape ``[..., C]``; all leading dims are samples).

        Args:
            x: activations of any float dtype, on any device (the sums stay on that device).
        """
        xb = _rows(x, self.num_channels)  # (N, C)
        n_b = xb.shape[0]
        if n_b == 0:
            return
        mean_b = xb.mean(dim=0)  # (C,)
        m2_b = (xb - mean_b).square_().sum(dim=0)  # (C,), centred: no cancellation
        acc = acc_dtype(xb.device)
        self._fold(n_b, mean_b.to(acc), m2_b.to(acc))

    def _fold(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if self._mean is None or self._m2 is None:
            self.num_channels = int(mean_b.shape[0])
            self._count, self._mean, self._m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        mean_b, m2_b = mean_b.to(self._mean), m2_b.to(self._m2)
        n_a = self._count
        n = n_a + n_b
        delta = mean_b - self._mean
        # Chan, Golub & LeVeque (1979): merge two (count, mean, M2) summaries
        self._mean += delta * (n_b / n)
        self._m2 += m2_b + delta.square() * (n_a * n_b / n)
        self._count = n

    def merge(self, other: Accumulator) -> None:
        """Fold another summary of the same channels into this one (parallel merge).

        Args:
            other: statistics gathered on disjoint samples.
        """
        if not isinstance(other, ChannelStats):
            raise TypeError(f"cannot merge {type(other).__name__} into ChannelStats")
        if other.num_channels is not None and self.num_channels not in (None, other.num_channels):
            raise ValueError("cannot merge statistics of different channel counts")
        if other._count == 0 or other._mean is None or other._m2 is None:
            return
        self._fold(other._count, other._mean, other._m2)

    def state(self) -> list[Tensor]:
        if self._mean is None or self._m2 is None:
            return [torch.tensor([0.0], dtype=torch.float64)]
        count = torch.tensor([float(self._count)], dtype=self._mean.dtype, device=self._mean.device)
        return [count, self._mean, self._m2]

    @classmethod
    def from_state(cls, state: list[Tensor]) -> ChannelStats:
        s = cls()
        if len(state) == 3 and int(state[0].item()) > 0:
            s._fold(int(state[0].item()), state[1].clone(), state[2].clone())
        return s

    def _zeros(self) -> Tensor:
        return torch.zeros(self.num_channels or 0, dtype=torch.float64)

    @property
    def mean(self) -> Tensor:
        """Per-channel mean ``[C]`` (on the device the statistics were gathered on)."""
        return self._zeros() if self._mean is None else self._mean.clone()

    @property
    def var(self) -> Tensor:
        """Per-channel unbiased sample variance ``M2 / (count - 1)`` ``[C]``."""
        if self._m2 is None or self._count < 2:
            return self._zeros() if self._m2 is None else torch.zeros_like(self._m2)
        return self._m2 / (self._count - 1)

    @property
    def mean_sq(self) -> Tensor:
        """Per-channel mean of squares ``E[x^2] = mean^2 + M2 / count`` ``[C]``."""
        if self._mean is None or self._m2 is None:
            return self._zeros()
        return self._mean.square() + self._m2 / self._count


class _Sums(Accumulator):
    """A count and a summed tensor: merging adds both (the summed accumulators share this)."""

    def __init__(self) -> None:
        self._count = 0
        self._sum: Tensor | None = None

    @property
    def count(self) -> int:
        return self._count

    def _add(self, total: Tensor, count: int) -> None:
        self._sum = total if self._sum is None else self._sum + total.to(self._sum)
        self._count += count

    def merge(self, other: Accumulator) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        assert isinstance(other, _Sums)
        if other._sum is not None:
            self._add(other._sum.clone(), other._count)

    def state(self) -> list[Tensor]:
        if self._sum is None:
            return [torch.tensor([0.0], dtype=torch.float64)]
        count = torch.tensor([float(self._count)], dtype=self._sum.dtype, device=self._sum.device)
        return [count, self._sum.reshape(-1)]

    @classmethod
    def from_state(cls, state: list[Tensor]) -> _Sums:
        s = cls()
        if len(state) == 2 and int(state[0].item()) > 0:
            s._add(state[1].clone(), int(state[0].item()))
        return s


class SumSquares(_Sums):
    """Token count and per-channel sum of squares ``sum_t x_tj^2``.

    Example:
        >>> s = SumSquares()
        >>> s.update(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
        >>> s.sum_sq.tolist(), s.count, s.rms.tolist()[1]
        ([10.0, 4.0], 2, 1.4142135623730951)
    """

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add every row of ``x`` (``[..., C]``)."""
        xb = _rows(x, None if self._sum is None else self._sum.shape[0])
        self._add((xb * xb).sum(dim=0).to(acc_dtype(xb.device)), xb.shape[0])

    @property
    def sum_sq(self) -> Tensor:
        """Per-channel sum of squares ``[C]``."""
        if self._sum is None:
            raise ValueError("no samples were observed")
        return self._sum.clone()

    @property
    def rms(self) -> Tensor:
        """Per-channel root mean square ``sqrt(sum_sq / count)``."""
        return (self.sum_sq / max(self._count, 1)).sqrt()


def angular_distance(x_in: Tensor, x_out: Tensor) -> Tensor:
    """Per-token angular distance ``arccos(cos(x_in, x_out)) / pi``, in ``[0, 1]`` (CFSP, Eq. 2).

    Args:
        x_in: hidden states entering a block ``[..., d]``.
        x_out: hidden states leaving it, same shape.

    Returns:
        ``[...]`` distances (the last dimension reduced), float64 (float32 on MPS). A token
        whose input or output is the zero vector gets 0.5 (cosine NaN replaced by 0.5, as in
        the CFSP public code).

    Example:
        >>> angular_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])).tolist()
        [0.5]
    """
    if x_in.shape != x_out.shape:
        raise InputError(f"hidden-state shapes differ: {tuple(x_in.shape)} vs {tuple(x_out.shape)}")
    a = x_in.detach().to(acc_dtype(x_in.device))
    b = x_out.detach().to(a)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    cos = cos.nan_to_num(nan=0.5).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


class AngularDistance(_Sums):
    """Mean angular distance between a block's input and output over all tokens."""

    @torch.no_grad()
    def update(self, x_in: Tensor, x_out: Tensor) -> None:
        """Add the tokens of one batch (``[..., d]`` input and output hidden states)."""
        d = angular_distance(x_in.detach(), x_out.detach()).sum().reshape(1)
        self._add(d, int(x_in[..., 0].numel()))

    @property
    def mean(self) -> float:
        """Mean distance over every observed token."""
        if self._sum is None or self._count == 0:
            raise ValueError("no samples were observed")
        return float(self._sum) / self._count


class Gram(_Sums):
    """Token count and the Gram matrix ``[x, 1]^T [x, 1]`` of the inputs augmented with a 1.

    The last row and column hold the per-channel sums and the token count, so a bias can be
    refitted together with the weights (:mod:`prunecli.refit`). Each batch's product is
    computed in float32 (float64 inputs stay float64) and added to float64 totals.

    Example:
        >>> g = Gram()
        >>> g.update(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
        >>> g.matrix.tolist()
        [[10.0, 2.0, 4.0], [2.0, 4.0, 2.0], [4.0, 2.0, 2.0]]
    """

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add every row of ``x`` (``[..., C]``)."""
        xb = _rows(x, None if self._sum is None else self.channels)
        aug = torch.cat([xb, torch.ones(xb.shape[0], 1, dtype=xb.dtype, device=xb.device)], dim=1)
        self._add((aug.T @ aug).to(acc_dtype(xb.device)).reshape(-1), xb.shape[0])

    @property
    def channels(self) -> int:
        """Input channels ``C`` (the matrix is ``C + 1`` square)."""
        if self._sum is None:
            raise ValueError("no samples were observed")
        return math.isqrt(self._sum.numel()) - 1

    @property
    def matrix(self) -> Tensor:
        """``[C + 1, C + 1]`` summed Gram matrix of the augmented inputs."""
        n = self.channels + 1
        assert self._sum is not None
        return self._sum.reshape(n, n).clone()


class ExpertStats(_Sums):
    """Per routed expert of one MoE block: tokens routed, ``Σ c`` and ``Σ c·s`` (see
    :mod:`prunecli.calibrate.moe`; ``c = g·‖E(h)‖₂``, ``s`` the token contribution).

    ``count`` is the number of tokens seen (routed or not).

    Example:
        >>> st = ExpertStats()
        >>> st.update(torch.tensor([[0, 2]]), torch.tensor([[1.0, 3.0]]), torch.tensor([0.5]), 3)
        >>> st.routed.tolist(), st.importance.tolist(), st.weighted.tolist()
        ([1.0, 0.0, 1.0], [1.0, 0.0, 3.0], [0.5, 0.0, 1.5])
    """

    @torch.no_grad()
    def update(self, index: Tensor, c: Tensor, s: Tensor, num_experts: int) -> None:
        """Add one batch: routed experts ``[T, k]``, their ``c`` ``[T, k]``, ``s`` ``[T]``."""
        dt = acc_dtype(index.device)
        flat = index.reshape(-1).long()
        ok = (flat >= 0) & (flat < num_experts)
        cs = (c.to(dt) * s.to(dt).reshape(-1, 1)).reshape(-1)
        total = torch.zeros(3, num_experts, dtype=dt, device=index.device)
        total[0].index_add_(0, flat[ok], torch.ones_like(cs)[ok])
        total[1].index_add_(0, flat[ok], c.to(dt).reshape(-1)[ok])
        total[2].index_add_(0, flat[ok], cs[ok])
        self._add(total.reshape(-1), int(index.shape[0]))

    def _part(self, i: int) -> Tensor:
        if self._sum is None:
            raise ValueError("no samples were observed")
        return self._sum.reshape(3, -1)[i].clone()

    @property
    def routed(self) -> Tensor:
        """Tokens routed to each expert ``[E]``."""
        return self._part(0)

    @property
    def importance(self) -> Tensor:
        """``Σ_t g·‖E(h_t)‖₂`` over the tokens routed to each expert ``[E]``."""
        return self._part(1)

    @property
    def weighted(self) -> Tensor:
        """``Σ_t g·‖E(h_t)‖₂·s_t`` (EASY-EP's expert score) ``[E]``."""
        return self._part(2)


#: statistic name (as methods request it) -> accumulator class
STATISTICS: dict[str, type[Accumulator]] = {
    "moments": ChannelStats,
    "sumsq": SumSquares,
    "angular": AngularDistance,
    "gram": Gram,
    "experts": ExpertStats,
}
