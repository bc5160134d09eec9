"""onnxzip: merge pre-trained ONNX networks into one multi-task model (Multi-Task Zipping)."""

__version__ = "0.1.0"
