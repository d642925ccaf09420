"""Fixtures of the ops tests: the ROCm backend on a fake box (support.rocm_harness), for
the self-check against every fake aiter generation, and a clean registry per test."""

import pytest

from support.rocm_harness import plugin_log, rocm  # noqa: F401 - fixtures, found by pytest here


@pytest.fixture
def clean_registry():
    """Agreements, disabled paths, broken marks and self-check results forgotten before
    and after the test (they live for the process otherwise)."""
    from vllm_rocm_fused.ops import backends, self_check

    backends.reset_decisions()
    self_check.reset()
    yield
    backends.reset_decisions()
    self_check.reset()
