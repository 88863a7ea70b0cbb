"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive structured pruning.

Scores each attention head and MLP channel by how much its input to the output projection
fluctuates over calibration data (weighted by the projection's column norm), standardises
the scores per layer and module so one global threshold can set every layer's width, and
replaces what it removes by its calibration mean through the output bias.

Example:
    >>> from prunecli.methods.flap import FlapConfig
    >>> FlapConfig(sparsity=0.2, metric="WIFV", structure="AL-AM").method
    'flap'
"""

from __future__ import annotations

from prunecli.methods.flap.config import FlapConfig
from prunecli.methods.flap.method import prune_flap

__all__ = ["FlapConfig", "prune_flap"]
