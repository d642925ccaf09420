"""The portable block-FP8 MoE experts: against a per-token float64 oracle, traced by
torch.compile in one graph (as vLLM compiles the model), split across expert-parallel
ranks through ``expert_map``, and the parallel configurations they accept."""

import pytest
import torch

from support.markers import requires_vllm

pytestmark = requires_vllm

E, TOPK, K, N = 4, 2, 256, 256  # experts, experts per token, hidden, intermediate (per partition)
FP8_MAX = 448.0


def _quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float -> fp8 [R, C] and float32 [ceil(R/128), C/128] positive block scales."""
    r, c = w.shape
    rb, cb = -(-r // 128), c // 128
    pad = torch.zeros(rb * 128, c)
    pad[:r] = w.float()
    blocks = pad.view(rb, 128, cb, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-10) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(rb * 128, c)[:r]
    return q, scale


def _experts_weights(seed: int, n_experts: int = E):
    g = torch.Generator().manual_seed(seed)
    w1, s1, w2, s2 = [], [], [], []
    for _ in range(n_experts):
        q, s = _quantize_blocks(torch.randn(2 * N, K, generator=g) * 0.05)
        w1.append(q)
        s1.append(s)
        q, s = _quantize_blocks(torch.randn(K, N, generator=g) * 0.05)
        w2.append(q)
        s2.append(s)
    return torch.stack(w1), torch.stack(s1), torch.stack(w2), torch.stack(s2)


def _routing(m: int, seed: int, n_experts: int = E):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g).to(torch.bfloat16)
    logits = torch.randn(m, n_experts, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(TOPK, dim=-1)
    return x, (weights / weights.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


def _dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r, c = q.shape
    return q.double() * scale.double().repeat_interleave(128, 0)[:r].repeat_interleave(128, 1)[:, :c]


def _group_quant_dequant(v: torch.Tensor) -> torch.Tensor:
    """One row [C] -> the float64 values its 1x128-group FP8 quant stands for (the spec)."""
    g = v.double().view(-1, 128)
    s = (g.abs().amax(-1).clamp(min=1e-10) / FP8_MAX).float().double()
    return ((g / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double() * s[:, None]).view(-1)


def _oracle(x, w1, s1, w2, s2, weights, ids):
    """Token by token, slot by slot, in float64 (the GPU kernels' W8A8 semantics)."""
    out = torch.zeros(x.shape[0], K, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(TOPK):
            e = int(ids[t, j])
            h = (_dequant(w1[e], s1[e]) @ _group_quant_dequant(x[t])).to(torch.bfloat16)
            gate, up = h.float().chunk(2)
            act = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
            out[t] += float(weights[t, j]) * (_dequant(w2[e], s2[e]) @ _group_quant_dequant(act))
    return out.to(torch.bfloat16)


def _experts(w1_scale, w2_scale, parallel=None):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
        fp8_w8a8_moe_quant_config,
    )

    from vllm_rocm_fused.layers.portable_moe import PortableExpertsFp8

    moe = FusedMoEConfig(
        num_experts=E,
        experts_per_token=TOPK,
        hidden_dim=K,
        intermediate_size=N,
        num_local_experts=E,
        num_logical_experts=E,
        activation=MoEActivation.SILU,
        device="cpu",
        routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=parallel or FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=torch.bfloat16,
    )
    quant = fp8_w8a8_moe_quant_config(w1_scale=w1_scale, w2_scale=w2_scale, block_shape=[128, 128])
    return PortableExpertsFp8(moe_config=moe, quant_config=quant)


def _apply(experts, x, w1, w2, weights, ids, expert_map=None):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    out = torch.empty_like(x)
    experts.apply(out, x, w1, w2, weights, ids, MoEActivation.SILU, E, expert_map, None, None, None, None, None, False)
    return out


@pytest.mark.parametrize("m", [1, 5, 33])
def test_matches_float64_oracle(vllm_cfg, m):
    w1, s1, w2, s2 = _experts_weights(seed=m)
    x, weights, ids = _routing(m, seed=100 + m)
    out = _apply(_experts(s1, s2), x, w1, w2, weights, ids)
    assert out.shape == (m, K) and out.dtype == torch.bfloat16
    ref = _oracle(x, w1, s1, w2, s2, weights, ids)
    # the same math in another order: equal up to the last bit of a rare bf16 tie
    torch.testing.assert_close(out.double(), ref.double(), rtol=2**-7, atol=1e-5)
    assert (out == ref).float().mean() > 0.99


def test_traced_in_one_graph_equals_eager(vllm_cfg):
    """vLLM compiles the whole model with fullgraph=True and, on CPU, traces into the
    experts: their routing-dependent loop must be one opaque node."""
    w1, s1, w2, s2 = _experts_weights(seed=7)
    experts = _experts(s1, s2)

    def moe(x, weights, ids):
        return _apply(experts, x, w1, w2, weights, ids)

    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, dynamic=True, backend="aot_eager")
    for m in (3, 17):  # two token counts through one dynamic graph
        x, weights, ids = _routing(m, seed=m)
        assert torch.equal(compiled(x, weights, ids), moe(x, weights, ids))


def test_expert_parallel_ranks_sum_to_the_whole(vllm_cfg):
    """Each EP rank holds half the experts (others are -1 in expert_map); the ranks'
    outputs are partial sums that add up to the single-rank output."""
    w1, s1, w2, s2 = _experts_weights(seed=3)
    x, weights, ids = _routing(24, seed=4)
    whole = _apply(_experts(s1, s2), x, w1, w2, weights, ids).double()
    parts = []
    for rank in range(2):
        local = slice(rank * E // 2, (rank + 1) * E // 2)
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(E // 2, dtype=torch.int32)
        experts = _experts(s1[local], s2[local])
        part = _apply(experts, x, w1[local], w2[local], weights, ids, expert_map)
        # a token routed to no expert of this rank gets exactly zero
        none_here = ~((ids >= local.start) & (ids < local.stop)).any(-1)
        assert none_here.any() and (part[none_here] == 0).all()
        parts.append(part.double())
    # each rank rounds its partial sum to bf16 once: within half an ulp of each
    bound = 2**-8 * (parts[0].abs() + parts[1].abs() + whole.abs()) + 1e-6
    assert ((parts[0] + parts[1] - whole).abs() <= bound).all()


def _parallel(**kw):
    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig

    base = dict(tp_size=1, pcp_size=1, dp_size=1, ep_size=1, tp_rank=0, pcp_rank=0, dp_rank=0, ep_rank=0, sp_size=1)
    base.update(use_ep=False, all2all_backend="allgather_reducescatter", enable_eplb=False)
    base.update(kw)
    return FusedMoEParallelConfig(**base)


@pytest.mark.parametrize(
    "config,accepted",
    [
        ({"tp_size": 2}, True),  # -tp 2
        ({"ep_size": 2, "use_ep": True}, True),  # -tp 2 --enable-expert-parallel
        ({"dp_size": 2, "ep_size": 2, "use_ep": True}, True),  # -dp 2 --enable-expert-parallel
        ({"dp_size": 2, "ep_size": 4, "sp_size": 2, "use_ep": True}, True),  # -dp 2 -tp 2 --enable-expert-parallel
        ({"dp_size": 2, "ep_size": 2, "use_ep": True, "all2all_backend": "deepep_low_latency"}, False),
        ({"dp_size": 2, "ep_size": 2, "use_ep": True, "all2all_backend": "deepep_high_throughput"}, False),
        ({"ep_size": 2, "use_ep": True, "all2all_backend": "passthrough"}, False),
    ],
)
def test_parallel_configs_accepted(config, accepted):
    from vllm_rocm_fused.layers.portable_moe import PortableExpertsFp8, supports_parallel_config

    par = _parallel(**config)
    assert PortableExpertsFp8._supports_parallel_config(par) is accepted
    assert supports_parallel_config(par)[0] is accepted


def test_parallel_config_without_the_fields_is_refused():
    from vllm_rocm_fused.layers.portable_moe import supports_parallel_config

    class Renamed:  # a vLLM whose parallel config no longer has the fields read
        dp_size = 2

    ok, why = supports_parallel_config(Renamed())
    assert not ok and "use_all2all_kernels" in why


def test_oracle_picks_the_portable_experts_under_dp_ep(vllm_cfg):
    """vLLM's FP8 MoE oracle finds no kernel on this CPU; the wrapped oracle answers with
    the portable experts, also for the DP + EP (allgather/reduce-scatter) layout."""
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend
    from vllm.model_executor.layers.quantization import fp8 as fp8_method
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8Dynamic128Sym, kFp8Static128BlockSym

    from vllm_rocm_fused.layers.portable_moe import PortableExpertsFp8, install

    install()
    _, s1, _, s2 = _experts_weights(seed=1, n_experts=1)
    dp_ep = _experts(s1, s2, _parallel(dp_size=2, ep_size=2, use_ep=True)).moe_config
    keys = {"weight_key": kFp8Static128BlockSym, "activation_key": kFp8Dynamic128Sym}
    stock = fp8_method.select_fp8_moe_backend.__wrapped__(config=dp_ep, **keys)
    if stock[0] is not Fp8MoeBackend.NONE:
        pytest.skip(f"vLLM has an FP8 MoE kernel on this CPU: {stock}")
    assert fp8_method.select_fp8_moe_backend(config=dp_ep, **keys) == (Fp8MoeBackend.TRITON, PortableExpertsFp8)
