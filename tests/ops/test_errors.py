"""Bad input gets a clear error naming the argument."""

import pytest
import torch

from vllm_rocm_fused.ops import fused_allreduce_rmsnorm_quant as op

H = 256


def good():
    x = torch.randn(4, H, dtype=torch.bfloat16)
    return x, x.clone(), torch.ones(H, dtype=torch.bfloat16)


CASES = [
    ("x", TypeError, lambda x, r, w: op(x.float(), None, w, 1e-6)),
    ("x", TypeError, lambda x, r, w: op(x.to(torch.int32), None, w, 1e-6)),
    ("x", ValueError, lambda x, r, w: op(x.view(2, 2, H), None, w, 1e-6)),
    ("x", ValueError, lambda x, r, w: op(x[0], None, w, 1e-6)),
    ("x", TypeError, lambda x, r, w: op(x.tolist(), None, w, 1e-6)),
    (
        "group_size",
        ValueError,
        lambda x, r, w: op(
            torch.randn(4, 200, dtype=torch.bfloat16), None, torch.ones(200, dtype=torch.bfloat16), 1e-6
        ),
    ),
    ("group_size", ValueError, lambda x, r, w: op(x, r, w, 1e-6, group_size=0)),
    ("group_size", ValueError, lambda x, r, w: op(x, r, w, 1e-6, group_size=96)),
    ("residual", ValueError, lambda x, r, w: op(x, r[:3], w, 1e-6)),
    ("residual", TypeError, lambda x, r, w: op(x, r.half(), w, 1e-6)),
    ("residual", TypeError, lambda x, r, w: op(x, "r", w, 1e-6)),
    ("weight", ValueError, lambda x, r, w: op(x, r, w[:128], 1e-6)),
    ("weight", ValueError, lambda x, r, w: op(x, r, w.view(2, 128), 1e-6)),
    ("weight", TypeError, lambda x, r, w: op(x, r, w.half(), 1e-6)),
    ("weight", TypeError, lambda x, r, w: op(x, r, w.to(torch.float64), 1e-6)),
    ("eps", ValueError, lambda x, r, w: op(x, r, w, -1.0)),
    ("eps", ValueError, lambda x, r, w: op(x, r, w, float("nan"))),
    ("weight_offset", ValueError, lambda x, r, w: op(x, r, w, 1e-6, weight_offset=float("inf"))),
    ("scale_layout", ValueError, lambda x, r, w: op(x, r, w, 1e-6, scale_layout="tma")),
    ("quant_dtype", TypeError, lambda x, r, w: op(x, r, w, 1e-6, quant_dtype=torch.int8)),
    ("quant_dtype", TypeError, lambda x, r, w: op(x, r, w, 1e-6, quant_dtype=torch.float8_e5m2)),
    ("quant_dtype", TypeError, lambda x, r, w: op(x, r, w, 1e-6, quant_dtype="fp8")),
    ("backend", ValueError, lambda x, r, w: op(x, r, w, 1e-6, backend="cutlass")),
    ("group", TypeError, lambda x, r, w: op(x, r, w, 1e-6, group="tp")),
]


@pytest.mark.parametrize("arg,exc,call", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_names_the_argument(arg, exc, call):
    x, r, w = good()
    with pytest.raises(exc, match=arg):
        call(x, r, w)


def test_good_input_passes():
    x, r, w = good()
    out = op(x, r, w, 1e-6, weight_offset=1, quant_dtype=torch.float8_e4m3fnuz)
    assert out.q.dtype == torch.float8_e4m3fnuz
