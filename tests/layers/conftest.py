import pytest


@pytest.fixture(scope="module")
def vllm_cfg():
    """A current vLLM config for the CPU platform (constructing vLLM layers and kernels needs one)."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        yield
