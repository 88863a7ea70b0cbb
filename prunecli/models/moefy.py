"""A real-weights Mixture-of-Experts derived from a dense Llama-style model (MoEfication).

No small real MoE can be downloaded here, so expert pruning is measured on one made from a
dense model (Zhang et al., 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of
Experts"): every MLP's ``I`` intermediate channels are split into ``E`` experts of ``I / E``
channels, and a router is added. The result is a stock transformers **Mixtral** model
(``MixtralForCausalLM``: softmax router, top-``k``, weights renormalised over the chosen
experts); attention, norms, embeddings and head are copied unchanged.

How the experts and the router are made (data-free, seeded):

1. **Channels -> experts** by balanced spherical k-means on the MLP's gate rows
   (``gate_proj.weight[c] / ‖·‖``): channels whose gates point the same way, and so tend to
   open for the same inputs, share an expert. Each expert gets exactly ``I / E`` channels.
2. **Router row of expert e** = the mean of its channels' gate rows, so the router logit is the
   mean pre-activation of the expert's gates: a token is sent to the experts whose gates it
   opens most. Expert choice therefore matters.
3. **Router scale** ``s`` multiplies the router rows. Mixtral weights a chosen expert by its
   softmax probability renormalised over the ``k`` chosen ones; each expert's ``down_proj`` is
   multiplied by ``k`` so that near-uniform weights (a small ``s``) give each chosen expert
   weight ~1, as in the dense MLP. The choice (top-``k`` of the logits) does not depend on ``s``.

Exactness: with every expert active (``k = E``) and ``s = 0`` the weights are exactly ``1/E``
and the ``E``-fold ``down_proj`` cancels them, so the MoE computes the dense MLP (a sum of
``E`` partial matmuls instead of one: equal up to float rounding). With ``s > 0`` and
``k = E`` it differs from the dense model by the weights' spread (``O(s)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prunecli.errors import InputError, UnsupportedModelError

DEFAULT_ROUTER_SCALE = 0.01


def balanced_clusters(rows: Tensor, num_clusters: int, *, seed: int = 0, iters: int = 10) -> list[list[int]]:
    """Split the rows into ``num_clusters`` clusters of equal size by spherical k-means.

    ``iters`` plain k-means steps, then one balanced assignment: the most similar
    (row, centroid) pairs first, each row to a centroid with room left.

    Args:
        rows: ``[n, d]`` vectors; ``n`` must be a multiple of ``num_clusters``.
        num_clusters: clusters.
        seed: seeds the initial centroids (random rows).
        iters: k-means iterations.

    Returns:
        ``num_clusters`` sorted index lists of ``n / num_clusters`` rows each.

    Example:
        >>> balanced_clusters(torch.tensor([[1.0, 0], [0, 1.0], [0.9, 0.1], [0.1, 0.9]]), 2)
        [[0, 2], [1, 3]]
    """
    n = rows.shape[0]
    if num_clusters < 1 or n % num_clusters:
        raise InputError(f"{n} channels cannot be split into {num_clusters} equal experts")
    size = n // num_clusters
    x = nn.functional.normalize(rows.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:num_clusters]]
    for step in range(iters + 1):
        sim = x @ centroids.T  # (n, E)
        if step < iters:  # plain spherical k-means steps
            near = sim.argmax(1)
            centroids = torch.stack(
                [x[near == c].mean(0) if (near == c).any() else centroids[c] for c in range(num_clusters)]
            )
            centroids = nn.functional.normalize(centroids, dim=1)
            continue
        # final balanced assignment: most similar (row, centroid) pairs first, while there is room
        assign = [-1] * n
        room = [size] * num_clusters
        left = n
        for flat in torch.argsort(sim.flatten(), descending=True, stable=True).tolist():
            r, c = divmod(flat, num_clusters)
            if assign[r] < 0 and room[c] > 0:
                assign[r] = c
                room[c] -= 1
                left -= 1
                if not left:
                    break
    owner = torch.tensor(assign)
    clusters = [sorted(torch.nonzero(owner == c).flatten().tolist()) for c in range(num_clusters)]
    return sorted(clusters, key=lambda c: c[0])


def moefy(
    model: nn.Module,
    experts: int,
    top_k: int,
    *,
    router_scale: float = DEFAULT_ROUTER_SCALE,
    seed: int = 0,
) -> nn.Module:
    """A Mixtral model whose experts are the channel clusters of ``model``'s MLPs.

    Args:
        model: a dense ``LlamaForCausalLM`` (SiLU-gated MLP without biases).
        experts: experts per layer ``E`` (must divide the MLP width).
        top_k: experts per token ``k`` (``1 <= k <= E``).
        router_scale: multiplier of the router rows (see the module docstring).
        seed: seeds the clustering.

    Returns:
        ``MixtralForCausalLM`` in eval mode, on the CPU, in ``model``'s dtype.

    Raises:
        UnsupportedModelError: not a Llama-architecture model or one with biases.
        InputError: ``experts`` / ``top_k`` out of range.

    Example:
        >>> moe = moefy(load_model("smollm2-135m").model, experts=8, top_k=2)   # doctest: +SKIP
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        raise UnsupportedModelError(
            f"moefy derives a MoE from a Llama-architecture model, not {getattr(cfg, 'model_type', None)!r}"
        )
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False) or cfg.hidden_act != "silu":
        raise UnsupportedModelError("moefy needs a SiLU-gated model without projection biases")
    inter = int(cfg.intermediate_size)
    if not 2 <= experts <= inter or inter % experts:
        raise InputError(f"--experts must divide the MLP width {inter} and be at least 2, got {experts}")
    if not 1 <= top_k <= experts:
        raise InputError(f"--top-k must be between 1 and --experts ({experts}), got {top_k}")
    src = cfg.to_dict()
    keep = (
        "vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
        "max_position_embeddings rms_norm_eps rope_parameters tie_word_embeddings bos_token_id "
        "eos_token_id pad_token_id hidden_act attention_dropout initializer_range"
    ).split()
    new_cfg = MixtralConfig(
        **{k: src[k] for k in keep if k in src},
        intermediate_size=inter // experts,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        router_jitter_noise=0.0,
    )
    dtype = next(model.parameters()).dtype
    moe = MixtralForCausalLM(new_cfg).to(dtype)
    state = {name: t for name, t in model.state_dict().items() if ".mlp." not in name}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        gate, up, down = (
            mlp.gate_proj.weight.detach(),
            mlp.up_proj.weight.detach(),
            mlp.down_proj.weight.detach(),
        )
        idx = [torch.tensor(c) for c in balanced_clusters(gate.float(), experts, seed=seed + i)]
        p = f"model.layers.{i}.mlp"
        state[f"{p}.experts.gate_up_proj"] = torch.stack([torch.cat([gate[c], up[c]], 0) for c in idx])
        state[f"{p}.experts.down_proj"] = torch.stack([down[:, c] * top_k for c in idx])
        state[f"{p}.gate.weight"] = (torch.stack([gate[c].double().mean(0) for c in idx]) * router_scale).to(
            dtype
        )
    result = moe.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and new_cfg.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise UnsupportedModelError(
            f"moefy could not map {(missing or result.unexpected_keys)[0]} between the dense and the MoE model"
        )
    if new_cfg.tie_word_embeddings:
        moe.tie_weights()
    return moe.to(dtype).eval()
