"""Shared test set-up. The models/ scripts (refdata, refnets, build_reference, ...) are importable
because pyproject.toml puts models/ on pytest's pythonpath; models/ is not an installed package."""

import os

from hypothesis import settings

# CI runs the property tests on a fixed sequence of examples (a failure there is reproducible and
# never a matter of luck); local runs draw new examples each time and keep no example database.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("dev", database=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
