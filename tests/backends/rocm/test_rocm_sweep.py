"""The backend never sends a call real aiter would throw on, hang on or corrupt
with: every token count 1-16384 (sampled, every boundary included) x hidden
256-16384 x TP 2/4/8 x API generation (the refused v0.1.11 and the racing
v0.1.12/13 included) x arch x box (ROCm 6, ROCm 7, and a ROCm 7 torch whose
aiter JIT-builds with a ROCm 6 hipcc) x site kind.

The sweep asks the backend for its plan (the steps it may take and the kernel
variant of each: what ``run`` sends) and judges every call the plan could send
-- each eligible step, not only the first, since a later one runs when an
earlier one fails -- with the fake's reading of aiter's dispatch
(support.fake_aiter.base.kernel_verdict), written independently of the
backend's rules. At the production sizes (hidden 2048-8192, tokens 1-8192) it
also checks that the first step is the fastest safe one (``fastest_safe``). A
second test sends a sample of the same calls through ``run`` on meta tensors,
so the plan is checked against what is really sent.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from support import fake_aiter
from support.fake_aiter.base import kernel_verdict
from support.rocm_harness import PER_GROUP, Case
from vllm_rocm_fused.ops import backends
from vllm_rocm_fused.ops.backends import CallSpec

HIDDEN = (
    256,
    384,
    512,
    640,
    768,
    1024,
    1536,
    2048,
    3072,
    4096,
    5120,
    6144,
    7168,
    8064,
    8192,
    8320,
    10240,
    12288,
    16256,
    16384,
)
BASE_TOKENS = (
    1,
    2,
    3,
    8,
    16,
    24,
    25,
    31,
    32,
    40,
    41,
    48,
    63,
    64,
    65,
    79,
    80,
    81,
    96,
    127,
    128,
    129,
    255,
    256,
    257,
    511,
    512,
    513,
    1023,
    1024,
    2047,
    2048,
    4095,
    4096,
    4097,
    8191,
    8192,
    8193,
    16383,
    16384,
)
BYTE_EDGES = (128 * 1024, 256 * 1024, 512 * 1024, 64 * 1024 * 1024)  # one-stage caps, two-stage/split, fused limit
ROCM6, ROCM7 = "6.4.43482", "7.0.51831"
# (torch's HIP, the HIP of the hipcc aiter JIT-builds with)
BOXES = ((ROCM6, ROCM6), (ROCM7, ROCM7), (ROCM7, ROCM6))
# the compiler matters to the per-group kernel only, which runs on gfx950 only
ARCH_BOXES = [("gfx950", box) for box in BOXES] + [("gfx942", box) for box in BOXES[:2]]
WORLD_SIZES = (2, 4, 8)
PRODUCTION_HIDDEN = range(2048, 8193)
PRODUCTION_TOKENS = range(1, 8193)
VLLM_ONE_STAGE_CAP = {4: 256 * 1024, 8: 128 * 1024}


def tokens_for(hidden: int) -> list[int]:
    """The base counts plus, for this hidden size, the counts either side of every byte boundary."""
    edges = set()
    for cap in BYTE_EDGES:
        t = cap // (hidden * 2)
        edges.update({t - 1, t, t + 1})
    return sorted({t for t in (*BASE_TOKENS, *edges) if 1 <= t <= 16384})


def spec(tokens, hidden, world_size, *, quantize, arch, device="cpu") -> CallSpec:
    fp8 = torch.float8_e4m3fnuz if arch == "gfx942" else torch.float8_e4m3fn
    return CallSpec(
        tokens,
        hidden,
        torch.bfloat16,
        torch.device(device),
        world_size,
        128,
        1.0,
        quantize,
        "col",
        fp8,
        True,
        quantize=quantize,
    )


def sent_calls(plan, s: CallSpec, comm_one_stage) -> list[tuple[str, bool]]:
    """Every (kernel, use_1stage) the plan's steps may launch. Module routes: aiter's
    communicator picks use_1stage (``comm_one_stage``), and its per-group function
    falls back to AR+RMSNorm on a decline."""
    calls = []
    for step in plan.steps:
        kernel = plan.kernels[step.key]
        one_stage = kernel.use_1stage if kernel is not None else comm_one_stage
        if step.key == "per-group":
            calls.append(("per_group", one_stage))
            if kernel is None:
                calls.append(("ar_rms", one_stage))
        else:
            calls.append(("ar_rms", one_stage))
    return calls


def verdict(ca_class, kernel: str, tokens: int, hidden: int, ws: int, use_1stage: bool, compiler: str):
    return kernel_verdict(
        kernel,
        tokens=tokens,
        hidden=hidden,
        dtype=torch.bfloat16,
        world_size=ws,
        use_1stage=use_1stage,
        one_block_per_token=ca_class.ONE_STAGE_ONE_BLOCK_PER_TOKEN,
        hip=compiler,
        two_stage_races=ca_class.TWO_STAGE_RACES,
        fixed_hidden=ca_class.FIXED_HIDDEN,
    )


def fastest_safe(ca_class, arch: str, compiler: str, ws: int, hidden: int, tokens: int, quantize: bool) -> str:
    """The step a vLLM-route call should take, from the fake's verdicts: one kernel
    before two before the portable path; each kernel in the variant vLLM's rule
    picks (one-stage for <= 80 tokens under its byte cap) when that is safe, else
    in the other variant where that is safe -- except a plain AR+RMSNorm outside
    vLLM's one-stage rule, which vLLM measured slower than an unfused all-reduce +
    norm, and a one-stage one outside the 80-token rule -- and a per-group
    one-stage kernel beyond the byte cap (one kernel instead of two)."""
    if tokens * hidden * 2 >= 64 * 1024 * 1024 or ca_class.FIXED_HIDDEN:
        return "generic"
    vllm_one = tokens <= 80 and (ws == 2 or tokens * hidden * 2 < VLLM_ONE_STAGE_CAP[ws])

    def runs(kernel: str) -> bool:
        if vllm_one:
            return verdict(ca_class, kernel, tokens, hidden, ws, True, compiler).problem is None
        if verdict(ca_class, kernel, tokens, hidden, ws, False, compiler).problem is None:
            return True
        return kernel == "per_group" and tokens <= 80 and not ca_class.TWO_STAGE_RACES

    if not quantize:
        return "fused-1" if runs("ar_rms") else "generic"
    if arch == "gfx950" and hasattr(ca_class, PER_GROUP.split(".")[1]) and runs("per_group"):
        return "fused-1"
    return "fused-2" if runs("ar_rms") else "generic"


@pytest.mark.parametrize("route", ["vllm", "aiter"])
@pytest.mark.parametrize("gen", fake_aiter.WITH_FUSED_API)
def test_no_call_real_aiter_would_refuse(rocm, gen, route):
    checked = eligible = one_kernel = fastest = 0
    for arch, (hip, compiler) in ARCH_BOXES:
        fake = rocm.use(gen, arch, hip=hip, compiler_hip=compiler)
        ca_class = rocm.ca_class()
        if route == "aiter" and not fake.generation.modules()["aiter.dist.communication_op"]:
            continue
        for ws in WORLD_SIZES:
            case = Case(tokens=1, hidden=256, world_size=ws)
            comm = rocm.vllm_comm(case, register=False)
            if route == "aiter":  # no vLLM object; aiter's own TP group over the same ranks
                comm.coordinator.device_communicator.aiter_ar_comm = None
                fake.set_tp_group(list(range(ws)), ca_class(case.group(), torch.device("cpu")))
            for hidden in HIDDEN:
                for tokens in tokens_for(hidden):
                    comm_one_stage = tokens * hidden * 2 <= 128 * 1024  # aiter's communicator's default
                    for quantize in (True, False):
                        s = spec(tokens, hidden, ws, quantize=quantize, arch=arch)
                        plan = rocm.backend.plan(s, comm)
                        for kernel, use_1stage in sent_calls(plan, s, comm_one_stage):
                            v = verdict(ca_class, kernel, tokens, hidden, ws, use_1stage, compiler)
                            assert v.problem is None, (
                                (gen, route, arch, hip, compiler, ws, hidden, tokens, kernel, use_1stage),
                                v,
                                plan.why_not,
                            )
                            checked += 1
                        eligible += bool(plan.steps)
                        one_kernel += bool(plan.steps) and plan.steps[0].path == "fused-1" and quantize
                        if route == "vllm" and hidden in PRODUCTION_HIDDEN and tokens in PRODUCTION_TOKENS:
                            taken = plan.steps[0].path if plan.steps else "generic"
                            best = fastest_safe(ca_class, arch, compiler, ws, hidden, tokens, quantize)
                            assert taken == best, (
                                (gen, arch, hip, compiler, ws, hidden, tokens, quantize),
                                plan.why_not,
                            )
                            fastest += 1
    # every production point was judged (archs x boxes x TP sizes x site kinds)
    production = sum(
        len([t for t in tokens_for(h) if t in PRODUCTION_TOKENS]) for h in HIDDEN if h in PRODUCTION_HIDDEN
    )
    assert fastest == (production * len(ARCH_BOXES) * len(WORLD_SIZES) * 2 if route == "vllm" else 0)
    if gen == "v0_1_11":  # refused outright
        assert eligible == 0
        return
    # not vacuous: most calls below 64 MiB are fused, one kernel where the API has it
    assert eligible > 1000 and checked >= eligible
    if gen != "v0_1_13" and not (route == "aiter" and gen == "v0_1_18"):
        assert one_kernel > 100


def test_the_judge_catches_what_the_old_rules_sent():
    """The verdict is not vacuous: the calls the backend sent before these rules
    (one-stage by bytes alone, any per-group variant on any ROCm, two-stage
    AR+RMSNorm at any hidden) are flagged."""
    old_one_stage = kernel_verdict(
        "per_group",
        tokens=81,
        hidden=512,
        dtype=torch.bfloat16,
        world_size=2,
        use_1stage=True,
        one_block_per_token=True,
        hip="7.0",
    )
    assert old_one_stage.hazard  # 81 x 512 x 2 = 81 KiB < 128 KiB: the old rule chose one-stage
    assert kernel_verdict(
        "ar_rms",
        tokens=200,
        hidden=256,
        dtype=torch.bfloat16,
        world_size=4,
        use_1stage=True,
        one_block_per_token=True,
        hip="7.0",
    ).problem.startswith("Token number is too large")
    assert (
        "n too small"
        in kernel_verdict(
            "ar_rms",
            tokens=4096,
            hidden=256,
            dtype=torch.bfloat16,
            world_size=2,
            use_1stage=False,
            one_block_per_token=False,
            hip="7.0",
        ).problem
    )
    assert kernel_verdict(
        "per_group",
        tokens=1024,
        hidden=4096,
        dtype=torch.bfloat16,
        world_size=8,
        use_1stage=False,
        one_block_per_token=False,
        hip="6.4",
    ).hazard
    assert (
        kernel_verdict(
            "per_group",
            tokens=1024,
            hidden=4096,
            dtype=torch.float16,
            world_size=8,
            use_1stage=False,
            one_block_per_token=False,
            hip="6.4",
        ).problem
        is None
    )


# a sample sent through run() on meta tensors: every generation, the token
# boundaries that change the kernel, small and large hidden sizes
RUN_TOKENS = (1, 80, 81, 200, 16384)
RUN_HIDDEN = (256, 4096, 8192, 16384)


# ROCm 6 and 7 for every generation used, the mixed box (which the sweep above
# covers in full) for the newest, one box for the refused one
RUN_CASES = [
    ("v0_1_11", ROCM7, ROCM7),
    *((gen, hip, compiler) for gen in fake_aiter.USABLE for hip, compiler in BOXES[:2]),
    ("v0_1_20", ROCM7, ROCM6),
]


@pytest.mark.parametrize("gen,hip,compiler", RUN_CASES)
def test_run_sends_what_the_plan_says(rocm, gen, hip, compiler):
    fake = rocm.use(gen, "gfx950", hip=hip, compiler_hip=compiler)
    meta = torch.device("meta")
    ran = 0
    for ws, hidden, tokens, quantize in itertools.product((2, 8), RUN_HIDDEN, RUN_TOKENS, (True, False)):
        if tokens * hidden * 2 >= 64 * 1024 * 1024:
            continue
        group = fake_aiter.SimulatedGroup(ws, [torch.empty(tokens, hidden, device=meta)] * (ws - 1))
        ca = rocm.ca_class()(group, meta, max_size=8192 * 1024 * 8 * 2)
        coordinator = fake_aiter.FakeCoordinator(group, aiter_ar_comm=fake_aiter.VllmAiterWrapper(ca))
        from vllm_rocm_fused.layers.comm import VllmGroupCommunicator

        comm = VllmGroupCommunicator(coordinator)
        s = spec(tokens, hidden, ws, quantize=quantize, arch="gfx950", device="meta")
        plan = rocm.backend.plan(s, comm)
        x = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=meta)
        w = torch.empty(hidden, dtype=torch.bfloat16, device=meta)
        fake.state.calls.clear()
        out, path = rocm.backend.run(x, x, w, 1e-6, comm, s)
        sent = [c for c in fake.state.calls if c.name != "CustomAllreduce.__init__" and "use_1stage" in c.args]
        if not plan.steps:
            assert path == "generic" and not sent
            continue
        first = plan.steps[0]
        assert path == first.path and sent, (gen, ws, hidden, tokens, quantize, plan.why_not)
        assert sent[0].args["use_1stage"] is plan.kernels[first.key].use_1stage
        assert sent[0].args["variant"] == plan.kernels[first.key].variant
        assert (sent[0].name == PER_GROUP) == (first.key == "per-group")
        ran += 1
    assert ran > {"v0_1_11": -1, "v0_1_13": 10}.get(gen, 20)
    assert backends.disabled_paths() == []  # nothing predictable disabled a step
