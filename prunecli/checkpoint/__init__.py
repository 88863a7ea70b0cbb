"""Checkpoints: atomic safetensors folders with provenance, reloadable by stock transformers.

Importing this package is cheap; torch and transformers are imported when saving.
``modeling_prunecli.py`` in this folder is the file copied into checkpoints whose layer widths
differ by layer; the loader in :mod:`prunecli.models` builds models with the same code.
"""

from __future__ import annotations

from prunecli.checkpoint.save import MODELING_FILE, PROVENANCE_FILE, RECIPE_FILE, save_checkpoint

__all__ = ["MODELING_FILE", "PROVENANCE_FILE", "RECIPE_FILE", "save_checkpoint"]
