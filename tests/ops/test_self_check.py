"""The shared tolerance (ops.tolerance) and the startup self-check (ops.self_check): a
correct output passes, a broken one is caught and named; the check disables a wrong
path for exactly the token buckets where it is wrong, on every rank (vLLM's layer over
a gloo TP group of two), after which the site's outputs equal the reference; strict
refuses instead; off leaves the wrong path in place (what the check prevents)."""

from __future__ import annotations

import math

import pytest
import torch

from support.check_workers import vllm_site_self_check_rank
from support.dist import run_ranks
from support.op_workers import rank_inputs
from vllm_rocm_fused import envs
from vllm_rocm_fused.ops import backends, self_check
from vllm_rocm_fused.ops.backend_api import CallSpec
from vllm_rocm_fused.ops.fault_injection import FaultInjectedBackend, _other_order
from vllm_rocm_fused.ops.reference import norm_quant_reference
from vllm_rocm_fused.ops.tolerance import compare, fp8_step

FP8 = torch.float8_e4m3fn


def spec_for(tokens=8, hidden=512, *, layout="row", emit=False, quantize=True) -> CallSpec:
    return CallSpec(
        num_tokens=tokens,
        hidden=hidden,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        world_size=1,
        group_size=128,
        weight_offset=1.0,
        emit_bf16=emit,
        scale_layout=layout,
        quant_dtype=FP8,
        has_residual=True,
        quantize=quantize,
    )


def case(tokens=8, hidden=512, seed=0, layout="row", emit=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g) * 2
    residual = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    weight = (torch.randn(hidden, generator=g) * 0.3).to(torch.bfloat16)
    ref = norm_quant_reference(
        h, residual, weight, 1e-6, out_dtype=torch.bfloat16, weight_offset=1.0, emit_bf16=emit, scale_layout=layout
    )
    kw = dict(
        h=h,
        residual=residual,
        weight=weight,
        eps=1e-6,
        weight_offset=1.0,
        group_size=128,
        quant_dtype=FP8,
        scale_layout=layout,
        emit_bf16=emit,
        quantize=True,
    )
    return ref, kw


# --- the tolerance ---------------------------------------------------------------


def test_fp8_step_is_the_grid_spacing():
    v = torch.tensor([0.0, 2.0**-9, 1.0, 1.9, 2.0, 300.0, 448.0])
    assert fp8_step(v, FP8).tolist() == [2.0**-9, 2.0**-9, 2.0**-3, 2.0**-3, 2.0**-2, 32.0, 32.0]
    # e4m3fnuz: one more binade of normals below, the same mantissa
    assert fp8_step(torch.tensor([0.0, 1.0]), torch.float8_e4m3fnuz).tolist() == [2.0**-10, 2.0**-3]


@pytest.mark.parametrize("layout", ["row", "col"])
def test_the_reference_passes_and_one_fp8_step_more_does_not(layout):
    ref, kw = case(layout=layout, emit=True)
    errors = compare(tuple(ref), tuple(ref), **kw)
    assert errors.ok and errors.q_steps == 0 and errors.problem is None
    # q one fp8 step up everywhere a step up exists: still within the tolerance ...
    q = ref.q.float()
    one_up = (q + fp8_step(q, FP8) * torch.sign(q)).clamp(-448, 448).to(FP8)
    assert compare((one_up, ref.scale, ref.residual, ref.normed), tuple(ref), **kw).ok
    # ... three steps are not, and the worst element is named in fp8 steps
    three_up = (q + 3 * fp8_step(q, FP8) * torch.sign(q)).clamp(-448, 448).to(FP8)
    errors = compare((three_up, ref.scale, ref.residual, ref.normed), tuple(ref), **kw)
    assert not errors.ok and 1.5 < errors.q_steps <= 3.0 and "fp8 steps" in errors.describe()


@pytest.mark.parametrize(
    "break_it,what",
    [
        (lambda o: (o.q, o.scale * 1.05, o.residual, o.normed), "scales"),
        (lambda o: (o.q, o.scale, (o.residual.float() * 1.02).to(torch.bfloat16), o.normed), "residual"),
        (lambda o: (o.q, o.scale, o.residual, (o.normed.float() * 1.03).to(torch.bfloat16)), "normed"),
        (lambda o: (o.q, _other_order(o.scale, "row"), o.residual, o.normed), "scales"),
        (lambda o: (o.q, o.scale.t().contiguous().t(), o.residual, o.normed), "strides"),
        (lambda o: (o.q.view(torch.uint8), o.scale, o.residual, o.normed), "q is torch.uint8"),
        (lambda o: (o.q, o.scale, o.residual, None), "activation is missing"),
        (lambda o: (o.q, torch.full_like(o.scale, float("nan")), o.residual, o.normed), "scales inf"),
    ],
    ids=["scales+5%", "residual+2%", "normed+3%", "scales-other-order", "col-strides", "bytes", "no-normed", "nan"],
)
def test_broken_outputs_are_caught_and_named(break_it, what):
    ref, kw = case(emit=True)
    errors = compare(break_it(ref), tuple(ref), **kw)
    assert not errors.ok
    assert what.split()[0] in errors.describe() or what in errors.describe(), errors.describe()


def test_an_all_zero_group_may_have_any_scale():
    """aiter writes 1.0 where the spec writes the floor; q is 0 either way."""
    ref, kw = case()
    kw["weight"] = kw["weight"].clone()
    kw["weight"][:128] = -1.0  # (1 + w) == 0
    ref = norm_quant_reference(kw["h"], kw["residual"], kw["weight"], 1e-6, out_dtype=torch.bfloat16, weight_offset=1.0)
    scale = ref.scale.clone()
    scale[:, 0] = 1.0
    assert compare((ref.q, scale, ref.residual, None), tuple(ref), **{**kw, "emit_bf16": False}).ok


# --- the check -------------------------------------------------------------------


def test_check_sizes_are_both_ends_of_every_bucket():
    assert self_check.check_sizes(1) == [1]
    assert self_check.check_sizes(100) == [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 100]
    buckets = {backends.token_bucket(t) for t in self_check.check_sizes(8192)}
    assert buckets == {1 << k for k in range(14)}


@pytest.fixture
def faulty(clean_registry):
    backends.register_backend(FaultInjectedBackend("scales"))
    yield
    backends.unregister_backend(FaultInjectedBackend.name)


def test_a_wrong_backend_is_disabled_for_every_bucket_it_would_take(faulty, plugin_log):
    weight = (torch.randn(512) * 0.3).to(torch.bfloat16)
    sizes = self_check.check_sizes(40)
    results = self_check.check_site("auto", weight, 1e-6, None, spec_for(), sizes, site="attn_input")
    assert [r.tokens for r in results if r.disabled] == [1, 2, 3, 5, 9, 17, 33]  # the first size of each bucket
    assert all(r.backend == "native" for r in results if not r.disabled)
    assert {key.bucket for _, key, _ in backends.disabled_paths()} == {1, 2, 4, 8, 16, 32, 64}
    # serving's calls of those sizes now take native; other sites (no quant) are untouched
    assert backends.decide("auto", spec_for(tokens=30), None).name == "native"
    assert backends.decide("auto", spec_for(tokens=100), None).name == "fault-injected"  # never checked
    (warning,) = [r.getMessage() for r in plugin_log.records if r.levelname == "WARNING"]
    assert "self-check (attn_input): fault-injected/fused-1 differs from the portable path (worst at T=" in warning
    assert "fp8 steps" in warning and "disabled on every rank for T=1-64" in warning
    (line,) = self_check.summary_lines()
    assert "DISABLED fault-injected/fused-1 at T=1-33 (7 sizes)" in line and "native/generic" in line


def test_strict_refuses(faulty):
    weight = torch.zeros(512, dtype=torch.bfloat16)
    with pytest.raises(self_check.SelfCheckError, match="strict"):
        self_check.check_site("auto", weight, 1e-6, None, spec_for(), [4], site="s", strict=True)
    assert backends.disabled_paths() == []


def test_a_correct_fast_path_is_kept(clean_registry):
    """The check passes a backend that computes the spec (the portable math under another
    name) and disables nothing."""
    from vllm_rocm_fused.ops.native import NativeBackend

    class Correct(NativeBackend):
        name = "correct"
        priority = 900

    backends.register_backend(Correct())
    try:
        results = self_check.check_site(
            "auto", torch.ones(512, dtype=torch.bfloat16), 1e-6, None, spec_for(emit=True, layout="col"), [1, 7, 64]
        )
    finally:
        backends.unregister_backend("correct")
    assert [(r.backend, r.ok, r.disabled) for r in results] == [("correct", True, False)] * 3
    assert all(r.errors is not None and r.errors.q_steps == 0 for r in results)


def test_before_call_checks_each_site_once_and_only_when_configured(faulty):
    weight = torch.ones(512, dtype=torch.bfloat16)
    self_check.before_call("attn_input", "auto", weight, 1e-6, None, spec_for())
    assert self_check.results() == []  # not configured: nothing runs
    self_check.configure("off", 16)
    self_check.before_call("attn_input", "auto", weight, 1e-6, None, spec_for())
    assert self_check.results() == []
    self_check.configure("startup", 16)
    for _ in range(2):
        self_check.before_call("attn_input", "auto", weight, 1e-6, None, spec_for(tokens=3))
    assert [r.tokens for r in self_check.results()] == [1, 1, 2, 2, 3, 3, 4, 5, 5, 8, 9, 9, 16]
    with pytest.raises(ValueError, match="mode"):
        self_check.configure("sometimes", 16)


def test_the_env_switch_and_the_fault_hook(monkeypatch, clean_registry):
    monkeypatch.setenv("VLLM_ROCM_FUSED_VALIDATE", "STRICT")
    assert envs.validate_mode() == "strict" and envs.problems() == []
    monkeypatch.setenv("VLLM_ROCM_FUSED_VALIDATE", "maybe")
    assert envs.problems() == ["VLLM_ROCM_FUSED_VALIDATE='maybe': not a self-check mode (one of off, startup, strict)"]
    monkeypatch.delenv("VLLM_ROCM_FUSED_VALIDATE")
    assert envs.validate_mode() == "startup"
    assert envs.injected_fault() is None and "fault-injected" not in backends.known_backend_names()
    monkeypatch.setenv("VLLM_ROCM_FUSED_FAULT_INJECT", "layout")
    monkeypatch.setattr(backends, "_loaded", False)
    try:
        assert backends.get_backend("fault-injected").fault == "layout"
    finally:
        backends.unregister_backend("fault-injected")


# --- vLLM's layer over a TP group of two ---------------------------------------------

TOKENS = 6
_runs: dict = {}


def site_runs():
    """One spawn of two ranks runs the layer in each mode (a spawn costs seconds)."""
    if not _runs:
        modes = ["startup", "strict", "off"]
        try:
            per_rank = run_ranks(vllm_site_self_check_rank, 2, "scales", modes, TOKENS, timeout=240)
        except Exception as e:  # noqa: BLE001 - reported by each test, not re-run by each
            _runs["error"] = e
        else:
            for i, mode in enumerate(modes):
                _runs[mode] = [per_rank[r][i] for r in range(2)]
    if "error" in _runs:
        raise _runs["error"]
    return _runs


def site_reference(rank):
    ins = [rank_inputs(r, TOKENS, 256, seed=3) for r in range(2)]
    total = torch.stack([x.float() for x, _, _ in ins]).sum(0)
    _, residual, weight = ins[rank]
    ref = norm_quant_reference(total, residual, weight, 1e-6, out_dtype=torch.bfloat16, weight_offset=1.0)
    return ref, total, residual, weight


def site_errors(out, rank):
    ref, total, residual, weight = site_reference(rank)
    return compare(
        out,
        tuple(ref),
        h=total,
        residual=residual,
        weight=weight,
        eps=1e-6,
        weight_offset=1.0,
        group_size=128,
        quant_dtype=FP8,
        scale_layout="row",
        emit_bf16=False,
        quantize=True,
    )


@pytest.mark.timeout(300)
def test_vllm_site_disables_the_wrong_path_on_every_rank():
    per_rank = site_runs()["startup"]
    disabled = [d for _, d, _, _ in per_rank]
    assert disabled[0] == disabled[1]
    # max_num_batched_tokens=64: every bucket up to 64 (1, 2, 4, ..., 64)
    assert sorted(b for _, b in disabled[0]) == [1, 2, 4, 8, 16, 32, 64]
    for rank, (out, _, summary, counters) in enumerate(per_rank):
        assert counters == {"native/generic": 1}  # the site's own call
        assert site_errors(out, rank).ok
        assert "DISABLED fault-injected/fused-1" in summary[0]


@pytest.mark.timeout(300)
def test_vllm_site_strict_refuses_on_every_rank():
    for out, disabled, _, _ in site_runs()["strict"]:
        assert isinstance(out, str) and "VLLM_ROCM_FUSED_VALIDATE=strict" in out
        assert disabled == []


@pytest.mark.timeout(300)
def test_vllm_site_without_the_check_serves_the_wrong_scales():
    """What the check prevents: with it off, the wrong path runs and its output is off."""
    for rank, (out, disabled, summary, counters) in enumerate(site_runs()["off"]):
        assert counters == {"fault-injected/fused-1": 1} and disabled == [] and summary == []
        errors = site_errors(out, rank)
        assert not errors.ok and errors.scale > 10 and not math.isinf(errors.q_steps)


def test_a_backend_that_raises_is_reported_and_left(clean_registry):
    from vllm_rocm_fused.ops.native import NativeBackend

    class Raises(NativeBackend):
        name = "raises"
        priority = 900

        def run(self, *args):
            raise RuntimeError("no kernel image for this GPU")

    backends.register_backend(Raises())
    try:
        results = self_check.check_site("auto", torch.ones(512, dtype=torch.bfloat16), 1e-6, None, spec_for(), [4, 8])
        broken = backends.broken_backends()
    finally:
        backends.unregister_backend("raises")
    assert [(r.backend, r.ok, r.disabled) for r in results] == [
        ("raises", False, True),
        ("native", True, False),
        ("native", True, False),
    ]
    assert results[0].errors is not None and results[0].errors.problem == self_check.RAISED
    assert "no kernel image" in broken["raises"]  # no group: disabled for the process
