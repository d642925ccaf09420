"""The CUDA backend over real process groups, one process per GPU, at every world size
the machine has (2 on an H200 pair; 4 and 8 run unchanged where lent)."""

import os

import pytest
import torch

from support.cuda_workers import multi_gpu_rank
from support.dist import run_ranks
from support.gpu import gpu

pytestmark = gpu

QUICK = os.environ.get("VLLM_ROCM_FUSED_GPU_TESTS_QUICK", "0") == "1"


def world_sizes():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [w for w in (2, 4, 8) if w <= n] or [2]


@pytest.mark.parametrize("world_size", world_sizes())
def test_all_algorithms_on_real_gpus(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    results = run_ranks(multi_gpu_rank, world_size, QUICK, timeout=540)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    print("algorithms:", results[0]["algos"])
    for key, d0 in results[0]["digests"].items():
        for rank in range(1, world_size):
            assert results[rank]["digests"][key] == d0, f"{key}: rank {rank}'s outputs differ from rank 0's"
