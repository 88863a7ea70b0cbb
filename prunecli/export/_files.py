"""Output-file rules shared by the exporters: refuse what must not be replaced, write atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prunecli.errors import InputError, OutputExistsError, OutputNotWritableError


def check_output_file(path: str | os.PathLike[str], *, overwrite: bool, suffix: str) -> Path:
    """Check that ``path`` may be written as an export file, before anything is loaded.

    Args:
        path: the file to write (``model.onnx``, ``model.gguf``).
        overwrite: replace an existing *file* (a folder or a symlink is always refused).
        suffix: the expected suffix (``.onnx``, ``.gguf``).

    Returns:
        The absolute path.
    """
    out = Path(path).expanduser().absolute()
    if out.suffix.lower() != suffix:
        raise InputError(f"the output file must end in {suffix}: {path}", hint=f"e.g. -o model{suffix}")
    if out.is_symlink() or out.is_dir():
        raise OutputExistsError(f"refusing to replace {path}: it is a folder or a symlink")
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"output file exists: {path}", hint="choose another -o file or pass --overwrite"
        )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"cannot write in {parent}", hint="choose a folder you can write to")
    return out


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``; the caller writes ``out.name`` (and side files) into it.

    On success every file of the folder is moved next to ``out`` (the main file last, so a
    reader never sees it before its side files); on failure the folder is removed and nothing
    is published.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        files = sorted(tmp.iterdir(), key=lambda p: p.name == out.name)
        umask = os.umask(0)
        os.umask(umask)
        for f in files:
            os.chmod(f, 0o666 & ~umask)
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
