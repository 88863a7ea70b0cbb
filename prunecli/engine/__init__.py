"""The pruning engine: plans, their application, and budgeted selection."""

from prunecli.engine.apply import (
    PruneSummary,
    apply_plan,
    block_params,
    count_params,
    replay_plan,
    zero_units,
)
from prunecli.engine.plan import Plan
from prunecli.engine.select import select_uniform

__all__ = [
    "Plan",
    "PruneSummary",
    "apply_plan",
    "block_params",
    "count_params",
    "replay_plan",
    "select_uniform",
    "zero_units",
]
