"""Shared test set-up. The models/ scripts (refdata, refnets, build_reference, ...) are importable
because pyproject.toml puts models/ on pytest's pythonpath; models/ is not an installed package."""
