"""Fake aiter whose import raises RuntimeError (not ImportError), as the PyPI
``amd-aiter`` 0.1.7.post2 build does on a box without ROCm (its JIT loader
fails at import). The backend must treat any exception as "unavailable"."""

VERSION = None
MESSAGE = "aiter: no HIP runtime found (the fake's emulation of a non-ROCm import failure)"


def modules():
    raise RuntimeError(MESSAGE)
