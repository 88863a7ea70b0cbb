"""What prunecli keeps in its cache (``$PRUNECLI_CACHE``, default ``~/.cache/prunecli``), and clearing it.

Two kinds of entries: ``gguf/<stem>-<key>/`` (a GGUF model converted once to safetensors, so
later loads take well under a second) and ``assembled/<file>`` (a GGUF file joined from the
chunks of several packages). Both are rebuilt on the next load when removed. Nothing outside
those two folders is listed or touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prunecli.errors import InputError
from prunecli.models.gguf import MARKER, cache_root

KINDS = {"gguf": "converted GGUF model", "assembled": "GGUF file joined from package chunks"}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cache_entries() -> list[dict[str, Any]]:
    """Every cache entry: ``{"name", "kind", "path", "bytes", "source"}``, sorted by name.

    ``name`` is ``<kind>/<folder or file>``; ``source`` is the GGUF file a converted entry came
    from (when its marker says so).
    """
    from prunecli.models.files import read_json

    root = cache_root()
    entries = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):  # an entry being written
                continue
            source = None
            if kind == "gguf" and (path / MARKER).is_file():
                try:
                    source = (read_json(path / MARKER).get("fingerprint") or {}).get("source")
                except Exception:  # noqa: BLE001 - a damaged marker only loses the source column
                    source = None
            entries.append(
                {
                    "name": f"{kind}/{path.name}",
                    "kind": kind,
                    "path": str(path),
                    "bytes": _size(path),
                    "source": source,
                }
            )
    return entries


def clear_cache(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Remove cache entries (all of them when ``names`` is ``None``) and return what was removed.

    Args:
        names: entry names as :func:`cache_entries` gives them (``gguf/SmolLM2-...``).

    Raises:
        InputError: a name that is not a cache entry (nothing is removed then).

    Example:
        >>> freed = sum(e["bytes"] for e in clear_cache())  # doctest: +SKIP
    """
    entries = {e["name"]: e for e in cache_entries()}
    if names is None:
        chosen = list(entries.values())
    else:
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise InputError(
                f"not a cache entry: {unknown[0]}",
                hint="`prunecli cache list` shows the entries"
                + (f" ({', '.join(entries)})" if entries else " (none)"),
            )
        chosen = [entries[n] for n in names]
    for e in chosen:
        path = Path(e["path"])
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return chosen
