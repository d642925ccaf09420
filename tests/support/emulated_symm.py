"""Ranks of a symmetric workspace emulated on one device, for the kernels' interpreter
phases (tests only): every "rank" gets its own staging/flag/output tensors, and each
rank's SymmPeers sees all of them, as peer pointers would on real GPUs."""

from __future__ import annotations

import torch

from vllm_rocm_fused.kernels.launch import SymmPeers


def emulated_peers(
    world_size: int,
    *,
    stage_cap: int,
    out_cap: int = 0,
    ll_cap: int = 0,
    dtype=torch.bfloat16,
    quant_dtype=torch.float8_e4m3fn,
    max_grid: int = 4,
    device="cpu",
) -> list[SymmPeers]:
    def per_rank(n, dt):
        return tuple(torch.full((n,), 0, dtype=dt, device=device) for _ in range(world_size))

    stage = tuple(torch.randn(2 * stage_cap, device=device).to(dtype) for _ in range(world_size))  # junk
    flags = per_rank(max_grid * world_size, torch.int32)
    two = out_cap > 0
    out = dict(
        out_q=tuple(torch.randn(2 * out_cap, device=device).to(quant_dtype) for _ in range(world_size))
        if two
        else None,
        out_res=tuple(torch.randn(2 * out_cap, device=device).to(dtype) for _ in range(world_size)) if two else None,
        out_normed=tuple(torch.randn(2 * out_cap, device=device).to(dtype) for _ in range(world_size)) if two else None,
        out_scale=tuple(torch.randn(2 * (out_cap // 16), device=device) for _ in range(world_size)) if two else None,
    )
    ll = per_rank(2 * world_size * ll_cap, torch.int64) if ll_cap else None
    return [
        SymmPeers(
            rank=r,
            world_size=world_size,
            stage=stage,
            flags=flags,
            ctl=torch.zeros(8 + max_grid, dtype=torch.int32, device=device),
            stage_cap=stage_cap,
            max_grid=max_grid,
            out_cap=out_cap,
            ll=ll,
            ll_cap=ll_cap,
            **out,
        )
        for r in range(world_size)
    ]
