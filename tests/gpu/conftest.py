"""The GPU tests' fixtures (support/gpu.py): ``cuda_only``."""

from support.gpu import cuda_only  # noqa: F401 - a fixture, found by pytest here
