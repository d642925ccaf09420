import pytest


@pytest.fixture(scope="session")
def built(tiny_models):
    """name -> folder of that tiny model (seed 0), built once per session: a preset or a
    name of tests/conftest.py's DERIVED_BUILDS (e.g. "moe-bf16")."""
    return tiny_models
