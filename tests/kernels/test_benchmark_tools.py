"""The measurement tools behind the kernels' launch table and the TP=1 benchmark, on CPU:
the compiled baseline's arithmetic against the spec, the table derived from a sweep, the
TP=1 summary and targets, imports without vLLM, and (once committed) the results against
the table the dispatch uses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_fused_ar_rms_quant as bench  # noqa: E402
import compiled_baseline  # noqa: E402
import derive_launch_table  # noqa: E402
import measurement  # noqa: E402

from vllm_rocm_fused.kernels import local_launch_table  # noqa: E402
from vllm_rocm_fused.ops.reference import norm_quant_reference  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def run_python(code: str, *, interpret: bool, timeout: float) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python from the repository root, with TRITON_INTERPRET=1 or without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def sass_schedule_or_skip():
    """benchmarks/sass_schedule.py, or a skip where this Triton lacks its bundled ptxas/cuobjdump."""
    sass_schedule = pytest.importorskip("sass_schedule")
    tools = Path(sass_schedule.triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip("this Triton has no bundled ptxas/cuobjdump")
    return sass_schedule


@pytest.mark.parametrize("t, h", [(3, 640), (1, 5120), (5, 2560)])
def test_compiled_baseline_computes_the_spec(t, h):
    """Eagerly, the plain-torch baseline is ops/reference.py bit for bit (the benchmark checks
    its compiled form against the same reference on the GPU)."""
    g = torch.Generator().manual_seed(t * h)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    res = (torch.randn(t, h, generator=g) * 2).to(torch.bfloat16)
    w = (torch.randn(h, generator=g) * 0.3).to(torch.bfloat16)
    q, scale, r = compiled_baseline.add_rmsnorm_group_quant(x, res, w, 1e-6)
    ref = norm_quant_reference(x, res, w, 1e-6, out_dtype=torch.bfloat16, weight_offset=1.0)
    assert torch.equal(r, ref.residual) and torch.equal(scale, ref.scale)
    assert torch.equal(q.view(torch.uint8), ref.q.view(torch.uint8))


def test_compiled_variants_get_code_objects_of_their_own():
    a = compiled_baseline._fresh_copy(compiled_baseline.add_rmsnorm_group_quant, "static_5120_1")
    b = compiled_baseline._fresh_copy(compiled_baseline.add_rmsnorm_group_quant, "static_5120_2")
    assert a.__code__ is not b.__code__ and a.__code__.co_name != b.__code__.co_name
    assert a.__kwdefaults__ == compiled_baseline.add_rmsnorm_group_quant.__kwdefaults__
    with pytest.raises(ValueError, match="mode"):
        compiled_baseline.compiled("max-autotune", "x")


def _sweep(points):
    """Sweep records from {(hidden, tokens): {(warps, slice_groups): us}}."""
    return [
        {"hidden": h, "tokens": t, "num_warps": w, "slice_groups": g, "median_us": us, "ok": True}
        for (h, t), shapes in points.items()
        for (w, g), us in shapes.items()
    ]


def test_derived_table_follows_the_fastest_shape_without_chasing_noise():
    points = {
        (5120, 1): {(8, 1): 3.0, (16, 1): 2.0, (32, 1): 2.05},
        (5120, 2): {(8, 1): 3.0, (16, 1): 2.02, (32, 1): 2.0},  # 32 only 1% faster: keep 16
        (5120, 64): {(8, 1): 4.0, (16, 1): 3.0, (32, 1): 3.5},
        (5120, 1024): {(8, 1): 20.0, (16, 1): 25.0, (32, 1): 30.0},
        (5120, 8192): {(8, 1): 150.0, (8, 2): 140.0, (16, 1): 160.0},
        (2048, 1): {(4, 1): 2.0, (8, 1): 1.9},
    }
    results = _sweep(points)
    results.append({"hidden": 2048, "tokens": 1, "num_warps": 16, "slice_groups": 1, "median_us": 0.5, "ok": False})
    results.append({"hidden": 2048, "tokens": 1, "num_warps": 32, "slice_groups": 1, "error": "RuntimeError: boom"})
    table = derive_launch_table.derive(results)
    assert table == {2048: ((None, 8, 1),), 5120: ((64, 16, 1), (1024, 8, 1), (None, 8, 2))}
    assert derive_launch_table.lookup(table, 5120, 100) == (8, 1)  # between measured counts: the next above
    assert derive_launch_table.lookup(table, 5120, 65536) == (8, 2)
    worst, where = derive_launch_table.worst_loss(results, table)
    assert worst == pytest.approx(1.01) and where == (5120, 2, (16, 1))


def test_rendered_table_module_is_what_was_derived(tmp_path):
    table = derive_launch_table.derive(_sweep({(3072, 1): {(8, 1): 2.0}, (3072, 16): {(16, 1): 1.0, (8, 1): 2.0}}))
    text = derive_launch_table.render(
        table,
        source="benchmarks/results/x.json",
        gpu="NVIDIA H200",
        command="PYTHONPATH=. python benchmarks/sweep_local_launch.py --out X",
    )
    namespace = {}
    exec(compile(text, "local_launch_table.py", "exec"), namespace)
    assert namespace["TABLE"] == table == {3072: ((1, 8, 1), (None, 16, 1))}
    assert namespace["SOURCE"] == "benchmarks/results/x.json" and namespace["GPU"] == "NVIDIA H200"
    sweep = tmp_path / "sweep.json"
    sweep.write_text(
        json.dumps({"machine": {"gpu": "NVIDIA H200"}, "command": "c", "results": _sweep({(3072, 1): {(8, 1): 2.0}})})
    )
    out = tmp_path / "table.py"
    assert derive_launch_table.main([str(sweep), "--write", str(out), "--source", "s.json"]) == 0
    assert "3072: ((None, 8, 1),)," in out.read_text()
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"results": [{"hidden": 1, "tokens": 1, "error": "x"}]}))
    assert derive_launch_table.main([str(empty)]) == 1


def test_tp1_summary_ratios_floor_and_target_misses():
    recs = []
    for t, disp, stat, dyn, plain, empty in [
        (1, 2.5, 3.4, 3.6, 2.6, 0.8),
        (16, 3.2, 3.0, 2.9, 3.1, 0.8),
        (1024, 25.0, 30.0, 31.0, 26.0, None),
        (4096, 100.0, 120.0, 119.0, None, None),
    ]:
        for name, us in (
            ("dispatched", disp),
            ("compiled_static", stat),
            ("compiled_dynamic", dyn),
            ("plain", plain),
            ("empty", empty),
        ):
            if us is not None:
                recs.append({"hidden": 5120, "tokens": t, "variant": name, "median_us": us, "ok": True})
    recs.append({"hidden": 5120, "tokens": 2, "variant": "dispatched", "median_us": 1.0, "ok": False})
    bw = 4.0e12
    rows = bench.summarize_tp1(recs, 5120, bw)
    assert sorted(rows) == [1, 16, 1024, 4096]  # failed points are not summarized
    assert rows[1]["compiled"] == 3.4 and rows[1]["compiled_from"] == "static"
    assert rows[16]["compiled"] == 2.9 and rows[16]["compiled_from"] == "dynamic"
    assert rows[1024]["floor"] == pytest.approx(measurement.op_bytes(1024, 5120) / bw * 1e6)
    assert measurement.op_bytes(1024, 5120) == 1024 * 5120 * 7 + 1024 * 40 * 4 + 5120 * 2
    assert rows[16]["dispatched_over_compiled"] == pytest.approx(3.2 / 2.9)
    assert rows[1]["dispatched_over_plain"] == pytest.approx(2.5 / 2.6)
    assert rows[1]["dispatched_over_empty"] == pytest.approx(2.5 / 0.8)
    targets = bench.tp1_targets({"5120": {str(t): r for t, r in rows.items()}})
    assert targets["points"] == 4
    misses = targets["misses"]
    assert [m[:2] for m in misses["dispatched_over_compiled_gt_1"]] == [[5120, 16]]
    assert [m[:2] for m in misses["dispatched_over_plain_gt_1_to_64_tokens"]] == [[5120, 16]]
    # 5120 is in the 2.5 us class up to 64 tokens: 2.5 is met, 3.2 is not; 1024 tokens is not decode
    assert [m[:2] for m in misses["dispatched_over_us_target_to_64_tokens"]] == [[5120, 16]]
    for start in (1024, 4096):
        want = [t for t in (1024, 4096) if t >= start and rows[t]["dispatched_over_floor"] > 1.3]
        assert [m[1] for m in misses[f"dispatched_over_floor_gt_1.3_from_{start}_tokens"]] == want
    assert "| 1024 |" in bench.table_tp1(rows) and "disp/plain" in bench.table_tp1(rows)
    small = bench.tp1_targets({"4096": {"8": {"dispatched": 2.1, "dispatched_over_floor": 9.0}}})
    assert small["misses"]["dispatched_over_us_target_to_64_tokens"] == [[4096, 8, 2.1]]


def test_decode_step_summary_counts_two_sites_per_layer_and_the_final_norm():
    summary = {"5120": {"1": {"dispatched": 2.0, "compiled": 3.0}, "8": {"dispatched": 2.2}}}
    steps = bench.decode_steps(summary)
    assert [(s["model"], s["tokens"]) for s in steps] == [("Qwen3.5-27B", 1)]  # 8: no compiled point
    assert steps[0]["sites"] == 129 and steps[0]["saved_us_per_step"] == pytest.approx(129.0)
    assert "| Qwen3.5-27B | 5120 | 129 | 1 | 2.00 | 3.00 | 129 |" in bench.table_decode_steps(steps)
    sites = {name: 2 * layers + 1 for name, _, layers in bench.QWEN35_TP1_MODELS}
    assert sites == {
        "Qwen3.5-27B": 129,
        "Qwen3.5-9B": 65,
        "Qwen3.5-35B-A3B": 81,
        "Qwen3.5-122B-A10B": 97,
        "Qwen3.5-397B-A17B": 121,
    }


def test_tp2_summary_has_the_compiled_chain():
    recs = [
        {"hidden": 4096, "tokens": 8, "variant": v, "median_us": us, "ok": True}
        for v, us in [
            ("chain_compiled_nccl_static", 12.0),
            ("chain_compiled_torch_symm_dynamic", 10.0),
            ("dispatched", 7.0),
            ("split3_oneshot_ll", 9.0),
        ]
    ]
    row = bench.summarize(recs, 4096)[8]
    assert row["compiled_chain"] == 10.0 and row["compiled_chain_from"] == "chain_compiled_torch_symm_dynamic"
    assert row["dispatched_over_compiled_chain"] == pytest.approx(0.7)
    assert "compiled_chain" in bench.table(recs, 4096)


def test_precompile_pool_reports_every_job():
    import precompile

    logs = []
    records = precompile.warm([("bogus", 1), ("also-bogus", 2)], workers=2, timeout_s=120, log=logs.append)
    assert [r["job"] for r in records] == [["bogus", 1], ["also-bogus", 2]]
    assert all(r["error"].startswith("ValueError: unknown job") for r in records), records
    assert logs[-1].startswith("precompile: 2 jobs on 2 processes")


def test_kernels_and_benchmarks_import_without_vllm():
    """The GPU machines have no vLLM: every module the GPU run uses must import without it."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vllm' or name.startswith('vllm.'):\n"
        "            raise ImportError('vllm is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path[:0] = ['.', 'benchmarks', 'tests']\n"
        "import measurement, bench_fused_ar_rms_quant, sweep_local_launch, sweep_grid, precompile\n"
        "import compiled_baseline, derive_launch_table\n"
        "import vllm_rocm_fused.kernels.add_rmsnorm_quant, vllm_rocm_fused.kernels.oneshot_ll_ar_norm_quant\n"
        "import vllm_rocm_fused.kernels.oneshot_ar_norm_quant, vllm_rocm_fused.kernels.twoshot_ar_norm_quant\n"
        "import vllm_rocm_fused.backends.cuda.backend, vllm_rocm_fused.ops.fused\n"
        "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules)\n"
        "print('imports ok')\n"
    )
    proc = run_python(code, interpret=False, timeout=300)
    assert proc.returncode == 0 and "imports ok" in proc.stdout, proc.stderr[-3000:]


def test_committed_sweep_and_tp1_results_match_the_table_the_dispatch_uses():
    sweep = RESULTS / "h200_tp1_launch_sweep.json"
    tp1 = RESULTS / "h200_tp1.json"
    if not sweep.exists() and not tp1.exists():
        assert local_launch_table.TABLE == {} and local_launch_table.SOURCE is None
        pytest.skip("no TP=1 measurements committed yet: the table is empty")
    report = json.loads(sweep.read_text())
    assert local_launch_table.SOURCE == "benchmarks/results/h200_tp1_launch_sweep.json"
    assert derive_launch_table.derive(report["results"]) == local_launch_table.TABLE
    run = json.loads(tp1.read_text())
    used = {int(h): tuple(tuple(e) for e in v) for h, v in run["launch_table"]["table"].items()}
    assert used == local_launch_table.TABLE, "h200_tp1.json was measured with another launch table"
    assert all(r.get("ok") for r in run["results"]), "a TP=1 point failed its reference check"


def test_sass_schedule_finds_the_loads_and_the_residual_store(tmp_path):
    """benchmarks/sass_schedule.py on the CPU: the tree's kernel and a trial copy of it whose
    residual is stored before the rsqrt (in program order, ahead of inv_rms's division) get
    their loads and stores located, and the copy's store is reported before the rsqrt."""
    sass_schedule = sass_schedule_or_skip()
    from vllm_rocm_fused.kernels.add_rmsnorm_quant import _add_rmsnorm_quant_kernel

    tree = sass_schedule.schedule(sass_schedule.sass(_add_rmsnorm_quant_kernel, 4096, 16, 8), 2)
    assert len(tree["loads"]) == 4 and tree["spread"] >= 3
    assert tree["residual_store"] is not None and tree["rsqrt"] is not None
    source = (ROOT / "vllm_rocm_fused" / "kernels" / "add_rmsnorm_quant.py").read_text()
    store = "    tl.store(res_out_ptr + base + offs, s.to(res_out_ptr.dtype.element_ty), mask=mask)\n"
    early = source.replace("    finish_part(\n", store + "    finish_part(\n", 1)
    assert early != source
    trial = tmp_path / "add_rmsnorm_quant.py"
    trial.write_text(early)
    kernel = sass_schedule.kernel_from(trial)
    moved = sass_schedule.schedule(sass_schedule.sass(kernel, 4096, 16, 8), 2)
    assert moved["residual_store"] < moved["rsqrt"], moved


def test_pdl_kernel_waits_for_the_previous_kernel_before_its_first_load():
    """The local kernel compiled for programmatic dependent launch (PDL = True, what
    launch.pdl_launch picks on Hopper): its SASS waits for the previous grid
    (griddepcontrol.wait: ACQBULK) before any global load or store, then lets the next grid
    start (PREEXIT); compiled without, neither instruction is there."""
    sass_schedule = sass_schedule_or_skip()
    from vllm_rocm_fused.kernels.add_rmsnorm_quant import _add_rmsnorm_quant_kernel

    for hidden, groups, warps in ((2560, 16, 8), (8192, 64, 16)):
        ops = sass_schedule.sass(_add_rmsnorm_quant_kernel, hidden, groups, warps, pdl=True)
        memory = [i for i, op in enumerate(ops) if "LDG" in op or "STG" in op]
        wait = [i for i, op in enumerate(ops) if op.split()[0] == "ACQBULK"]
        trigger = [i for i, op in enumerate(ops) if op.split()[0] == "PREEXIT"]
        assert len(wait) == 1 and len(trigger) == 1 and memory, ops[:40]
        assert wait[0] < trigger[0] < memory[0], (wait, trigger, memory[:4])
        plain = sass_schedule.sass(_add_rmsnorm_quant_kernel, hidden, groups, warps)
        assert not any(op.split()[0] in ("ACQBULK", "PREEXIT") for op in plain)


def test_explore_trial_kind_runs_its_own_copy_of_the_kernel(tmp_path):
    """explore_split_sum.py --trial NAME=FILE: the kind NAME runs FILE's kernel (here a copy
    whose row is doubled after its sum of squares: residual and scale exactly 2 x k's, the
    same q bytes), variants() gives it k's launch shapes, the report's diff shows the change,
    and names that would shadow a kind are refused. Interpreted, in a subprocess
    (TRITON_INTERPRET=1)."""
    source = (ROOT / "vllm_rocm_fused" / "kernels" / "add_rmsnorm_quant.py").read_text()
    trial = tmp_path / "doubled.py"
    changed = source.replace("    finish_part(\n        s,\n", "    finish_part(\n        s * 2.0,\n", 1)
    assert changed != source
    trial.write_text(changed)
    code = (
        "import sys, torch\n"
        "sys.path[:0] = ['.', 'benchmarks']\n"
        "import explore_split_sum as e\n"
        f"name, diff = e.add_trial('dbl={trial}')\n"
        "assert name == 'dbl' and '+        s * 2.0,' in diff, diff\n"
        "names = e.variants(2560, ['k', 'dbl'])\n"
        "assert [n for n in names if n.startswith('dbl')] == ['dbl' + n[1:] for n in names if n.startswith('k')]\n"
        "for bad in ('k=x.py', 'bt=x.py', 'Dbl=x.py', 'dbl'):\n"
        "    try:\n"
        "        e.add_trial(bad)\n"
        "    except ValueError as err:\n"
        "        assert '--trial' in str(err)\n"
        "    else:\n"
        "        raise AssertionError(bad)\n"
        "g = torch.Generator().manual_seed(5)\n"
        "h, r = (torch.randn(3, 2560, generator=g).to(torch.bfloat16) for _ in range(2))\n"
        "w = (torch.randn(2560, generator=g) * 0.3).to(torch.bfloat16)\n"
        "k = e.runner('k16_w8')(h, r, w)\n"
        "d = e.runner('dbl16_w8')(h, r, w)\n"
        "assert torch.equal(d[2].float(), 2 * k[2].float()), 'the trial did not run its own kernel'\n"
        "assert torch.equal(d[0].view(torch.uint8), k[0].view(torch.uint8)) and torch.equal(d[1], 2 * k[1])\n"
        "print('trial ok')\n"
    )
    proc = run_python(code, interpret=True, timeout=600)
    assert proc.returncode == 0 and "trial ok" in proc.stdout, proc.stderr[-3000:]


def test_benchmark_scripts_do_not_import_each_other_in_a_circle():
    """Issue 21: the scripts under benchmarks/ share their helpers through one module
    (measurement.py); the imports among them, at module level or inside functions, form no cycle."""
    import ast

    bench_dir = ROOT / "benchmarks"
    local = {p.stem for p in bench_dir.glob("*.py")}
    graph = {}
    for path in bench_dir.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        graph[path.stem] = sorted((deps & local) - {path.stem})

    def cycle_from(node, stack):
        if node in stack:
            return stack[stack.index(node) :] + [node]
        for dep in graph[node]:
            found = cycle_from(dep, stack + [node])
            if found:
                return found
        return None

    for module in sorted(graph):
        cycle = cycle_from(module, [])
        assert cycle is None, f"benchmarks/ import cycle: {' -> '.join(cycle)}"
    assert "measurement" in graph["bench_fused_ar_rms_quant"] and "measurement" in graph["sweep_local_launch"]
