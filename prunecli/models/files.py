"""Checks on model files made before anything is handed to transformers.

They name the broken file in the error, refuse pickle weights before ``torch.load`` can run,
and cost a few reads of small headers. Only the standard library is imported here.
"""

from __future__ import annotations

import json
import secrets
import struct
from pathlib import Path
from typing import Any

from prunecli.errors import CheckpointError, PickleRefusedError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
)
SAFE_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from ``path``; any failure is a :class:`CheckpointError` naming the file.

    Args:
        path: the JSON file.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot read {path}: {str(exc).splitlines()[0]}",
            hint="the file is corrupt or truncated; re-save the checkpoint",
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def check_safetensors_file(path: Path) -> None:
    """Check that ``path`` has a readable safetensors header and is as long as the header says.

    Catches truncated downloads and files that are not safetensors at all, without reading
    the tensor data.

    Args:
        path: a ``.safetensors`` file.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {header_len} does not fit in a file of {size} bytes")
            header = json.loads(f.read(header_len).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise CheckpointError(
            f"corrupt safetensors file {path}: {str(exc).splitlines()[0]}",
            hint="the file is damaged or truncated; re-save or re-download the checkpoint",
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {path}: the header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"corrupt safetensors file {path}: bad entry for tensor {name!r}") from exc
        if stop < start:
            raise CheckpointError(f"corrupt safetensors file {path}: bad offsets for tensor {name!r}")
        end = max(end, stop)
    if 8 + header_len + end != size:
        raise CheckpointError(
            f"corrupt safetensors file {path}: expected {8 + header_len + end} bytes, found {size}",
            hint="the file is truncated or damaged; re-save or re-download the checkpoint",
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a model folder's weights live in (via the index when sharded).

    Args:
        folder: a Hugging Face model folder.

    Returns:
        The files, checked to exist; an empty list when the folder has no safetensors weights.
    """
    index = folder / SAFE_INDEX
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists shards that are missing: {', '.join(missing[:5])}",
                hint="the checkpoint is incomplete; copy or download every shard",
            )
        return files
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def pickle_files(folder: Path) -> list[Path]:
    """Files in ``folder`` that hold pickled weights (``pytorch_model.bin``, ``*.pt``, ...)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def check_model_folder(folder: Path, *, allow_pickle: bool) -> bool:
    """Validate a model folder's config and weight files before loading.

    Args:
        folder: the folder; must contain ``config.json``.
        allow_pickle: accept a folder whose only weights are pickles.

    Returns:
        True when the weights are safetensors, False when they are (allowed) pickles.
    """
    read_json(folder / "config.json")
    files = weight_files(folder)
    if files:
        for path in files:
            check_safetensors_file(path)
        return True
    pickles = pickle_files(folder)
    if not pickles:
        raise CheckpointError(
            f"{folder} has a config.json but no weights (*.safetensors)",
            hint="copy the weight files next to config.json",
        )
    if not allow_pickle:
        raise PickleRefusedError(
            f"{folder} holds only pickle weights ({', '.join(p.name for p in pickles[:3])}); "
            "loading them can run arbitrary code",
            hint="convert the checkpoint to safetensors, or pass --allow-pickle if you trust the file",
        )
    return False


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def sibling_temp_dir(target: Path) -> Path:
    """Create an empty hidden folder next to ``target`` (same filesystem, so it can be renamed
    onto ``target``). Unlike ``tempfile.mkdtemp`` it follows the umask, so the final folder gets
    the usual permissions.

    Args:
        target: the folder that will eventually replace or become ``target``.
    """
    for _ in range(100):
        path = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"cannot create a temporary folder next to {target}")


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and every file and folder in it the permissions the umask allows.

    Some writers (safetensors) create files with mode 0600; a checkpoint or cache entry
    should be readable like any other file the user creates.

    Args:
        folder: a folder written by prunecli.
    """
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        base = 0o777 if path.is_dir() else 0o666
        path.chmod(base & ~umask)
