"""Tiny random models, one per architecture the engine must cover (shared by tests)."""

from __future__ import annotations

import torch
from torch import nn

DECODERS: dict[str, dict] = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96),
    "gemma": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96),
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96),
    "gemma3_text": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96),
    "phi3": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, pad_token_id=0),
}

#: tiny Mixture-of-Experts decoders: 8 routed experts, 2 per token (DeepSeek-V3: 2 expert
#: groups of 4, one chosen per token, a dense first layer and one shared expert)
MOE: dict[str, dict] = {
    "mixtral": dict(head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2
    ),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1),
    "deepseek_v3": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        num_key_value_heads=4,  # multi-head latent attention: one key/value head per query head
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
}


def tiny_config(model_type: str, **overrides):
    """The tiny config of ``model_type``; ``overrides`` replace or add config fields."""
    from transformers import AutoConfig

    if overrides:
        cfg = tiny_config(model_type)
        kw = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "transformers_version")}
        kw.update(overrides)
        return AutoConfig.for_model(model_type, **kw)
    if model_type in DECODERS:
        kw = dict(hidden_size=64, num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
        kw.update(DECODERS[model_type])
        return AutoConfig.for_model(model_type, **kw)
    if model_type in MOE:
        kw = dict(
            hidden_size=64,
            num_hidden_layers=2,
            vocab_size=128,
            max_position_embeddings=64,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        kw.update(MOE[model_type])  # may replace num_key_value_heads
        return AutoConfig.for_model(model_type, **kw)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    if model_type == "opt":
        return AutoConfig.for_model(
            "opt",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=96,
            vocab_size=128,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        )
    if model_type == "bert":
        return AutoConfig.for_model(
            "bert",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            vocab_size=128,
            max_position_embeddings=64,
        )
    if model_type == "vit":
        return AutoConfig.for_model(
            "vit",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            image_size=32,
            patch_size=8,
            num_channels=3,
        )
    raise KeyError(model_type)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised tiny model of ``model_type`` in eval mode (float32)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    cls = AutoModel if model_type in ("bert", "vit") else AutoModelForCausalLM
    model = cls.from_config(cfg).eval()
    # random (not zero) biases and norm weights so that exactness tests mean something
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def mixed_layers_model(model_type: str, layer_types: list[str], seed: int = 0) -> nn.Module:
    """:func:`tiny_model` with ``len(layer_types)`` layers; where the config has ``layer_types``,
    local (sliding-window 5) and global layers follow that pattern, so they see different masks
    (and, in Gemma 3, different rotary tables)."""
    overrides: dict = {"num_hidden_layers": len(layer_types)}
    if getattr(tiny_config(model_type), "layer_types", None) is not None:
        overrides.update(layer_types=list(layer_types), sliding_window=5)
        if model_type in ("qwen2", "qwen3"):
            overrides["use_sliding_window"] = True
    return tiny_model(model_type, seed=seed, **overrides)


def example_input(model_type: str, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if model_type == "vit":
        return torch.randn(batch, 3, 32, 32, generator=g)
    return torch.randint(1, 128, (batch, 9), generator=g)


def model_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if x.dtype == torch.long:
            out = model(input_ids=x)
        else:
            out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


class TinyCNN(nn.Module):
    """Residual adds, a channel concat, batch norms and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.a1 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(24)
        self.a2 = nn.Conv2d(24, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b2 = nn.Conv2d(16, 12, 1)
        self.merge = nn.Conv2d(20, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        r = torch.relu(self.bn1(self.a1(x)))
        x = x + self.a2(r)  # residual add
        x = torch.relu(self.dw(x))
        cat = torch.cat([torch.relu(self.b1(x)), torch.relu(self.b2(x))], dim=1)  # concat
        x = x + self.merge(cat)
        return self.head(x.mean(dim=(2, 3)))


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(TinyCNN().eval())


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, depthwise 3x3, 1x1 project, residual add."""

    def __init__(self, c: int, expand: int, pad_before_dw: bool = False) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, expand, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(expand)
        self.dw = nn.Conv2d(expand, expand, 3, padding=0 if pad_before_dw else 1, groups=expand, bias=False)
        self.bn2 = nn.BatchNorm2d(expand)
        self.project = nn.Conv2d(expand, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.pad_before_dw = pad_before_dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        if self.pad_before_dw:  # EfficientNet's TF-style "same" padding
            h = nn.functional.pad(h, (1, 1, 1, 1))
        h = nn.functional.relu6(self.bn2(self.dw(h)))
        return x + self.bn3(self.project(h))


class MobileCNN(nn.Module):
    """Depthwise convs (multiplier 1 and 2), a grouped conv, batch norms, residual adds."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.block1 = InvertedResidual(16, 32)
        self.block2 = InvertedResidual(16, 24, pad_before_dw=True)
        self.dw2 = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # channel multiplier 2
        self.bn4 = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 24, 3, padding=1, groups=4)  # 8 in, 6 out per group
        self.bn5 = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self.bn0(self.stem(x)))
        x = self.block2(self.block1(x))
        x = nn.functional.relu6(self.bn4(self.dw2(x)))
        x = nn.functional.relu6(self.bn5(self.grouped(x)))
        return self.head(x.mean(dim=(2, 3)))


def _randomise_bn(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_()
                mod.bias.normal_()
    return m


def mobile_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(MobileCNN().eval())


ALL = [*DECODERS, "gpt2", "opt", "bert", "vit"]


def block_observations(model: nn.Module) -> list:
    """Every linear inside a block (input moments, output sums of squares) and every block's angle."""
    from prunecli.calibrate import Observe

    reqs = []
    for name, mod in model.named_modules():
        if ".layers." in name and isinstance(mod, nn.Linear):
            reqs += [Observe(name, "moments"), Observe(name, "sumsq", "output")]
        if name.count(".") == 2 and name.split(".")[1] == "layers":
            reqs.append(Observe(name, "angular", "block"))
    return reqs
