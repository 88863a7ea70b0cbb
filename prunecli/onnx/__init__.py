"""Structured pruning of ONNX models: graph, calibration through onnxruntime, rewriting.

``import prunecli.onnx`` stays light; ``onnx`` and ``onnxruntime`` are imported when used.
"""

from __future__ import annotations
