import os

import pytest
import torch

# Builds that are a preset with overrides: name -> (preset, overrides).
DERIVED_BUILDS = {"moe-bf16": ("moe-fp8", {"quantization": "none"})}


def pytest_configure(config):
    # Keep CPU tests deterministic and cheap on small boxes.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Builds tiny checkpoints on demand, once per session: tiny_models("dense-fp8")
    (a preset, or a name of DERIVED_BUILDS)."""
    from vllm_rocm_fused.tiny_models.builder import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built = {}

    def get(preset: str, seed: int = 0, **overrides):
        key = (preset, seed, tuple(sorted(overrides.items())))
        if key not in built:
            name = f"{preset}-s{seed}" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            base, derived = DERIVED_BUILDS.get(preset, (preset, {}))
            built[key] = build_tiny_model(base, root / name, seed=seed, overrides={**derived, **overrides} or None)
        return built[key]

    return get


@pytest.fixture(scope="session")
def engines(tiny_models):
    """engines(*support.engines.Engine) -> their results, each engine started once per
    session (see support.engines)."""
    from support.engines import run

    return lambda *specs: run(tiny_models, *specs)
