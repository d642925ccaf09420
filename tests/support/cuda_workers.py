"""Rank bodies for the multi-GPU tests (imported by spawned children, one per GPU).

Every rank builds every rank's inputs from shared seeds, so it can compute the exact
all-reduced input (float32, rank order) and check its own outputs against the float64
oracle locally; the parent compares digests across ranks (all ranks must hold the same
bits) and collects failures.
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

FP8 = torch.float8_e4m3fn
EPS = 1e-6


def rank_inputs(world, t, h, seed, *, dtype=torch.bfloat16, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, h, generator=g).to(dtype).to(device) for _ in range(world)]
    res = (torch.randn(t, h, generator=g) * 2).to(dtype).to(device)
    w = (torch.randn(h, generator=g) * 0.3).to(dtype).to(device)
    return xs, res, w


def exact_sum(xs):
    h = xs[0].float()
    for x in xs[1:]:
        h = h + x.float()
    return h


def digest(tensors) -> list[int]:
    out = []
    for t in tensors:
        if t is None:
            out.append(-1)
            continue
        b = (
            t.contiguous().view(torch.uint8).to(torch.int64)
            if t.numel()
            else torch.zeros(1, dtype=torch.int64, device=t.device)
        )
        idx = torch.arange(b.numel(), device=b.device, dtype=torch.int64) % 65521 + 1
        out.append(int((b.flatten() * idx).sum().item()))
    return out


def poison(outs):
    for t in outs:
        if t is not None:
            if t.dtype == FP8:
                t.view(torch.uint8).fill_(0xFF)
            else:
                t.fill_(float("nan"))
    return outs


def multi_gpu_rank(rank, world_size, port, quick):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, device_id=dev
    )
    from support.oracle import assert_matches_oracle
    from vllm_rocm_fused.backends.cuda import backend as cb
    from vllm_rocm_fused.backends.cuda.dispatch import ONE_SHOT, ONE_SHOT_LL, SPLIT, TWO_SHOT, DispatchPlan
    from vllm_rocm_fused.kernels.launch import empty_outputs
    from vllm_rocm_fused.kernels.oneshot_ar_norm_quant import oneshot_all_reduce, oneshot_ar_norm_quant
    from vllm_rocm_fused.kernels.oneshot_ll_ar_norm_quant import oneshot_ll_all_reduce, oneshot_ll_ar_norm_quant
    from vllm_rocm_fused.kernels.twoshot_ar_norm_quant import twoshot_ar_norm_quant
    from vllm_rocm_fused.ops import backends, fused_allreduce_rmsnorm_quant
    from vllm_rocm_fused.ops.comm import communicator_for_group
    from vllm_rocm_fused.ops.fused import make_spec
    from vllm_rocm_fused.ops.reference import FusedNormQuantOutput, norm_quant_reference

    failures: list[str] = []
    digests: dict[str, list[int]] = {}
    algos: dict[str, str] = {}
    seed = [1000]

    def fresh():
        seed[0] += 1
        return seed[0]

    def run_case(name, fn):
        import time

        start = time.time()
        errors_before = ws.barrier_errors()
        try:
            fn()
            torch.cuda.synchronize()
            gave_up = ws.barrier_errors() - errors_before
            assert gave_up == 0, f"{gave_up} barrier waits gave up during this case"
            status = "ok"
        except Exception:  # noqa: BLE001 - collected and reported by the parent
            failures.append(f"rank {rank} {name}: {traceback.format_exc(limit=3)}")
            status = "FAILED"
        # progress on stdout (run_gpu_tests.sh runs pytest -s): a run cut short shows where it was
        print(f"[rank {rank}] {name}: {status} ({time.time() - start:.1f} s)", flush=True)

    def oracle_check(out, xs, res, w, *, algo, offset, emit, layout, quantize=True):
        h = exact_sum(xs)
        if algo == SPLIT:
            h = h.to(xs[0].dtype)  # NCCL sums in bf16: one rounding of h (exact for 2 ranks)
        if algo == SPLIT and world_size > 2:
            ref = norm_quant_reference(
                h,
                res,
                w,
                EPS,
                out_dtype=xs[0].dtype,
                weight_offset=offset,
                emit_bf16=emit,
                scale_layout=layout,
                quantize=quantize,
            )
            torch.testing.assert_close(out.residual, ref.residual, rtol=2**-6, atol=1e-2)
            return
        assert_matches_oracle(
            out,
            h,
            res,
            w,
            EPS,
            out_dtype=xs[0].dtype,
            group_size=128,
            weight_offset=offset,
            fp8_dtype=FP8,
            emit_bf16=emit if quantize else False,
            scale_layout=layout,
        )

    world = dist.group.WORLD
    comm = communicator_for_group(world)
    backend = cb.CudaBackend()

    # the workspace first, with the two-shot region and a large LL region, so every
    # algorithm can be forced at every size tested
    x0, r0, w0 = rank_inputs(world_size, 4, 4096, 1)
    spec0 = make_spec(
        x0[rank],
        r0,
        world_size=world_size,
        group_size=128,
        weight_offset=1.0,
        emit_bf16=False,
        scale_layout="row",
        quant_dtype=FP8,
        quantize=True,
    )
    ws = cb.ensure_workspace(comm, spec0, with_twoshot=True, ll_bytes=8 << 20)
    assert ws is not None, cb._state(comm).failed

    # 1. the public op (auto dispatch), many shapes, fresh inputs
    shapes = [
        (1, 4096),
        (2, 2048),
        (7, 5120),
        (64, 4096),
        (129, 2048),
        (512, 5120),
        (1024, 4096),
        (3000, 4096),
        (8192, 2048),
    ]
    if quick:  # fewer hidden sizes (each is a set of kernels to compile), every algorithm still
        shapes = [(1, 4096), (7, 5120), (64, 4096), (700, 4096), (3000, 4096)]
    for i, (t, h) in enumerate(shapes):

        def case(t=t, h=h, i=i):
            layout = "col" if i % 2 else "row"
            emit = i % 3 == 0
            xs, res, w = rank_inputs(world_size, t, h, fresh())
            res = None if i == 2 else res
            backends.reset_counters()
            out = fused_allreduce_rmsnorm_quant(
                xs[rank], res, w, EPS, group=world, weight_offset=1.0, emit_bf16=emit, scale_layout=layout
            )
            spec = make_spec(
                xs[rank],
                res,
                world_size=world_size,
                group_size=128,
                weight_offset=1.0,
                emit_bf16=emit,
                scale_layout=layout,
                quant_dtype=FP8,
                quantize=True,
            )
            p = backend.plan(spec, comm)
            algos[f"auto {t}x{h}"] = f"{p.algo}/{p.path}"
            counters = backends.backend_counters()
            assert counters == {f"cuda/{p.path}": 1}, f"expected the cuda backend, got {counters}"
            oracle_check(out, xs, res, w, algo=p.algo, offset=1.0, emit=emit, layout=layout)
            digests[f"auto {t}x{h}"] = digest(out)

        run_case(f"auto {t}x{h}", case)

    # 2. every algorithm and path forced, both layouts, norm-only too
    forced = [
        (DispatchPlan(ONE_SHOT_LL, "fused-1", True), True),
        (DispatchPlan(ONE_SHOT_LL, "fused-2", False), True),
        (DispatchPlan(ONE_SHOT_LL, "fused-1", False), False),
        (DispatchPlan(ONE_SHOT, "fused-1", True), True),
        (DispatchPlan(ONE_SHOT, "fused-2", False), True),
        (DispatchPlan(TWO_SHOT, "fused-1", True), True),
        (DispatchPlan(TWO_SHOT, "fused-2", False), True),
        (DispatchPlan(SPLIT, "fused-2", True), True),
        (DispatchPlan(SPLIT, "generic", False), True),
        (DispatchPlan(ONE_SHOT, "fused-1", False), False),
        (DispatchPlan(TWO_SHOT, "fused-1", False), False),
        (DispatchPlan(SPLIT, "fused-2", False), False),
    ]
    for t in (1, 33) if quick else (1, 3, 33, 700):
        for j, (plan, quantize) in enumerate(forced):

            def case(t=t, j=j, plan=plan, quantize=quantize):
                layout = "col" if (t + j) % 2 else "row"
                emit = j % 2 == 0
                xs, res, w = rank_inputs(world_size, t, 4096, fresh())
                spec = make_spec(
                    xs[rank],
                    res,
                    world_size=world_size,
                    group_size=128,
                    weight_offset=1.0,
                    emit_bf16=emit,
                    scale_layout=layout,
                    quant_dtype=FP8,
                    quantize=quantize,
                )
                out = FusedNormQuantOutput(*cb.execute(plan, xs[rank], res, w, EPS, comm, spec, ws))
                if quantize and not emit:
                    assert out.normed is None
                oracle_check(out, xs, res, w, algo=plan.algo, offset=1.0, emit=emit, layout=layout, quantize=quantize)
                digests[f"forced {plan.algo}/{plan.path}/{quantize} T={t}"] = digest(out)

            run_case(f"forced {plan.algo}/{plan.path} quantize={quantize} T={t}", case)

    # 2b. two-shot back to back at uneven token counts (rows split unevenly between the
    #     ranks, grids changing from call to call): the case that once split the ranks'
    #     barrier epochs (a load/store race on the per-block epoch, fixed in symm_sync.py)
    def twoshot_repeats():
        for k, t in enumerate([33, 33, 17, 3, 33, 130, 1, 33, 65, 2] * (2 if quick else 4)):
            xs, res, w = rank_inputs(world_size, t, 4096, fresh())
            quantize, emit, layout = k % 3 != 2, k % 4 == 0, "col" if k % 5 == 0 else "row"
            plan = DispatchPlan(TWO_SHOT, "fused-1" if k % 2 else "fused-2", quantize and k % 2 == 1)
            spec = make_spec(
                xs[rank],
                res,
                world_size=world_size,
                group_size=128,
                weight_offset=1.0,
                emit_bf16=emit,
                scale_layout=layout,
                quant_dtype=FP8,
                quantize=quantize,
            )
            out = FusedNormQuantOutput(*cb.execute(plan, xs[rank], res, w, EPS, comm, spec, ws))
            oracle_check(out, xs, res, w, algo=TWO_SHOT, offset=1.0, emit=emit, layout=layout, quantize=quantize)

    run_case("two-shot back to back", twoshot_repeats)

    # 3. every output element written (poisoned outputs), one-shot and two-shot kernels
    hp = 4096 if quick else 5120
    for t in (1, 130) if quick else (1, 5, 130):
        for kernel in (oneshot_ll_ar_norm_quant, oneshot_ar_norm_quant, twoshot_ar_norm_quant):

            def case(t=t, kernel=kernel):
                xs, res, w = rank_inputs(world_size, t, hp, fresh())
                for quantize, emit, layout in [(True, True, "row"), (True, False, "col"), (False, True, "row")]:
                    outs = poison(
                        empty_outputs(
                            t,
                            hp,
                            torch.bfloat16,
                            dev,
                            group_size=128,
                            quantize=quantize,
                            emit_bf16=emit,
                            scale_layout=layout,
                            quant_dtype=FP8,
                        )
                    )
                    kernel(
                        xs[rank],
                        res,
                        w,
                        EPS,
                        ws.peers(torch.bfloat16),
                        weight_offset=1.0,
                        quantize=quantize,
                        emit_bf16=emit,
                        scale_layout=layout,
                        outputs=outs,
                    )
                    for o in outs:
                        assert o is None or not o.float().isnan().any(), "an output element was not written"
                    oracle_check(
                        FusedNormQuantOutput(*outs),
                        xs,
                        res,
                        w,
                        algo=ONE_SHOT,
                        offset=1.0,
                        emit=emit,
                        layout=layout,
                        quantize=quantize,
                    )

            run_case(f"poisoned {kernel.__name__} T={t}", case)

    def bare():
        for fn in (oneshot_all_reduce, oneshot_ll_all_reduce):
            xs, _, _ = rank_inputs(world_size, 37, 4096, fresh())
            out = fn(xs[rank], ws.peers(torch.bfloat16))
            assert torch.equal(out, exact_sum(xs).to(torch.bfloat16)), fn.__name__

    run_case("bare one-shot all-reduces", bare)

    # 4. fp16 input
    def fp16():
        xs, res, w = rank_inputs(world_size, 9, 4096, fresh(), dtype=torch.float16)
        out = fused_allreduce_rmsnorm_quant(xs[rank], res, w, EPS, group=world, weight_offset=1.0)
        oracle_check(out, xs, res, w, algo=ONE_SHOT, offset=1.0, emit=False, layout="row")

    run_case("fp16", fp16)

    # 5. zero tokens, NaN/Inf
    def zero():
        xs, res, w = rank_inputs(world_size, 0, 4096, fresh())
        out = fused_allreduce_rmsnorm_quant(xs[rank], res, w, EPS, group=world, emit_bf16=True)
        assert out.q.shape == (0, 4096) and out.scale.shape == (0, 32) and out.normed.shape == (0, 4096)

    run_case("zero tokens", zero)

    def nan_inf():
        xs, res, w = rank_inputs(world_size, 4, 4096, fresh())
        xs[0][1, 5] = float("nan")
        xs[-1][2, 300] = float("inf")
        out = fused_allreduce_rmsnorm_quant(xs[rank], res, w, EPS, group=world, weight_offset=1.0, emit_bf16=True)
        ref = norm_quant_reference(
            exact_sum(xs), res, w, EPS, out_dtype=torch.bfloat16, weight_offset=1.0, emit_bf16=True
        )
        for got, want in [
            (out.normed, ref.normed),
            (out.scale, ref.scale),
            (out.q.float(), ref.q.float()),
            (out.residual, ref.residual),
        ]:
            assert torch.equal(got.float().isnan(), want.float().isnan()), "NaN pattern differs from the spec"
            assert torch.equal(got.float().isinf(), want.float().isinf()), "Inf pattern differs from the spec"
        assert out.q[1].float().isnan().all() and out.scale[2, 2].isnan()

    run_case("nan/inf", nan_inf)

    # 6. CUDA graphs: capture three calls of different sizes (different grids), replay
    # with changing inputs, with eager calls in between (one parity sequence for both)
    def graphs():
        sizes = [(1, 4096), (16, 4096), (200, 4096)]
        static = [rank_inputs(world_size, t, h, fresh()) for t, h in sizes]
        xs_static = [s[0][rank].clone() for s in static]
        for k, (t, h) in enumerate(sizes):  # warm-up (compiles)
            fused_allreduce_rmsnorm_quant(xs_static[k], static[k][1], static[k][2], EPS, group=world, weight_offset=1.0)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = [
                fused_allreduce_rmsnorm_quant(
                    xs_static[k],
                    static[k][1],
                    static[k][2],
                    EPS,
                    group=world,
                    weight_offset=1.0,
                    scale_layout="col" if k == 1 else "row",
                )
                for k in range(len(sizes))
            ]
        for it in range(5):
            new = [rank_inputs(world_size, t, h, fresh()) for t, h in sizes]
            for k in range(len(sizes)):
                xs_static[k].copy_(new[k][0][rank])
                static[k][1].copy_(new[k][1])
                static[k][2].copy_(new[k][2])
            g.replay()
            torch.cuda.synchronize()
            for k in range(len(sizes)):
                oracle_check(
                    outs[k],
                    new[k][0],
                    static[k][1],
                    static[k][2],
                    algo=ONE_SHOT,
                    offset=1.0,
                    emit=False,
                    layout="col" if k == 1 else "row",
                )
            xe, re, we = rank_inputs(world_size, 3 + it, 4096 if quick else 2048, fresh())
            eager = fused_allreduce_rmsnorm_quant(xe[rank], re, we, EPS, group=world, weight_offset=1.0)
            oracle_check(eager, xe, re, we, algo=ONE_SHOT, offset=1.0, emit=False, layout="row")

    run_case("graph capture + replay", graphs)

    # 7. a group whose first call is captured: no workspace yet -> the split algorithm
    #    inside the graph; the next eager call sets up the workspace
    def capture_first():
        g2 = dist.new_group(list(range(world_size)))
        tmp = torch.ones(1, device=dev)
        dist.all_reduce(tmp, group=g2)  # NCCL communicator of the new group, eagerly
        xs, res, w = rank_inputs(world_size, 8, 4096, fresh())
        x_static = xs[rank].clone()
        torch.cuda.synchronize()
        backends.reset_counters()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fused_allreduce_rmsnorm_quant(x_static, res, w, EPS, group=g2, weight_offset=1.0)
        assert backends.backend_counters() == {"cuda/fused-2": 1}, backends.backend_counters()
        for _ in range(2):
            new, _, _ = rank_inputs(world_size, 8, 4096, fresh())
            x_static.copy_(new[rank])
            g.replay()
            torch.cuda.synchronize()
            oracle_check(out, new, res, w, algo=SPLIT, offset=1.0, emit=False, layout="row")
        c2 = communicator_for_group(g2)
        assert cb._state(c2).workspace is None
        eager = fused_allreduce_rmsnorm_quant(xs[rank], res, w, EPS, group=g2, weight_offset=1.0)
        assert cb._state(c2).workspace is not None
        oracle_check(eager, xs, res, w, algo=ONE_SHOT, offset=1.0, emit=False, layout="row")

    run_case("first call under capture", capture_first)

    # 8. stress: many back-to-back calls of changing sizes and algorithms (LL, pull,
    # two-shot share one call counter and buffer halves), every result checked
    def stress():
        sizes = [1, 5, 300, 64, 2, 1000, 3, 129]
        for it in range(16 if quick else 48):
            t = sizes[it % len(sizes)]
            xs, res, w = rank_inputs(world_size, t, 4096, fresh())
            if it % 3 == 2:
                spec = make_spec(
                    xs[rank],
                    res,
                    world_size=world_size,
                    group_size=128,
                    weight_offset=1.0,
                    emit_bf16=False,
                    scale_layout="row",
                    quant_dtype=FP8,
                    quantize=True,
                )
                out = FusedNormQuantOutput(
                    *cb.execute(DispatchPlan(TWO_SHOT, "fused-1", True), xs[rank], res, w, EPS, comm, spec, ws)
                )
                oracle_check(out, xs, res, w, algo=TWO_SHOT, offset=1.0, emit=False, layout="row")
                continue
            out = fused_allreduce_rmsnorm_quant(
                xs[rank], res, w, EPS, group=world, weight_offset=1.0, emit_bf16=bool(it % 2)
            )
            oracle_check(out, xs, res, w, algo=ONE_SHOT, offset=1.0, emit=bool(it % 2), layout="row")

    run_case("stress", stress)

    torch.cuda.synchronize()
    errors = ws.barrier_errors()
    if errors:
        failures.append(f"rank {rank}: {errors} barrier waits gave up")
    broken = backends.broken_backends()
    if broken:
        failures.append(f"rank {rank}: broken backends {broken}")
    dist.barrier()
    dist.destroy_process_group()
    return {"failures": failures, "digests": digests, "algos": algos}
