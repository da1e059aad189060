"""The fused Wan block: the same function as `WanAttentionBlock.forward` (ours and ComfyUI's), in fewer passes.

Where the unfused block reads and writes every activation between its linears several times (LayerNorm, the
adaLN `addcmul`, one quantization per q/k/v linear, RMSNorm, RoPE, GELU, the gated residual `addcmul`), the fused
block runs:
- LayerNorm + modulation + per-token INT8 quantization in one pass (`norm_modulate`), its codes shared by every
  linear that reads the same input with the same quantizer (q, k and v; ffn.0; the cross-attention q);
- RMSNorm + RoPE on q and k in one pass (`rms_norm_rope`);
- GELU, and the gate-and-residual `x + y * gate`, inside the INT8 GEMM's epilogue (o, ffn.0, ffn.2, and the
  cross-attention's o with a plain residual).
Attention itself is whatever the caller passes (SDPA, ComfyUI's `optimized_attention`, our INT8 attention).

The function works on any module tree with Wan's names (`norm1`, `self_attn.{q,k,v,o,norm_q,norm_k}`, `norm3`,
`cross_attn`, `norm2`, `ffn.{0,2}`, `modulation`): our `models.wan.WanAttentionBlock` and ComfyUI's
`comfy.ldm.wan.model.WanAttentionBlock` alike.  INT8 layers are driven through `int8_activation`/`int8_call`
(`layers.Int8Linear`, the ComfyUI glue's Linear); any other linear runs as itself, its epilogue in torch.  LoRA
stacks in a layer's `lora` slot are honoured: a fully fusable stack goes into the GEMM epilogue with the rest;
otherwise the layer's output gets the LoRA and then the epilogue in torch.

Numerics: the fused passes compute in fp32 from load to store, rounding once where ComfyUI rounds every
intermediate to the model dtype; the block output therefore differs from the unfused one by the model dtype's
rounding (bf16: ~1e-3 relative), not more (tests compare both against a float64 evaluation of the block).

Every kernel has its torch reference here (`norm_modulate_reference`, `rms_norm_rope_reference`, and
`quant.int8.block_epilogue_reference` for the GEMM epilogue); without Triton (CPU without the interpreter, an
unsupported GPU) `fused_block_unavailable` says why and callers run the unfused block.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .models.wan import attention as sdpa_heads, modulation_per, repeat_e
from .quant.int8 import gated_rows, quantize_activation

log = logging.getLogger("wan_int8")

# -- references ------------------------------------------------------------------------------------------------
def norm_modulate_reference(x: torch.Tensor, eps: float, weight: Optional[torch.Tensor] = None,
                            bias: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                            scale: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0) -> torch.Tensor:
    """LayerNorm over each row of `x [M, K]` (optional affine), then `* (1 + scale) + shift` with shift/scale
    `[B, G, K]` rows chosen per token (`quant.int8.gated_rows`), in fp32 (float64 stays float64)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    v = x.to(dtype)
    mean = v.mean(dim=1, keepdim=True)
    d = v - mean
    v = d / torch.sqrt((d * d).mean(dim=1, keepdim=True) + eps)
    if weight is not None:
        v = v * weight.to(dtype) + bias.to(dtype)
    if shift is not None:
        seq = seq or x.shape[0]
        rows = lambda t: gated_rows(t, x.shape[0], seq, per or seq).to(dtype)  # noqa: E731
        v = v * (1 + rows(scale)) + rows(shift)
    return v


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, freqs: Optional[torch.Tensor],
                            head_dim: int, seq: int) -> torch.Tensor:
    """RMSNorm over each row of `x [M, D]` times weight, then RoPE on every head with `freqs [seq, hd/2, 2, 2]`
    (ComfyUI's rotation matrices; None: none), in fp32 (float64 stays float64)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    v = x.to(dtype)
    v = v * torch.rsqrt((v * v).mean(dim=1, keepdim=True) + eps) * weight.to(dtype)
    if freqs is None:
        return v
    m, d = v.shape
    f = freqs.reshape(seq, head_dim // 2, 2, 2).to(dtype)
    f = f[torch.arange(m, device=v.device) % seq][:, None]                  # [M, 1, hd/2, 2, 2]
    pairs = v.reshape(m, d // head_dim, head_dim // 2, 1, 2)
    return (f[..., 0] * pairs[..., 0] + f[..., 1] * pairs[..., 1]).reshape(m, d)


# -- the fused passes ----------------------------------------------------------------------------------------
def kernels_unavailable(x: torch.Tensor) -> Optional[str]:
    """None when the fused passes' Triton kernels can run on x's device, else why not."""
    from .kernels.triton_backend import triton_available
    from .kernels.triton_launch import interpreting
    if x.device.type not in ("cuda", "cpu"):
        return f"device type {x.device.type!r}"
    ok, why = triton_available(x.device if x.is_cuda else None)
    if not ok:
        return why
    if x.device.type == "cpu" and not interpreting():
        return "input is on the CPU"
    return None


# Both passes are custom ops (fake implementations for torch.compile: the Triton launch and the backend choice
# stay opaque, no graph break); eager calls skip the op wrapper.  Outputs a pass does not produce come back from
# the op as empty tensors and from the functions as None.
def _norm_modulate_impl(x: torch.Tensor, eps: float, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], seq: int, per: int,
                        store_y: bool, quantize: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernels_unavailable(x) is None and x.shape[1] <= 16384:
        from .kernels.triton_fused import norm_modulate_triton
        y, q, s = norm_modulate_triton(x, eps, weight, bias, shift, scale, seq, per, store_y, quantize)
    else:
        v = norm_modulate_reference(x, eps, weight, bias, shift, scale, seq, per)
        y = v.to(x.dtype) if store_y else None
        q, s = quantize_activation(v) if quantize else (None, None)
    empty = x.new_empty(0)
    return (y if y is not None else empty, q if q is not None else empty.to(torch.int8),
            s if s is not None else empty.float())


_norm_modulate_op = torch.library.custom_op("wan_int8::norm_modulate", mutates_args=())(_norm_modulate_impl)


@_norm_modulate_op.register_fake
def _(x, eps, weight, bias, shift, scale, seq, per, store_y, quantize):
    m, k = x.shape
    return (x.new_empty((m, k) if store_y else (0,)), x.new_empty((m, k) if quantize else (0,), dtype=torch.int8),
            x.new_empty((m,) if quantize else (0,), dtype=torch.float32))


def norm_modulate(x: torch.Tensor, eps: float, weight=None, bias=None, shift=None, scale=None, seq: int = 0,
                  per: int = 0, store_y: bool = True, quantize: bool = False):
    """(y in x.dtype or None, int8 codes or None, fp32 scales or None) of `norm_modulate_reference`: one Triton
    pass where it can run (else the reference and `quant.int8.quantize_activation`)."""
    fn = torch.ops.wan_int8.norm_modulate if torch.compiler.is_compiling() else _norm_modulate_impl
    y, q, s = fn(x, float(eps), weight, bias, shift, scale, seq, per, store_y, quantize)
    return (y if store_y else None), (q if quantize else None), (s if quantize else None)


def _rms_norm_rope_impl(x: torch.Tensor, weight: torch.Tensor, eps: float, freqs: Optional[torch.Tensor],
                        head_dim: int, seq: int) -> torch.Tensor:
    if kernels_unavailable(x) is None:
        from .kernels.triton_fused import rms_norm_rope_triton
        return rms_norm_rope_triton(x, weight, eps, freqs, head_dim, seq)
    return rms_norm_rope_reference(x, weight, eps, freqs, head_dim, seq).to(x.dtype)


_rms_norm_rope_op = torch.library.custom_op("wan_int8::rms_norm_rope", mutates_args=())(_rms_norm_rope_impl)


@_rms_norm_rope_op.register_fake
def _(x, weight, eps, freqs, head_dim, seq):
    return torch.empty_like(x)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, freqs: Optional[torch.Tensor], head_dim: int,
                  seq: int) -> torch.Tensor:
    """`rms_norm_rope_reference` rounded to x.dtype: one Triton pass where it can run."""
    fn = torch.ops.wan_int8.rms_norm_rope if torch.compiler.is_compiling() else _rms_norm_rope_impl
    return fn(x, weight, float(eps), freqs, head_dim, seq)


# -- linears with the block epilogue --------------------------------------------------------------------------
class _Input:
    """One activation as its consumers may take it: float `x [M, K]` and/or shared INT8 codes with scales."""

    def __init__(self, x: Optional[torch.Tensor], xq: Optional[torch.Tensor] = None,
                 sx: Optional[torch.Tensor] = None, key: Optional[tuple] = None):
        self.x, self.xq, self.sx, self.key = x, xq, sx, key


def _key_of(module, x: torch.Tensor) -> Optional[tuple]:
    fn = getattr(module, "int8_activation", None)
    return fn(x) if fn is not None else None


def _same_key(a: tuple, b: tuple) -> bool:
    """Same rotation kind and group, and the same sign vector (the same tensor or storage without a device sync;
    else compared by value)."""
    if a[0] != b[0] or a[1] != b[1]:
        return False
    sa, sb = a[2], b[2]
    if sa is sb:
        return True
    if sa is None or sb is None or sa.shape != sb.shape:
        return False
    return (sa.data_ptr() == sb.data_ptr() and sa.stride() == sb.stride() and sa.dtype == sb.dtype) \
        or torch.equal(sa, sb)


def _has_lora(module) -> bool:
    return getattr(module, "lora", None) is not None


def prepare_input(consumers: Sequence, x_like: torch.Tensor, make: Callable[[bool, bool], tuple]) -> _Input:
    """Decide how to produce one activation for `consumers` and produce it with `make(store_y, quantize_plain)
    -> (y, xq, sx)`: shared INT8 codes when every consumer runs INT8 with the same quantizer (plain: quantized in
    the same pass; rotated: one rotated quantization of y), and the float y when any consumer needs it (a LoRA,
    a float layer, a different quantizer)."""
    keys = [_key_of(m, x_like) for m in consumers]
    shared = keys[0] if all(k is not None for k in keys) and all(_same_key(k, keys[0]) for k in keys[1:]) else None
    plain = shared is not None and shared[0] == "none"
    need_y = shared is None or not plain or any(_has_lora(m) for m in consumers)
    y, xq, sx = make(need_y, plain)
    if shared is not None and not plain:
        xq, sx = _quantize_rotated(y, shared)
    return _Input(y, xq, sx, shared)


def _quantize_rotated(y: torch.Tensor, key: tuple):
    kind, group, signs = key
    if kernels_unavailable(y) is None:
        from .kernels.triton_quant import quantize_activation_triton
        return quantize_activation_triton(y, kind, group, signs)
    from .quant.types import Rotation
    return quantize_activation(y, Rotation(kind, group, signs))


def residual_fusion_pays(x: torch.Tensor) -> bool:
    """Whether the gated residual belongs in the GEMM epilogue: on Hopper at M > 1024 the GEMM loads the residual
    tile by TMA (the Gluon GEMM, or the persistent TMA Triton kernel per stored half; measured for the latter:
    costs the GEMM nothing for a plain residual, saves the separate addcmul pass; the block runs with the former
    in bench/RESULTS.md runs 39 and 41).  The pointer-load epilogue of the other kernels made the GEMM slower than
    the pass it saves (H100, bench/fused_parts.py), so there it stays in torch."""
    if not x.is_cuda or x.shape[0] <= 1024:
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def run_linear(module, inp: _Input, out_dtype: torch.dtype, act: int = 0, residual: Optional[torch.Tensor] = None,
               gate: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0) -> torch.Tensor:
    """`module`'s output for `inp` followed by the block epilogue (GELU / residual + y * gate), fused into the INT8
    GEMM where the layer runs INT8 and its LoRA (if any) fuses completely; otherwise in torch after it (the
    residual also where `residual_fusion_pays` says no)."""
    rows = inp.x if inp.x is not None else inp.xq
    if residual is not None and rows.device.type == "cuda" and not residual_fusion_pays(rows):
        return epilogue_torch(run_linear(module, inp, out_dtype, act), 0, residual, gate, seq, per)
    epi = dict(act=act, residual=residual, gate=gate, seq=seq, per=per) if act or residual is not None else {}
    key = _key_of(module, inp.x if inp.x is not None else inp.xq)
    if key is not None:
        use_codes = inp.key is not None and _same_key(key, inp.key)
        x_op, sx = (inp.xq, inp.sx) if use_codes else (inp.x, None)
        lora = getattr(module, "lora", None)
        if lora is None:
            return module.int8_call(x_op, sx=sx, out_dtype=out_dtype, **epi)
        fused = getattr(lora, "fused_parts", None)
        if fused is not None:
            t, b, state = fused(inp.x)
            done = getattr(lora, "fully_fused", None)
            if done is not None and done(state):
                return module.int8_call(x_op, sx=sx, out_dtype=out_dtype, lora_t=t, lora_b=b, **epi)
            y = lora.finish(inp.x, module.int8_call(x_op, sx=sx, out_dtype=out_dtype, lora_t=t, lora_b=b), state)
        else:
            y = lora.apply(inp.x, module.int8_call(x_op, sx=sx, out_dtype=out_dtype))
    else:
        y = module(inp.x)
    if not epi:
        return y
    return epilogue_torch(y, **epi)


def epilogue_torch(y: torch.Tensor, act: int = 0, residual: Optional[torch.Tensor] = None,
                   gate: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0) -> torch.Tensor:
    """The block epilogue as ComfyUI computes it (GELU, then `addcmul(x, y, gate)` in the model dtype, the gate
    spread over the tokens by `repeat_e`): for layers whose GEMM does not apply it."""
    if act:
        y = F.gelu(y, approximate="tanh")
    if residual is None:
        return y
    n = y.shape[-1]
    if gate is None:
        return residual + y
    seq = seq or y.shape[0]
    b = y.shape[0] // seq
    y3, r3 = y.reshape(b, seq, n), residual.reshape(b, seq, n)
    return torch.addcmul(r3, y3, repeat_e(gate, y3)).reshape(b * seq, n)


# -- the block ------------------------------------------------------------------------------------------------
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _param(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t if t.device == like.device else t.to(like.device)


def _eps(norm, default: float = 1e-6) -> float:
    eps = getattr(norm, "eps", None)
    return float(eps) if eps is not None else default


def fused_block_unavailable(block, x: torch.Tensor, need_kernels: bool = True) -> Optional[str]:
    """None when `fused_block_forward` can run `block` on x, else why not (callers run the unfused block).
    `need_kernels=False` (tests of the glue on a CPU): accept running the fused block on its torch references."""
    why = kernels_unavailable(x) if need_kernels else None
    if why is not None:
        return f"the fused kernels cannot run here ({why})"
    sa = block.self_attn
    d = x.shape[-1]
    head_dim = d // sa.num_heads
    if d > 16384 or head_dim not in (32, 64, 128, 256):
        return f"dim {d} / head_dim {head_dim} (fused passes cover dim <= 16384, head_dim 32-256 powers of two)"
    if not isinstance(block.norm1, torch.nn.LayerNorm) or not isinstance(block.norm2, torch.nn.LayerNorm):
        return "norm1/norm2 are not LayerNorms"
    for norm in (sa.norm_q, sa.norm_k, block.cross_attn.norm_q):
        if getattr(norm, "weight", None) is None:
            return "q/k norms without RMSNorm weights (qk_norm off)"
    if not isinstance(block.ffn[1], torch.nn.GELU) or block.ffn[1].approximate != "tanh":
        return "the FFN activation is not GELU(tanh)"
    for name, module in block.named_modules():   # ComfyUI's lowvram patches live in these, not in the weights
        if len(getattr(module, "weight_function", ())) or len(getattr(module, "bias_function", ())):
            return f"{name or 'the block'} has ComfyUI weight patches applied at run time (lowvram)"
    return None


def log_decision(why: Optional[str], fallback: str) -> None:
    """Say once which block runs: the fused one (`why` None or empty), else `fallback` (e.g. "ComfyUI's block")
    and why not.  One message for every caller (our model, the ComfyUI hook)."""
    from .attention import log_once
    if why:
        log_once(f"fused off: {fallback}: {why}", logging.INFO, "wan-int8: fused Wan block not used (%s); %s runs",
                 why, fallback)
    else:
        log_once(f"fused on: {fallback}", logging.INFO, "wan-int8: Wan blocks run fused (norm+modulation+INT8 "
                 "quantization, RMSNorm+RoPE, GELU and gated residual in the INT8 GEMM epilogue)")


def fused_block_forward(block, x: torch.Tensor, e: torch.Tensor, freqs: torch.Tensor, context: torch.Tensor,
                        context_img_len: Optional[int] = None, attention: Optional[AttentionFn] = None,
                        cross_attention: Optional[AttentionFn] = None) -> torch.Tensor:
    """`block(x, e, freqs, context, context_img_len)` with the fused passes (see module docstring).

    x `[B, L, D]`; e `[B, G, 6, D]` (or ComfyUI's `[B, 6, D]`); freqs ComfyUI's RoPE `[1, L, 1, hd/2, 2, 2]`;
    `attention(q, k, v, heads)` on `[B, L, H*D]` tensors for self-attention, `cross_attention` likewise (default:
    the same).  Check `fused_block_unavailable` first."""
    attention = attention or sdpa_heads
    cross_attention = cross_attention or attention
    b, seq, d = x.shape
    dtype = x.dtype
    m = b * seq
    mod = _param(block.modulation, x).to(dtype)
    if e.dim() == 4:
        parts = (mod.unsqueeze(0) + e).unbind(2)                           # six [B, G, D]
    else:
        parts = [p.unsqueeze(1) for p in (mod + e).unbind(1)] if e.shape[1] == 6 else None
        if parts is None:
            raise ValueError(f"modulation input e has shape {tuple(e.shape)}; expected [B, G, 6, D] or [B, 6, D]")
    per = modulation_per(seq, parts[0].shape[1])
    x2 = x.reshape(m, d)
    if not x2.is_contiguous():
        x2 = x2.contiguous()

    sa = block.self_attn
    heads = sa.num_heads
    head_dim = d // heads
    n1 = block.norm1
    h = prepare_input((sa.q, sa.k, sa.v), x2, lambda store_y, quant: norm_modulate(
        x2, _eps(n1), _param(n1.weight, x), _param(n1.bias, x), parts[0], parts[1], seq, per, store_y, quant))
    rope = freqs.reshape(-1, head_dim // 2, 2, 2)[:seq] if freqs is not None else None
    q = rms_norm_rope(run_linear(sa.q, h, dtype), _param(sa.norm_q.weight, x), _eps(sa.norm_q), rope, head_dim, seq)
    k = rms_norm_rope(run_linear(sa.k, h, dtype), _param(sa.norm_k.weight, x), _eps(sa.norm_k), rope, head_dim, seq)
    v = run_linear(sa.v, h, dtype)
    del h
    o = attention(q.view(b, seq, d), k.view(b, seq, d), v.view(b, seq, d), heads)
    del q, k, v
    x2 = run_linear(sa.o, _Input(o.reshape(m, d)), dtype, residual=x2, gate=parts[2], seq=seq, per=per)

    ca = block.cross_attn
    n3 = block.norm3
    if isinstance(n3, torch.nn.LayerNorm):
        h = prepare_input((ca.q,), x2, lambda store_y, quant: norm_modulate(
            x2, _eps(n3), _param(n3.weight, x), _param(n3.bias, x), None, None, seq, per, store_y, quant))
    else:   # ComfyUI's cross_attn_norm=False: no norm
        h = _Input(n3(x2))
    q = rms_norm_rope(run_linear(ca.q, h, dtype), _param(ca.norm_q.weight, x), _eps(ca.norm_q), None, head_dim, seq)
    del h
    q = q.view(b, seq, d)
    ctx = context
    img = None
    if hasattr(ca, "k_img"):   # Wan 2.1 i2v: the first context_img_len tokens are CLIP image tokens
        ctx_img, ctx = context[:, :context_img_len], context[:, context_img_len:]
        img = cross_attention(q, ca.norm_k_img(ca.k_img(ctx_img)), ca.v_img(ctx_img), heads)
    o = cross_attention(q, ca.norm_k(ca.k(ctx)), ca.v(ctx), heads)
    if img is not None:
        o = o + img
    x2 = run_linear(ca.o, _Input(o.reshape(m, d)), dtype, residual=x2)

    ffn0, ffn2 = block.ffn[0], block.ffn[2]
    n2 = block.norm2
    h = prepare_input((ffn0,), x2, lambda store_y, quant: norm_modulate(
        x2, _eps(n2), _param(n2.weight, x), _param(n2.bias, x), parts[3], parts[4], seq, per, store_y, quant))
    g = run_linear(ffn0, h, dtype, act=1)
    del h
    x2 = run_linear(ffn2, _Input(g), dtype, residual=x2, gate=parts[5], seq=seq, per=per)
    return x2.view(b, seq, d)
