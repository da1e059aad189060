"""Triton per-token activation quantizer, with the block-Hadamard rotation fused into the same kernel.

Contract: `quant.int8.quantize_activation` (the torch oracle).  For a 2-D `x [M, K]` (any strides, bf16/fp16/fp32):
    xr      = x · R           R = diag(signs) · blockdiag(H_g)   (optional)
    s[m]    = max(absmax(xr[m, :]), 1e-30) / 127                  (or a static scalar `input_scale`)
    q[m, k] = clamp(rint_half_even(xr[m, k] / s[m]), -127, 127)    -> int8 [M, K] contiguous, fp32 s [M]

Numerics (why the codes match the oracle bit for bit):
- divisions use `tl.div_rn` (IEEE round-to-nearest; Triton's plain `/` on fp32 is the ~2-ulp fast divide);
- round-half-even is computed exactly from floor() and the fraction (no libdevice: the CPU interpreter lacks
  `rint`, and the `x + 1.5*2^23` trick is only as safe as the compiler's reassociation rules);
- absmax is exact, so unrotated codes equal the oracle's exactly.
- Rotation: the ±1 Hadamard (unnormalised) is applied with `tl.dot`, then scaled by 1/sqrt(g).  For bf16/fp16
  inputs (exact ±x products, fp32 accumulation on tensor cores) and powers of 4 (1/sqrt(g) a power of two) this
  differs from the oracle's fp32 `x @ (H/sqrt(g))` only in summation order: a few fp32 ulps of xr.  A code
  can then differ by ±1 where xr/s lands within those ulps of a .5 boundary (measured: ~1e-5 of codes or less).
  fp32 inputs (and Turing, and the CPU interpreter whose bf16 dot is broken) use an fp32 `ieee` dot (FMA path).

Performance shape: memory bound (read 2 B, write 1 B per element).  Unrotated rows with K <= 16384 are
quantized in one pass from registers (one read); otherwise, and always with rotation, a first pass computes
the absmax and a second re-reads (mostly from L2) and quantizes, recomputing the rotation (cheap on tensor
cores: 2*g flops per element).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch

import triton
import triton.language as tl

QMAX = 127.0
AMAX_FLOOR = 1e-30
ROT_KIND_IDS = {"regular": 1, "sylvester": 2}
ONE_PASS_MAX_K = 16384


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _round_half_even(v):
    # exact for |v| < 2^22 (callers clamp to [-127, 127] first); v - floor(v) is exact in that range
    fl = tl.floor(v)
    frac = v - fl
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, fl + 1.0, fl)


@triton.jit
def _codes(v, s):
    v = tl.div_rn(v, s)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return _round_half_even(v).to(tl.int8)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, M, K, stride_xm, stride_xk,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
                       STATIC: tl.constexpr):
    """No rotation.  ONE_PASS: the whole row (BLOCK_K >= K) stays in registers between absmax and quantize."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < M
    x_row = x_ptr + rows[:, None] * stride_xm
    q_row = q_ptr + rows[:, None] * K
    cols0 = tl.arange(0, BLOCK_K).to(tl.int64)
    if STATIC:
        s = tl.load(static_ptr + tl.zeros([BLOCK_M], dtype=tl.int32)).to(tl.float32)
    if ONE_PASS:
        mask = rmask[:, None] & (cols0[None, :] < K)
        x = tl.load(x_row + cols0[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if not STATIC:
            s = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30), 127.0)
        tl.store(q_row + cols0[None, :], _codes(x, s[:, None]), mask=mask)
    else:
        if not STATIC:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                mask = rmask[:, None] & (cols[None, :] < K)
                x = tl.load(x_row + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            s = tl.div_rn(tl.maximum(amax, 1e-30), 127.0)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            mask = rmask[:, None] & (cols[None, :] < K)
            x = tl.load(x_row + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + cols[None, :], _codes(x, s[:, None]), mask=mask)
    tl.store(s_ptr + rows, s, mask=rmask)


@triton.jit
def _load_group(x_row, rmask, sign_ptr, col0, stride_xk, G: tl.constexpr, HAS_SIGNS: tl.constexpr,
                DOT_F32: tl.constexpr):
    """x[:, col0:col0+G] * signs, in the dtype the Hadamard dot consumes (sign flips are exact)."""
    gcols = col0 + tl.arange(0, G).to(tl.int64)
    x = tl.load(x_row + gcols[None, :] * stride_xk, mask=rmask[:, None], other=0.0)
    if HAS_SIGNS:
        sg = tl.load(sign_ptr + gcols)
        x = (x.to(tl.float32) * sg[None, :]).to(x.dtype)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _rotate_cols(x, h_ptr, c0, inv_sqrt_g, G: tl.constexpr, HC: tl.constexpr, DOT_F32: tl.constexpr):
    """Columns [c0, c0+HC) of the rotated group: x @ H[:, c0:c0+HC] / sqrt(G) (H chunk is G x HC, ±1)."""
    hr = tl.arange(0, G)
    hc = c0 + tl.arange(0, HC)
    h = tl.load(h_ptr + hr[:, None] * G + hc[None, :])
    if DOT_F32:
        y = tl.dot(x, h.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    else:
        y = tl.dot(x, h.to(x.dtype), out_dtype=tl.float32)
    return y * inv_sqrt_g


@triton.jit
def _quant_rotated_kernel(x_ptr, q_ptr, s_ptr, static_ptr, sign_ptr, h_ptr, M, K, stride_xm, stride_xk,
                          inv_sqrt_g, BLOCK_M: tl.constexpr, G: tl.constexpr, HC: tl.constexpr,
                          HAS_SIGNS: tl.constexpr, STATIC: tl.constexpr, DOT_F32: tl.constexpr,
                          CHUNK_LOOP: tl.constexpr):
    """Rotation by diag(signs)·blockdiag(H_G) along K (K % G == 0), then per-row quantization (two passes).

    H is applied HC output columns at a time.  With an unrolled chunk loop the compiler hoists the whole H
    (G*G elements) into shared memory once per program (fastest; 128 KB for bf16 G=256); CHUNK_LOOP keeps
    one G x HC chunk resident instead (re-read from L1/L2), for GPUs with less shared memory.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < M
    x_row = x_ptr + rows[:, None] * stride_xm
    q_row = q_ptr + rows[:, None] * K
    if STATIC:
        s = tl.load(static_ptr + tl.zeros([BLOCK_M], dtype=tl.int32)).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for col0 in range(0, K, G):
            x = _load_group(x_row, rmask, sign_ptr, col0, stride_xk, G, HAS_SIGNS, DOT_F32)
            if CHUNK_LOOP:
                for c0 in range(0, G, HC):
                    y = _rotate_cols(x, h_ptr, c0, inv_sqrt_g, G, HC, DOT_F32)
                    amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
            else:
                for c0 in tl.static_range(0, G, HC):
                    y = _rotate_cols(x, h_ptr, c0, inv_sqrt_g, G, HC, DOT_F32)
                    amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
        s = tl.div_rn(tl.maximum(amax, 1e-30), 127.0)
    for col0 in range(0, K, G):
        x = _load_group(x_row, rmask, sign_ptr, col0, stride_xk, G, HAS_SIGNS, DOT_F32)
        if CHUNK_LOOP:
            for c0 in range(0, G, HC):
                y = _rotate_cols(x, h_ptr, c0, inv_sqrt_g, G, HC, DOT_F32)
                ocols = (col0 + c0 + tl.arange(0, HC)).to(tl.int64)
                tl.store(q_row + ocols[None, :], _codes(y, s[:, None]), mask=rmask[:, None])
        else:
            for c0 in tl.static_range(0, G, HC):
                y = _rotate_cols(x, h_ptr, c0, inv_sqrt_g, G, HC, DOT_F32)
                ocols = (col0 + c0 + tl.arange(0, HC)).to(tl.int64)
                tl.store(q_row + ocols[None, :], _codes(y, s[:, None]), mask=rmask[:, None])
    tl.store(s_ptr + rows, s, mask=rmask)


# ------------------------------------------------------------------------------------------------------------
# host side

SUPPORTED_GROUPS = {"regular": (16, 64, 256), "sylvester": (16, 32, 64, 128, 256)}


@functools.lru_cache(maxsize=32)
def _pm1_hadamard_cpu(kind: str, g: int) -> torch.Tensor:
    from ..quant.hadamard import hadamard_matrix
    return torch.round(hadamard_matrix(kind, g, dtype=torch.float64) * math.sqrt(g)).to(torch.float32)


_H_CACHE: dict = {}


def pm1_hadamard(kind: str, g: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The unnormalised (±1) g x g Hadamard of `kind`, cached per device and dtype."""
    key = (kind, g, dtype, str(device))
    h = _H_CACHE.get(key)
    if h is None:
        h = _pm1_hadamard_cpu(kind, g).to(device=device, dtype=dtype).contiguous()
        _H_CACHE[key] = h
    return h


def rotation_unsupported(kind: str, g: int, k: int) -> Optional[str]:
    """Why the fused quantizer cannot apply this rotation (None if it can)."""
    groups = SUPPORTED_GROUPS.get(kind)
    if groups is None:
        return f"rotation kind {kind!r} is not supported by the Triton quantizer"
    if g not in groups:
        return f"{kind} Hadamard group {g} not supported by the Triton quantizer (supported: {groups})"
    if k % g:
        return f"K={k} is not a multiple of the rotation group {g}"
    return None


@functools.lru_cache(maxsize=16)
def _smem_budget_cached(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if not optin:
        major, minor = props.major, props.minor
        optin = {(8, 0): 163 * 1024, (9, 0): 227 * 1024, (8, 7): 163 * 1024}.get((major, minor), 99 * 1024)
    return int(optin) - 8 * 1024   # headroom for reductions/layout conversions


def _smem_budget(device: torch.device) -> int:
    """Shared memory one program may use (bytes); the interpreter has no limit worth modelling."""
    if device.type != "cuda" or _interpreting():
        return 1 << 30
    return _smem_budget_cached(device.index if device.index is not None else torch.cuda.current_device())


def _dot_needs_f32(x: torch.Tensor) -> bool:
    if x.dtype == torch.float32 or _interpreting() or x.device.type != "cuda":
        return True
    if x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] < 8:
        return True   # no bf16 tensor cores before Ampere
    return False


def quantize_activation_triton(x: torch.Tensor, rotation_kind: str = "none", group_size: int = 0,
                               signs: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None,
                               out: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None,
                               block_m: Optional[int] = None,
                               chunk_loop: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 of `x [M, K]` (rotation fused) -> (int8 codes [M, K] contiguous, fp32 scales [M])."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D activation [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported activation dtype {x.dtype}")
    m, k = x.shape
    q = out if out is not None else torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = out_scale if out_scale is not None else torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        if m:
            s.fill_(AMAX_FLOOR / QMAX) if input_scale is None else s.copy_(input_scale.float().reshape(()).expand(m))
        return q, s
    static = input_scale is not None
    static_t = input_scale.to(device=x.device, dtype=torch.float32).reshape(1) if static else s
    if rotation_kind in (None, "none"):
        kp2 = triton.next_power_of_2(k)
        if kp2 <= ONE_PASS_MAX_K:
            bk = kp2
            bm = block_m or max(1, min(16, 4096 // kp2))
            one_pass = True
        else:
            bk, bm, one_pass = 4096, block_m or 1, False
        warps = 8 if bk * bm >= 8192 else 4
        grid = (triton.cdiv(m, bm),)
        _quant_rows_kernel[grid](x, q, s, static_t, m, k, x.stride(0), x.stride(1), BLOCK_M=bm, BLOCK_K=bk,
                                 ONE_PASS=one_pass, STATIC=static, num_warps=warps)
        return q, s
    reason = rotation_unsupported(rotation_kind, group_size, k)
    if reason:
        raise ValueError(reason)
    g = group_size
    dot_f32 = _dot_needs_f32(x)
    h_dtype = torch.float32 if dot_f32 else x.dtype
    h = pm1_hadamard(rotation_kind, g, h_dtype, x.device)
    has_signs = signs is not None
    sg = signs.to(device=x.device, dtype=torch.float32).contiguous() if has_signs else s
    if has_signs and sg.numel() != k:
        raise ValueError(f"sign vector has {sg.numel()} entries, expected K={k}")
    hc = min(g, 64)
    bm = block_m or (16 if (m <= 16 or dot_f32) else 32)
    x_tile = bm * g * (4 if dot_f32 else x.element_size())
    if chunk_loop is None:
        chunk_loop = g * g * h.element_size() + x_tile > _smem_budget(x.device)
    grid = (triton.cdiv(m, bm),)
    _quant_rotated_kernel[grid](x, q, s, static_t, sg, h, m, k, x.stride(0), x.stride(1), 1.0 / math.sqrt(g),
                                BLOCK_M=bm, G=g, HC=hc, HAS_SIGNS=has_signs, STATIC=static, DOT_F32=dot_f32,
                                CHUNK_LOOP=chunk_loop, num_warps=4)
    return q, s
