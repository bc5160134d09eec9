"""Light retraining of a merged model that keeps its sharing (MTZ, Algorithm 1, line 10).

PyTorch is an optional extra (``pip install "onnxzip[torch]"``): importing this package does not
import torch; ``retrain`` raises OnnxZipError with the install hint when torch is missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .backend import TORCH_HINT
from .options import RetrainOptions

if TYPE_CHECKING:
    from .api import RetrainResult, TaskRetrain, retrain

__all__ = ["RetrainOptions", "RetrainResult", "TaskRetrain", "TORCH_HINT", "retrain"]
# Loaded on first use (PEP 562): .api imports onnx and ONNX Runtime, which a CLI's --help need not pay for.
_FROM_API = ("RetrainResult", "TaskRetrain", "retrain")


def __getattr__(name: str):
    if name in _FROM_API:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
