"""Models whose decoder layers differ in width, for checkpoints written by prunecli.

Structured pruning can leave each decoder layer with its own number of attention heads,
key/value heads or MLP channels. The config records those widths in transformers'
standard ``per_layer_config`` field (a sparse map ``{layer_index: {attribute: value}}``),
but the stock model classes build every layer from the global config. This file builds
the stock model first (reading the global values) and then replaces each layer that has
overrides (and, so that no layer keeps the global config, every other layer) with
``LayerClass(config.per_layer_config[i], i)`` before any weight is loaded.

Families whose config cannot describe the pruned model at all (BERT, GPT-2, OPT and ViT
derive the head size from ``hidden_size / num_heads``; Mistral, Qwen2 or Gemma have no flag for
MLP biases) get a second record, ``config.prunecli_modules``: for each module whose shapes or
numeric attributes differ from what the stock class builds, ``{"params": {name: shape or
null}, "attrs": {name: number}}``. :func:`apply_module_overrides` resizes those modules
(``nn.Linear`` widths, head counts, head sizes, extra biases) before any weight is loaded.

The file is copied verbatim into such checkpoints and named in ``config.json``'s
``auto_map``, e.g. ``"AutoModelForCausalLM": "modeling_prunecli.PruneCliLlamaForCausalLM"``
and ``"AutoConfig": "modeling_prunecli.PruneCliLlamaConfig"``, so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works without
prunecli installed. It imports only torch and transformers (and huggingface_hub, which
transformers requires), and it is generic: ``PruneCli<Base>`` is created on first access for
any stock class ``<Base>`` whose decoder layers are built as ``LayerClass(config, layer_idx)``
(Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 text, Phi-3, ...), and
``PruneCli<Base>Config`` for its config class.

Why a config class: a heterogeneous config refuses reads of its per-layer attributes
(``config.num_attention_heads``) unless ``allow_global_per_layer_attribute_access`` is set,
and then warns "Reading global config value for per-layer attribute" for each one. The stock
validators read them (``LlamaConfig.validate_architecture``: ``hidden_size %
num_attention_heads``; ``validate_token_ids`` reads every field). ``PruneCli<Base>Config``
runs the same validators on the *global* values (the dense model's, which the config keeps)
without going through the per-layer guard; the per-layer widths need no such check, since
every layer states its ``head_dim``. The model's stock constructor likewise reads the global
values from a homogeneous view of the config, and every layer is then rebuilt from its own
``config.per_layer_config[i]``.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
import transformers

PREFIX = "PruneCli"

_CLASSES: dict[str, type] = {}


def per_layer_overrides(config: Any) -> dict[int, dict[str, Any]]:
    """``{layer_index: {attribute: value}}`` for the layers that differ from the global config."""
    if not getattr(config, "is_heterogeneous", False):
        return {}
    raw = config.to_dict().get("per_layer_config") or {}
    return {int(i): dict(v) for i, v in raw.items() if v}


def find_decoder_layers(model: torch.nn.Module, num_layers: int) -> tuple[str, torch.nn.ModuleList]:
    """The ``ModuleList`` holding the ``num_layers`` decoder layers (first match by module order).

    Args:
        model: the model to search.
        num_layers: ``config.num_hidden_layers``.
    """
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) == num_layers
            and num_layers > 0
            and len({type(m) for m in module}) == 1
            and name.rsplit(".", 1)[-1] in ("layers", "layer", "h", "blocks")
        ):
            return name, module
    raise ValueError(f"cannot find the {num_layers} decoder layers of {type(model).__name__}")


def rebuild_heterogeneous_layers(model: torch.nn.Module, config: Any) -> list[int]:
    """Rebuild every decoder layer from its own resolved config ``config.per_layer_config[i]``.

    Layers without overrides are rebuilt too: a layer built from the global config keeps a
    reference to it, and some models read per-layer attributes from that reference in
    ``forward`` (Phi-3's attention reads ``config.num_attention_heads``), which a heterogeneous
    global config refuses.

    Args:
        model: a model built from the global values of ``config``.
        config: the heterogeneous config.

    Returns:
        The indices of the layers that were rebuilt (empty for a homogeneous config).
    """
    if not per_layer_overrides(config):
        return []
    _, layers = find_decoder_layers(model, config.num_hidden_layers)
    rebuilt = []
    for i in range(len(layers)):
        old = layers[i]
        layer_cls = type(old)
        params = inspect.signature(layer_cls.__init__).parameters
        layer_config = config.per_layer_config[i]
        new = layer_cls(layer_config, layer_idx=i) if "layer_idx" in params else layer_cls(layer_config)
        ref = next(old.parameters(), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        new.train(old.training)
        layers[i] = new
        rebuilt.append(i)
    return rebuilt


def bind_layer_configs(model: torch.nn.Module) -> int:
    """Point every module inside decoder layer ``i`` that holds the global config at layer ``i``'s config.

    For a model resized in place whose ``config.per_layer_config`` was set afterwards: its
    modules still reference the global config, and models that read per-layer attributes in
    ``forward`` (Phi-3's attention: ``config.num_attention_heads``) then fail, because a
    heterogeneous global config refuses those reads. Models built by :func:`heterogeneous_class`
    need no binding.

    Args:
        model: the model whose ``model.config`` is heterogeneous.

    Returns:
        The number of module attributes rebound (0 for a homogeneous config).
    """
    config = model.config
    if not per_layer_overrides(config):
        return 0
    _, layers = find_decoder_layers(model, config.num_hidden_layers)
    count = 0
    for i, layer in enumerate(layers):
        layer_config = config.per_layer_config[i]
        for module in layer.modules():
            if getattr(module, "config", None) is config:
                module.config = layer_config
                count += 1
    return count


class GlobalAccess:
    """Temporarily allow reading per-layer attributes from the global config (quietly)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.active = bool(getattr(config, "is_heterogeneous", False))
        self.previous = False
        self.logger = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
        self.level = logging.NOTSET

    def __enter__(self) -> None:
        if self.active:
            self.previous = self.config.allow_global_per_layer_attribute_access
            self.level = self.logger.level
            self.logger.setLevel(logging.ERROR)
            self.config.allow_global_per_layer_attribute_access = True

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.config.allow_global_per_layer_attribute_access = self.previous
            self.logger.setLevel(self.level)


def global_view(config: Any) -> Any:
    """A shallow copy of ``config`` without its per-layer record (the global values), or ``config``."""
    if "_heterogeneity_spec" not in config.__dict__:
        return config
    view = copy.copy(config)
    view.__dict__.pop("_heterogeneity_spec", None)
    return view


def heterogeneous_config_class(base: type | str) -> type:
    """``PruneCli<Base>``: a config class whose validators read the global values quietly.

    The stock validators of ``base`` (``validate_architecture``, ``validate_token_ids``, ...)
    run on :func:`global_view` of a heterogeneous config: the same checks stock transformers
    runs when ``allow_global_per_layer_attribute_access`` is set, without its warnings. A
    homogeneous config is validated exactly as by ``base``.

    Args:
        base: a stock transformers config class, or its name (e.g. ``"LlamaConfig"``).
    """
    from huggingface_hub.dataclasses import strict

    base_cls = getattr(transformers, base) if isinstance(base, str) else base
    name = PREFIX + base_cls.__name__
    if name in _CLASSES:
        return _CLASSES[name]

    def on_global_view(stock):
        def validator(self):
            return stock(global_view(self))

        validator.__name__ = stock.__name__
        validator.__doc__ = stock.__doc__
        return validator

    namespace: dict[str, Any] = {"__module__": __name__}
    for attr in dir(base_cls):
        if attr.startswith("validate_") and callable(getattr(base_cls, attr)):
            namespace[attr] = on_global_view(getattr(base_cls, attr))
    cls = type(name, (base_cls,), namespace)
    cls.__qualname__ = name
    cls = strict(accept_kwargs=True)(cls)
    _CLASSES[name] = cls
    _register_auto_models(cls, base_cls)
    return cls


# transformers' auto classes whose mapping gets ``PruneCli<Config> -> PruneCli<Model>``
_AUTO_MODELS = ("AutoModelForCausalLM", "AutoModel", "AutoModelForSequenceClassification")


def _register_auto_models(config_cls: type, base_config: type) -> None:
    """Let ``AutoModel*.from_config(config)`` build ``PruneCli<Model>`` for a ``PruneCli<Config>``."""
    model_type = getattr(base_config, "model_type", None)
    for auto_name in _AUTO_MODELS:
        auto = getattr(transformers, auto_name)
        names = auto._model_mapping._model_mapping.get(model_type)
        model_name = names if isinstance(names, str) else None
        if model_name and isinstance(getattr(transformers, model_name, None), type):
            auto.register(config_cls, heterogeneous_class(model_name), exist_ok=True)


def config_class_for(model_type: str) -> type:
    """``PruneCli<Config>`` for the stock config class of ``model_type`` (e.g. ``"llama"``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return heterogeneous_config_class(CONFIG_MAPPING[model_type])


def config_from_pretrained(folder: str, **kwargs: Any) -> Any:
    """Read ``folder/config.json``: with ``PruneCli<Config>`` when it has per-layer widths.

    Args:
        folder: a checkpoint folder.
        **kwargs: passed to ``from_pretrained``.
    """
    import json
    import os

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # transformers reports a missing or broken file its own way
        data = {}
    if isinstance(data, dict) and data.get("per_layer_config") and data.get("model_type") in CONFIG_MAPPING:
        return config_class_for(data["model_type"]).from_pretrained(folder, **kwargs)
    return AutoConfig.from_pretrained(folder, **kwargs)


def stock_class_name(config: Any) -> str:
    """The stock transformers class a (possibly prunecli-prefixed) config was saved from.

    Args:
        config: a transformers config; ``architectures`` wins, else the causal-LM class of
            its ``model_type``.
    """
    for arch in getattr(config, "architectures", None) or []:
        name = arch[len(PREFIX) :] if arch.startswith(PREFIX) else arch
        if hasattr(transformers, name):
            return name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if isinstance(name, str) and hasattr(transformers, name):
        return name
    raise ValueError(f"no stock transformers class for model_type {getattr(config, 'model_type', None)!r}")


def heterogeneous_class(base: type | str) -> type:
    """``PruneCli<Base>``: a subclass of ``base`` that builds layers from ``per_layer_config``.

    Args:
        base: a stock transformers model class, or its name (e.g. ``"LlamaForCausalLM"``).
    """
    base_cls = getattr(transformers, base) if isinstance(base, str) else base
    name = PREFIX + base_cls.__name__
    if name in _CLASSES:
        return _CLASSES[name]

    def __init__(self, config, *args, **kwargs):  # noqa: N807
        # The stock constructor builds every layer from the global values (a homogeneous view);
        # post_init (at its end) puts the per-layer record back and rebuilds the layers.
        spec = config.__dict__.pop("_heterogeneity_spec", None)
        self.__dict__["_prunecli_spec"] = (config, spec)
        try:
            base_cls.__init__(self, config, *args, **kwargs)
        finally:
            _reattach(self)
        # post_init normally rebuilt the layers already; this covers classes that skip it.
        rebuild_heterogeneous_layers_once(self)

    def post_init(self):
        # Called at the end of the stock __init__: rebuild before weights are initialised,
        # so the new layers get the model's own _init_weights.
        _reattach(self)
        rebuild_heterogeneous_layers_once(self)
        base_cls.post_init(self)

    def is_custom_code(cls) -> bool:
        # The stock class plus a build step: transformers must apply the stock class's weight
        # name conversions (ViT's legacy "encoder.layer.0.attention.attention.query" names),
        # which it skips for custom code.
        return False

    namespace = {
        "__init__": __init__,
        "post_init": post_init,
        "is_custom_code": classmethod(is_custom_code),
        "__module__": __name__,
    }
    config_cls = getattr(base_cls, "config_class", None)
    if isinstance(config_cls, type) and issubclass(config_cls, transformers.PreTrainedConfig):
        # from_pretrained(folder) without a config reads config.json with the quiet validators
        namespace["config_class"] = heterogeneous_config_class(config_cls)
    cls = type(name, (base_cls,), namespace)
    cls.__qualname__ = name
    _share_weight_conversions(base_cls.__name__, name)
    _CLASSES[name] = cls
    return cls


def _share_weight_conversions(base_name: str, name: str) -> None:
    """Give ``name`` the weight-name conversions transformers registered for the class ``base_name``."""
    try:
        from transformers import conversion_mapping
    except ImportError:  # older transformers: no conversions
        return
    mapping = conversion_mapping.get_checkpoint_conversion_mapping(base_name)
    if mapping is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


def _reattach(model: torch.nn.Module) -> None:
    """Put back the per-layer record that ``PruneCli<Base>.__init__`` detached from the config."""
    held = model.__dict__.pop("_prunecli_spec", None)
    if held is not None and held[1] is not None:
        held[0].__dict__["_heterogeneity_spec"] = held[1]


def rebuild_heterogeneous_layers_once(model: torch.nn.Module) -> None:
    """Rebuild the overridden layers and apply the module overrides, once per model."""
    if getattr(model, "_prunecli_layers_rebuilt", False):
        return
    config = model.config
    rebuild_heterogeneous_layers(model, config)
    apply_module_overrides(model, module_overrides(config))
    model._prunecli_layers_rebuilt = True


def module_overrides(config: Any) -> dict[str, dict[str, Any]]:
    """``config.prunecli_modules``: ``{module path: {"params": {...}, "attrs": {...}}}`` (or empty)."""
    raw = getattr(config, "prunecli_modules", None)
    return {str(k): dict(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def apply_module_overrides(model: torch.nn.Module, overrides: dict[str, dict[str, Any]]) -> int:
    """Resize modules to the saved widths before the weights load.

    For each module path: numeric attributes are set (``in_features``, ``num_heads``,
    ``attention_head_size``, ``scaling``, ...), and each listed parameter is replaced by an
    zero one of the saved shape (``null`` removes it, e.g. a bias the model lacks).
    The weights loaded afterwards fill every replaced parameter.

    Args:
        model: a model built from the stock class (not yet loaded).
        overrides: :func:`module_overrides` of its config.

    Returns:
        The number of modules changed.
    """
    for path, change in overrides.items():
        module = model.get_submodule(path)
        for attr, value in (change.get("attrs") or {}).items():
            setattr(module, attr, value)
        for name, shape in (change.get("params") or {}).items():
            old = getattr(module, name, None)
            ref = old if isinstance(old, torch.Tensor) else next(model.parameters())
            if shape is None:
                if name in module._parameters:
                    module._parameters[name] = None
                continue
            new = torch.zeros(tuple(shape), dtype=ref.dtype, device=ref.device)
            if name in module._buffers:
                module._buffers[name] = new
            else:
                requires_grad = old.requires_grad if isinstance(old, torch.nn.Parameter) else True
                setattr(module, name, torch.nn.Parameter(new, requires_grad=requires_grad))
    return len(overrides)


def __getattr__(name: str) -> type:
    # auto_map names PruneCli<Base> and PruneCli<Base>Config; classes are created on first access.
    base = getattr(transformers, name[len(PREFIX) :], None) if name.startswith(PREFIX) else None
    if isinstance(base, type) and issubclass(base, transformers.PreTrainedConfig):
        return heterogeneous_config_class(base)
    if isinstance(base, type):
        return heterogeneous_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
