"""Pruning plans: which units of which groups to remove, as replayable JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from prunecli.errors import PlanError

PLAN_VERSION = 1


@dataclasses.dataclass
class Plan:
    """What to remove from a model, independent of the model object.

    Args:
        removals: group name -> sorted indices of the units to remove. Only selectable
            groups appear here; derived groups (``kv_heads``) follow from their children.
        bias_updates: module name -> vector added to that module's output bias (created,
            zero-initialised, where the module has none). Used by bias compensation.
        fingerprint: hash of the original model's parameter names and shapes; a plan is
            only applied to a model with the same fingerprint.
        meta: free-form provenance (method name, sparsity, ...).

    Example:
        >>> plan = Plan(removals={"model.layers.0.mlp:channels": [3, 7]})
        >>> Plan.from_json(plan.to_json()).removals
        {'model.layers.0.mlp:channels': [3, 7]}
    """

    removals: dict[str, list[int]]
    bias_updates: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    fingerprint: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.removals = {k: sorted(int(i) for i in v) for k, v in self.removals.items() if len(v)}

    def num_removed(self) -> int:
        return sum(len(v) for v in self.removals.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "fingerprint": self.fingerprint,
            "removals": self.removals,
            "bias_updates": self.bias_updates,
            "meta": self.meta,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict) or "removals" not in d:
            raise PlanError("not a prunecli plan: missing 'removals'")
        if d.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise PlanError(f"plan version {d['version']} is newer than this prunecli understands")
        try:
            removals = {str(k): [int(i) for i in v] for k, v in d["removals"].items()}
            bias = {str(k): [float(x) for x in v] for k, v in d.get("bias_updates", {}).items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"malformed plan: {e}") from None
        return cls(removals, bias, str(d.get("fingerprint", "")), dict(d.get("meta", {})))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file not found: {p}")
        return cls.from_json(p.read_text())
