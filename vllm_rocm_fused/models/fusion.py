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
unreduced (sequence-parallel MoE, a MoE that ends in an all2all combine rather
than a TP all-reduce, drafts that read intermediate hidden states such as
EAGLE-3, a MoE runner that cannot skip its reduce, the last layer of a non-last
pipeline stage) keeps that reduce where vLLM put it. The decisions read vLLM's
own fields; one that this vLLM lacks keeps the reduce (logged once).
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


class UnknownVllmField(Exception):
    """A field of vLLM's that a deferral decision reads is missing (renamed or removed)."""


def _vllm_field(obj, name: str, owner: str):
    """``obj.<name>`` as vLLM 0.32/0.33 define it; ``UnknownVllmField`` ("owner.name")
    where this vLLM has none, so that a decision can fail closed instead of guessing."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise UnknownVllmField(f"{owner}.{name}") from None


def _kept_for_unknown(field: UnknownVllmField, what: str) -> str:
    """The reason for keeping ``what`` unfused when ``field`` is missing; logged once."""
    reason = f"this vLLM has no {field} (renamed?), so {what} stays as vLLM does it"
    log_once(logger, logging.WARNING, f"unknown-field:{field}:{what}", "vllm-rocm-fused: %s", reason)
    return reason


def _why_mlp_reduce_stays(layer) -> str | None:
    """None if the MLP/MoE output reduce of ``layer`` can be deferred to the next norm
    site; else why it stays where vLLM put it (a field this vLLM lacks: it stays)."""
    try:
        if _mlp_kind(layer) == "dense":
            return _why_dense_reduce_stays(layer.mlp)
        return _why_moe_reduce_stays(layer.mlp)
    except UnknownVllmField as e:
        return _kept_for_unknown(e, "the MLP reduce")


def _why_dense_reduce_stays(mlp) -> str | None:
    down = _vllm_field(mlp, "down_proj", "Qwen3NextMLP")
    if not _vllm_field(down, "reduce_results", "RowParallelLinear"):
        return "down_proj does not reduce"
    if _vllm_field(down, "tp_size", "RowParallelLinear") == 1:
        return "down_proj is not tensor-parallel"
    return None


def _why_moe_reduce_stays(block) -> str | None:
    """The MoE block's output can be deferred when vLLM's MoE runner ends with a plain TP
    all-reduce of the routed + shared partial sums (``MoERunner._maybe_reduce_final_output``),
    which ``FusedMoEConfig.skip_final_all_reduce`` skips. vLLM's own factory honors that
    request only without all2all kernels, sequence-parallel MoE or zero experts; the rule
    reads those facts, not ``use_ep``: at ``-tp N --enable-expert-parallel`` (dp=1) each rank
    holds whole experts and the output is still a partial sum over the TP ranks."""
    if _vllm_field(block, "is_sequence_parallel", "Qwen3NextSparseMoeBlock"):
        return "sequence-parallel MoE (the block all-gathers its output over TP)"
    if _vllm_field(block, "replicate_shared_expert", "Qwen3NextSparseMoeBlock") and (
        _vllm_field(block, "shared_expert", "Qwen3NextSparseMoeBlock") is not None
    ):
        return "the shared expert is replicated (its output is not a partial sum)"
    runner = _vllm_field(block, "experts", "Qwen3NextSparseMoeBlock")
    cfg = _vllm_field(runner, "moe_config", "MoERunner")
    _vllm_field(cfg, "skip_final_all_reduce", "FusedMoEConfig")
    par = _vllm_field(cfg, "moe_parallel_config", "FusedMoEConfig")
    if _vllm_field(par, "is_sequence_parallel", "FusedMoEParallelConfig"):
        return "sequence-parallel MoE"
    if _vllm_field(par, "use_all2all_kernels", "FusedMoEParallelConfig"):
        return "all2all MoE kernels (a combine step, not a TP all-reduce, ends the MoE)"
    if _vllm_field(par, "all2all_backend", "FusedMoEParallelConfig") == "passthrough":
        return "passthrough all2all (the experts return a reduced output)"
    if _vllm_field(par, "dp_size", "FusedMoEParallelConfig") > 1:
        return "data-parallel MoE (tokens all-gathered and reduce-scattered over DP)"
    if _vllm_field(par, "pcp_size", "FusedMoEParallelConfig") > 1:
        return "context-parallel MoE"
    if _is_zero_expert_router(_vllm_field(runner, "router", "MoERunner")):
        return "zero experts (their output is added after the reduce)"
    return None


def _is_zero_expert_router(router) -> bool:
    try:
        from vllm.model_executor.layers.fused_moe.router.zero_expert_router import ZeroExpertRouter
    except ImportError:
        raise UnknownVllmField("fused_moe.router.zero_expert_router.ZeroExpertRouter") from None
    return isinstance(router, ZeroExpertRouter)


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
    """Why nothing is fused in ``layers``: with sequence-parallel MoE (``-dp N -tp M
    --enable-expert-parallel``) attention reduce-scatters its output, the norms see a
    slice of the tokens and the next layer all-gathers their output: no site can take a
    partial sum or hand on (fp8, scale). A layer without the field: not fused either."""
    try:
        sp = [_vllm_field(layer, "use_attn_reduce_scatter_for_moe", "Qwen3_5DecoderLayer") for layer in layers]
    except UnknownVllmField as e:
        return _kept_for_unknown(e, "every norm site")
    if any(sp):
        return "sequence-parallel MoE (attention reduce-scatter) is enabled"
    return None


# Speculative methods whose draft reads at most the target's final (reduced) hidden
# states, so the reduces inside the stack may move; other methods (EAGLE-3, DFlash,
# DSpark, extract_hidden_states, custom classes, names added later) may read a layer's
# output in between and keep every reduce in place.
_SPEC_FINAL_STATE_ONLY = ("ngram", "ngram_gpu", "suffix", "draft_model", "medusa", "mlp_speculator", "eagle", "mtp")


def _why_no_deferral(vllm_config) -> str | None:
    """Why no reduce of the stack may move to the next norm site (None: they may)."""
    try:
        spec = _vllm_field(vllm_config, "speculative_config", "VllmConfig")
        method = None if spec is None else _vllm_field(spec, "method", "SpeculativeConfig")
    except UnknownVllmField as e:
        return _kept_for_unknown(e, "every reduce")
    if spec is None:
        return None
    name = str(method)
    if name in _SPEC_FINAL_STATE_ONLY or name.endswith("_mtp"):
        return None
    if name == "eagle3":
        return "EAGLE-3 reads intermediate hidden states, which must stay reduced"
    reason = f"speculative method {name} may read intermediate hidden states, which must stay reduced"
    log_once(logger, logging.INFO, f"spec-method:{name}", "vllm-rocm-fused: %s: every reduce stays", reason)
    return reason


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
