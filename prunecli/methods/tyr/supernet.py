"""Týr's supernet (candidate blocks on disk) and the fitness evaluator.

Building (:func:`build`): the shared calibration runner runs layer-sequentially with pruned
propagation. When block ``l``'s statistics are complete (the augmented Gram matrix of the
input of every consumer projection), every level of every variable of the block is pruned
locally (:mod:`prunecli.methods.tyr.local`), its kept columns re-solved by least squares, and
written to ``<dir>/<variable>-<level>.safetensors`` (the removed units, each consumer's kept
columns and its bias change). Then the block is set to its *centre* level and rerun, so
block ``l + 1`` is measured on inputs that went through the earlier blocks at their expected
sparsity: the code's "median" form of expectation error accumulation (its weighted average
over all levels is left commented out there; we follow the code). Memory holds one block's
statistics at a time; the candidates live on disk.

Evaluating (:class:`Evaluator`): a candidate state is put into the model by writing each
consumer's level weights (removed columns zero, so the removed units contribute nothing:
exactly the pruned model's output) and adding each level's bias change with a hook. The
fitness is Týr's sparse KL: for every position, the dense model's ``k`` largest logits and
the candidate's logits at the same vocabulary entries are each normalised over those ``k``
entries, and ``KL(dense || candidate)`` is averaged over positions (the code's
``compute_sparse_kl_div``). The forward runs block by block from the runner's captured
inputs, starting at the first block where the candidate differs from the cached parent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prunecli.calibrate import Observe, Runner
from prunecli.calibrate.runner import Captured, block_index
from prunecli.engine.select import HeadLayout
from prunecli.graph import DependencyGraph
from prunecli.methods.tyr.local import augmented, greedy_path, head_scores
from prunecli.methods.tyr.search import State, Variable
from prunecli.progress import Progress
from prunecli.refit import OutputShifts, refit_columns


def _units(graph: DependencyGraph, var: Variable, consumer: str) -> list[list[int]]:
    for m in graph.groups[var.name].consumers():
        if m.module == consumer and m.dim == 1 and m.param.endswith(".weight"):
            return [list(ix) for ix in m.index]
    raise KeyError(consumer)


def level_path(directory: Path, index: int, level: int) -> Path:
    return directory / f"{index:04d}-{level:02d}.safetensors"


def candidates(
    model: nn.Module,
    graph: DependencyGraph,
    var: Variable,
    grams: dict[str, Tensor],
    round_size: int,
    damp: float,
) -> list[tuple[list[int], dict[str, tuple[Tensor, Tensor]], float]]:
    """Every level of ``var``: removed units, per consumer (kept-column weights, bias change),
    and the candidate's calibration reconstruction error relative to the dense output energy
    (summed over consumers)."""
    data = []
    for c in var.consumers:
        mod = model.get_submodule(c)
        data.append((augmented(mod.weight, mod.bias), grams[c], _units(graph, var, c)))
    g = graph.groups[var.name]
    if var.kind == "channels":
        counts = [g.num_units - int(k) for k in var.widths]
        path = greedy_path(data, counts, round_size, damp)
        removals = [path[g.num_units - int(k)] for k in var.widths]
    else:
        layout = HeadLayout(graph, g)
        scores = head_scores(data, damp)
        removals = []
        for layouts in var.widths:  # layouts of equal cost: keep the one with the smallest refitted error
            options = [layout.removal(scores, gr[0], gr[1]) for gr in layouts]
            removals.append(min(options, key=lambda rm: (_refit(model, var, data, rm, damp)[1], len(rm))))
    out = []
    energy = sum(float(((b.T @ gram.to(torch.float64)) * b.T).sum()) for b, gram, _ in data)
    for removed in removals:
        per, err = _refit(model, var, data, removed, damp)
        out.append((sorted(removed), per, err / energy if energy > 0 else 0.0))
    return out


def _refit(
    model: nn.Module, var: Variable, data: list[Any], removed: list[int], damp: float
) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """Refit every consumer of ``var`` without the ``removed`` units: per consumer (kept-column
    weights, bias change), and the summed calibration reconstruction error of the best choice."""
    per: dict[str, tuple[Tensor, Tensor]] = {}
    err = 0.0
    for c, (_, gram, units) in zip(var.consumers, data):
        mod = model.get_submodule(c)
        cols = _columns(units, removed)
        res = refit_columns(mod.weight, mod.bias, gram, cols, damp)
        err += min(res.error_refit, res.error_bias, res.error_removed)
        keep = [i for i in range(mod.weight.shape[1]) if i not in set(cols)]
        per[c] = (res.weight[:, keep].contiguous(), res.bias_delta.float().contiguous())
    return per, err


def _columns(units: list[list[int]], removed: list[int]) -> list[int]:
    """Sorted input columns owned by the ``removed`` units."""
    return sorted({i for u in removed for i in units[u]})


def write_level(
    model: nn.Module,
    graph: DependencyGraph,
    var: Variable,
    removed: list[int],
    per: dict[str, tuple[Tensor, Tensor]],
) -> None:
    """Write a candidate's kept-column weights into ``var``'s consumers (removed columns zero);
    the bias changes are the caller's (a hook during the search, the plan at the end)."""
    with torch.no_grad():
        for c, (w, _) in per.items():
            cols = _columns(_units(graph, var, c), removed)
            model.get_submodule(c).weight.copy_(full_weight(model, c, w, cols))


def full_weight(model: nn.Module, consumer: str, kept: Tensor, removed_cols: list[int]) -> Tensor:
    """The consumer's full-width weight with ``kept`` in the kept columns and zeros elsewhere."""
    w = model.get_submodule(consumer).weight
    out = torch.zeros_like(w)
    gone = set(removed_cols)
    keep = torch.tensor([i for i in range(w.shape[1]) if i not in gone], dtype=torch.long)
    out[:, keep.to(w.device)] = kept.to(device=w.device, dtype=w.dtype)
    return out


class BiasHooks:
    """Forward hooks adding a per-consumer output change (for consumers with or without a bias)."""

    def __init__(self, model: nn.Module, consumers: list[str]) -> None:
        self.deltas: dict[str, Tensor] = {}
        self.handles = []
        for c in consumers:
            mod = model.get_submodule(c)
            self.deltas[c] = torch.zeros(
                mod.weight.shape[0], dtype=mod.weight.dtype, device=mod.weight.device
            )
            self.handles.append(mod.register_forward_hook(lambda _m, _a, y, d=self.deltas[c]: y + d))

    def set(self, consumer: str, delta: Tensor) -> None:
        self.deltas[consumer].copy_(delta.to(self.deltas[consumer]))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def build(
    model: nn.Module,
    graph: DependencyGraph,
    variables: list[Variable],
    calib: Tensor,
    runner: Runner,
    directory: Path,
    *,
    obs_rounds: int,
    damp: float,
    progress: Progress | None = None,
) -> None:
    """Write every level of every variable to ``directory`` (see the module docstring)."""
    consumers = sorted({c for v in variables for c in v.consumers})
    requests = {c: Observe(c, "gram") for c in consumers}
    path = graph_block_path(model, consumers)
    by_block: dict[int, list[int]] = {}
    for i, v in enumerate(variables):
        by_block.setdefault(block_index(path, v.consumers[0]), []).append(i)
    shifts = OutputShifts()

    def after_block(j: int, _block: nn.Module, obs: dict[Observe, Any]) -> None:
        shifts.clear()
        for i in by_block.get(j, []):
            var = variables[i]
            grams = {c: obs[requests[c]].matrix for c in var.consumers}
            step = (
                abs(int(var.widths[0]) - int(var.widths[1]))
                if var.kind == "channels" and len(var.widths) > 1
                else 1
            )
            cands = candidates(model, graph, var, grams, max(1, math.ceil(step / obs_rounds)), damp)
            for level, (removed, per, rel) in enumerate(cands):
                tensors = {
                    "removed": torch.tensor(removed, dtype=torch.long),
                    "error": torch.tensor([rel], dtype=torch.float64),
                }
                for c, (w, b) in per.items():
                    tensors[f"{c}|weight"] = w.detach().cpu()
                    tensors[f"{c}|bias"] = b.detach().cpu()
                save_file(tensors, str(level_path(directory, i, level)))
            removed, per, _ = cands[var.center]  # expectation error accumulation: the centre level
            write_level(model, graph, var, removed, per)
            for c, (_, b) in per.items():
                shifts.add(model.get_submodule(c), b)

    try:
        runner.observe(
            model,
            list(requests.values()),
            calib,
            propagation="pruned",
            after_block=after_block,
            progress=progress,
            label="tyr supernet",
        )
    finally:
        shifts.clear()


def graph_block_path(model: nn.Module, modules: list[str]) -> str:
    from prunecli.calibrate.runner import block_list

    found = block_list(model, modules)
    if found is None:
        from prunecli.errors import UnsupportedModelError

        raise UnsupportedModelError("tyr needs the pruned projections inside the repeated blocks")
    return found[0]


def teacher_topk(runner: Runner, model: nn.Module, windows: Tensor, topk: int) -> list[tuple[Tensor, Tensor]]:
    """Per window: the dense model's top-``topk`` log-probabilities (normalised over the
    ``topk``) and their vocabulary ids, for every position but the last."""
    out: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for _, logits in runner.logits(model, windows):
            vals, idx = logits[:, :-1].float().topk(min(topk, logits.shape[-1]), dim=-1)
            logp = torch.log_softmax(vals, dim=-1)
            out += [(logp[r].cpu(), idx[r].to(torch.int32).cpu()) for r in range(logp.shape[0])]
    return out


class Evaluator:
    """Puts supernet states into the model and measures their sparse-KL fitness."""

    def __init__(
        self,
        model: nn.Module,
        graph: DependencyGraph,
        variables: list[Variable],
        directory: Path,
        runner: Runner,
    ) -> None:
        self.model, self.graph, self.variables, self.directory, self.runner = (
            model,
            graph,
            variables,
            directory,
            runner,
        )
        self.consumers = sorted({c for v in variables for c in v.consumers})
        self.original = {c: model.get_submodule(c).weight.detach().clone() for c in self.consumers}
        self.hooks = BiasHooks(model, self.consumers)
        self.applied: list[int | None] = [None] * len(variables)
        path = graph_block_path(model, self.consumers)
        self.block_of = [block_index(path, v.consumers[0]) for v in variables]

    def load(self, i: int, level: int) -> tuple[list[int], dict[str, tuple[Tensor, Tensor]]]:
        t = load_file(str(level_path(self.directory, i, level)))
        per = {c: (t[f"{c}|weight"], t[f"{c}|bias"]) for c in self.variables[i].consumers}
        return t["removed"].tolist(), per

    def errors(self) -> list[list[float]]:
        """Per variable and level: the candidate's relative calibration reconstruction error."""
        return [
            [
                float(load_file(str(level_path(self.directory, i, lv)))["error"][0])
                for lv in range(len(v.costs))
            ]
            for i, v in enumerate(self.variables)
        ]

    def set_state(self, state: State) -> None:
        for i, level in enumerate(state):
            if self.applied[i] == level:
                continue
            removed, per = self.load(i, level)
            write_level(self.model, self.graph, self.variables[i], removed, per)
            for c, (_, b) in per.items():
                self.hooks.set(c, b)
            self.applied[i] = level

    def reset(self) -> None:
        """Dense weights back, output changes zero (the hooks stay)."""
        with torch.no_grad():
            for c, w in self.original.items():
                self.model.get_submodule(c).weight.copy_(w)
            for d in self.hooks.deltas.values():
                d.zero_()
        self.applied = [None] * len(self.variables)

    def restore(self) -> None:
        """Dense weights back, hooks off."""
        self.hooks.remove()
        with torch.no_grad():
            for c, w in self.original.items():
                self.model.get_submodule(c).weight.copy_(w)
        self.applied = [None] * len(self.variables)

    # ------------------------------------------------------------------ fitness
    def tokens(self, windows: Tensor, teacher: list[tuple[Tensor, Tensor]]) -> TokenSet:
        """Capture the block inputs of ``windows``; ``teacher`` holds their rows of :func:`teacher_topk`."""
        cap = self.runner.capture(self.model, windows)
        per_batch, at = [], 0
        for _, ids in cap.batches:
            rows = teacher[at : at + ids.shape[0]]
            at += ids.shape[0]
            per_batch.append((torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]).long()))
        return TokenSet(cap, per_batch, int(windows.numel()))

    def put(self, weights: dict[str, Tensor], deltas: dict[str, Tensor]) -> None:
        """Write explicit full-width consumer weights and output changes (not supernet levels);
        ``fitness(ts, None)`` then measures them, and the next state rewrites every block."""
        with torch.no_grad():
            for c in self.consumers:
                mod = self.model.get_submodule(c)
                if c in weights:
                    mod.weight.copy_(weights[c].to(mod.weight))
                self.hooks.set(c, deltas.get(c, torch.zeros(mod.weight.shape[0])))
        self.applied = [None] * len(self.variables)

    def fitness(
        self, ts: TokenSet, state: State | None, cache: PrefixCache | None = None, keep: bool = False
    ) -> tuple[float, PrefixCache | None]:
        """Sparse KL of ``state`` on ``ts`` (``None``: of the weights in the model now, see
        :meth:`put`); with ``cache`` the blocks before the first change are skipped; with
        ``keep`` the per-block inputs are returned as a new cache."""
        if state is not None:
            self.set_state(state)
        elif cache is not None or keep:
            raise ValueError("a prefix cache needs a supernet state")
        start = 0
        hidden = ts.cap.hidden
        if cache is not None and state is not None:
            diff = [self.block_of[i] for i, (a, b) in enumerate(zip(state, cache.state)) if a != b]
            start = min(diff) if diff else len(ts.cap.blocks)
            hidden = cache.inputs[start]
        inputs: list[list[Tensor]] = (
            list(cache.inputs[: start + 1]) if (keep and cache is not None) else [hidden]
        )
        total, count = 0.0, 0
        with torch.no_grad():
            for j in range(start, len(ts.cap.blocks)):
                hidden = [
                    self.runner.run_block(ts.cap.blocks[j], x, ts.cap.extra[j][b])
                    for b, x in enumerate(hidden)
                ]
                if keep:
                    inputs.append(hidden)
            for b, (_, ids) in enumerate(ts.cap.batches):
                logits = self.runner.head(self.model, ts.cap, ids, hidden[b])[:, :-1].float()
                t_logp, idx = ts.teacher[b]
                t_logp, idx = t_logp.to(logits.device), idx.to(logits.device)
                s_logp = torch.log_softmax(logits.gather(-1, idx), dim=-1)
                kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
                total += float(kl.double().sum())
                count += kl.numel()
        value = total / max(1, count)
        if not math.isfinite(value):
            value = math.inf
        return value, (PrefixCache(tuple(state), inputs) if keep and state is not None else None)


class TokenSet:
    """Captured block inputs of some windows and the dense model's top-k log-probabilities."""

    def __init__(self, cap: Captured, teacher: list[tuple[Tensor, Tensor]], tokens: int) -> None:
        self.cap, self.teacher, self.tokens = cap, teacher, tokens


class PrefixCache:
    """A state and the inputs of every block (``inputs[j]``: per batch) it produced."""

    def __init__(self, state: State, inputs: list[list[Tensor]]) -> None:
        self.state, self.inputs = state, inputs
