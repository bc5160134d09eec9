"""The typer command-line front end of onnxzip (installed as ``onnxzip.cli``)."""
