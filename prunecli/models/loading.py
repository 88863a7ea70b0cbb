"""Load a model from a folder, a hub id, a ``.gguf`` file or a built-in alias.

A hub alias (``llama-7b``) becomes its hub id (``huggyllama/llama-7b``) and loads like one.
Weights load in the checkpoint's own dtype unless asked otherwise (``dtype="auto"``).

Everything heavy (torch, transformers) is imported inside the functions, so importing this
module is cheap.

Example:
    >>> from prunecli.models import load_model
    >>> lm = load_model("smollm2-135m")          # doctest: +SKIP
    >>> type(lm.model).__name__, lm.kind
    ('LlamaForCausalLM', 'alias')
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

from prunecli.errors import (
    CheckpointError,
    DependencyMissingError,
    InputError,
    ModelNotFoundError,
    PickleRefusedError,
    PruneCliError,
    UnsupportedModelError,
)
from prunecli.models.aliases import hub_alias, is_alias, resolve_alias, suggest_alias
from prunecli.models.files import PICKLE_SUFFIXES, check_model_folder, has_tokenizer
from prunecli.progress import Progress, resolve

# "org/name" or a legacy bare name such as "gpt2".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_DTYPE_NAMES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
_MODEL_SUFFIXES = (".gguf", ".safetensors", *PICKLE_SUFFIXES)


@dataclasses.dataclass
class LoadedModel:
    """A loaded model and where it came from.

    Args:
        model: the transformers model, in eval mode.
        tokenizer: its tokenizer, or None when the source has none.
        spec: what the caller asked for.
        source: the resolved local path (folder or ``.gguf`` file) or hub id (a hub alias gives
            its hub id).
        kind: ``"folder"``, ``"hub"`` (hub ids and hub aliases), ``"gguf"`` or ``"alias"``
            (package aliases).
        load_seconds: wall time of :func:`load_model`.
        dtype: the dtype the weights were loaded in (``"bfloat16"``), after ``"auto"`` was
            resolved.
        weights: with ``offload=True``, the :class:`prunecli.calibrate.offload.OffloadedWeights`
            the block weights are read from (pass it to ``Runner(weights=...)`` and
            ``save_checkpoint(weights=...)``); ``None`` when the model is whole in memory.
    """

    model: Any
    tokenizer: Any | None
    spec: str
    source: str
    kind: str
    load_seconds: float
    dtype: str = "float32"
    weights: Any = None


def resolve_dtype(dtype: Any, config: Any | None = None) -> Any:
    """The ``torch.dtype`` to load weights in.

    ``"auto"`` keeps the checkpoint's own dtype: ``dtype`` (or the older ``torch_dtype``) in
    ``config``. It is float32 when there is no config, when the config records no dtype, or when
    it records one prunecli does not load in (float64, an integer type).

    Args:
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` (``fp32``/``bf16``/``fp16``
            also accepted) or a torch dtype.
        config: the model's config (a transformers config or the ``config.json`` mapping); read
            only for ``"auto"``.

    Example:
        >>> resolve_dtype("bf16")  # doctest: +SKIP
        torch.bfloat16
        >>> resolve_dtype("auto", {"torch_dtype": "float16"})  # doctest: +SKIP
        torch.float16
    """
    import torch

    requested = _parse_dtype(dtype)
    if requested != "auto":
        return requested
    if config is None:
        return torch.float32
    if isinstance(config, dict):
        recorded = config.get("dtype") or config.get("torch_dtype")
    else:
        recorded = getattr(config, "dtype", None)  # transformers reads a legacy torch_dtype into it
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded.removeprefix("torch."), None)
    return recorded if recorded in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _parse_dtype(dtype: Any) -> Any:
    """A torch dtype, or the string ``"auto"``; raises :class:`InputError` for anything else."""
    import torch

    allowed = {torch.float32, torch.bfloat16, torch.float16}
    if isinstance(dtype, torch.dtype):
        if dtype in allowed:
            return dtype
    elif isinstance(dtype, str) and dtype.strip().lower() in _DTYPE_NAMES:
        name = _DTYPE_NAMES[dtype.strip().lower()]
        return name if name == "auto" else getattr(torch, name)
    raise InputError(
        f"unsupported dtype {dtype!r}",
        hint="use auto (the checkpoint's own), float32, bfloat16 or float16",
    )


def _check_device(device: Any) -> Any:
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"invalid device {device!r}", hint="use e.g. cpu, cuda, cuda:1 or mps") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def classify_spec(spec: str, *, allow_pickle: bool = False) -> tuple[str, str]:
    """Decide what ``spec`` names without loading anything.

    A local file or folder wins over an alias of the same name; aliases are case-insensitive.

    Args:
        spec: folder, file, hub id or alias.
        allow_pickle: accept a pickle weight file (its folder is loaded).

    Returns:
        ``(kind, target)`` with kind one of ``alias``, ``gguf``, ``folder``, ``hub`` and target the
        resolved path (package alias/gguf: the ``.gguf`` file or folder; folder: the folder) or
        the hub id (a hub alias such as ``llama-7b`` gives ``("hub", "huggyllama/llama-7b")``).
    """
    path = Path(spec).expanduser()
    if not path.exists():
        if is_alias(spec):
            return "alias", str(resolve_alias(spec))
        hub = hub_alias(spec)
        if hub is not None:
            return "hub", hub.repo_id
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", str(ggufs[0].resolve())
            raise ModelNotFoundError(
                f"{path} is not a model folder: it has no config.json",
                hint="pass a folder saved with save_pretrained(), a .gguf file, a hub id or an alias",
            )
        return "folder", str(path.resolve())
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return "gguf", str(path.resolve())
        if suffix in PICKLE_SUFFIXES or suffix == ".safetensors" or path.name == "config.json":
            if suffix in PICKLE_SUFFIXES and not allow_pickle:
                raise PickleRefusedError(
                    f"{path} is a pickle file; loading it can run arbitrary code",
                    hint="convert it to safetensors; with --allow-pickle pass the folder that holds it",
                )
            if (path.parent / "config.json").is_file():
                return "folder", str(path.parent.resolve())
            raise ModelNotFoundError(
                f"{path} has no config.json beside it",
                hint="pass the model folder (config.json + weights) instead of a single weight file",
            )
        raise ModelNotFoundError(
            f"{path} is not a model: expected a folder, a .gguf file, a hub id or an alias",
            hint="pass a folder saved with save_pretrained(), a .gguf file, a hub id or an alias",
        )
    looks_like_path = (
        spec.startswith((".", "/", "~"))
        or spec.lower().endswith(_MODEL_SUFFIXES)
        or (os.altsep is not None and os.altsep in spec)
        or spec.count(os.sep) > 1
    )
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelNotFoundError(
            f"no such file or folder: {spec}",
            hint="check the path; models can also be a hub id (org/name) or an alias (prunecli models list)",
        )
    return "hub", spec


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: Any = "auto",
    device: Any = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    offload: bool = False,
) -> LoadedModel:
    """Load a model and its tokenizer for pruning or evaluation.

    ``spec`` may be a local Hugging Face folder (safetensors, sharded or not; prunecli
    checkpoints with per-layer widths included, loaded without remote code), a hub id
    (``HuggingFaceTB/SmolLM2-135M``), a ``.gguf`` file (dequantised once into an fp32
    safetensors cache, see :mod:`prunecli.models.gguf`) or a built-in alias: a package alias
    (``smollm2-135m``) or a hub alias (``llama-7b``, loaded as its hub id), see
    :func:`prunecli.models.list_aliases`. Hub ids are read from the local Hugging Face cache
    when the hub is unreachable or ``HF_HUB_OFFLINE=1``.

    Args:
        spec: what to load.
        dtype: ``"auto"`` (default: the checkpoint's own dtype from its config.json; float32
            for ``.gguf`` files and configs that record none), ``"float32"``, ``"bfloat16"``,
            ``"float16"`` or a torch dtype.
        device: where to put the model (passed to ``.to()``).
        allow_pickle: accept pickle weights (``pytorch_model.bin``, ``*.pt``); they are read with
            ``weights_only=True`` but are refused by default.
        trust_remote_code: let transformers run modeling code shipped with the checkpoint.
        progress: progress reporter.
        offload: leave every decoder-block weight in the checkpoint's safetensors files (the
            model is built on the meta device; only embeddings, final norm and LM head are
            loaded); blocks are read one at a time by the layer-sequential runner. A ``.gguf``
            is streamed from its fp32 safetensors cache, a hub id from its local snapshot.

    Returns:
        A :class:`LoadedModel` whose model is in eval mode on ``device``.

    Example:
        >>> lm = load_model("path/to/folder", dtype="bfloat16")  # doctest: +SKIP
    """
    start = time.perf_counter()
    spec_str = os.fspath(spec)
    torch_dtype = _parse_dtype(dtype)  # a torch dtype or "auto", resolved once the config is read
    torch_device = _check_device(device)
    kind, target = classify_spec(spec_str, allow_pickle=allow_pickle)
    from prunecli.models.hf import quiet_transformers

    if offload:
        return _load_offloaded(
            spec_str, kind, target, torch_dtype, torch_device, trust_remote_code, start, progress
        )
    with quiet_transformers(), resolve(progress).task(f"loading {spec_str}", total=1) as task:
        if is_gguf(kind, target):
            model, tokenizer = _load_gguf(Path(target), torch_dtype, progress)
        elif kind in ("folder", "alias"):
            model, tokenizer = _load_folder(
                Path(target),
                torch_dtype,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
            )
        else:
            model, tokenizer = _load_hub(
                target,
                torch_dtype,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
                spec=spec_str,
            )
        try:
            model = model.to(torch_device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise InputError(
                f"cannot move the model to device {str(torch_device)!r}: {_first_line(exc)}",
                hint="check that the device exists (e.g. torch.cuda.is_available())",
            ) from exc
        model.eval()
        task.advance()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec_str,
        source=target,
        kind=kind,
        load_seconds=time.perf_counter() - start,
        dtype=_dtype_name(model),
    )


def is_gguf(kind: str, target: str) -> bool:
    """Whether a classified spec (see :func:`classify_spec`) loads from a ``.gguf`` file."""
    return kind == "gguf" or (kind == "alias" and not Path(target).is_dir())


def load_dtype(kind: str, target: str, dtype: Any, config: Any) -> Any:
    """The torch dtype a classified spec loads in: ``auto`` is float32 for ``.gguf`` files (their
    cache holds the dequantised fp32 weights) and the config's own dtype otherwise."""
    import torch

    if is_gguf(kind, target) and _parse_dtype(dtype) == "auto":
        return torch.float32
    return resolve_dtype(dtype, config)


def local_folder(kind: str, target: str, *, progress: Progress | None = None) -> Path:
    """The local folder holding the safetensors weights of a classified spec (see :func:`classify_spec`).

    A ``.gguf`` gives its fp32 safetensors cache (converted once); a hub id its snapshot in the
    local Hugging Face cache (downloaded when the hub is reachable).
    """
    if is_gguf(kind, target):
        from prunecli.models.gguf import ensure_gguf_cache

        return ensure_gguf_cache(Path(target), progress=progress)
    if kind in ("folder", "alias"):
        return Path(target)
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    local_only = offline or not _hub_reachable()
    try:
        return Path(
            snapshot_download(
                target,
                local_files_only=local_only,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.py"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - not cached / not found / gated: one line either way
        if local_only:
            raise _not_cached_error(target, target, offline=offline) from exc
        raise _hub_error(target, exc) from exc


def _load_offloaded(
    spec: str,
    kind: str,
    target: str,
    torch_dtype: Any,
    device: Any,
    trust_remote_code: bool,
    start: float,
    progress: Progress | None,
) -> LoadedModel:

    from prunecli.calibrate.offload import load_offloaded
    from prunecli.models.hf import quiet_transformers

    folder = local_folder(kind, target, progress=progress)
    with quiet_transformers(), resolve(progress).task(f"loading {spec} (blocks offloaded)", total=1) as task:
        config = _load_config(str(folder), trust_remote_code=trust_remote_code, hub=False)
        torch_dtype = load_dtype(kind, target, torch_dtype, config)
        try:
            model, weights = load_offloaded(
                folder, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"cannot load {spec} with offloaded weights: {_first_line(exc)}",
                hint="load it whole (drop --sequential / --max-memory)",
            ) from exc
        tokenizer = (
            _load_tokenizer(str(folder), trust_remote_code=trust_remote_code, config=config)
            if has_tokenizer(folder)
            else None
        )
        task.advance()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        source=str(folder) if kind != "hub" else target,
        kind=kind,
        load_seconds=time.perf_counter() - start,
        dtype=str(torch_dtype).removeprefix("torch."),
        weights=weights,
    )


def _dtype_name(model: Any) -> str:
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    return "float32"


def _load_gguf(gguf: Path, torch_dtype: Any, progress: Progress | None) -> tuple[Any, Any]:
    import torch

    from prunecli.models.gguf import ensure_gguf_cache

    if torch_dtype == "auto":
        torch_dtype = torch.float32  # the cache holds the dequantised weights in fp32
    cache = ensure_gguf_cache(gguf, progress=progress)
    try:
        return _load_folder(cache, torch_dtype, allow_pickle=False, trust_remote_code=False, strict=True)
    except CheckpointError:
        # The entry passed the cheap checks but does not load: rebuild it once.
        cache = ensure_gguf_cache(gguf, rebuild=True, progress=progress)
        return _load_folder(cache, torch_dtype, allow_pickle=False, trust_remote_code=False, strict=True)


def _load_folder(
    folder: Path,
    torch_dtype: Any,
    *,
    allow_pickle: bool,
    trust_remote_code: bool,
    strict: bool = False,
) -> tuple[Any, Any]:
    safe = check_model_folder(folder, allow_pickle=allow_pickle)
    label = str(folder)
    config = _load_config(label, trust_remote_code=trust_remote_code, hub=False)
    strict = strict or (folder / "prunecli.json").is_file()
    model = _from_pretrained(
        label,
        config,
        torch_dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=safe,
        strict=strict,
        hub=False,
    )
    tokenizer = (
        _load_tokenizer(label, trust_remote_code=trust_remote_code, config=config)
        if has_tokenizer(folder)
        else None
    )
    return model, tokenizer


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport failure means "not reachable"; the reason is not needed
        return False
    return True


def _load_hub(
    repo_id: str, torch_dtype: Any, *, allow_pickle: bool, trust_remote_code: bool, spec: str | None = None
) -> tuple[Any, Any]:
    from huggingface_hub import try_to_load_from_cache

    spec = spec or repo_id
    offline = _hub_offline()
    local_only = offline or not _hub_reachable()
    if local_only and not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise _not_cached_error(spec, repo_id, offline=offline)
    config = _load_config(
        repo_id, trust_remote_code=trust_remote_code, hub=True, local_files_only=local_only, spec=spec
    )
    model = _from_pretrained(
        repo_id,
        config,
        torch_dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        strict=False,
        hub=True,
        local_files_only=local_only,
        spec=spec,
    )
    try:
        tokenizer = _load_tokenizer(
            repo_id, trust_remote_code=trust_remote_code, local_files_only=local_only, config=config
        )
    except CheckpointError:
        tokenizer = None  # a hub repo without tokenizer files (an encoder head, say)
    return model, tokenizer


def _hub_label(spec: str, repo_id: str) -> str:
    """``llama-7b (hub id huggyllama/llama-7b)`` for an alias, the bare hub id otherwise."""
    alias = hub_alias(spec)
    return f"{alias.name} (hub id {repo_id})" if alias is not None and spec != repo_id else repo_id


def _typo_hint(spec: str) -> str | None:
    guess = suggest_alias(spec)
    return f"did you mean {guess}? (prunecli models list shows the aliases)" if guess else None


def _not_cached_error(spec: str, repo_id: str, *, offline: bool) -> ModelNotFoundError:
    """One line for a hub model that is neither in the local cache nor downloadable now."""
    why = " (HF_HUB_OFFLINE is set)" if offline else ""
    folder = repo_id.rsplit("/", 1)[-1]
    hint = f"download it elsewhere and set HF_HOME, or pass the folder path: prunecli compress /path/to/{folder} ..."
    if offline:
        hint = f"unset HF_HUB_OFFLINE to download it, or {hint}"
    return ModelNotFoundError(
        f"model {_hub_label(spec, repo_id)} is not in the local Hugging Face cache and the hub is unreachable{why}",
        hint=_typo_hint(spec) or hint,
    )


def _hub_error(repo_id: str, exc: BaseException, spec: str | None = None) -> PruneCliError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    label = _hub_label(spec or repo_id, repo_id)
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        return ModelNotFoundError(
            f"the hub repo of {label} is gated", hint="accept its licence on the hub and run `hf auth login`"
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return ModelNotFoundError(
            f"no model {label} on the Hugging Face hub", hint=_typo_hint(spec or repo_id) or "check the id"
        )
    return ModelNotFoundError(
        f"cannot load {label} from the Hugging Face hub: {_first_line(exc)}",
        hint="check the id and the network; a repo with only pickle weights needs --allow-pickle",
    )


def _load_config(
    source: str,
    *,
    trust_remote_code: bool,
    hub: bool,
    local_files_only: bool = False,
    spec: str | None = None,
) -> Any:
    from transformers import AutoConfig

    label = source if hub else str(Path(source) / "config.json")
    try:
        if not hub and not trust_remote_code:
            # per-layer widths: prunecli's config class (no per-layer warnings from the validators)
            from prunecli.checkpoint.modeling_prunecli import config_from_pretrained

            return config_from_pretrained(source)
        return AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        )
    except (ValueError, KeyError) as exc:
        msg = _first_line(exc)
        if "trust_remote_code" in str(exc):
            raise UnsupportedModelError(
                f"{label} needs modeling code shipped with the checkpoint",
                hint="pass --trust-remote-code if you trust the checkpoint's author",
            ) from exc
        if "model_type" in str(exc) or "Unrecognized model" in str(exc) or "recogni" in str(exc):
            import transformers

            raise UnsupportedModelError(
                f"transformers {transformers.__version__} does not know the architecture in {label}: {msg}",
                hint="upgrade transformers, or pass --trust-remote-code if the checkpoint ships its code",
            ) from exc
        raise CheckpointError(f"invalid model config {label}: {msg}") from exc
    except OSError as exc:
        if hub:
            raise _hub_error(source, exc, spec) from exc
        raise CheckpointError(f"cannot read {label}: {_first_line(exc)}") from exc


def _model_class(config: Any, *, trust_remote_code: bool) -> Any:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    from prunecli.checkpoint.modeling_prunecli import (
        heterogeneous_class,
        module_overrides,
        per_layer_overrides,
        stock_class_name,
    )

    if per_layer_overrides(config) or module_overrides(config):
        try:
            return heterogeneous_class(stock_class_name(config))
        except (ValueError, AttributeError) as exc:
            raise UnsupportedModelError(
                f"cannot build per-layer widths for model_type {config.model_type!r}: {_first_line(exc)}"
            ) from exc
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        for key in ("AutoModelForCausalLM", "AutoModel"):
            if key in auto_map:
                return getattr(transformers, key)
    try:
        return getattr(transformers, stock_class_name(config))
    except (ValueError, AttributeError):
        pass
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return transformers.AutoModelForCausalLM
    if type(config) in MODEL_MAPPING:
        return transformers.AutoModel
    raise UnsupportedModelError(f"transformers has no model class for model_type {config.model_type!r}")


def _first_mismatch(source: str, config: Any, cls: Any) -> str | None:
    """``NAME is [a, b] in the weights, [c, d] in config.json`` for the first tensor whose shape
    differs (read from the safetensors headers and a meta-device model), or ``None``."""
    try:
        import torch
        from safetensors import safe_open

        from prunecli.models.files import weight_files

        with torch.device("meta"):
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        expected = {name: list(t.shape) for name, t in model.state_dict().items()}
        for path in weight_files(Path(source)):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shape = list(f.get_slice(key).get_shape())
                    if key in expected and expected[key] != shape:
                        return f"{key} is {shape} in the weights, {expected[key]} in config.json"
    except Exception:  # noqa: BLE001 - a better message is a bonus; the caller has a fallback
        return None
    return None


def _from_pretrained(
    source: str,
    config: Any,
    torch_dtype: Any,
    *,
    trust_remote_code: bool,
    use_safetensors: bool | None,
    strict: bool,
    hub: bool,
    local_files_only: bool = False,
    spec: str | None = None,
) -> Any:
    cls = _model_class(config, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": resolve_dtype(torch_dtype, config),
        "use_safetensors": use_safetensors,
        "output_loading_info": True,
        "local_files_only": local_files_only,
    }
    if cls.__name__.startswith("AutoModel"):
        kwargs["trust_remote_code"] = trust_remote_code
    try:
        model, info = cls.from_pretrained(source, **kwargs)
    except ImportError as exc:
        raise DependencyMissingError(f"loading {source} needs a missing package: {_first_line(exc)}") from exc
    except OSError as exc:
        if hub:
            raise _hub_error(source, exc, spec) from exc
        raise CheckpointError(f"cannot read the weights in {source}: {_first_line(exc)}") from exc
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = _first_mismatch(source, config, cls) or _first_line(exc)
        raise CheckpointError(
            f"the weights in {source} do not load into its config: {detail}",
            hint="the weight shapes and config.json disagree; re-save the checkpoint",
        ) from exc
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise CheckpointError(f"corrupt safetensors weights in {source}: {_first_line(exc)}") from exc
        raise
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in problems.items() if v and (strict or k == "mismatched_keys")}
    if bad:
        details = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:4]))}" for k, v in bad.items())
        raise CheckpointError(
            f"the weights in {source} do not match its config.json ({details})",
            hint="the checkpoint is incomplete or was edited; re-save it",
        )
    return model


def _load_tokenizer(
    source: str, *, trust_remote_code: bool, local_files_only: bool = False, config: Any = None
) -> Any:
    from transformers import AutoTokenizer

    # The model's config, already read: AutoTokenizer would read config.json again with the
    # stock config class (which warns about per-layer widths).
    extra = {"config": config} if config is not None else {}
    try:
        return AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_files_only, **extra
        )
    except ImportError as exc:
        raise DependencyMissingError(
            f"the tokenizer of {source} needs a missing package: {_first_line(exc)}"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot load the tokenizer in {source}: {_first_line(exc)}") from exc
