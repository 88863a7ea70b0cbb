"""Groups of coupled channels: the unit that methods score and the engine removes.

A :class:`Group` is a set of parameter slices that must be removed together. It has
``num_units`` units (an attention head, an MLP channel, a convolution channel); unit ``u``
touches, for every :class:`Member`, the indices ``member.index[u]`` along ``member.dim``
of ``member.param``.

Heads with grouped-query attention are two groups: a ``heads`` group whose units are the
query heads, and a derived ``kv_heads`` group whose units are the key/value heads. Each
query head names its key/value head in ``parent_of``; a key/value head is removed exactly
when all of its query heads are, and every kept key/value head must keep the same number
of query heads (transformers repeats each key/value head the same number of times).
The same parent mechanism fits Mixture-of-Experts routers and shared norm weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

GroupKind = Literal["heads", "kv_heads", "channels", "residual", "experts"]
MemberRole = Literal["producer", "consumer", "bias", "norm", "other"]


@dataclasses.dataclass
class Member:
    """One parameter dimension touched by a group.

    Args:
        param: qualified name of the parameter or buffer, e.g. ``model.layers.0.mlp.down_proj.weight``.
        dim: the dimension that is sliced.
        index: for each unit of the group, the indices along ``dim`` that it owns.
        role: ``producer`` (output rows of a linear/conv/embedding weight), ``consumer``
            (input columns of a linear/conv weight), ``bias``, ``norm`` or ``other``.
        module: qualified name of the module that owns the parameter.
        shape: the parameter's shape before pruning.
    """

    param: str
    dim: int
    index: list[list[int]]
    role: MemberRole
    module: str
    shape: tuple[int, ...]

    def unit_params(self, unit: int) -> int:
        """Number of scalars that removing ``unit`` takes from this parameter."""
        rest = math.prod(s for d, s in enumerate(self.shape) if d != self.dim)
        return len(self.index[unit]) * rest

    def to_dict(self) -> dict[str, Any]:
        return {
            "param": self.param,
            "dim": self.dim,
            "role": self.role,
            "module": self.module,
            "shape": list(self.shape),
            "index": self.index,
        }


@dataclasses.dataclass
class Group:
    """A set of coupled channels, scored and removed unit by unit.

    Args:
        name: stable name, ``<owning module>:<kind>``, e.g. ``model.layers.3.mlp:channels``.
        kind: ``heads``, ``kv_heads`` (derived, never selected directly), ``channels``,
            ``residual`` (channels of a residual stream) or ``experts`` (the routed experts
            of a Mixture-of-Experts block, :mod:`prunecli.graph.experts`).
        module: qualified name of the smallest module holding every member.
        layer: index of the repeated block (transformer layer) or ``None``.
        num_units: number of units.
        members: the parameter slices.
        parent: name of the parent group (``kv_heads`` for grouped-query heads) or ``None``.
        parent_of: for each unit, the index of its parent unit in ``parent``.
        prunable: whether methods may remove units of this group.
        reason: why the group is not prunable (empty when it is).
        head_dim: channels per unit in the consumer for head groups, else ``None``.
    """

    name: str
    kind: GroupKind
    module: str
    layer: int | None
    num_units: int
    members: list[Member]
    parent: str | None = None
    parent_of: list[int] | None = None
    prunable: bool = True
    reason: str = ""
    head_dim: int | None = None

    def unit_params(self, unit: int = 0) -> int:
        """Scalars removed by removing one unit of this group (parents not counted)."""
        return sum(m.unit_params(unit) for m in self.members)

    def total_params(self) -> int:
        return sum(self.unit_params(u) for u in range(self.num_units))

    def consumers(self) -> list[Member]:
        """Members that are input columns of a linear/conv (where activations can be observed)."""
        return [m for m in self.members if m.role == "consumer"]

    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "producer"]

    def to_dict(self, with_index: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "module": self.module,
            "layer": self.layer,
            "num_units": self.num_units,
            "unit_params": self.unit_params(0) if self.num_units else 0,
            "prunable": self.prunable,
            "reason": self.reason,
            "parent": self.parent,
            "head_dim": self.head_dim,
            "members": [
                m.to_dict() if with_index else {k: v for k, v in m.to_dict().items() if k != "index"}
                for m in self.members
            ],
        }
        if self.parent_of is not None:
            d["parent_of"] = self.parent_of
        return d


@dataclasses.dataclass
class AttentionSite:
    """One attention computation found in the traced graph.

    Args:
        module: the module that runs it (its attributes such as ``num_heads`` are updated).
        heads: name of the query-head group.
        kv_heads: name of the key/value-head group (same as ``heads`` without GQA).
        num_heads: query heads before pruning.
        num_kv_heads: key/value heads before pruning.
        head_dim: channels per head.
    """

    module: str
    heads: str
    kv_heads: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
