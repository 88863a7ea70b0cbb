"""Built-in pruning methods; importing this package registers them.

One subpackage per method, each with its config dataclass, its scoring maths and a
docstring citing its paper. See ``prunecli.config.register_method``.
"""

from prunecli.methods import (  # noqa: F401
    cfsp,
    experts,
    flap,
    loraprune,
    magnitude,
    michel,
    random,
    shrp,
    tyr,
    wanda_sp,
)
