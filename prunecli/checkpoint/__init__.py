"""Checkpoints: atomic safetensors folders with provenance, reloadable by stock transformers.

Importing this package is cheap; torch and transformers are imported when saving.
``modeling_prunecli.py`` in this folder is the file copied into checkpoints that the stock
class cannot build from their config (widths that differ by layer, head sizes or biases the
config cannot state); the loader in :mod:`prunecli.models` builds models with the same code.
"""

from __future__ import annotations

from prunecli.checkpoint.save import (
    MODELING_FILE,
    PROVENANCE_FILE,
    RECIPE_FILE,
    check_output_dir,
    is_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "MODELING_FILE",
    "PROVENANCE_FILE",
    "RECIPE_FILE",
    "check_output_dir",
    "is_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
