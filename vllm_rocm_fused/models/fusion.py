"""Install the fused norm sites into a constructed Qwen3.5 decoder stack.

The stock layer forward stays as vLLM wrote it; what changes is what its calls
do. For every local decoder layer ``i``:

* the output projections skip their all-reduce (``o_proj``/``out_proj`` and the
  MLP ``down_proj`` get ``reduce_results = False``; the MoE runner gets
  ``moe_config.skip_final_all_reduce = True``), so each returns this rank's
  partial sum;
* ``input_layernorm`` becomes a ``FusedNormSite`` that all-reduces the previous
  layer's partial MLP output, adds the residual, normalizes and quantizes,
  returning a ``QuantizedActivation`` (attention: ``qkv_proj`` reads it) or a
  ``FusedInputActivation`` (GDN: ``in_proj_qkvz`` reads the FP8 part,
  ``in_proj_ba`` the bf16 part); layer 0's input (the embedding) is already
  reduced, so its site only normalizes and quantizes;
* ``post_attention_layernorm`` all-reduces the attention output the same way,
  quantizing for a dense MLP's ``gate_up_proj`` and returning bf16 for MoE;
* the final ``norm`` all-reduces the last MLP output (bf16 out, for lm_head).

A site whose consumer cannot take (fp8, scale) keeps bf16 output, and the
reason is reported. Anything that would make a deferred partial sum escape
unreduced (sequence-parallel MoE, EAGLE-3 taps of hidden states, a MoE runner
that cannot skip its reduce, the last layer of a non-last pipeline stage) keeps
that reduce where vLLM put it.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from vllm.model_executor.layers.fusion.quant_activation import QuantizedActivation
from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8Dynamic128Sym

from .. import envs
from ..layers.fused_norm import FusedAllReduceRMSNormQuant
from ..layers.quant_handoff import Handoff, enable_handoff, inspect_consumer
from ..log import get_logger, log_once
from ..ops import backends, self_check
from ..ops.backends import CallSpec
from ..ops.comm import get_communicator
from ..sites import ATTENTION_INPUT, FINAL_NORM, GDN_INPUT, POST_ATTN_DENSE, POST_ATTN_MOE, SiteKind
from .activation import FusedInputActivation, accept_fused_input

logger = get_logger("models")

GEMMA_OFFSET = 1.0  # Qwen3.5 norms scale by (1 + weight)


class FusedNormSite(FusedAllReduceRMSNormQuant):
    """A norm site of a Qwen3.5 layer, called like vLLM's RMSNorm
    (``norm(x) -> out`` or ``norm(x, residual) -> (out, residual)``), where ``out``
    is what the site's consumer takes."""

    def __init__(
        self, site: SiteKind, hidden_size: int, eps: float, *, all_reduce: bool, handoff: Handoff | None
    ) -> None:
        layout = handoff.layout if handoff is not None else None
        quantize = layout is not None
        super().__init__(
            hidden_size,
            eps,
            weight_offset=GEMMA_OFFSET,
            all_reduce=all_reduce,
            quantize=quantize,
            emit_bf16=quantize and site.emit_bf16,
            scale_layout=layout or "row",
        )
        self.site = site
        self.handoff = handoff

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # CustomOp.forward runs the forward_<platform> vLLM picked at construction
        out = super().forward(x, residual, tag=self.site.key)
        if not self.quantize:
            act = out.normed
        elif self.emit_bf16:
            act = FusedInputActivation(out.q, out.scale, x.dtype, out.normed.shape, kFp8Dynamic128Sym, bf16=out.normed)
        else:
            act = QuantizedActivation(out.q, out.scale, x.dtype, out.residual.shape, kFp8Dynamic128Sym)
        return act if residual is None else (act, out.residual)

    def extra_repr(self) -> str:
        return f"site={self.site.key}, " + super().extra_repr()


@dataclass
class SiteRecord:
    site: SiteKind
    layer: str
    all_reduce: bool
    layout: str | None
    reason: str  # why no quant handoff / what the consumer reads


@dataclass
class FusionReport:
    """What was installed, for the startup log line and for tests."""

    where: str
    tp_size: int
    rank: int
    sites: list[SiteRecord] = field(default_factory=list)
    pp_size: int = 1
    pp_rank: int = 0  # this pipeline stage
    layer_range: tuple[int, int] | None = None  # first and last local decoder layer
    kept_reduces: list[str] = field(default_factory=list)  # "layer.N.mlp: reason"
    disabled: str | None = None
    backends: dict[str, str] = field(default_factory=dict)  # site key -> backend/path picks
    backends_not_used: list[str] = field(default_factory=list)  # "name: reason"

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for rec in self.sites:
            c = out.setdefault(rec.site.key, Counter())
            c["total"] += 1
            c["all_reduce"] += rec.all_reduce
            c["quant_handoff"] += rec.layout is not None
        return {k: dict(v) for k, v in out.items()}

    def summary(self) -> str:
        if self.disabled:
            return f"vllm-rocm-fused: {self.where}: not fused: {self.disabled}"
        parts = []
        by_kind: dict[str, list[SiteRecord]] = {}
        for rec in self.sites:
            by_kind.setdefault(rec.site.key, []).append(rec)
        for key, recs in by_kind.items():
            site = recs[0].site
            n_ar = sum(r.all_reduce for r in recs)
            n_q = sum(r.layout is not None for r in recs)
            desc = f"{site.title} x{len(recs)}: AR fused {n_ar}/{len(recs)}"
            if site.quantize:
                desc += f", fp8 handoff {n_q}/{len(recs)}"
                reasons = sorted({r.reason for r in recs if r.layout is None})
                if reasons:
                    desc += f" (bf16 because: {'; '.join(reasons)})"
                layouts = sorted({r.layout for r in recs if r.layout})
                if layouts:
                    desc += f" [{'/'.join(layouts)} scales]"
            if key in self.backends:
                desc += f" -> {self.backends[key]}"
            parts.append(desc)
        stage = ""
        if self.pp_size > 1:
            stage = f", PP={self.pp_size} stage {self.pp_rank}"
            if self.layer_range is not None:
                stage += f" (layers {self.layer_range[0]}-{self.layer_range[1]})"
        text = f"vllm-rocm-fused: fused sites ({self.where}, TP={self.tp_size}, rank {self.rank}{stage}): " + "; ".join(
            parts
        )
        if self.kept_reduces:
            text += f" | reduces kept in place: {'; '.join(self.kept_reduces)}"
        if self.backends_not_used:
            text += f" | backends not used: {'; '.join(self.backends_not_used)}"
        checked = self.self_check_lines()
        if checked:
            text += f" | self-check: {'; '.join(checked)}"
        return text

    def self_check_lines(self) -> list[str]:
        """What the startup self-check found at this model's site kinds (ops.self_check;
        empty until their first call, vLLM's profile run, has checked them)."""
        keys = {rec.site.key for rec in self.sites}
        sites = [s for s in self_check.checked_sites() if s.split(" ", 1)[0] in keys]
        return [line for s in sites if (line := self_check.site_summary(s)) is not None]


_reports: list[FusionReport] = []


def reports() -> list[FusionReport]:
    """Every report made in this process (one per fused model built)."""
    return list(_reports)


def _attn_out_proj(layer):
    if layer.layer_type == "full_attention":
        return layer.self_attn.o_proj
    return layer.linear_attn.out_proj


def _mlp_kind(layer) -> str:
    return "moe" if hasattr(layer.mlp, "experts") else "dense"


def _why_mlp_reduce_stays(layer) -> str | None:
    """None if the MLP/MoE output reduce of ``layer`` can be deferred."""
    mlp = layer.mlp
    if _mlp_kind(layer) == "dense":
        down = mlp.down_proj
        if not getattr(down, "reduce_results", False):
            return "down_proj does not reduce"
        if getattr(down, "tp_size", 1) == 1:
            return "down_proj is not tensor-parallel"
        return None
    if getattr(mlp, "is_sequence_parallel", False):
        return "sequence-parallel MoE"
    if getattr(mlp, "replicate_shared_expert", False) and getattr(mlp, "shared_expert", None) is not None:
        return "the shared expert is replicated (its output is not a partial sum)"
    cfg = getattr(mlp.experts, "moe_config", None)
    if cfg is None or not hasattr(cfg, "skip_final_all_reduce"):
        return "this vLLM's MoE runner cannot skip its final all-reduce"
    par = getattr(cfg, "moe_parallel_config", None)
    if par is not None and (getattr(par, "use_all2all_kernels", False) or getattr(par, "use_ep", False)):
        return "expert parallel / all2all MoE"
    if getattr(cfg, "dp_size", 1) > 1 or getattr(cfg, "pcp_size", 1) > 1:
        return "data/context-parallel MoE"
    return None


def _defer_mlp_reduce(layer) -> None:
    if _mlp_kind(layer) == "dense":
        layer.mlp.down_proj.reduce_results = False
    else:
        layer.mlp.experts.moe_config.skip_final_all_reduce = True


def _input_consumer(layer):
    if layer.layer_type == "full_attention":
        return ATTENTION_INPUT, layer.self_attn.qkv_proj
    return GDN_INPUT, layer.linear_attn.in_proj_qkvz


def _handoff_for(site: SiteKind, consumer, quant_off: bool) -> Handoff:
    if not site.quantize:
        return Handoff(None, site.consumer, "bf16")
    if quant_off:
        return Handoff(None, "VLLM_ROCM_FUSED_DISABLE_AR_QUANT=1", "-")
    return inspect_consumer(consumer)


def _deferred_reduces(
    report: FusionReport, layers: list, no_deferral: str | None, *, last_output_reduced: bool, independent_layers: bool
) -> tuple[list[bool], list[bool]]:
    """Per layer, whether its attention and its MLP output reduce can be deferred to the
    next norm site; each MLP reduce that stays is recorded in ``report.kept_reduces``."""
    attn_deferred, mlp_deferred = [], []
    for i, layer in enumerate(layers):
        a_ok = no_deferral is None and getattr(_attn_out_proj(layer), "reduce_results", False)
        m_why = no_deferral or _why_mlp_reduce_stays(layer)
        if m_why is None and last_output_reduced and i == len(layers) - 1 and not independent_layers:
            m_why = "the last layer of a non-last pipeline stage hands on a reduced output"
        if m_why is not None and report.tp_size > 1:
            report.kept_reduces.append(f"layer {layer.layer_idx} mlp: {m_why}")
        attn_deferred.append(bool(a_ok))
        mlp_deferred.append(m_why is None)
    return attn_deferred, mlp_deferred


def _install_site(
    report: FusionReport,
    owner,
    attr: str,
    site: SiteKind,
    consumer,
    *,
    all_reduce: bool,
    hidden: int,
    eps: float,
    quant_off: bool,
    prefix: str = "",
) -> Handoff:
    """Replace the norm ``owner.<attr>`` with a fused site, switch ``consumer`` to the
    (fp8, scale) input where it can take it, and record the site as ``prefix + attr``."""
    handoff = _handoff_for(site, consumer, quant_off)
    setattr(owner, attr, FusedNormSite(site, hidden, eps, all_reduce=all_reduce, handoff=handoff))
    if handoff.layout is not None:
        enable_handoff(consumer, handoff)
    report.sites.append(SiteRecord(site, prefix + attr, all_reduce, handoff.layout, handoff.reason))
    return handoff


def _why_stack_not_fused(vllm_config, layers) -> str | None:
    if any(getattr(layer, "use_attn_reduce_scatter_for_moe", False) for layer in layers):
        return "sequence-parallel MoE (attention reduce-scatter) is enabled"
    return None


def _why_no_deferral(vllm_config) -> str | None:
    spec = getattr(vllm_config, "speculative_config", None)
    method = getattr(spec, "method", None) if spec is not None else None
    if method is not None and "eagle3" in str(method):
        return "EAGLE-3 reads intermediate hidden states, which must stay reduced"
    return None


def install(
    *,
    vllm_config,
    layers: list,
    final_norm_owner,
    where: str,
    last_output_reduced: bool = False,
    independent_layers: bool = False,
) -> FusionReport:
    """Rewire ``layers`` (this rank's decoder layers, in order) and the final norm
    (``final_norm_owner.norm``, or None when this rank has none).

    The first layer's input always arrives reduced (the embedding, or a previous
    pipeline stage's reduced output), so its input norm does not all-reduce.

    last_output_reduced: the last layer's output must leave reduced (a non-last
        pipeline stage hands it on).
    independent_layers: each layer runs alone between an unreduced input and the
        final norm (MTP drafts): every input norm starts without a residual.
    """
    from vllm.distributed import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pp_group()
    report = FusionReport(
        where=where,
        tp_size=tp_size,
        rank=rank,
        pp_size=pp.world_size,
        pp_rank=pp.rank_in_group,
        layer_range=(layers[0].layer_idx, layers[-1].layer_idx) if layers else None,
    )
    _reports.append(report)

    why = _why_stack_not_fused(vllm_config, layers)
    if why is not None:
        report.disabled = why
        log_once(logger, logging.INFO, f"report:{where}", report.summary())
        return report

    quant_off = envs.ar_quant_disabled()
    no_deferral = _why_no_deferral(vllm_config) if tp_size > 1 else "TP=1 (nothing to reduce)"

    attn_deferred, mlp_deferred = _deferred_reduces(
        report, layers, no_deferral, last_output_reduced=last_output_reduced, independent_layers=independent_layers
    )
    eps = layers[0].input_layernorm.variance_epsilon if layers else 1e-6
    hidden = layers[0].input_layernorm.weight.shape[0] if layers else 0  # unused without layers

    fuse = functools.partial(_install_site, report, hidden=hidden, eps=eps, quant_off=quant_off)
    for i, layer in enumerate(layers):
        if attn_deferred[i]:
            _attn_out_proj(layer).reduce_results = False
        if mlp_deferred[i]:
            _defer_mlp_reduce(layer)
        prefix = f"layers.{layer.layer_idx}."

        site, consumer = _input_consumer(layer)
        in_ar = False if (independent_layers or i == 0) else mlp_deferred[i - 1]
        handoff = fuse(layer, "input_layernorm", site, consumer, all_reduce=in_ar, prefix=prefix)
        if handoff.layout is not None and site.emit_bf16:
            accept_fused_input(layer.linear_attn.in_proj_ba)

        if _mlp_kind(layer) == "dense":
            site, consumer = POST_ATTN_DENSE, layer.mlp.gate_up_proj
        else:
            site, consumer = POST_ATTN_MOE, None
        fuse(layer, "post_attention_layernorm", site, consumer, all_reduce=attn_deferred[i], prefix=prefix)

    if final_norm_owner is not None and layers:
        final_ar = mlp_deferred[-1] if not independent_layers else all(mlp_deferred)
        if independent_layers and any(mlp_deferred) and not all(mlp_deferred):
            raise RuntimeError("MTP layers must defer their MLP reduce all alike")
        fuse(final_norm_owner, "norm", FINAL_NORM, None, all_reduce=final_ar)

    report.backends, report.backends_not_used = _backend_summary(report, vllm_config)
    log_once(logger, logging.INFO, f"report:{where}", report.summary())
    return report


def _backend_summary(report: FusionReport, vllm_config) -> tuple[dict[str, str], list[str]]:
    """Per site kind, which backend/path ``auto`` takes at a decode-sized (1 token)
    and a prefill-sized call; and, once, why every better backend is not used."""
    from vllm.platforms import current_platform

    comm = None
    if report.tp_size > 1:
        from ..layers.comm import tp_communicator_name

        name = tp_communicator_name()
        comm = get_communicator(name) if name is not None else None
    device = torch.device("cpu" if current_platform.is_cpu() else current_platform.device_type)
    max_tokens = getattr(vllm_config.scheduler_config, "max_num_batched_tokens", None) or 8192
    picks: dict[str, str] = {}
    why_not: dict[str, str] = {}
    for rec in report.sites:
        if rec.site.key in picks:
            continue
        quantize = rec.layout is not None
        site_comm = comm if rec.all_reduce else None
        chosen = []
        for tokens in (1, max_tokens):
            spec = CallSpec(
                num_tokens=tokens,
                hidden=vllm_config.model_config.get_hidden_size(),
                dtype=vllm_config.model_config.dtype,
                device=device,
                world_size=report.tp_size if rec.all_reduce else 1,
                group_size=128,
                weight_offset=GEMMA_OFFSET,
                emit_bf16=quantize and rec.site.emit_bf16,
                scale_layout=rec.layout or "row",
                quant_dtype=current_platform.fp8_dtype(),
                has_residual=True,
                quantize=quantize,
            )
            backend = backends.select("auto", spec, site_comm)
            chosen.append(f"{backend.name}/{backend.describe(spec, site_comm)} at T={tokens}")
            for name, reason in backends.explain(spec, site_comm):
                if reason is not None and name != backend.name:
                    why_not.setdefault(name, reason)
        picks[rec.site.key] = ", ".join(chosen)
    return picks, [f"{name}: {reason}" for name, reason in why_not.items()]
