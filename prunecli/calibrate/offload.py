"""Models larger than memory: block weights stay in their safetensors files until a block runs.

:func:`load_offloaded` builds the model on the meta device (``accelerate.init_empty_weights``),
loads everything outside the repeated blocks (embeddings, final norm, LM head: a few percent
of a 7B model) and leaves every block parameter on the meta device. An
:class:`OffloadedWeights` (accelerate's ``OffloadedWeightsLoader`` over the checkpoint's own
safetensors files: nothing is copied) brings one block in when the calibration runner needs it
(``set_module_tensor_to_device``) and sends it back to the meta device afterwards.

Pruning an offloaded model changes shapes without touching data: the engine slices the meta
tensors and records, per tensor, which indices stay (:meth:`OffloadedWeights.record_slice`) and
which bias deltas are added (:meth:`OffloadedWeights.record_add`). :meth:`tensor` then returns
the *pruned* value of any tensor, read from its file and sliced on the fly, one tensor at a
time, which is how :func:`prunecli.checkpoint.save_checkpoint` writes the pruned checkpoint
shard by shard without the model ever being whole in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.errors import CheckpointError, UnsupportedModelError


def _checkpoint_keys(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index or the single weights file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(
        f"{folder} has no model.safetensors or model.safetensors.index.json to stream weights from",
        hint="offloaded (layer-by-layer) loading needs safetensors weights; convert the checkpoint first",
    )


def main_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks: the one holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and name:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no list of repeated blocks to load one at a time",
            hint="load it whole (drop --max-memory / --sequential)",
        )
    return best[1], best[2]


class OffloadedWeights:
    """The block weights of an offloaded model, read from the checkpoint one tensor at a time.

    Args:
        index: model tensor name -> ``(safetensors file, name inside the file)``.
        dtype: dtype the tensors are cast to when read.
        fused: model tensor name -> per-expert sources of a fused Mixture-of-Experts tensor
            stored one expert at a time (transformers' legacy layout): one list of
            ``(file, key)`` per source pattern (e.g. gate, up), each with one entry per expert.
            The value is the experts stacked along dimension 0, the patterns concatenated
            along dimension 1 (transformers' ``MergeModulelist(0)`` + ``Concatenate(1)``).
    """

    def __init__(
        self,
        index: dict[str, tuple[Path, str]],
        dtype: torch.dtype,
        fused: dict[str, list[list[tuple[Path, str]]]] | None = None,
    ) -> None:
        from accelerate.utils import OffloadedWeightsLoader

        self.dtype = dtype
        self._fused = {
            name: [[f"{name}@{i}.{e}" for e in range(len(src))] for i, src in enumerate(parts)]
            for name, parts in (fused or {}).items()
        }
        for name, parts in (fused or {}).items():
            for i, src in enumerate(parts):
                for e, entry in enumerate(src):
                    index = {**index, f"{name}@{i}.{e}": entry}
        self.names = set(index) | set(self._fused)
        self._loader = OffloadedWeightsLoader(
            index={
                name: {
                    "safetensors_file": str(path),
                    "weight_name": key,
                    "dtype": str(dtype).removeprefix("torch."),
                }
                for name, (path, key) in index.items()
            }
        )
        self._slices: dict[str, list[tuple[int, Tensor]]] = {}
        self._adds: dict[str, list[Tensor]] = {}
        self._model: nn.Module | None = None

    def bind(self, model: nn.Module) -> None:
        """The model whose meta tensors these weights stand for."""
        self._model = model

    # ------------------------------------------------------------ pruning records
    def record_slice(self, name: str, dim: int, keep: Tensor) -> None:
        """Tensor ``name`` keeps only indices ``keep`` along ``dim`` (applied when it is read)."""
        self._slices.setdefault(name, []).append((int(dim), keep.detach().cpu().long()))

    def record_add(self, name: str, delta: Tensor) -> None:
        """``delta`` is added to tensor ``name`` (after its slices) when it is read."""
        self._adds.setdefault(name, []).append(delta.detach().cpu())

    # ------------------------------------------------------------ reading
    def _meta(self, name: str) -> Tensor | None:
        if self._model is None:
            return None
        mod_name, _, leaf = name.rpartition(".")
        mod = self._model.get_submodule(mod_name) if mod_name else self._model
        t = getattr(mod, leaf, None)
        return t if isinstance(t, Tensor) else None

    def tensor(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        """The current (pruned, compensated) value of tensor ``name``.

        A tensor the checkpoint does not hold is one the engine created (the zero bias of a
        projection that receives bias compensation): it starts at zero.
        """
        if name in self._fused:
            parts = [torch.stack([self._loader[k] for k in keys]) for keys in self._fused[name]]
            value = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            for dim, keep in self._slices.get(name, []):
                value = value.index_select(dim, keep)
        elif name in self.names:
            value = self._loader[name]
            for dim, keep in self._slices.get(name, []):
                value = value.index_select(dim, keep)
        else:
            meta = self._meta(name)
            if meta is None:
                raise UnsupportedModelError(f"{name} is neither in the checkpoint nor in the model")
            value = torch.zeros(meta.shape, dtype=meta.dtype)
        for delta in self._adds.get(name, []):
            value = value + delta.to(value.dtype)
        return value.contiguous().to(device)

    @contextmanager
    def loaded(self, model: nn.Module, path: str, device: torch.device | str = "cpu") -> Iterator[None]:
        """Bring the meta tensors of module ``path`` in for the body, and send them back after."""
        from accelerate.utils import set_module_tensor_to_device

        mod = model.get_submodule(path) if path else model
        prefix = f"{path}." if path else ""
        names = [
            prefix + n for n, t in [*mod.named_parameters(), *mod.named_buffers()] if t.device.type == "meta"
        ]
        try:
            for name in names:
                set_module_tensor_to_device(model, name, device, value=self.tensor(name))
            yield
        finally:
            for name in names:
                set_module_tensor_to_device(model, name, "meta")


def has_meta_tensors(model: nn.Module) -> bool:
    """Whether some parameter or buffer of ``model`` lives on the meta device (offloaded)."""
    return any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def load_offloaded(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[Any, OffloadedWeights]:
    """A causal LM from ``folder`` with every block weight left in the safetensors files.

    Args:
        folder: a local checkpoint folder with safetensors weights.
        dtype: compute dtype (weights are cast when read).
        device: where the resident weights and, later, each block go.
        trust_remote_code: let transformers run modeling code shipped with the checkpoint.

    Returns:
        ``(model, weights)``: the model (eval mode; blocks on the meta device) and the source
        its block weights are read from.

    Raises:
        CheckpointError: no safetensors weights, or a model tensor missing from the files.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    files = _checkpoint_keys(folder)
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = (
        {k for k, v in (getattr(model, "_tied_weights_keys", None) or {}).items()}
        if isinstance(getattr(model, "_tied_weights_keys", None), dict)
        else set(getattr(model, "_tied_weights_keys", None) or [])
    )
    renames = [(None, None), *_renamings(config)]  # checkpoint names of transformers' legacy layouts
    index: dict[str, tuple[Path, str]] = {}
    fused: dict[str, list[list[tuple[Path, str]]]] = {}
    missing = []
    for name, t in model.state_dict(keep_vars=True).items():
        if t.device.type != "meta":
            continue  # a buffer computed at construction (rotary tables)
        variants = (name, name.removeprefix(prefix + "."), f"{prefix}.{name}")
        for key in [v.replace(tgt, src) if src else v for v in variants for src, tgt in renames]:
            if key in files:
                index[name] = (files[key], key)
                break
        else:
            sources = _per_expert_sources(config, name, t.shape, files, prefix)
            if sources is not None:
                fused[name] = sources
            elif name not in tied and not (
                name.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)
            ):
                missing.append(name)
    if missing:
        raise CheckpointError(
            f"{folder} does not hold {missing[0]} ({len(missing)} model tensors missing), so it cannot be streamed",
            hint="load it whole (drop --max-memory / --sequential) or re-save it with save_pretrained",
        )
    weights = OffloadedWeights(index, dtype, fused)
    path, _ = main_block_list(model)
    for name in index:
        if not name.startswith(path + "."):
            set_module_tensor_to_device(model, name, device, value=weights.tensor(name))
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    weights.bind(model)
    model.eval()
    return model, weights


def _plain(pattern: str) -> bool:
    return bool(pattern) and all(c.isalnum() or c in "._" for c in pattern)


def _conversions(config: Any) -> list[Any]:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover - older transformers keep experts unfused
        return []
    return get_checkpoint_conversion_mapping(getattr(config, "model_type", "")) or []


def _renamings(config: Any) -> list[tuple[str, str]]:
    """``(checkpoint substring, model substring)`` of transformers' plain renamings for this model type
    (Mixtral: ``.block_sparse_moe.`` is ``.mlp.``)."""
    return [
        (src, tgt)
        for conv in _conversions(config)
        if type(conv).__name__ == "WeightRenaming"
        for src, tgt in zip(conv.source_patterns, conv.target_patterns)
        if _plain(src) and _plain(tgt)
    ]


def _per_expert_sources(
    config: Any, name: str, shape: torch.Size, files: dict[str, Path], prefix: str
) -> list[list[tuple[Path, str]]] | None:
    """Where a fused experts tensor (``…experts.gate_up_proj`` ``[E, 2I, H]``) lies in a
    checkpoint that stores one tensor per expert (``…experts.3.w1.weight``), read from
    transformers' own conversion mapping for the model type; ``None`` when it is not so stored.

    Only the mapping's plain renamings and its stack (``MergeModulelist(0)``) and concatenate
    (``Concatenate(1)``) converters are understood.
    """
    renames = _renamings(config)
    for conv in _conversions(config):
        if type(conv).__name__ != "WeightConverter" or len(conv.target_patterns) != 1:
            continue
        ops = [(type(o).__name__, getattr(o, "dim", None)) for o in conv.operations]
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            continue
        target = conv.target_patterns[0]
        if not (_plain(target) and name.endswith(target) and all("*" in s for s in conv.source_patterns)):
            continue
        base = name[: -len(target)]
        for variant in (base, base.removeprefix(prefix + "."), f"{prefix}.{base}"):
            keys = [
                [variant + src.replace("*", str(e)) for e in range(shape[0])] for src in conv.source_patterns
            ]
            for src, tgt in [(None, None), *renames]:
                named = [[k.replace(tgt, src) if src else k for k in ks] for ks in keys]
                if all(k in files for ks in named for k in ks):
                    return [[(files[k], k) for k in ks] for ks in named]
    return None


def build_graph_offloaded(model: nn.Module, weights: OffloadedWeights) -> Any:
    """The dependency graph of an offloaded model: the blocks it traces are brought in for it.

    The graph builder traces two blocks per distinct layer signature
    (:func:`prunecli.graph.repeat.sample_blocks`) and replicates what it finds, so only those
    blocks are read from the files.
    """
    from contextlib import ExitStack

    from prunecli.graph import build_graph
    from prunecli.graph.repeat import sample_blocks

    sample = sample_blocks(model)
    if sample is not None:
        paths = [f"{sample.path}.{i}" for i in sample.traced]
    else:
        path, blocks = main_block_list(model)
        paths = [f"{path}.{i}" for i in range(len(blocks))]
    with ExitStack() as stack:
        for p in paths:
            stack.enter_context(weights.loaded(model, p))
        return build_graph(model)
