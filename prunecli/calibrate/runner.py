"""The calibration runner: every method's forward passes over the calibration windows.

A method declares what it observes as a list of :class:`Observe` requests (the input or
output of a module, or a block's input against its output, and which statistic), and the
runner returns one accumulator per request (:mod:`prunecli.calibrate.stats`). The runner
owns batching, stopping, devices and the execution mode; methods never register hooks.

Modes (:attr:`Runner.mode`):

- ``whole``: the model runs ``model(input_ids=batch)`` on each mini-batch with hooks on the
  observed modules; the pass is cut short after the last block holding an observed module,
  so later layers, the final norm and the LM head are never computed.
- ``sequential`` (layer-sequential): the inputs of the first block (hidden states and the
  keyword arguments each block receives: masks, rotary tables, per-layer-type variants) are
  captured once with the blocks replaced by recorders; then each block in turn is brought in
  (from the safetensors files when its weights are offloaded), every batch runs through it,
  its statistics are updated, and its outputs become the next block's inputs. Only one block's
  weights and two copies of the calibration hidden states are ever resident.

Propagation (``propagation=``): ``dense`` (each block sees the dense outputs of the block
before; FLAP and CFSP define their statistics so) or ``pruned`` (after a block's statistics are
complete the method's ``after_block`` callback may change the block, e.g. zero the units it
chose, and the block is rerun to produce the inputs of the next one; the wanda-sp reference).
Pruned propagation always runs layer-sequentially. The block's weights are restored after it
has produced its outputs, so the model is left as it came.

Dense ``sequential`` computes exactly what ``whole`` computes: the same batches go through the
same blocks with the same arguments, so the statistics, and therefore the plans, are equal.

Data parallel: when ``torch.distributed`` is initialised with more than one process, each
rank runs every ``world``-th mini-batch, and the summaries are gathered and merged in rank
order before anyone reads them (:mod:`prunecli.calibrate.distributed`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.calibrate import distributed
from prunecli.calibrate.offload import has_meta_tensors, main_block_list
from prunecli.calibrate.stats import STATISTICS, Accumulator
from prunecli.errors import DataError, InputError, UnsupportedModelError
from prunecli.progress import Progress, resolve

#: tokens per calibration mini-batch (windows per batch = max(1, batch_tokens // seqlen))
BATCH_TOKENS = 8192
MODES = ("whole", "sequential")
PROPAGATION = ("dense", "pruned")
SITES = ("input", "output", "block", "moe")


class StopForward(Exception):
    """Raised by a hook after the last observed block, to skip the rest of the model."""


@dataclasses.dataclass(frozen=True)
class Observe:
    """One thing a method wants measured over the calibration tokens.

    Args:
        module: qualified module name (``model.layers.3.mlp.down_proj``; for ``site="block"``
            the block itself, ``model.layers.3``).
        stat: ``moments`` (:class:`~prunecli.calibrate.stats.ChannelStats`), ``sumsq``
            (:class:`~prunecli.calibrate.stats.SumSquares`), ``angular``
            (:class:`~prunecli.calibrate.stats.AngularDistance`, ``site="block"`` only) or
            ``experts`` (:class:`~prunecli.calibrate.stats.ExpertStats`, ``site="moe"`` only).
        site: ``input`` (the first argument of the module's forward), ``output`` (its first
            output tensor), ``block`` (the module's input hidden states against its output) or
            ``moe`` (a Mixture-of-Experts block: its router's choices and weights, each routed
            expert's output norm, and each token's contribution, :mod:`prunecli.calibrate.moe`).
    """

    module: str
    stat: str = "moments"
    site: str = "input"

    def __post_init__(self) -> None:
        if self.stat not in STATISTICS:
            raise InputError(f"unknown statistic {self.stat!r}", hint=f"choose one of {sorted(STATISTICS)}")
        if self.site not in SITES:
            raise InputError(f"unknown observation site {self.site!r}", hint=f"choose one of {SITES}")
        if (self.stat == "angular") != (self.site == "block"):
            raise InputError("the angular statistic compares a block's input and output: use site='block'")
        if (self.stat == "experts") != (self.site == "moe"):
            raise InputError("the experts statistic observes a Mixture-of-Experts block: use site='moe'")


AfterBlock = Callable[[int, nn.Module, dict[Observe, Accumulator]], None]


def first_tensor(x: Any) -> Tensor:
    """The hidden states in a module's output (a tensor, a tuple starting with one, or a ModelOutput)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state") and isinstance(x.last_hidden_state, Tensor):
        return x.last_hidden_state
    raise UnsupportedModelError(f"cannot find the hidden states in a block output of type {type(x).__name__}")


def _input_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    raise UnsupportedModelError("an observed module was called without a tensor input")


def check_windows(calib: Any) -> Tensor:
    """``calib`` as a LongTensor ``[n, seqlen]`` or a :class:`DataError`."""
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise DataError(
            "calibration data must be a non-empty 2-D LongTensor of token windows [n, seqlen]",
            hint="pass calib=calibration_windows(...) or --calib FILE to the CLI",
        )
    if calib.dtype not in (torch.int64, torch.int32):
        raise DataError(f"calibration windows must hold token ids, got dtype {calib.dtype}")
    return calib.long()


def block_list(model: nn.Module, modules: Sequence[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``ModuleList`` of repeated blocks whose entries hold every module in ``modules``.

    No attribute name (``model.layers``, ``encoder.layer``) is assumed.

    Returns:
        ``(qualified name, list)``, or ``None`` when no list holds them all.
    """
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or not len(mod):
            continue
        for m in modules:
            rest = m[len(name) + 1 :] if name and m.startswith(name + ".") else (m if not name else "")
            head = rest.split(".", 1)[0]
            if not head.isdigit() or int(head) >= len(mod):
                break
        else:
            return name, mod
    return None


def block_index(path: str, module: str) -> int:
    """Index of the block of ``path`` (a ModuleList's name) that holds ``module``."""
    rest = module[len(path) + 1 :] if path else module
    return int(rest.split(".", 1)[0])


def stop_module(model: nn.Module, modules: set[str]) -> nn.Module | None:
    """The block after which no observed module runs (``None`` when they are not all in blocks)."""
    found = block_list(model, sorted(modules))
    if found is None or not modules:
        return None
    path, blocks = found
    return blocks[max(block_index(path, m) for m in modules)]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter that is not on the meta device."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


@dataclasses.dataclass
class Captured:
    """What :meth:`Runner.capture` recorded for a set of windows.

    Attributes:
        path: qualified name of the block list (``model.layers``).
        blocks: the block list.
        batches: ``(batch number, windows)`` per mini-batch.
        hidden: the first block's input hidden states, per mini-batch.
        extra: ``extra[j][b]``: block ``j``'s other positional and keyword arguments for batch ``b``.
    """

    path: str
    blocks: nn.ModuleList
    batches: list[tuple[int, Tensor]]
    hidden: list[Tensor]
    extra: list[list[tuple[tuple[Any, ...], dict[str, Any]]]]

    def block_name(self, j: int) -> str:
        return f"{self.path}.{j}" if self.path else str(j)


@dataclasses.dataclass
class Runner:
    """Runs calibration windows through a model and gathers what methods observe.

    Args:
        mode: ``whole`` or ``sequential`` (see the module docstring).
        batch_tokens: tokens per mini-batch; ``max(1, batch_tokens // seqlen)`` windows.
        device: compute device (``None``: the model's).
        weights: where offloaded block weights come from
            (:class:`prunecli.calibrate.offload.OffloadedWeights`); ``None`` when the whole
            model is in memory. Offloaded models always run layer-sequentially.
        distributed: split the batches over the ``torch.distributed`` ranks when a process
            group with more than one process is initialised.

    Example:
        >>> runner = Runner(mode="sequential")                                  # doctest: +SKIP
        >>> obs = runner.observe(model, [Observe("model.layers.0.mlp.down_proj")], windows)  # doctest: +SKIP
        >>> obs[Observe("model.layers.0.mlp.down_proj")].var.shape              # doctest: +SKIP
    """

    mode: str = "whole"
    batch_tokens: int = BATCH_TOKENS
    device: torch.device | str | None = None
    weights: Any = None
    distributed: bool = True
    #: filled by :meth:`observe`: forward passes run, per mode (for reports and tests)
    log: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown calibration mode {self.mode!r}", hint=f"choose one of {MODES}")
        if int(self.batch_tokens) < 1:
            raise InputError(f"batch_tokens must be at least 1, got {self.batch_tokens}")

    # ------------------------------------------------------------------ public
    def tensor(self, model: nn.Module, name: str) -> Tensor:
        """The value of parameter or buffer ``name``, read from the offloaded files if needed."""
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        t = getattr(mod, leaf)
        if isinstance(t, Tensor) and t.device.type == "meta":
            if self.weights is None:
                raise UnsupportedModelError(
                    f"{name} is on the meta device and no offloaded weights are known"
                )
            return self.weights.tensor(name)
        return t

    def tensors(self, model: nn.Module) -> _TensorView:
        """A read-only mapping ``name -> tensor`` over :meth:`tensor` (offloaded ones read lazily)."""
        return _TensorView(self, model)

    @contextmanager
    def materialized(self, model: nn.Module, path: str) -> Iterator[nn.Module]:
        """The module ``path`` with its weights in memory for the duration of the block."""
        mod = model.get_submodule(path) if path else model
        if self.weights is None or not has_meta_tensors(mod):
            yield mod
            return
        with self.weights.loaded(model, path, device=self._device(model)):
            yield mod

    def observe(
        self,
        model: nn.Module,
        requests: Sequence[Observe],
        calib: Tensor,
        *,
        propagation: str = "dense",
        after_block: AfterBlock | None = None,
        progress: Progress | None = None,
        label: str = "calibration",
    ) -> dict[Observe, Accumulator]:
        """Run ``calib`` through ``model`` and return one accumulator per request.

        Args:
            model: the model (put in eval mode for the pass; its weights are not changed).
            requests: what to observe.
            calib: token windows ``[n, seqlen]``.
            propagation: ``dense`` or ``pruned`` (see the module docstring).
            after_block: with ``pruned``, called as ``after_block(index, block, observations)``
                once a block's statistics are complete (merged across ranks); it may modify
                the block, whose outputs are then recomputed for the next block.
            progress: progress reporter.
            label: progress description.

        Returns:
            request -> accumulator, every one with at least one observed token.

        Raises:
            DataError: ``calib`` is not a 2-D tensor of token ids.
            UnsupportedModelError: an observed module never ran, or layer-sequential mode
                was asked for modules outside the repeated blocks.
        """
        calib = check_windows(calib)
        requests = list(dict.fromkeys(requests))
        if not requests:
            return {}
        if propagation not in PROPAGATION:
            raise InputError(f"unknown propagation {propagation!r}", hint=f"choose one of {PROPAGATION}")
        if propagation == "pruned" and after_block is None:
            raise InputError("pruned propagation needs an after_block callback")
        names = dict(model.named_modules())
        unknown = [r.module for r in requests if r.module not in names]
        if unknown:
            raise UnsupportedModelError(f"the model has no module {unknown[0]!r} to observe")
        sequential = self.mode == "sequential" or propagation == "pruned" or self.weights is not None
        obs = {r: STATISTICS[r.stat]() for r in requests}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if sequential:
                    self._sequential(model, requests, obs, calib, propagation, after_block, progress, label)
                else:
                    self._whole(model, requests, obs, calib, progress, label)
        finally:
            model.train(was_training)
        if not sequential and self.distributed:
            distributed.reduce(obs, self._device(model))
        missing = [r.module for r, acc in obs.items() if acc.count == 0]
        if missing:
            raise UnsupportedModelError(
                f"the calibration pass never reached {missing[0]}",
                hint="the module is not called by model(input_ids=...); add it to --ignore",
            )
        return obs

    def logits(
        self, model: nn.Module, windows: Tensor, *, progress: Progress | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(ids, logits)`` per mini-batch of ``windows``, the blocks run one at a time.

        For a model whose blocks are offloaded: the hidden states go through every block
        layer-sequentially (each block read from the files once), then the model's own forward
        runs once more per batch with its blocks replaced by pass-throughs, the last one
        returning the final hidden states, so the final norm and the head are the model's own
        code. Every process computes all windows (no data parallelism).
        """
        seq = dataclasses.replace(self, distributed=False, log=[])
        with torch.no_grad():
            cap = seq.capture(model, windows)
            hidden = cap.hidden
            with resolve(progress).task("forward (layer by layer)", total=len(cap.blocks)) as task:
                for j in range(len(cap.blocks)):
                    with seq.materialized(model, cap.block_name(j)) as block:
                        hidden = [seq.run_block(block, x, cap.extra[j][b]) for b, x in enumerate(hidden)]
                    task.advance()
            for b, (_, ids) in enumerate(cap.batches):
                yield ids, seq.head(model, cap, ids, hidden[b])

    def capture(self, model: nn.Module, windows: Tensor) -> Captured:
        """The inputs of the first block and every block's other arguments, per mini-batch.

        With :meth:`run_block` and :meth:`head` this is a forward pass that a method can start
        at any block (e.g. from cached hidden states) and whose blocks it may change between
        passes. Uses all windows on every process.
        """
        windows = check_windows(windows)
        path, blocks = main_block_list(model)
        last = len(blocks) - 1
        seq = dataclasses.replace(self, distributed=False, log=[])
        batches = seq.batches(windows)
        with torch.no_grad():
            hidden, extra = seq._capture(model, blocks, last, batches)
        return Captured(path=path, blocks=blocks, batches=batches, hidden=hidden, extra=extra)

    def run_block(self, block: nn.Module, x: Tensor, call: tuple[tuple[Any, ...], dict[str, Any]]) -> Tensor:
        """``block``'s output hidden states for input ``x`` and its captured arguments ``call``."""
        return self._run_block(block, x, call)

    def head(self, model: nn.Module, cap: Captured, ids: Tensor, hidden: Tensor) -> Tensor:
        """Logits of the model's own final norm and head on the last block's output ``hidden``.

        The model's forward runs with every block replaced by a pass-through (the last one
        returning ``hidden``), so whatever the model does after its blocks is its own code.
        """
        last = len(cap.blocks) - 1
        passes: dict[int, Callable[..., Any]] = {j: _pass_through for j in range(last)}
        passes[last] = lambda *_a, _h=hidden, **_k: _h
        with torch.no_grad(), _forwards(cap.blocks, passes):
            out = model(input_ids=ids.to(self._device(model)), **_forward_kwargs(model))
        return out.logits if hasattr(out, "logits") else first_tensor(out)

    # ------------------------------------------------------------------ helpers
    def _device(self, model: nn.Module) -> torch.device:
        return torch.device(self.device) if self.device is not None else model_device(model)

    def batches(self, calib: Tensor) -> list[tuple[int, Tensor]]:
        """This rank's mini-batches as ``(batch number, windows)``.

        Batches are cut the same way whatever the number of processes (``batch_tokens //
        seqlen`` windows each) and dealt round-robin to the ranks, so every window meets the
        same neighbours in every run and the per-batch arithmetic is identical.
        """
        n, seqlen = calib.shape
        bw = max(1, int(self.batch_tokens) // seqlen)
        rank, world = distributed.rank_world() if self.distributed else (0, 1)
        cut = [(b, calib[i : i + bw]) for b, i in enumerate(range(0, n, bw))]
        return [(b, x) for b, x in cut if b % world == rank]

    @staticmethod
    def _hook(module: nn.Module, reqs: list[Observe], obs: dict[Observe, Accumulator]) -> list[Any]:
        handles = []
        inputs = [r for r in reqs if r.site == "input"]
        outputs = [r for r in reqs if r.site == "output"]
        blocks = [r for r in reqs if r.site == "block"]
        if inputs:

            def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                x = _input_tensor(args, kwargs)
                for r in inputs:
                    obs[r].update(x)  # type: ignore[attr-defined]

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if outputs or blocks:

            def post(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
                y = first_tensor(out)
                for r in outputs:
                    obs[r].update(y)  # type: ignore[attr-defined]
                if blocks:
                    x = _input_tensor(args, kwargs)
                    for r in blocks:
                        obs[r].update(x, y)  # type: ignore[attr-defined]

            handles.append(module.register_forward_hook(post, with_kwargs=True))
        return handles

    def _whole(
        self,
        model: nn.Module,
        requests: list[Observe],
        obs: dict[Observe, Accumulator],
        calib: Tensor,
        progress: Progress | None,
        label: str,
    ) -> None:
        by_module: dict[str, list[Observe]] = {}
        for r in requests:
            by_module.setdefault(r.module, []).append(r)
        handles = []
        try:
            for name, reqs in by_module.items():
                handles += self._hook(model.get_submodule(name), reqs, obs)
                handles += _moe_hooks(model, name, reqs, obs)
            stop = stop_module(model, set(by_module))
            if stop is not None:

                def halt(_m: nn.Module, _a: Any, _o: Any) -> None:
                    raise StopForward

                handles.append(stop.register_forward_hook(halt))
            device = self._device(model)
            kwargs = _forward_kwargs(model)
            batches = self.batches(calib)
            with resolve(progress).task(label, total=len(batches)) as task:
                for _, ids in batches:
                    try:
                        model(input_ids=ids.to(device), **kwargs)
                    except StopForward:
                        pass
                    task.advance()
            self.log.append({"mode": "whole", "batches": len(batches), "block_passes": 0})
        finally:
            for h in handles:
                h.remove()

    def _capture(
        self, model: nn.Module, blocks: nn.ModuleList, last: int, batches: list[tuple[int, Tensor]]
    ) -> tuple[list[Tensor], list[list[tuple[tuple[Any, ...], dict[str, Any]]]]]:
        """First-block hidden states per batch, and every block's other arguments per batch."""
        hidden: list[Tensor] = []
        extra: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in range(last + 1)]

        def recorder(j: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if args:
                    x, rest = args[0], tuple(args[1:])
                else:
                    kwargs = dict(kwargs)
                    x, rest = kwargs.pop("hidden_states"), ()
                if j == 0:
                    hidden.append(x)
                extra[j].append((rest, kwargs))
                if j == last:
                    raise StopForward
                return x

            return forward

        device = self._device(model)
        kwargs = _forward_kwargs(model)
        with _forwards(blocks, {j: recorder(j) for j in range(last + 1)}):
            for _, ids in batches:
                try:
                    model(input_ids=ids.to(device), **kwargs)
                except StopForward:
                    pass
        if len(hidden) != len(batches) or any(len(e) != len(batches) for e in extra):
            raise UnsupportedModelError(
                "layer-sequential calibration could not capture the inputs of every block "
                "(the model does not call its blocks once per forward pass, in order)",
                hint="use whole-model calibration (drop --sequential / raise --max-memory)",
            )
        return hidden, extra

    def _sequential(
        self,
        model: nn.Module,
        requests: list[Observe],
        obs: dict[Observe, Accumulator],
        calib: Tensor,
        propagation: str,
        after_block: AfterBlock | None,
        progress: Progress | None,
        label: str,
    ) -> None:
        found = block_list(model, [r.module for r in requests])
        if found is None:
            raise UnsupportedModelError(
                "layer-sequential calibration needs every observed module inside the repeated "
                f"blocks, and {requests[0].module} is not",
                hint="use whole-model calibration (drop --sequential / raise --max-memory)",
            )
        path, blocks = found
        per_block: dict[int, list[Observe]] = {}
        for r in requests:
            per_block.setdefault(block_index(path, r.module), []).append(r)
        last = max(per_block)
        batches = self.batches(calib)
        hidden, extra = self._capture(model, blocks, last, batches)
        passes = 0
        with resolve(progress).task(f"{label} (layer by layer)", total=last + 1) as task:
            for j in range(last + 1):
                reqs = per_block.get(j, [])
                with self.materialized(model, f"{path}.{j}" if path else str(j)) as block:
                    handles = []
                    for name in dict.fromkeys(r.module for r in reqs):
                        mine = [r for r in reqs if r.module == name]
                        handles += self._hook(model.get_submodule(name), mine, obs)
                        handles += _moe_hooks(model, name, mine, obs)
                    try:
                        outs = [self._run_block(block, x, extra[j][b]) for b, x in enumerate(hidden)]
                    finally:
                        for h in handles:
                            h.remove()
                    passes += 1
                    if self.distributed:
                        merged = {r: obs[r] for r in reqs}
                        distributed.reduce(merged, self._device(model))  # replaces `merged`'s entries
                        obs.update(merged)
                    if propagation == "pruned" and j < last:
                        assert after_block is not None
                        with _restored(block):
                            after_block(j, block, obs)
                            outs = [self._run_block(block, x, extra[j][b]) for b, x in enumerate(hidden)]
                        passes += 1
                    elif propagation == "pruned":
                        assert after_block is not None
                        with _restored(block):
                            after_block(j, block, obs)
                hidden = outs
                task.advance()
        self.log.append({"mode": "sequential", "batches": len(batches), "block_passes": passes})

    @staticmethod
    def _run_block(block: nn.Module, x: Tensor, call: tuple[tuple[Any, ...], dict[str, Any]]) -> Tensor:
        args, kwargs = call
        out = first_tensor(block(x, *args, **kwargs))
        if out.shape != x.shape:
            raise UnsupportedModelError(
                f"a block changed the hidden-state shape from {tuple(x.shape)} to {tuple(out.shape)}",
                hint="use whole-model calibration (drop --sequential / raise --max-memory)",
            )
        return out


def _moe_hooks(
    model: nn.Module, name: str, reqs: list[Observe], obs: dict[Observe, Accumulator]
) -> list[Any]:
    """Hooks for ``site="moe"`` requests on the MoE block ``name``.

    Three hooks fire in order within one forward of the layer: the experts module's
    (routed experts, router weights, ``c = g·‖E(h)‖₂``, routed output ``y``), the MoE
    block's (its output) and the layer's (``x = layer output − block output``, then
    ``s = max(0, 1 − cos(x, x + y))`` and the accumulator update).
    """
    reqs = [r for r in reqs if r.site == "moe"]
    if not reqs:
        return []
    from prunecli.calibrate.moe import expert_outputs, token_contribution
    from prunecli.graph.experts import find_moe_sites

    site = next((s for s in find_moe_sites(model) if s.block == name), None)
    found = block_list(model, [name])
    if site is None or found is None:
        raise UnsupportedModelError(
            f"{name} is not a Mixture-of-Experts block with fused experts inside a repeated layer"
        )
    path, blocks = found
    layer = blocks[block_index(path, name)]
    experts = model.get_submodule(site.experts)
    state: dict[str, Tensor] = {}

    def on_experts(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        vals = list(args) + [kwargs[k] for k in ("top_k_index", "top_k_weights") if k in kwargs]
        h, index, weights = vals[0], vals[1], vals[2]
        norms = torch.linalg.vector_norm(expert_outputs(experts, h, index).float(), dim=-1)
        state.update(index=index, c=weights.float() * norms, y=first_tensor(out).reshape(h.shape))

    def on_block(_m: nn.Module, _a: Any, out: Any) -> None:
        state["block"] = first_tensor(out)

    def on_layer(_m: nn.Module, _a: Any, out: Any) -> None:
        if "block" not in state or "y" not in state:
            return
        z = first_tensor(out)
        x = (z - state.pop("block")).reshape(-1, z.shape[-1])
        s = token_contribution(x, state.pop("y"))
        for r in reqs:
            obs[r].update(state["index"], state["c"], s, site.num_experts)  # type: ignore[attr-defined]

    return [
        experts.register_forward_hook(on_experts, with_kwargs=True),
        model.get_submodule(name).register_forward_hook(on_block),
        layer.register_forward_hook(on_layer),
    ]


class _TensorView:
    """``view[name]`` is ``runner.tensor(model, name)``."""

    def __init__(self, runner: Runner, model: nn.Module) -> None:
        self._runner, self._model = runner, model

    def __getitem__(self, name: str) -> Tensor:
        return self._runner.tensor(self._model, name)


def _pass_through(*args: Any, **kwargs: Any) -> Any:
    """A block's forward that returns its input hidden states unchanged."""
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _forwards(blocks: nn.ModuleList, fns: dict[int, Callable[..., Any]]) -> Iterator[None]:
    """Run the body with ``blocks[j].forward`` replaced by ``fns[j]`` (an instance attribute
    shadows the class method), and the real forwards back afterwards."""
    try:
        for j, fn in fns.items():
            blocks[j].forward = fn
        yield
    finally:
        for j in fns:
            blocks[j].__dict__.pop("forward", None)


@contextmanager
def _restored(block: nn.Module) -> Iterator[None]:
    """Put back every parameter and buffer value of ``block`` that the body changes in place."""
    saved = {
        k: v.detach().clone() for k, v in block.state_dict(keep_vars=True).items() if v.device.type != "meta"
    }
    try:
        yield
    finally:
        live = block.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in saved.items():
                if k in live and live[k].shape == v.shape:
                    live[k].copy_(v)
