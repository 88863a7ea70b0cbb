"""Remove whole transformer layers (the layer-dropping setting of encoder pruning).

A dropped layer is taken out of the model's layer list and ``config.num_hidden_layers`` is
lowered; the kept layers are renumbered in order, so their weights are saved under the
usual names (``encoder.layer.0``, ``encoder.layer.1``, ...) and the checkpoint is a plain
model of the same family with fewer layers: stock transformers loads it. A heterogeneous
``per_layer_config`` is re-keyed to the new indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from prunecli.errors import PlanError


def drop_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Remove the transformer layers ``layers`` (original indices) from ``model`` in place.

    Args:
        model: a transformers model whose config has ``num_hidden_layers``.
        layers: indices of the layers to remove; at least one layer must stay.

    Returns:
        The original indices of the kept layers.

    Raises:
        PlanError: an index out of range, or every layer removed.

    Example:
        >>> drop_layers(bert, [1, 2])    # doctest: +SKIP
        [0, 3, 4, 5]
    """
    from prunecli.checkpoint.modeling_prunecli import find_decoder_layers

    config: Any = model.config
    n = int(config.num_hidden_layers)
    drop = sorted({int(i) for i in layers})
    if any(i < 0 or i >= n for i in drop):
        raise PlanError(f"layer indices {drop} out of range for {n} layers")
    if len(drop) >= n:
        raise PlanError("cannot drop every layer", hint="keep at least one layer")
    if not drop:
        return list(range(n))
    path, old = find_decoder_layers(model, n)
    keep = [i for i in range(n) if i not in drop]
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.ModuleList([old[i] for i in keep]))
    for new_i, layer in enumerate(model.get_submodule(path)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_i
    raw = config.to_dict().get("per_layer_config") or {}
    if raw:
        raw = {int(k): v for k, v in raw.items()}
        config.per_layer_config = {new_i: dict(raw[i]) for new_i, i in enumerate(keep) if raw.get(i)}
    for key in ("layer_types", "mlp_layer_types"):
        # one entry per layer (Gemma 2/3, Qwen 2/3: sliding or full attention); the config
        # validator refuses a list whose length is not num_hidden_layers
        types = config.__dict__.get(key)
        if isinstance(types, (list, tuple)) and len(types) == n:
            setattr(config, key, [types[i] for i in keep])
    config.num_hidden_layers = len(keep)
    check_config(model)
    return keep


def check_config(model: nn.Module) -> None:
    """Refuse a pruned model whose config transformers' own validation rejects.

    A checkpoint with such a config would not reload (``from_pretrained`` validates it), so
    this runs right after the model is changed, before recovery, evaluation or saving.

    Raises:
        PrunedModelError: the config is refused (the model was modified in place).
    """
    from prunecli.errors import PrunedModelError
    from prunecli.models.hf import config_problem

    config = getattr(model, "config", None)
    problem = config_problem(config) if config is not None else None
    if problem:
        raise PrunedModelError(
            f"the pruned model's config is refused by transformers' validation ({problem}); "
            "the model was modified in place and must be reloaded",
            hint="report this with `prunecli graph MODEL --all`: a constraint of this model is not modelled",
        )
