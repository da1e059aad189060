"""Triton kernels for the fused passes of a Wan block (contracts and torch references: `wan_int8.fused`).

- `norm_modulate_triton`: LayerNorm over each token (optional affine weight/bias), then the adaLN modulation
  `n * (1 + scale) + shift` with `scale`/`shift` per (batch, token group), in one pass over the row.  Writes the
  float result, and/or per-token INT8 codes + fp32 scale (the `quantize_activation` contract, unrotated): one
  read of x feeds the q, k and v linears (or ffn.0) where three separate quantizations used to read it.
- `rms_norm_rope_triton`: RMSNorm over the whole row (all heads), then RoPE on each head's (even, odd) pairs with
  ComfyUI's rotation matrices `[L, head_dim/2, 2, 2]`, one read and one write (ComfyUI: two passes).

Numerics: the whole computation stays in fp32 from the load to the one final rounding (ComfyUI rounds the norm
output, `1 + scale` and the product to the model dtype on the way); mean and variance are two-pass sums over
the row in registers.  INT8 codes follow `triton_quant` (absmax / 127, IEEE division, round half even) from the
fp32 modulated values.

Shapes: rows `[M, K]` (the flattened `[B, L, K]`); row m is token `m % seq` of batch `m // seq`, and its
modulation row is `(m // seq) * groups + (m % seq) // per`: ComfyUI's `repeat_e` for a per-frame `e [B, G, K]`
(`groups = 1`, `per = seq` for the usual `[B, 1, K]`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

import triton
import triton.language as tl

from .triton_quant import _codes, fast_div_default, k_pieces

ONE_PASS_MAX_K = 16384
ROPE_CHUNK = 1024     # elements of a row per step of the RMSNorm+RoPE kernel (a multiple of the head size)


@triton.jit
def _piece(x_ptr, row, col0, K, BK: tl.constexpr):
    cols = col0 + tl.arange(0, BK)
    mask = cols < K
    return tl.load(x_ptr + row + cols, mask=mask, other=0.0).to(tl.float32), cols, mask


@triton.jit
def _modulate(v, cols, mask, w_ptr, b_ptr, shift_ptr, scale_ptr, e_off, HAS_AFFINE: tl.constexpr,
              HAS_MOD: tl.constexpr):
    if HAS_AFFINE:
        v = v * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) \
            + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_MOD:
        sc = tl.load(scale_ptr + e_off + cols, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + e_off + cols, mask=mask, other=0.0).to(tl.float32)
        v = v * (1.0 + sc) + sh
    return tl.where(mask, v, 0.0)


@triton.jit
def _norm_mod_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, y_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_ym,
                     SEQ, PER, GROUPS, stride_eb, stride_eg, eps,
                     BK1: tl.constexpr, BK2: tl.constexpr, BK3: tl.constexpr, HAS_AFFINE: tl.constexpr,
                     HAS_MOD: tl.constexpr, STORE_Y: tl.constexpr, QUANT: tl.constexpr, FAST_DIV: tl.constexpr):
    """One row per program, held in registers as up to three power-of-two pieces (BK1 + BK2 + BK3 >= K)."""
    m = tl.program_id(0).to(tl.int64)
    row = m * stride_xm
    x1, c1, k1 = _piece(x_ptr, row, 0, K, BK1)
    total = tl.sum(x1, axis=0)
    if BK2 > 0:
        x2, c2, k2 = _piece(x_ptr, row, BK1, K, BK2)
        total += tl.sum(x2, axis=0)
    if BK3 > 0:
        x3, c3, k3 = _piece(x_ptr, row, BK1 + BK2, K, BK3)
        total += tl.sum(x3, axis=0)
    mean = total / K
    d1 = tl.where(k1, x1 - mean, 0.0)
    ss = tl.sum(d1 * d1, axis=0)
    if BK2 > 0:
        d2 = tl.where(k2, x2 - mean, 0.0)
        ss += tl.sum(d2 * d2, axis=0)
    if BK3 > 0:
        d3 = tl.where(k3, x3 - mean, 0.0)
        ss += tl.sum(d3 * d3, axis=0)
    rstd = 1.0 / tl.sqrt_rn(ss / K + eps)
    b = m // SEQ
    e_off = b * stride_eb + ((m - b * SEQ) // PER) * stride_eg
    v1 = _modulate(d1 * rstd, c1, k1, w_ptr, b_ptr, shift_ptr, scale_ptr, e_off, HAS_AFFINE, HAS_MOD)
    amax = tl.max(tl.abs(v1), axis=0)
    if BK2 > 0:
        v2 = _modulate(d2 * rstd, c2, k2, w_ptr, b_ptr, shift_ptr, scale_ptr, e_off, HAS_AFFINE, HAS_MOD)
        amax = tl.maximum(amax, tl.max(tl.abs(v2), axis=0))
    if BK3 > 0:
        v3 = _modulate(d3 * rstd, c3, k3, w_ptr, b_ptr, shift_ptr, scale_ptr, e_off, HAS_AFFINE, HAS_MOD)
        amax = tl.maximum(amax, tl.max(tl.abs(v3), axis=0))
    if STORE_Y:
        yrow = y_ptr + m * stride_ym
        tl.store(yrow + c1, v1.to(y_ptr.dtype.element_ty), mask=k1)
        if BK2 > 0:
            tl.store(yrow + c2, v2.to(y_ptr.dtype.element_ty), mask=k2)
        if BK3 > 0:
            tl.store(yrow + c3, v3.to(y_ptr.dtype.element_ty), mask=k3)
    if QUANT:
        s = tl.div_rn(tl.maximum(amax, 1e-30), 127.0)
        r = tl.div_rn(1.0, s)
        qrow = q_ptr + m * K
        tl.store(qrow + c1, _codes(v1, s, r, FAST_DIV), mask=k1)
        if BK2 > 0:
            tl.store(qrow + c2, _codes(v2, s, r, FAST_DIV), mask=k2)
        if BK3 > 0:
            tl.store(qrow + c3, _codes(v3, s, r, FAST_DIV), mask=k3)
        tl.store(s_ptr + m, s)


@triton.jit
def _rms_rope_kernel(x_ptr, w_ptr, f_ptr, y_ptr, D, stride_xm, stride_ym, SEQ, stride_fl, eps,
                     HALF: tl.constexpr, CHUNK: tl.constexpr, HAS_ROPE: tl.constexpr):
    """One row (token) per program: sum of squares over the row in CHUNK steps, then normalise, scale by the
    RMSNorm weight and rotate each (even, odd) pair by the token's matrix for its position within the head
    (pair p of the row uses f[l, p % HALF]; HALF = head_dim / 2, CHUNK a multiple of 2 * HALF)."""
    m = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + m * stride_xm
    offs = tl.arange(0, CHUNK)
    ss = tl.zeros([CHUNK], dtype=tl.float32)
    for c0 in range(0, D, CHUNK):
        v = tl.load(xrow + c0 + offs, mask=c0 + offs < D, other=0.0).to(tl.float32)
        ss += v * v
    rstd = 1.0 / tl.sqrt_rn(tl.sum(ss, axis=0) / D + eps)
    yrow = y_ptr + m * stride_ym
    pairs = tl.arange(0, CHUNK // 2)
    frow = f_ptr + (m % SEQ) * stride_fl + (pairs % HALF) * 4
    if HAS_ROPE:
        f00 = tl.load(frow)
        f01 = tl.load(frow + 1)
        f10 = tl.load(frow + 2)
        f11 = tl.load(frow + 3)
    for c0 in range(0, D, CHUNK):
        mask = c0 + offs < D
        v = tl.load(xrow + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = v * rstd * tl.load(w_ptr + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ROPE:
            a, b = tl.split(tl.reshape(v, (CHUNK // 2, 2)))
            v = tl.reshape(tl.join(f00 * a + f01 * b, f10 * a + f11 * b), (CHUNK,))
        tl.store(yrow + c0 + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


def _modulation_args(shift, scale, m, k, seq, per):
    """(shift, scale, groups, stride_b, stride_g) for `[B, G, K]` modulation tensors (G = 1: per batch)."""
    if shift is None:
        return None, None, 1, 0, 0
    if shift.shape != scale.shape or shift.dim() != 3 or shift.shape[-1] != k:
        raise ValueError(f"modulation shift/scale must both be [B, G, {k}], got {tuple(shift.shape)} and "
                         f"{tuple(scale.shape)}")
    if shift.stride() != scale.stride() or shift.stride(-1) != 1:
        shift, scale = shift.contiguous(), scale.contiguous()
    bsz, groups = shift.shape[0], shift.shape[1]
    if m != bsz * seq:
        raise ValueError(f"{m} rows are not {bsz} batches of {seq} tokens")
    if (seq + per - 1) // per > groups:
        raise ValueError(f"{seq} tokens in groups of {per} need {(seq + per - 1) // per} modulation rows, have {groups}")
    return shift, scale, groups, shift.stride(0), shift.stride(1)


def norm_modulate_triton(x: torch.Tensor, eps: float, weight: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                         scale: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0,
                         store_y: bool = True, quantize: bool = False
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`x [M, K]` -> (y [M, K] in x.dtype or None, int8 codes [M, K] or None, fp32 scales [M] or None).

    LayerNorm(x; eps, weight, bias) * (1 + scale) + shift, shift/scale `[B, G, K]` (see module docstring for the
    row mapping; seq/per default to one group per batch of M rows)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected a 2-D row-contiguous activation, got shape {tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    if k > ONE_PASS_MAX_K:
        raise ValueError(f"rows of {k} features exceed the one-pass limit {ONE_PASS_MAX_K}")
    seq = seq or m
    per = per or seq
    shift, scale, groups, seb, seg = _modulation_args(shift, scale, m, k, seq, per)
    y = torch.empty_like(x) if store_y else None
    q = torch.empty((m, k), dtype=torch.int8, device=x.device) if quantize else None
    s = torch.empty((m,), dtype=torch.float32, device=x.device) if quantize else None
    if m == 0:
        return y, q, s
    dummy = x
    bk1, bk2, bk3 = k_pieces(k)
    warps = 4 if k <= 8192 else 8
    _norm_mod_kernel[(m,)](
        x, weight if weight is not None else dummy, bias if bias is not None else dummy,
        shift if shift is not None else dummy, scale if scale is not None else dummy,
        y if store_y else dummy, q if quantize else dummy, s if quantize else dummy,
        m, k, x.stride(0), k, seq, per, groups, seb, seg, float(eps),
        BK1=bk1, BK2=bk2, BK3=bk3, HAS_AFFINE=weight is not None, HAS_MOD=shift is not None,
        STORE_Y=store_y, QUANT=quantize, FAST_DIV=fast_div_default(x.device), num_warps=warps)
    return y, q, s


def rms_norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, freqs: Optional[torch.Tensor],
                         head_dim: int, seq: int) -> torch.Tensor:
    """RMSNorm over each row of `x [M, D]` times `weight [D]`, then RoPE with `freqs [seq, head_dim/2, 2, 2]`
    (fp32, ComfyUI's layout; None: no RoPE) on every head of every row; rows are batches of `seq` tokens."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected a 2-D row-contiguous activation, got shape {tuple(x.shape)} strides {x.stride()}")
    m, d = x.shape
    half = head_dim // 2
    if d % head_dim or head_dim % 2 or ROPE_CHUNK % head_dim or half & (half - 1):
        raise ValueError(f"head_dim {head_dim} must be a power of two dividing {ROPE_CHUNK} and D={d}")
    y = torch.empty_like(x)
    if m == 0:
        return y
    if freqs is not None:
        if tuple(freqs.shape[-3:]) != (half, 2, 2) or freqs.numel() != seq * half * 4:
            raise ValueError(f"RoPE freqs {tuple(freqs.shape)} do not fit {seq} tokens of head_dim {head_dim}")
        freqs = freqs.reshape(seq, half * 4)
        if freqs.dtype != torch.float32 or freqs.stride(1) != 1:
            freqs = freqs.float().contiguous()
    chunk = min(ROPE_CHUNK, max(head_dim, triton.next_power_of_2(d)))
    _rms_rope_kernel[(m,)](x, weight, freqs if freqs is not None else x, y, d, x.stride(0), d, seq,
                           freqs.stride(0) if freqs is not None else 0, float(eps), HALF=half, CHUNK=chunk,
                           HAS_ROPE=freqs is not None, num_warps=4)
    return y
