"""The self-check against every fake aiter generation (support.fake_aiter): aiter's own
numbers (its roundings, its (1 + w) in bf16, its multi-stage kernels above the one-stage
cut, its 1.0 scale for all-zero groups) pass the shared tolerance at every checked size,
both scale layouts, with and without the bf16 activation; and a fake kernel made to
return wrong scales, or scales in the wrong memory order, is caught and disabled for
exactly the buckets where it is wrong (the registry's cut: that backend for those
token buckets), after which those calls take the portable path."""

from __future__ import annotations

import pytest
import torch

from support import fake_aiter
from support.rocm_harness import PER_GROUP, RocmHarness
from vllm_rocm_fused.ops import backends, self_check
from vllm_rocm_fused.ops.backend_api import CallSpec

FP8 = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}
SIZES = self_check.check_sizes(96)  # past vLLM's one-stage cut (80 tokens here)


class ShapedPeers(fake_aiter.SimulatedGroup):
    """Simulated peers of any shape: each call's peers are random tensors made from its
    shape, so the check's inputs of every size have a sum (the fake kernels and the
    reference both reduce through ``all_reduce``)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        g = torch.Generator().manual_seed(x.shape[0] * 7919 + x.shape[1])
        for _ in range(self.world_size - 1):
            h = h + torch.randn(x.shape, generator=g).to(x.dtype).to(torch.float32)
        return h


def tp_comm(rocm: RocmHarness, world_size: int):
    class _Case:  # what RocmHarness.vllm_comm reads
        def group(self):
            return ShapedPeers(world_size)

    return rocm.vllm_comm(_Case())


def site_spec(arch, world_size, *, quantize=True, emit_bf16=False, layout="row") -> CallSpec:
    return CallSpec(
        num_tokens=1,
        hidden=512,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        world_size=world_size,
        group_size=128,
        weight_offset=1.0,
        emit_bf16=emit_bf16,
        scale_layout=layout,
        quant_dtype=FP8[arch],
        has_residual=True,
        quantize=quantize,
    )


def norm_weight(zero_group: bool = True) -> torch.Tensor:
    w = torch.randn(512, generator=torch.Generator().manual_seed(5)) * 0.3
    if zero_group:
        w[:128] = -1.0  # Gemma (1 + w) == 0: an all-zero quant group (aiter's scale 1.0)
    return w.to(torch.bfloat16)


# (generation, arch, world size): every usable generation on both archs; gfx942 has
# no per-group kernel (fused-2), gfx950 runs it where the generation has it (fused-1)
COMBOS = [(g, a, w) for g in fake_aiter.USABLE for a, w in (("gfx950", 2), ("gfx942", 8))]


@pytest.mark.parametrize("gen,arch,world_size", COMBOS)
def test_aiters_numbers_pass_at_every_size(rocm, clean_registry, gen, arch, world_size):
    rocm.use(gen, arch)
    comm = tp_comm(rocm, world_size)
    w = norm_weight()
    variants = [
        dict(quantize=True, emit_bf16=False, layout="row"),
        dict(quantize=True, emit_bf16=True, layout="col"),
        dict(quantize=False),
    ]
    for v in variants:
        spec = site_spec(arch, world_size, **v)
        results = self_check.check_site("auto", w, 1e-6, comm, spec, SIZES, site=str(v))
        ran = {(r.backend, r.path) for r in results}
        assert all(r.ok and not r.disabled for r in results), [r.line() for r in results if not r.ok]
        assert ("rocm", "fused-1") in ran or ("rocm", "fused-2") in ran, ran  # aiter really ran
        compared = [r.errors for r in results if r.errors is not None]
        assert compared and max(e.q_steps for e in compared) <= 1.0
    assert backends.disabled_paths() == []


@pytest.mark.parametrize("fault", ["scales", "layout"])
@pytest.mark.parametrize("gen", ["v0_1_14", "v0_1_20"])
def test_a_wrong_fused_kernel_is_disabled_where_it_is_wrong(rocm, clean_registry, plugin_log, gen, fault):
    fake = rocm.use(gen, "gfx950")
    ca_class = rocm.ca_class()
    original = ca_class._per_group

    def broken(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        q, residual, scale = out[0], out[1], out[2]
        if fault == "scales":
            scale = scale * 2
        else:  # the [T, G] values written in the other order, under the same strides
            t, g = scale.shape
            scale = torch.as_strided(scale.t().contiguous().reshape(-1), (t, g), scale.stride())
        return (q, residual, scale, *out[3:])

    ca_class._per_group = broken
    try:
        comm = tp_comm(rocm, 2)
        spec = site_spec("gfx950", 2)
        results = self_check.check_site("auto", norm_weight(zero_group=False), 1e-6, comm, spec, SIZES, site="s")
    finally:
        ca_class._per_group = original
    assert fake.calls(PER_GROUP)
    # the first size of a bucket that differs disables it: its other size runs fused-2 at once
    disabled = sorted({backends.token_bucket(r.tokens) for r in results if r.disabled})
    final = {r.tokens: (r.backend, r.path) for r in results if not r.disabled}
    assert all(r.ok for r in results if not r.disabled)
    buckets = sorted({backends.token_bucket(t) for t in SIZES})
    if fault == "scales":
        assert disabled == buckets
    else:  # one token: both memory orders are the same bytes, nothing wrong to see
        assert disabled == buckets[1:] and final[1] == ("rocm", "fused-1")
    for t in SIZES:
        if backends.token_bucket(t) in disabled:
            assert final[t] == ("native", "generic"), t  # the registry's cut: the backend for the bucket
    (warning,) = [m for r in plugin_log.records if "self-check" in (m := r.getMessage()) and r.levelname == "WARNING"]
    assert "rocm/fused-1 differs" in warning and "fp8 steps" in warning
    assert f"disabled on every rank for {self_check.bucket_ranges(disabled)}," in warning
    # serving calls of a disabled bucket now take the portable path, the others keep fused-1
    assert {(name, key.bucket) for name, key, _ in backends.disabled_paths()} == {("rocm", b) for b in disabled}
    summary = self_check.site_summary("s")
    assert summary is not None and "DISABLED rocm/fused-1" in summary
