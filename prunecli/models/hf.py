"""Small helpers around transformers shared by the loader and the checkpoint writer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' tqdm bars ("Loading weights", "Writing model shards") while inside.

    Library code reports progress through :mod:`prunecli.progress`, not through stray bars.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def config_problem(config: Any) -> str | None:
    """Why transformers' own config validation refuses ``config``, or None when it accepts it.

    Runs the config class's validators (``hidden_size % num_attention_heads``, ``layer_types``
    of length ``num_hidden_layers``, ...) as ``from_pretrained`` will when the checkpoint is
    reloaded. A config with per-layer widths is checked on its global values (the dense
    model's), as its checkpoint's config class does; each layer states its own ``head_dim``.

    Args:
        config: a transformers config (anything without ``validate`` is accepted).

    Returns:
        The first line of the validation error, or None.
    """
    from huggingface_hub.errors import StrictDataclassError

    from prunecli.checkpoint.modeling_prunecli import global_view

    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    try:
        global_view(config).validate()
    except (StrictDataclassError, ValueError, TypeError) as exc:
        text = str(exc).strip().splitlines()
        cause = [line.strip() for line in text[1:] if line.strip()]
        return cause[0] if cause else (text[0] if text else type(exc).__name__)
    return None
