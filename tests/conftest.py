"""Shared fixtures: the models/ scripts loaded by path (models/ is not an installed package)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_mlp():
    """The numpy MNIST trainer and demo builder, models/mnist_mlp.py."""
    spec = importlib.util.spec_from_file_location("mnist_mlp", REPO / "models" / "mnist_mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
