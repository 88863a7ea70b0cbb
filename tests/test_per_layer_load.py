"""Checkpoints with per-layer widths reload without transformers' per-layer warnings.

A global (non-uniform) FLAP selection leaves every layer with its own widths; the config
records them in ``per_layer_config``. Reading such a config's per-layer attributes globally
makes transformers warn "Reading global config value for per-layer attribute ..." once per
attribute; prunecli's checkpoints ship a config class (``auto_map`` ``AutoConfig``) whose
validators read the global values quietly, and the model is built from a homogeneous view.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from archs import example_input, model_output, tiny_model

PER_LAYER_WARNING = "Reading global config value for per-layer attribute"


@contextmanager
def transformers_messages() -> Iterator[list[str]]:
    """Every log record of transformers' loggers and every Python warning raised while inside.

    transformers' library logger does not propagate to the root logger (so ``caplog`` misses
    it), and ``warning_once`` remembers messages already shown in this process: the cache is
    cleared so that a warning shown (or hidden) earlier is shown again.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.levelname}: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        root.removeHandler(handler)


def pruned_per_layer(arch: str) -> torch.nn.Module:
    """``arch`` pruned by FLAP (global selection): the two layers keep different widths."""
    import prunecli
    from prunecli.methods.flap import FlapConfig

    model = tiny_model(arch)
    calib = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    prunecli.prune(model, FlapConfig(sparsity=0.4), calib)
    assert model.config.is_heterogeneous, "FLAP chose the same widths in every layer"
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_per_layer_checkpoint_reloads_without_warnings(arch: str, tmp_path, tiny_tokenizer) -> None:
    from huggingface_hub.errors import StrictDataclassClassValidationError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prunecli.checkpoint import save_checkpoint
    from prunecli.models import load_model

    model = pruned_per_layer(arch)
    x = example_input(arch)
    expected = model_output(model, x)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", provenance={"method": "flap"})
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"]
    assert config["auto_map"]["AutoConfig"].startswith("modeling_prunecli.PruneCli")
    assert config["auto_map"]["AutoConfig"].endswith("Config")

    with transformers_messages() as remote_messages:
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # reads config.json too
        remote_logits = model_output(remote, x)
        remote_tokens = remote.generate(x[:1], max_new_tokens=3, do_sample=False)
    assert type(remote.config).__name__ == "PruneCli" + type(model.config).__name__
    with transformers_messages() as local_messages:
        loaded = load_model(out)  # model and tokenizer
        local = loaded.model
        local_logits = model_output(local, x)
        local_tokens = local.generate(x[:1], max_new_tokens=3, do_sample=False)

    for messages in (remote_messages, local_messages):
        assert not [m for m in messages if PER_LAYER_WARNING in m], messages
        assert not messages, messages  # nothing else either
    torch.testing.assert_close(remote_logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(local_logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(remote_tokens, local_tokens)
    assert loaded.tokenizer is not None

    # The per-layer widths are the pruned model's, read from the layers' own configs.
    for i, layer in enumerate(local.model.layers):
        layer_config = local.config.per_layer_config[i]
        assert layer.mlp.down_proj.in_features == layer_config.intermediate_size
        assert layer.self_attn.q_proj.out_features == layer_config.num_attention_heads * layer_config.head_dim

    # The checkpoint's own config class still validates the global values.
    config_cls = type(local.config)
    with pytest.raises(
        StrictDataclassClassValidationError, match="multiple of the number of attention heads"
    ):
        config_cls(hidden_size=64, num_attention_heads=3, head_dim=16)
    # Stock AutoConfig (no remote code) still reads the folder, as a stock config class.
    stock = AutoConfig.from_pretrained(out)
    assert type(stock).__name__ == type(model.config).__name__ and stock.is_heterogeneous
