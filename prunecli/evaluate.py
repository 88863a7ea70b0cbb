"""Evaluation of a causal LM: perplexity, parameter counts, prefill throughput.

Perplexity follows the standard protocol on non-overlapping windows (see
:func:`prunecli.data.eval_windows`): within each window, token ``t`` is predicted from tokens
``0..t-1``; the perplexity is ``exp(sum of NLLs / number of predicted tokens)`` over all
windows, with the sum taken in float64 so that it does not depend on the batch size.

Example:
    >>> from prunecli.evaluate import evaluate
    >>> windows = eval_windows(tok, "persuasion.txt", seqlen=512, max_windows=16)  # doctest: +SKIP
    >>> report = evaluate(model, windows)  # doctest: +SKIP
    >>> report["perplexity"], report["params"], report["tokens_per_s"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunecli.errors import InputError
from prunecli.progress import Progress, resolve

__all__ = ["count_parameters", "evaluate", "parameter_breakdown", "perplexity", "throughput"]

BREAKDOWN_KINDS = ("embedding", "attention", "mlp", "norm", "lm_head", "other")
# Lower-cased class-name fragments that give a module's role (nearest matching module wins).
_NORM = ("norm",)
_EMBEDDING = ("embedding",)
_ATTENTION = ("attention", "attn")
_MLP = ("mlp", "feedforward", "ffn", "intermediate", "expert", "moe")


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: Progress | None = None,
    runner: Any = None,
) -> float:
    """Causal-LM perplexity over token windows.

    Args:
        model: a causal LM whose forward takes ``input_ids`` and ``use_cache`` and returns
            logits ``[B, T, vocab]`` (``.logits`` or the first output).
        windows: ``LongTensor [n, seqlen]``, ``seqlen >= 2``; each window predicts its tokens
            ``1..seqlen-1`` from its own prefix.
        batch_size: windows per forward pass; the result does not depend on it.
        progress: reports one step per batch.
        runner: a :class:`prunecli.calibrate.Runner` with offloaded weights: the model's blocks
            are then run one at a time (:meth:`~prunecli.calibrate.Runner.logits`), for a model
            that is never whole in memory.

    Returns:
        ``exp(total NLL / total predicted tokens)``; the model is put in eval mode for the call
        and its training flag restored afterwards.
    """
    _check_windows(windows)
    _check_positive("batch_size", batch_size)
    n, seqlen = windows.shape
    total_nll = torch.zeros((), dtype=torch.float64)
    with _eval_mode(model), torch.inference_mode():
        for ids, logits in _batch_logits(model, windows, batch_size, runner, progress):
            total_nll += next_token_nll(logits, ids).cpu()
            del logits
    return math.exp(total_nll.item() / (n * (seqlen - 1)))


# Positions (summed over the batch) whose logits are upcast to float32 at a time: a float32 copy
# of a whole window's logits is 512 x 262,144 x 4 bytes = 512 MiB on Gemma 3 (bfloat16 or not).
NLL_CHUNK_TOKENS = 128


def next_token_nll(
    logits: torch.Tensor, ids: torch.Tensor, chunk_tokens: int = NLL_CHUNK_TOKENS
) -> torch.Tensor:
    """Summed next-token negative log-likelihood of a batch, in float64.

    ``-sum_{b, t < T-1} log softmax(logits[b, t])[ids[b, t + 1]]``, computed in float32 on
    slices of about ``chunk_tokens`` positions, so that the float32 copy of the logits (and
    cross-entropy's own buffers) is per slice, not per batch.

    Args:
        logits: ``[B, T, vocab]`` in any floating dtype.
        ids: ``[B, T]`` token ids on the same device.
        chunk_tokens: positions (times batch rows) per slice.

    Returns:
        A float64 scalar tensor on the logits' device.
    """
    b, t, vocab = logits.shape
    targets = ids[:, 1:]  # (B, T - 1)
    step = max(1, chunk_tokens // max(1, b))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, t - 1, step):
        stop = min(start + step, t - 1)
        nll = F.cross_entropy(
            logits[:, start:stop].reshape(-1, vocab).float(),
            targets[:, start:stop].reshape(-1),
            reduction="none",
        )  # (B * (stop - start),)
        total += nll.double().sum()
    return total


def _batch_logits(
    model: nn.Module, windows: torch.Tensor, batch_size: int, runner: Any, progress: Progress | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, logits)`` per batch, ids on the logits' device: the whole model, or an offloaded
    one layer by layer through ``runner`` (which batches by its own token budget)."""
    if runner is not None and getattr(runner, "weights", None) is not None:
        for ids, logits in runner.logits(model, windows.long(), progress=progress):
            yield ids.to(logits.device), logits
        return
    device = _device(model)
    with resolve(progress).task("perplexity", total=math.ceil(windows.shape[0] / batch_size)) as task:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device, torch.long)  # (B, T)
            yield ids, _logits(model, ids)  # (B, T, V)
            task.advance()


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, each shared (tied) tensor counted once.

    Args:
        model: any module.
    """
    return sum(p.numel() for _, p in _unique_parameters(model))


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameter counts by role: embedding, attention, mlp, norm, lm_head, other.

    A parameter's role is that of the nearest module, from its owner upwards, whose class name
    says it: ``*Norm*`` -> norm, ``*Embedding*`` (or ``nn.Embedding``) -> embedding,
    ``*Attention*``/``*Attn*`` -> attention, ``*MLP*``/``*FeedForward*``/``*FFN*``/
    ``*Intermediate*``/``*Expert*``/``*MoE*`` -> mlp; whole-model containers (modules with
    ``get_input_embeddings``) carry no role. The module returned by
    ``model.get_output_embeddings()`` is lm_head (when tied to the input embedding, its weight is
    counted once, as embedding). Remaining parameters inside a transformer block (a module with
    an attention module as a direct child, e.g. BERT's output projection) are mlp; everything
    else is other. The values sum to :func:`count_parameters`.

    Args:
        model: any module.

    Returns:
        ``{kind: count}`` with every kind present (zero when absent).
    """
    modules = dict(model.named_modules())
    output_embeddings = _output_embeddings(model)
    kinds = {name: _kind_from_class(module) for name, module in modules.items()}
    # Transformer blocks: parents of attention modules (never the whole model).
    blocks = {name.rpartition(".")[0] for name, kind in kinds.items() if kind == "attention"} - {""}
    breakdown = dict.fromkeys(BREAKDOWN_KINDS, 0)
    for name, param in _unique_parameters(model):
        owner = name.rpartition(".")[0]
        if output_embeddings is not None and modules[owner] is output_embeddings:
            kind = "lm_head"
        else:
            chain = _ancestors(owner)  # owner first, root last
            kind = next((kinds[n] for n in chain if kinds[n] is not None), None)
            if kind is None:
                kind = "mlp" if any(n in blocks for n in chain) else "other"
        breakdown[kind] += param.numel()
    return breakdown


def throughput(
    model: nn.Module,
    *,
    seqlen: int = 512,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill throughput: timed full forward passes on random token ids.

    Args:
        model: a causal LM (its vocabulary size is read from ``config.vocab_size`` or the input
            embedding).
        seqlen: tokens per sequence.
        batch_size: sequences per forward pass.
        repeats: timed passes; the median is reported.
        warmup: untimed passes first.
        seed: seed of the generator that draws the token ids.

    Returns:
        ``{"tokens_per_s", "seconds_per_forward", "seqlen", "batch_size", "repeats", "times"}``
        where ``tokens_per_s = batch_size * seqlen / seconds_per_forward`` (median).
    """
    for name, value in (("seqlen", seqlen), ("batch_size", batch_size), ("repeats", repeats)):
        _check_positive(name, value)
    if warmup < 0:
        raise InputError(f"warmup must be >= 0, got {warmup}", hint="pass warmup >= 0")
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab_size(model), (batch_size, seqlen), generator=generator).to(device)
    times: list[float] = []
    with _eval_mode(model), torch.inference_mode():
        for i in range(warmup + repeats):
            _synchronize(device)
            start = time.perf_counter()
            _logits(model, ids)
            _synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "tokens_per_s": batch_size * seqlen / seconds,
        "seconds_per_forward": seconds,
        "seqlen": seqlen,
        "batch_size": batch_size,
        "repeats": repeats,
        "times": times,
    }


def compare_throughput(
    models: dict[str, nn.Module],
    *,
    seqlen: int = 512,
    rounds: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Prefill throughput of several models measured interleaved, as ``benchmarks/throughput.py`` does.

    Each model first runs ``warmup`` untimed passes; then every round times one forward pass
    of each model in turn, so drift on a shared machine hits all of them alike; the median
    over rounds is reported.

    Args:
        models: name -> causal LM (same vocabulary: the same random ids feed every model).
        seqlen: tokens per pass (batch 1).
        rounds: timed rounds.
        warmup: untimed passes per model first.
        seed: seed of the generator that draws the token ids.

    Returns:
        name -> ``{"tokens_per_s", "seconds_per_forward", "times", "seqlen", "rounds",
        "method"}``.
    """
    _check_positive("seqlen", seqlen)
    _check_positive("rounds", rounds)
    first = next(iter(models.values()))
    vocab = min(_vocab_size(m) for m in models.values())
    ids = torch.randint(0, vocab, (1, seqlen), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(_device(first))
    times: dict[str, list[float]] = {name: [] for name in models}
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for m in models.values():
            stack.enter_context(_eval_mode(m))
        for m in models.values():
            for _ in range(warmup):
                _logits(m, ids)
        for _ in range(rounds):
            for name, m in models.items():
                device = _device(m)
                _synchronize(device)
                start = time.perf_counter()
                _logits(m, ids)
                _synchronize(device)
                times[name].append(time.perf_counter() - start)
    how = f"interleaved, {warmup} warm-up pass, median of {rounds} rounds, batch 1 x {seqlen} tokens"
    out = {}
    for name, t in times.items():
        seconds = statistics.median(t)
        out[name] = {
            "tokens_per_s": seqlen / seconds,
            "seconds_per_forward": seconds,
            "times": t,
            "seqlen": seqlen,
            "rounds": rounds,
            "method": how,
        }
    return out


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    measure_throughput: bool = True,
    throughput_repeats: int = 3,
    progress: Progress | None = None,
    runner: Any = None,
) -> dict[str, Any]:
    """Perplexity, parameter counts and prefill throughput in one JSON-ready dict.

    Args:
        model: a causal LM.
        windows: evaluation windows ``[n, seqlen]`` (see :func:`prunecli.data.eval_windows`).
        batch_size: windows per forward pass for perplexity.
        measure_throughput: also time forward passes of ``[1, seqlen]`` random ids.
        throughput_repeats: timed passes for the throughput median.
        progress: reports the perplexity batches.
        runner: a runner with offloaded weights (see :func:`perplexity`); throughput is then
            not measured (the model cannot run whole).

    Returns:
        ``{"perplexity", "params", "params_breakdown", "n_windows", "seqlen", "eval_seconds",
        "tokens_per_s", "seconds_per_forward"}``; the last two are ``None`` when
        ``measure_throughput`` is false. ``eval_seconds`` is the wall time of the perplexity pass.
    """
    _check_windows(windows)
    start = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=batch_size, progress=progress, runner=runner)
    eval_seconds = time.perf_counter() - start
    streamed = runner is not None and getattr(runner, "weights", None) is not None
    speed = (
        throughput(model, seqlen=windows.shape[1], repeats=throughput_repeats)
        if measure_throughput and not streamed
        else None
    )
    return {
        "perplexity": ppl,
        "params": count_parameters(model),
        "params_breakdown": parameter_breakdown(model),
        "n_windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "eval_seconds": eval_seconds,
        "tokens_per_s": speed["tokens_per_s"] if speed else None,
        "seconds_per_forward": speed["seconds_per_forward"] if speed else None,
    }


def max_length_warning(model: nn.Module, seqlen: int) -> str | None:
    """A warning when ``seqlen`` exceeds the model's maximum length (its config's positions), else ``None``."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if isinstance(limit, int) and seqlen > limit:
        return (
            f"evaluation windows of {seqlen} tokens exceed the model's maximum length ({limit}); "
            "perplexity beyond it is not meaningful (lower --seqlen / --eval-seqlen)"
        )
    return None


def task_accuracy(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    task_dirs: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Zero-shot (or few-shot) task scores through lm-evaluation-harness, on the model object.

    The model is passed as an object (``HFLM(pretrained=model)``), so a checkpoint whose widths
    differ by layer needs no remote code. Needs the optional ``prunecli[eval]`` extra.

    Args:
        model: a causal LM (e.g. ``prunecli.load_model(DIR).model``).
        tokenizer: its tokenizer.
        tasks: lm-eval task names, e.g. ``["hellaswag", "arc_easy"]``.
        task_dirs: folders of extra task YAML files (local tasks).
        limit: evaluate at most this many documents per task.
        batch_size: documents per forward pass.
        num_fewshot: few-shot examples (default: the task's own, usually 0).
        seed: seed of lm-eval's samplers.

    Returns:
        task -> metric -> value (``acc``, ``acc_norm``, ... and their ``_stderr``).

    Example:
        >>> task_accuracy(loaded.model, loaded.tokenizer, ["arc_easy"], limit=100)  # doctest: +SKIP
        {'arc_easy': {'acc': 0.58, 'acc_stderr': 0.049, 'acc_norm': 0.52, ...}}
    """
    from prunecli.errors import DependencyMissingError

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DependencyMissingError(
            "task evaluation needs lm-evaluation-harness", hint="pip install 'prunecli[eval]'"
        ) from exc
    manager = TaskManager(verbosity="ERROR", include_path=list(task_dirs) if task_dirs else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(
            f"unknown lm-eval task {unknown[0]!r}",
            hint="see `lm-eval ls tasks`; a local task is a YAML file in a folder passed with --task-dir",
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
    # lm-eval draws its own tqdm bars on stderr; prunecli prints results, not bars
    with contextlib.redirect_stderr(io.StringIO()):
        results = _simple_evaluate(lm_eval, lm, tasks, limit, num_fewshot, manager, seed)
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "," in k
        }
    return out


def _simple_evaluate(
    lm_eval: Any,
    lm: Any,
    tasks: list[str],
    limit: int | None,
    num_fewshot: int | None,
    manager: Any,
    seed: int,
) -> Any:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        log_samples=False,
        verbosity="ERROR",
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=0,
    )


# -- helpers ---------------------------------------------------------------------------------


def _unique_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) once per distinct tensor: tied weights by identity or shared storage."""
    seen: set[object] = set()
    for name, param in model.named_parameters(remove_duplicate=True):
        key = (
            (param.data_ptr(), param.dtype, tuple(param.shape)) if param.device.type != "meta" else id(param)
        )
        if key in seen or id(param) in seen:
            continue
        seen.update((key, id(param)))
        yield name, param


def _kind_from_class(module: nn.Module) -> str | None:
    if callable(getattr(module, "get_input_embeddings", None)):
        return None  # a whole model (PreTrainedModel): its class name says nothing about roles
    if isinstance(module, nn.Embedding):
        return "embedding"
    cls = type(module).__name__.lower()
    for kind, fragments in (
        ("norm", _NORM),
        ("embedding", _EMBEDDING),
        ("attention", _ATTENTION),
        ("mlp", _MLP),
    ):
        if any(f in cls for f in fragments):
            return kind
    return None


def _ancestors(name: str) -> list[str]:
    chain = [name]
    while name:
        name = name.rpartition(".")[0]
        chain.append(name)
    return chain


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if isinstance(embedding, nn.Embedding):
        return embedding.num_embeddings
    raise InputError(
        f"cannot find the vocabulary size of {type(model).__name__}",
        hint="the model needs config.vocab_size or an input embedding",
    )


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; every submodule's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _check_windows(windows: torch.Tensor) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise InputError(
            "evaluation windows must be a 2-D tensor [n, seqlen]",
            hint="build them with prunecli.data.eval_windows",
        )
    if windows.dtype not in (torch.int64, torch.int32):
        raise InputError(
            f"evaluation windows must hold token ids (int64), got {windows.dtype}", hint="use .long()"
        )
    n, seqlen = windows.shape
    if n < 1 or seqlen < 2:
        raise InputError(
            f"need at least one window of at least 2 tokens, got shape {tuple(windows.shape)}",
            hint="use a longer text or a larger sequence length",
        )


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}", hint=f"pass {name} >= 1")
