"""INT8 attention in ComfyUI: an `optimized_attention_override` per model patcher (transformer_options).

ComfyUI wraps every attention function with `wrap_attn`: when `transformer_options["optimized_attention_override"]`
is set, that callable receives (the original function, its arguments) and decides.  Setting it on a patcher clone
keeps the choice per model (a Wan 2.2 high-noise expert can run INT8 attention while the low-noise one does not),
needs no change to ComfyUI's Wan code, and survives torch.compile (the kernel is a custom op).

What runs is logged once per distinct decision: the kernel with its P·V precision, or the original attention with
the reason (a mask, a head size above 256, a GPU without int8 tensor cores, ...).  No silent fallback.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..attention import AttentionConfig, AttentionUnavailable, log_once, plan_call, run_planned

log = logging.getLogger("wan_int8.comfy")

OVERRIDE_KEY = "optimized_attention_override"


class Int8AttentionOverride:
    """The override callable.  `self_only`: cross-attention (key length != query length) keeps the original."""

    def __init__(self, config: AttentionConfig = AttentionConfig(), self_only: bool = False):
        self.config = config
        self.self_only = self_only

    def __repr__(self) -> str:
        return f"Int8AttentionOverride(pv={self.config.pv}, self_only={self.self_only})"

    def _why_not(self, q, k, mask, kwargs) -> Optional[str]:
        if mask is not None:
            return "an attention mask was given"
        if kwargs.get("enable_gqa"):
            return "grouped-query attention"
        if kwargs.get("attn_precision") not in (None, torch.float32, torch.float16, torch.bfloat16):
            return f"attn_precision {kwargs.get('attn_precision')}"
        seq = 2 if kwargs.get("skip_reshape") else 1
        if self.self_only and q.shape[seq] != k.shape[seq]:
            return "cross-attention (this model runs INT8 attention for self-attention only)"
        return None

    def __call__(self, func, q, k, v, heads, mask=None, **kwargs):
        why = self._why_not(q, k, mask, kwargs)
        if why is None:
            try:
                out, pv_fp8, kernel = self._run(q, k, v, heads, kwargs)
            except AttentionUnavailable as exc:
                why = str(exc)
            else:
                pv = "fp8" if pv_fp8 else "16-bit"
                head_dim = q.shape[-1] if kwargs.get("skip_reshape") else q.shape[-1] // heads
                log_once(f"run {kernel} {pv} {head_dim}", logging.INFO, "wan-int8: INT8 attention (%s kernel; Q·K "
                         "INT8, P·V %s, head_dim %d) runs in place of ComfyUI's attention", kernel, pv, head_dim)
                return out
        log_once(f"skip {why}", logging.INFO, "wan-int8: INT8 attention not used for a call (%s): ComfyUI's own "
                 "attention runs it", why)
        return func(q, k, v, heads, mask=mask, **kwargs)

    def _run(self, q, k, v, heads, kwargs):
        if kwargs.get("skip_reshape"):          # [B, H, L, D]
            q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        else:                                    # [B, L, H*D]
            q4, k4, v4 = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        pv_fp8, kernel = plan_call(q4, k4, v4, self.config)      # decided once: run, then logged
        out = run_planned(q4, k4, v4, kwargs.get("scale"), pv_fp8, self.config.smooth_k, kernel)
        if kwargs.get("skip_output_reshape"):    # ComfyUI then wants [B, H, L, D]
            return out.transpose(1, 2), pv_fp8, kernel
        return out.flatten(-2), pv_fp8, kernel


def apply_int8_attention(patcher, pv: str = "auto", self_only: bool = False):
    """A clone of `patcher` whose attention runs INT8 (pv: auto | fp8 | fp16); the original is unchanged."""
    clone = patcher.clone()
    opts = clone.model_options.setdefault("transformer_options", {})
    previous = opts.get(OVERRIDE_KEY)
    if previous is not None and not isinstance(previous, Int8AttentionOverride):
        log.warning("wan-int8: this model already had an attention override (%r); INT8 attention replaces it",
                    previous)
    opts = dict(opts)
    opts[OVERRIDE_KEY] = Int8AttentionOverride(AttentionConfig(pv=pv), self_only)
    clone.model_options["transformer_options"] = opts
    log.info("wan-int8: INT8 attention on for this model (P·V %s, %s)",
             {"auto": "fp8 where the GPU has fp8 tensor cores, else 16-bit", "fp8": "fp8", "fp16": "16-bit"}[pv],
             "self-attention only" if self_only else "self- and cross-attention")
    return clone


def remove_int8_attention(patcher):
    """A clone of `patcher` without our override (ComfyUI's attention again)."""
    clone = patcher.clone()
    opts = dict(clone.model_options.get("transformer_options", {}))
    if isinstance(opts.get(OVERRIDE_KEY), Int8AttentionOverride):
        del opts[OVERRIDE_KEY]
    clone.model_options["transformer_options"] = opts
    return clone
