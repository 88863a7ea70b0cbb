"""Calibration and evaluation data: text sources -> token windows ``[n, seqlen]``.

Example:
    >>> from prunecli.data import calibration_windows, data_hash, eval_windows
    >>> calib = calibration_windows(tokenizer, None, nsamples=64, seqlen=128)  # doctest: +SKIP
    >>> test = eval_windows(tokenizer, "persuasion.txt", seqlen=512, max_windows=16)  # doctest: +SKIP
    >>> data_hash(calib)  # doctest: +SKIP
"""

from __future__ import annotations

from prunecli.data.sources import HfSpec, load_texts, parse_hf_spec, sample_text
from prunecli.data.windows import (
    calibration_windows,
    data_hash,
    eval_windows,
    tokenize_source,
    tokenize_texts,
    window_bos,
)

__all__ = [
    "HfSpec",
    "calibration_windows",
    "data_hash",
    "eval_windows",
    "load_texts",
    "parse_hf_spec",
    "sample_text",
    "tokenize_source",
    "tokenize_texts",
    "window_bos",
]
