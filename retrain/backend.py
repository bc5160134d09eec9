"""PyTorch, imported only when retraining actually runs, and the device it trains on."""

from __future__ import annotations

from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

from ..errors import OnnxZipError

INSTALL = 'pip install "onnxzip[torch]"'
TORCH_HINT = f"onnxzip retrain needs PyTorch: {INSTALL}"
MERGE_TORCH_HINT = f"onnxzip merge --retrain-iters needs PyTorch: {INSTALL}"


def require_torch(hint: str = TORCH_HINT) -> ModuleType:
    """The torch module, or OnnxZipError with the install ``hint`` when it cannot be imported."""
    try:
        import torch
    except ImportError:
        raise OnnxZipError(hint) from None
    return torch


def torch_device(device: str):
    """The torch device for a --device request: CUDA for 'auto' or 'cuda' when torch sees one, else the CPU."""
    torch = require_torch()
    if device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` PyTorch intra-op threads (None: unchanged), restored afterwards."""
    torch = require_torch()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
