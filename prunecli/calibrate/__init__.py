"""One calibration pipeline for every method: what to observe, how to run, how to combine.

- :mod:`~prunecli.calibrate.stats`: streaming accumulators (channel moments, sums of
  squares, block angular distance), kept on the compute device, mergeable across ranks.
- :mod:`~prunecli.calibrate.runner`: :class:`Runner` (whole-model or layer-sequential,
  dense or pruned propagation) and :class:`Observe` requests.
- :mod:`~prunecli.calibrate.distributed`: data-parallel calibration over ``torch.distributed``.
- :mod:`~prunecli.calibrate.launch`: ``compress --nproc N``: N local processes, started the
  way torchrun starts them.
- :mod:`~prunecli.calibrate.offload`: block weights brought in from the safetensors files
  only while a block runs.

Example:
    >>> from prunecli.calibrate import Observe, Runner
    >>> runner = Runner(mode="sequential")                                        # doctest: +SKIP
    >>> obs = runner.observe(model, [Observe("model.layers.0.mlp.down_proj", "sumsq")], calib)  # doctest: +SKIP
"""

from prunecli.calibrate.runner import BATCH_TOKENS, Observe, Runner, StopForward, block_list, first_tensor
from prunecli.calibrate.stats import AngularDistance, ChannelStats, SumSquares, angular_distance

__all__ = [
    "BATCH_TOKENS",
    "AngularDistance",
    "ChannelStats",
    "Observe",
    "Runner",
    "StopForward",
    "SumSquares",
    "angular_distance",
    "block_list",
    "first_tensor",
]
