"""Small helpers around transformers shared by the loader and the checkpoint writer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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
