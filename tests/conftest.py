import os

import pytest

# Compiled programs persist between runs (XLA's cache); the suite compiles many small ones.
from imp_jax.llm import enable_compilation_cache

enable_compilation_cache()

DATA = os.path.join(os.path.dirname(__file__), "data")


def pytest_collection_modifyitems(config, items):
    import jax

    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
