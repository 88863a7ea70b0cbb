"""Model loading: folders, hub ids, ``.gguf`` files and built-in aliases.

Importing this package is cheap (no torch, no transformers); they are imported when a model
is loaded.

Example:
    >>> from prunecli.models import load_model
    >>> lm = load_model("smollm2-135m")  # doctest: +SKIP
    >>> lm.model.num_parameters()  # doctest: +SKIP
    134515008
"""

from __future__ import annotations

from prunecli.models.aliases import list_aliases, pull_alias
from prunecli.models.loading import LoadedModel, classify_spec, load_model, resolve_dtype

__all__ = ["LoadedModel", "classify_spec", "list_aliases", "load_model", "pull_alias", "resolve_dtype"]
