"""Skip markers shared by the test modules."""

import pytest


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a vLLM that fails to import is as good as none
        return False
    return True


requires_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not importable here")
