"""Where ptxas puts the local kernel's loads and its residual store, without a GPU.

Compiles ``_add_rmsnorm_quant_kernel`` (kernels/add_rmsnorm_quant.py, or a trial copy of
that file) for sm_90a with Triton's own ptxas and cuobjdump, on the CPU, at the launch shapes
given, and prints per shape the SASS positions (instruction indices) of:
  loads     the h and residual loads of the row's slices (the first 2 x SPLIT_P2 128-bit
            loads at 2-4 programs per row; the first 4 otherwise) and their spread (last -
            first): a spread of a few instructions means every load is in flight before the
            first conversion; ~30 or more, that ptxas put the own slice's conversion between
            them, so the later loads wait for the own slice to arrive (benchmarks/NOTES.md,
            issue 24, fourth pass)
  store     the first 128-bit store (the residual) and the first reciprocal square root (the
            row's inv_rms): a store after it waited for the row's normalisation to start
Measured on an H200, the reference kernel whose loads were tight and whose residual store
came before the rsqrt ran 0.04-0.10 us faster at 64 tokens than the local kernel at the same
launch shape (hidden 2560, 3072, 6144, 7168; h200_tp1_split_sum_explore7/8.json), but a local
kernel given that schedule was no faster where the dispatch runs (rounds 9-10, NOTES.md fifth
pass): a schedule seen here is a reason to measure, not a prediction.

    PYTHONPATH=. python benchmarks/sass_schedule.py [--kernel-file FILE] [--shapes H:G:W ...]

(H hidden, G slice groups, W warps; default: the decode shapes of the committed table at 64
tokens.) torch + Triton only; no vLLM, no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SHAPES = ("2560:16:8", "3072:16:8", "4096:16:8", "6144:32:16", "7168:32:16", "8192:32:16")
SIGNATURE = {
    "h_ptr": "*bf16",
    "res_ptr": "*bf16",
    "w_ptr": "*bf16",
    "res_out_ptr": "*bf16",
    "normed_ptr": "constexpr",
    "q_ptr": "*fp8e4nv",
    "scale_ptr": "*fp32",
    "eps": "fp32",
    "weight_offset": "fp32",
    "scale_st": "i32",
    "scale_sg": "i32",
}


def module_from(path: Path, tag: str = "sass_schedule"):
    """A copy of kernels/add_rmsnorm_quant.py imported as its own module
    ``vllm_rocm_fused.kernels._trial_{tag}`` (its relative imports resolve against the
    package; its ``add_rmsnorm_quant`` launches its own kernel)."""
    name = f"vllm_rocm_fused.kernels._trial_{tag}"
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=None)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "vllm_rocm_fused.kernels"
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def kernel_from(path: Path):
    """``_add_rmsnorm_quant_kernel`` of a copy of kernels/add_rmsnorm_quant.py."""
    return module_from(path)._add_rmsnorm_quant_kernel


def sass(kernel, hidden: int, slice_groups: int, warps: int, pdl: bool = False) -> list[str]:
    """The kernel's SASS instructions (bf16 in and out, residual, e4m3 quant, row-major
    scales; ``pdl``: compiled for programmatic dependent launch, as launch.pdl_launch picks)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    n_groups = hidden // 128
    split = triton.cdiv(n_groups, slice_groups)
    constants = dict(
        normed_ptr=None,
        HIDDEN=hidden,
        GS=128,
        GROUP=128,
        ROW_G=triton.next_power_of_2(n_groups),
        SLICE_G=slice_groups,
        SPLIT=split,
        SPLIT_P2=triton.next_power_of_2(split),
        HAS_RES=True,
        QUANT=True,
        EMIT=False,
        FP8_MAX=448.0,
        PDL=pdl,
    )
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(SIGNATURE.values()) if t.startswith("*")}
    source = ASTSource(kernel, SIGNATURE, constants, aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        Path(ptx).write_text(compiled.asm["ptx"])
        subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", ptx, "-o", cubin], check=True)
        dump = subprocess.run([str(tools / "cuobjdump"), "-sass", cubin], check=True, capture_output=True, text=True)
    lines = [line for line in dump.stdout.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    return [re.sub(r"^\s+/\*[0-9a-f]+\*/\s+", "", line).split(";")[0] for line in lines]


def schedule(ops: list[str], split: int) -> dict:
    """Positions of the row's loads, the residual store and the first rsqrt in ``ops``."""
    wide_loads = [i for i, op in enumerate(ops) if "LDG.E.128" in op]
    n = 2 * triton.next_power_of_2(split) if 2 <= split <= 4 else 4
    loads = wide_loads[:n]
    store = next((i for i, op in enumerate(ops) if "STG.E.128" in op), None)
    rsqrt = next((i for i, op in enumerate(ops) if "MUFU.RSQ" in op), None)
    return {
        "instructions": len(ops),
        "loads": loads,
        "spread": loads[-1] - loads[0] if loads else None,
        "residual_store": store,
        "rsqrt": rsqrt,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel-file", type=Path, default=None, help="a trial copy of kernels/add_rmsnorm_quant.py")
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="HIDDEN:SLICE_GROUPS:WARPS")
    args = p.parse_args(argv)
    if args.kernel_file is None:
        from vllm_rocm_fused.kernels.add_rmsnorm_quant import _add_rmsnorm_quant_kernel as kernel
    else:
        kernel = kernel_from(args.kernel_file)
    for shape in args.shapes:
        try:
            hidden, slice_groups, warps = (int(x) for x in shape.split(":"))
        except ValueError:
            p.error(f"--shapes: {shape!r} is not HIDDEN:SLICE_GROUPS:WARPS")
        split = triton.cdiv(hidden // 128, slice_groups)
        s = schedule(sass(kernel, hidden, slice_groups, warps), split)
        order = "before" if (s["residual_store"] or 0) < (s["rsqrt"] or 0) else "after"
        print(
            f"hidden {hidden}, {slice_groups} groups x {split} programs, {warps} warps: {s['instructions']} "
            f"instructions; loads at {s['loads']} (spread {s['spread']}); residual store at "
            f"{s['residual_store']}, {order} the rsqrt at {s['rsqrt']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
