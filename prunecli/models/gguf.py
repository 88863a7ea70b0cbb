"""GGUF files, dequantised once into an fp32 safetensors folder that later loads are read from.

Dequantising a GGUF through transformers is slow (SmolLM2-135M: ~30 s on 2 cores); reading
the same weights back from fp32 safetensors takes well under a second. The cache lives in
``$PRUNECLI_CACHE`` (default ``~/.cache/prunecli``) under ``gguf/<stem>-<key>/`` where
``key`` hashes the GGUF's resolved path, size and modification time, so a changed file gets
a new entry. An entry is written in a temporary folder and renamed into place, and carries
a ``prunecli-cache.json`` marker; an entry that fails its checks is deleted and rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from prunecli.errors import CheckpointError, DependencyMissingError, UnsupportedModelError
from prunecli.models.files import (
    apply_umask,
    check_safetensors_file,
    read_json,
    sibling_temp_dir,
    weight_files,
)
from prunecli.progress import Progress, resolve

CACHE_ENV = "PRUNECLI_CACHE"
CACHE_FORMAT = 1
MARKER = "prunecli-cache.json"


def cache_root() -> Path:
    """``$PRUNECLI_CACHE`` or ``~/.cache/prunecli``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prunecli"


def _fingerprint(gguf: Path) -> dict[str, object]:
    st = gguf.stat()
    return {
        "source": str(gguf.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "format": CACHE_FORMAT,
    }


def cache_dir_for(gguf: Path) -> Path:
    """The cache folder for ``gguf`` (which may not exist yet).

    Args:
        gguf: an existing ``.gguf`` file.
    """
    fp = _fingerprint(gguf)
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def is_valid_cache(folder: Path, gguf: Path) -> bool:
    """Whether ``folder`` is a complete cache entry for ``gguf`` (marker, config, intact weights).

    Args:
        folder: a cache folder from :func:`cache_dir_for`.
        gguf: the GGUF file it was made from.
    """
    try:
        marker = read_json(folder / MARKER)
        if marker.get("fingerprint") != _fingerprint(gguf):
            return False
        read_json(folder / "config.json")
        files = weight_files(folder)
        if not files:
            return False
        for path in files:
            check_safetensors_file(path)
    except (CheckpointError, OSError):
        return False
    return True


def _require_gguf_packages() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise DependencyMissingError(
            f"loading .gguf files needs the {' and '.join(missing)} package(s)",
            hint=f"pip install {' '.join(missing)}",
        )


def _convert(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` to fp32 and save config, weights, tokenizer into ``dest``."""
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    # its "Converting and de-quantizing GGUF tensors" bar is a plain tqdm that transformers'
    # progress-bar switch does not reach; prunecli reports the step through its own progress
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnsupportedModelError(f"transformers cannot load {gguf}: {msg}") from exc
    finally:
        gguf_utils.tqdm = bar
    # save_pretrained refuses a quantised model; the weights are already dequantised fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _write_marker(gguf: Path, dest: Path) -> None:
    import transformers

    marker = {
        "fingerprint": _fingerprint(gguf),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "transformers_version": transformers.__version__,
        "dtype": "float32",
    }
    (dest / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def ensure_gguf_cache(gguf: Path, *, rebuild: bool = False, progress: Progress | None = None) -> Path:
    """The fp32 safetensors cache folder of ``gguf``, converting it first if needed.

    Args:
        gguf: an existing ``.gguf`` file.
        rebuild: delete the cache entry and convert again.
        progress: progress reporter for the (slow) conversion.

    Returns:
        A folder that ``from_pretrained`` loads: config.json, model.safetensors, tokenizer files,
        generation_config.json.
    """
    dest = cache_dir_for(gguf)
    if not rebuild and is_valid_cache(dest, gguf):
        return dest
    _require_gguf_packages()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    tmp = sibling_temp_dir(dest)
    try:
        with resolve(progress).task(f"converting {gguf.name} to fp32 safetensors (once)", total=1) as task:
            _convert(gguf, tmp)
            _write_marker(gguf, tmp)
            apply_umask(tmp)  # safetensors writes 0600 files
            task.advance()
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process finished the same conversion first; keep its entry if it is whole.
            if not is_valid_cache(dest, gguf):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
