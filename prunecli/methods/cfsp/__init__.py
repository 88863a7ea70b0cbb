"""CFSP (Wang et al., COLING 2025, arXiv 2409.13199): coarse-to-fine activation-guided MLP pruning.

Coarse: each block's importance is the mean angular distance between its input and output
hidden states; the sparsity budget is split so that important blocks keep more channels.
Fine: inside a block, MLP channels are ranked by the public code's criterion (which reduces to
the activation norm of the channel), or by prunecli's own ``across-channels`` criterion.
Formulas, their sources and every departure: :mod:`prunecli.methods.cfsp.scoring`.

Example:
    >>> from prunecli.methods.cfsp import CfspConfig
    >>> CfspConfig(sparsity=0.3, round_to=8).method
    'cfsp'
"""

from prunecli.methods.cfsp.config import CfspConfig
from prunecli.methods.cfsp.prune import CfspScores, cfsp_scores, plan_from_scores, prune_cfsp
from prunecli.methods.cfsp.scoring import (
    allocate_sparsity,
    allocate_units,
    angular_distance,
    channel_importance,
)

__all__ = [
    "CfspConfig",
    "CfspScores",
    "allocate_sparsity",
    "allocate_units",
    "angular_distance",
    "cfsp_scores",
    "channel_importance",
    "plan_from_scores",
    "prune_cfsp",
]
