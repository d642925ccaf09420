import pytest

from vllm_rocm_fused.tiny_models import build_tiny_model

# name -> (preset, overrides); every build uses seed 0.
BUILDS = {
    "dense-fp8": ("dense-fp8", None),
    "dense-bf16": ("dense-bf16", None),
    "moe-fp8": ("moe-fp8", None),
    "moe-bf16": ("moe-fp8", {"quantization": "none"}),
    "vl-fp8": ("vl-fp8", None),
    "trained-dense-bf16": ("trained-dense-bf16", None),
    "trained-dense-fp8": ("trained-dense-fp8", None),
    "trained-moe-bf16": ("trained-moe-bf16", None),
    "trained-moe-fp8": ("trained-moe-fp8", None),
}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Build each tiny model once per session on first use; returns name -> folder."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache = {}

    def get(name):
        if name not in cache:
            preset, overrides = BUILDS[name]
            cache[name] = build_tiny_model(preset, root / name, seed=0, overrides=overrides)
        return cache[name]

    return get
