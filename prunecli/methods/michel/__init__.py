"""Gradient head importance, iterative (Michel, Levy & Neubig, NeurIPS 2019, "Are Sixteen Heads
Really Better than One?", arXiv:1905.10650).

Each head ``h`` gets a mask variable ``xi_h`` multiplying its output (all 1 in the model); its
importance is the expected sensitivity of the task loss to it:

    I_h = E_x | dL(x) / d xi_h |          (accumulated over batches of the labelled task)

normalised per layer by the L2 norm of the layer's scores (the paper's code does this; it
makes layers comparable). Pruning is iterative: in ``iterations`` rounds, the heads with the
lowest importance are masked (``xi_h = 0``) until the round's share of the target is reached,
and the importances are recomputed with those heads masked. The masked heads are then
removed by the engine, which is exact (a masked head contributes nothing).

prunecli's choices: the same number of heads goes in every layer (``sparsity`` is the share
of heads removed; the paper ranks globally), which keeps it comparable to SHRP and the other
baselines; the layer-dropping setting (``drop_layers``) removes the layers with the lowest
sum of unnormalised head importance measured on the unpruned model.

Example:
    >>> prune(classifier, MichelConfig(sparsity=0.5), task=task)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunecli.config import TaskMethodConfig, register_method
from prunecli.engine import Plan
from prunecli.engine.select import selectable_groups
from prunecli.errors import DataError, InputError, UnsupportedModelError
from prunecli.graph import DependencyGraph
from prunecli.methods._heads import HeadSite, gated_heads, head_sites, lowest_layers
from prunecli.progress import Progress, resolve


@dataclasses.dataclass(frozen=True)
class MichelConfig(TaskMethodConfig):
    """Iterative gradient head importance (needs a labelled task).

    Args:
        sparsity: share of each layer's heads to remove (``0`` with ``drop_layers``).
        drop_layers / batch_size / max_length: see :class:`~prunecli.config.TaskMethodConfig`.
        iterations: pruning rounds, importance recomputed after each.
        batches: task batches per importance estimate.
    """

    method: ClassVar[str] = "michel"

    iterations: int = 3
    batches: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("iterations", "batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")


def normalise_per_layer(importance: Tensor) -> Tensor:
    """``I / ||I||_2`` (zeros stay zeros).

    Example:
        >>> normalise_per_layer(torch.tensor([3.0, 4.0])).tolist()
        [0.6, 0.8]
    """
    norm = importance.double().norm()
    return importance.double() / norm if norm > 0 else importance.double()


def head_importance(
    model: nn.Module, sites: list[HeadSite], task: Any, masks: list[Tensor], batches: int, batch_size: int
) -> list[Tensor]:
    """``E |dL/dxi_h|`` of every head (masked heads included, as if unmasked at ``xi = 0``)."""
    ref = next(model.parameters())
    gates = [m.to(device=ref.device, dtype=ref.dtype).clone().requires_grad_(True) for m in masks]
    index = {id(s): i for i, s in enumerate(sites)}
    total = [torch.zeros(s.num_heads, dtype=torch.float64) for s in sites]

    def transform(site: HeadSite, xh: Tensor, hidden: Tensor | None) -> Tensor:
        return xh * gates[index[id(site)]][:, None]

    model.eval()
    with gated_heads(model, sites, transform):
        for b, batch in enumerate(task.batches(batch_size)):
            if b >= batches:
                break
            out = model(
                input_ids=batch["input_ids"].to(ref.device),
                attention_mask=batch["attention_mask"].to(ref.device),
            )
            loss = nn.functional.cross_entropy(out.logits.float(), batch["labels"].to(ref.device))
            grads = torch.autograd.grad(loss, gates)
            for i, g in enumerate(grads):
                total[i] += g.detach().abs().double().cpu()
    n = max(1, min(batches, (len(task) + batch_size - 1) // batch_size))
    return [t / n for t in total]


@register_method(MichelConfig)
def prune_michel(
    model: nn.Module,
    graph: DependencyGraph,
    config: MichelConfig,
    calib: Tensor | None = None,
    progress: Progress | None = None,
    task: Any = None,
) -> Plan:
    """Iterative masking by gradient importance -> plan of the masked heads (or dropped layers)."""
    from prunecli.tasks import is_classifier

    if task is None:
        raise DataError("michel needs a labelled task", hint="pass --task FILE --label-field NAME")
    if not is_classifier(model):
        raise UnsupportedModelError(
            f"michel needs a sequence classifier, got {type(model).__name__}",
            hint="wrap the encoder with prunecli.tasks.as_classifier(model, labels)",
        )
    sites = head_sites(graph, [g for g in selectable_groups(graph, config.ignore) if g.kind == "heads"])
    masks = [torch.ones(s.num_heads) for s in sites]
    meta: dict[str, Any] = {"selection": "michel-iterative", "iterations": config.iterations}
    if config.drop_layers > 0:
        imp = head_importance(model, sites, task, masks, config.batches, config.batch_size)
        meta["drop_layers"] = lowest_layers(torch.stack([t.sum() for t in imp]), config.drop_layers)
        return Plan({}, fingerprint=graph.fingerprint, meta=meta)
    with resolve(progress).task("head importance (Michel et al.)", total=config.iterations) as bar:
        for it in range(1, config.iterations + 1):
            imp = head_importance(model, sites, task, masks, config.batches, config.batch_size)
            for i, s in enumerate(sites):
                target = min(
                    s.num_heads - 1, int(round(config.sparsity * s.num_heads * it / config.iterations))
                )
                score = normalise_per_layer(imp[i])
                score[masks[i] == 0] = -float("inf")  # already masked: stay masked
                done = int((masks[i] == 0).sum())
                if target > done:
                    masks[i][torch.argsort(score, stable=True)[done:target]] = 0
            bar.advance()
    removals = {
        s.group.name: [int(h) for h in torch.nonzero(masks[i] == 0).flatten()] for i, s in enumerate(sites)
    }
    return Plan(removals, fingerprint=graph.fingerprint, meta=meta)


prune_michel.needs_grad = True  # type: ignore[attr-defined]  # prunecli.api: do not wrap in no_grad
