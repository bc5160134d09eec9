"""Light retraining of a merged model that keeps its sharing (MTZ, Algorithm 1, line 10).

PyTorch is an optional extra (``pip install "onnxzip[torch]"``): importing this package does not
import torch; ``retrain`` raises OnnxZipError with the install hint when torch is missing.
"""

from .api import RetrainResult, TaskRetrain, retrain
from .backend import TORCH_HINT
from .options import RetrainOptions

__all__ = ["RetrainOptions", "RetrainResult", "TaskRetrain", "TORCH_HINT", "retrain"]
