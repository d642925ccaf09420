"""Markers and fixtures of the GPU tests (tests/gpu): skipped cleanly where there is no
CUDA GPU; every GPU test checks that the CUDA backend ran and never broke (so a silent
fallback to the portable path cannot pass for the fast path)."""

import pytest
import torch

from vllm_rocm_fused.ops import backends

HAS_CUDA = torch.cuda.is_available() and torch.version.hip is None

gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


@pytest.fixture
def cuda_only():
    backends.reset_counters()
    yield
    assert backends.broken_backends() == {}, f"a backend broke: {backends.broken_backends()}"
