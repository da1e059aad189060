"""Triton per-token activation quantizer, with the block-Hadamard rotation fused into the same kernel.

Contract: `quant.int8.quantize_activation` (the torch oracle).  For a 2-D `x [M, K]` (any strides, bf16/fp16/fp32):
    xr      = x · R           R = diag(signs) · blockdiag(H_g)   (optional)
    s[m]    = max(absmax(xr[m, :]), 1e-30) / 127                  (or a static scalar `input_scale`)
    q[m, k] = clamp(rint_half_even(xr[m, k] / s[m]), -127, 127)    -> int8 [M, K] contiguous, fp32 s [M]

Numerics (why the codes match the oracle bit for bit):
- division: IEEE round-to-nearest x/s.  On the GPU as r = RN(1/s) once per row, then q0 = x*r and one FMA
  correction (bitwise equal to x/s, checked by bench/kernel_sweep.py; WAN_INT8_QUANT_EXACT_DIV=1 forces
  `tl.div_rn` per element, which the interpreter always uses because its fma rounds twice);
- round-half-even: one fp32 add of 1.5*2^23 and a bit reinterpretation (exact, full-rate ALU);
- absmax is exact, so unrotated codes equal the oracle's exactly.
- Rotation: the ±1 Hadamard (unnormalised) is applied with `tl.dot`, then scaled by 1/sqrt(g).  For bf16/fp16
  inputs (exact ±x products, fp32 accumulation on tensor cores) and powers of 4 (1/sqrt(g) a power of two) this
  differs from the oracle's fp32 `x @ (H/sqrt(g))` only in summation order: a few fp32 ulps of xr.  A code
  can then differ by ±1 where xr/s lands within those ulps of a .5 boundary (measured: ~1e-5 of codes or less).
  fp32 inputs (and Turing, and the CPU interpreter whose bf16 dot is broken) use an fp32 `ieee` dot (FMA path).

Performance shape: memory bound (read 2 B, write 1 B per element).  Unrotated rows with K <= 16384 are
quantized in one pass from registers (one read); g=256 rotations likewise, through the Kronecker kernel
(H_256 = H_16 (x) H_16: 64 flops per element on tensor cores).  Other rotations, and K > 16384, use two
passes (absmax, then re-read mostly from L2 and quantize, recomputing the rotation).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch

import triton
import triton.language as tl

from .triton_launch import interpreting

QMAX = 127.0
AMAX_FLOOR = 1e-30
ROT_KIND_IDS = {"regular": 1, "sylvester": 2}
ONE_PASS_MAX_K = 16384


@triton.jit
def _round_half_even(v):
    # v already clamped to [-127, 127].  v + 1.5*2^23 is one IEEE add (round-to-nearest-even) whose result has
    # ulp 1, so its low mantissa bits ARE rint_half_even(v) + 2^22: reinterpret and subtract.  Exact for
    # |v| < 2^22, full-rate ALU (no cvt/frnd), and no float subtraction the compiler could reassociate.
    t = v + 12582912.0
    return t.to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _div(x, s, r, FAST_DIV: tl.constexpr):
    """IEEE x / s (round to nearest).  FAST_DIV: from r = RN(1/s) (one div_rn per row), q0 = RN(x*r) is within
    1 ulp, and one FMA correction q0 + (x - q0*s)*r (residual exact by FMA) gives exactly RN(x/s) (Markstein's
    theorem; verified against torch's division by bench/kernel_sweep.py).  No per-element MUFU/slow path."""
    if FAST_DIV:
        q0 = x * r
        e = tl.fma(-q0, s, x)
        return tl.fma(e, r, q0)
    else:
        return tl.div_rn(x, s)


@triton.jit
def _codes(v, s, r, FAST_DIV: tl.constexpr = False):
    v = _div(v, s, r, FAST_DIV)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return _round_half_even(v).to(tl.int8)


@triton.jit
def _load_piece(x_row, rmask, col0, stride_xk, K, BK: tl.constexpr):
    cols = col0 + tl.arange(0, BK)
    mask = rmask[:, None] & (cols[None, :] < K)
    return tl.load(x_row + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32), cols, mask


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, M, K, stride_xm, stride_xk,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
                       STATIC: tl.constexpr, FAST_DIV: tl.constexpr = False, BK2: tl.constexpr = 0,
                       BK3: tl.constexpr = 0):
    """No rotation.  ONE_PASS: the whole row stays in registers between absmax and quantize, as one
    [BLOCK_M, BLOCK_K] tile (BLOCK_K >= K), or with BK2/BK3 > 0 as up to three power-of-two pieces
    BLOCK_K + BK2 + BK3 >= K (K = 5120 -> 4096 + 1024: no masked-off registers; 13824 -> 8192+4096+2048)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < M
    x_row = x_ptr + rows[:, None] * stride_xm
    q_row = q_ptr + rows[:, None] * K
    cols0 = tl.arange(0, BLOCK_K)
    if STATIC:
        s = tl.load(static_ptr + tl.zeros([BLOCK_M], dtype=tl.int32)).to(tl.float32)
    if ONE_PASS:
        x, c1, m1 = _load_piece(x_row, rmask, 0, stride_xk, K, BLOCK_K)
        if BK2 > 0:
            x2, c2, m2 = _load_piece(x_row, rmask, BLOCK_K, stride_xk, K, BK2)
        if BK3 > 0:
            x3, c3, m3 = _load_piece(x_row, rmask, BLOCK_K + BK2, stride_xk, K, BK3)
        if not STATIC:
            amax = tl.max(tl.abs(x), axis=1)
            if BK2 > 0:
                amax = tl.maximum(amax, tl.max(tl.abs(x2), axis=1))
            if BK3 > 0:
                amax = tl.maximum(amax, tl.max(tl.abs(x3), axis=1))
            s = tl.div_rn(tl.maximum(amax, 1e-30), 127.0)
        r = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), s)
        tl.store(q_row + c1[None, :], _codes(x, s[:, None], r[:, None], FAST_DIV), mask=m1)
        if BK2 > 0:
            tl.store(q_row + c2[None, :], _codes(x2, s[:, None], r[:, None], FAST_DIV), mask=m2)
        if BK3 > 0:
            tl.store(q_row + c3[None, :], _codes(x3, s[:, None], r[:, None], FAST_DIV), mask=m3)
    else:
        if not STATIC:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                mask = rmask[:, None] & (cols[None, :] < K)
                x = tl.load(x_row + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            s = tl.div_rn(tl.maximum(amax, 1e-30), 127.0)
        r = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), s)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            mask = rmask[:, None] & (cols[None, :] < K)
            x = tl.load(x_row + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + cols[None, :], _codes(x, s[:, None], r[:, None], FAST_DIV), mask=mask)
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
                          CHUNK_LOOP: tl.constexpr, FAST_DIV: tl.constexpr = False):
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
    r = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), s)
    for col0 in range(0, K, G):
        x = _load_group(x_row, rmask, sign_ptr, col0, stride_xk, G, HAS_SIGNS, DOT_F32)
        if CHUNK_LOOP:
            for c0 in range(0, G, HC):
                y = _rotate_cols(x, h_ptr, c0, inv_sqrt_g, G, HC, DOT_F32)
                ocols = (col0 + c0 + tl.arange(0, HC)).to(tl.int64)
                tl.store(q_row + ocols[None, :], _codes(y, s[:, None], r[:, None], FAST_DIV), mask=rmask[:, None])
        else:
            for c0 in tl.static_range(0, G, HC):
                y = _rotate_cols(x, h_ptr, c0, inv_sqrt_g, G, HC, DOT_F32)
                ocols = (col0 + c0 + tl.arange(0, HC)).to(tl.int64)
                tl.store(q_row + ocols[None, :], _codes(y, s[:, None], r[:, None], FAST_DIV), mask=rmask[:, None])
    tl.store(s_ptr + rows, s, mask=rmask)


@triton.jit
def _split3(z):
    """z (fp32) = hi + mid + lo exactly: three bf16 pieces holding all 24 mantissa bits."""
    hi = z.to(tl.bfloat16)
    r1 = z - hi.to(tl.float32)
    mid = r1.to(tl.bfloat16)
    lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _split_pieces(z, F16: tl.constexpr):
    """hi = RN(z) and the exact residual z - hi, with hi in bf16 (8 bits) or fp16 (11 bits)."""
    if F16:
        hi = z.to(tl.float16)
    else:
        hi = z.to(tl.bfloat16)
    return hi, z - hi.to(tl.float32)


@triton.jit
def _pdot(a, b, acc, EMU: tl.constexpr):
    """One tensor-core dot of 16-bit operands, fp32 accumulate.  EMU (the CPU interpreter, whose bf16 dot is
    broken): the same exact products as an fp32 `ieee` dot of the upcast operands."""
    if EMU:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
    else:
        return tl.dot(a, b, acc, out_dtype=tl.float32)


@triton.jit
def _split3_dot(z, h, SPLIT: tl.constexpr, F16: tl.constexpr = False, EMU: tl.constexpr = False):
    """z (fp32) @ h (±1, exact in any dtype) on 16-bit tensor cores, z split into SPLIT 16-bit pieces.

    SPLIT 3: z = hi + mid + lo (bf16: all 24 mantissa bits), three dots accumulated smallest first.
    SPLIT 2: hi + RN(residual): bf16 16 bits (rel. error ~2^-17), fp16 22 bits (~2^-23; z must be pre-scaled
    into fp16's normal range, see `_quant_rot_kron_kernel`).  SPLIT 1: RN(z) only (ComfyUI-like, ~2^-9 bf16).
    SPLIT 0: one fp32 `ieee` dot (FMA)."""
    if SPLIT == 0:
        return tl.dot(z, h.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    else:
        hi, r1 = _split_pieces(z, F16)
        hb = h.to(hi.dtype)
        acc = tl.zeros((z.shape[0], h.shape[1]), dtype=tl.float32)
        if SPLIT == 3:
            mid = r1.to(hi.dtype)
            acc = _pdot((r1 - mid.to(tl.float32)).to(hi.dtype), hb, acc, EMU)
            acc = _pdot(mid, hb, acc, EMU)
        elif SPLIT == 2:
            acc = _pdot(r1.to(hi.dtype), hb, acc, EMU)
        return _pdot(hi, hb, acc, EMU)


@triton.jit
def _split3_dot_left(h, z, SPLIT: tl.constexpr, F16: tl.constexpr = False, EMU: tl.constexpr = False):
    """h (±1) @ z (fp32), batched 3-D, with the pieces of `_split3_dot`."""
    if SPLIT == 0:
        return tl.dot(h.to(tl.float32), z, input_precision="ieee", out_dtype=tl.float32)
    else:
        hi, r1 = _split_pieces(z, F16)
        hb = h.to(hi.dtype)
        acc = tl.zeros(z.shape, dtype=tl.float32)
        if SPLIT == 3:
            mid = r1.to(hi.dtype)
            acc = _pdot(hb, (r1 - mid.to(tl.float32)).to(hi.dtype), acc, EMU)
            acc = _pdot(hb, mid, acc, EMU)
        elif SPLIT == 2:
            acc = _pdot(hb, r1.to(hi.dtype), acc, EMU)
        return _pdot(hb, hi, acc, EMU)


@triton.jit
def _kron_load(x_ptr, sign_ptr, rows, rmask, col0, K, stride_xm, stride_xk, BK: tl.constexpr,
               HAS_SIGNS: tl.constexpr):
    cols = col0 + tl.arange(0, BK)
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    if HAS_SIGNS:
        sg = tl.load(sign_ptr + cols, mask=cmask, other=0.0)
        x = (x.to(tl.float32) * sg[None, :]).to(x.dtype)
    return x, cols, mask


@triton.jit
def _kron_rotate(x, h, sc, unsc, BLOCK_M: tl.constexpr, BK: tl.constexpr, G1: tl.constexpr,
                 BF16_IN: tl.constexpr, SPLIT: tl.constexpr, BATCHED: tl.constexpr, F16: tl.constexpr,
                 EMU: tl.constexpr):
    """blockdiag(H_g) of one [BLOCK_M, BK] piece (BK a multiple of g = G1*G1), fp32 out, times `unsc`
    ([BLOCK_M, 1]: 1/sqrt(g), divided by the power-of-two pre-scale `sc` when F16)."""
    R: tl.constexpr = BLOCK_M * BK // G1
    if F16:   # power-of-two row scale (exact): stage-2 inputs land in fp16's normal range
        x = (x.to(tl.float32) * sc).to(x.dtype)
    if BF16_IN:
        z = _pdot(tl.reshape(x, (R, G1)), h.to(tl.bfloat16), tl.zeros((R, G1), dtype=tl.float32), EMU)
    else:
        z = tl.dot(tl.reshape(x.to(tl.float32), (R, G1)), h.to(tl.float32), input_precision="ieee",
                   out_dtype=tl.float32)
    if BATCHED:   # stage 2 as a batched H·Z (3-D dot): no transposes, the result is already row-major
        z3 = tl.reshape(z, (R // G1, G1, G1))
        hb = tl.broadcast_to(h[None, :, :], (R // G1, G1, G1))
        y = tl.reshape(_split3_dot_left(hb, z3, SPLIT, F16, EMU), (BLOCK_M, BK))
    else:
        zt = tl.reshape(tl.permute(tl.reshape(z, (R // G1, G1, G1)), (0, 2, 1)), (R, G1))
        y = _split3_dot(zt, h, SPLIT, F16, EMU)
        y = tl.reshape(tl.permute(tl.reshape(y, (R // G1, G1, G1)), (0, 2, 1)), (BLOCK_M, BK))
    return y * unsc


@triton.jit
def _quant_rot_kron_kernel(x_ptr, q_ptr, s_ptr, static_ptr, sign_ptr, h_ptr, M, K, stride_xm, stride_xk,
                           inv_sqrt_g, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, G1: tl.constexpr,
                           HAS_SIGNS: tl.constexpr, STATIC: tl.constexpr, BF16_IN: tl.constexpr,
                           SPLIT: tl.constexpr, FAST_DIV: tl.constexpr, BATCHED: tl.constexpr = False,
                           BK2: tl.constexpr = 0, BK3: tl.constexpr = 0, F16: tl.constexpr = False,
                           EMU: tl.constexpr = False):
    """One pass: rotation by blockdiag(H_g), g = G1*G1 and H_g = H_G1 (x) H_G1 (Kronecker; true for the
    regular and Sylvester families), fused with per-row quantization, the whole row block in registers.

    A group's 256 values as a G1 x G1 matrix X (row-major: index i*G1 + j) rotate to H·X·H (H symmetric):
    stage 1 = X·H as a [rows*G1, G1] @ [G1, G1] dot (bf16 inputs times ±1: exact products, fp32 sums; one
    bf16 dot); stage 2 = H·(X·H) (batched) or (X·H)ᵀ·H on the transposed result, fp32-accurate through the
    3-way bf16 split (SPLIT 3), or cheaper: SPLIT 2 (hi+lo), SPLIT 1 (one bf16 dot), F16 (fp16 pieces: 11
    bits each, the row pre-scaled by a power of two so |X·H| < 2^15), SPLIT 0 (fp32 dot).
    The dot M dimension is BLOCK_M*BK/G1 (BK/16 = 256..1024 rows of 16 for one activation row): BLOCK_M=1
    already feeds full tensor-core tiles.  64 flops per element (x SPLIT in stage 2); one HBM read, one write.
    Columns: BLOCK_K = next_pow2(K) (padded columns are zeros and rotate to zeros), or with BK2/BK3 > 0
    as up to three power-of-two pieces BLOCK_K + BK2 + BK3 >= K (5120 -> 4096 + 1024: 37% less padding work).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < M
    hr = tl.arange(0, G1)
    h = tl.load(h_ptr + hr[:, None] * G1 + hr[None, :])
    x1, c1, m1 = _kron_load(x_ptr, sign_ptr, rows, rmask, 0, K, stride_xm, stride_xk, BLOCK_K, HAS_SIGNS)
    if BK2 > 0:
        x2, c2, m2 = _kron_load(x_ptr, sign_ptr, rows, rmask, BLOCK_K, K, stride_xm, stride_xk, BK2, HAS_SIGNS)
    if BK3 > 0:
        x3, c3, m3 = _kron_load(x_ptr, sign_ptr, rows, rmask, BLOCK_K + BK2, K, stride_xm, stride_xk, BK3,
                                HAS_SIGNS)
    if F16:
        xa = tl.max(tl.abs(x1.to(tl.float32)), axis=1)
        if BK2 > 0:
            xa = tl.maximum(xa, tl.max(tl.abs(x2.to(tl.float32)), axis=1))
        if BK3 > 0:
            xa = tl.maximum(xa, tl.max(tl.abs(x3.to(tl.float32)), axis=1))
        # 2^floor(log2(amax)) from the exponent bits; sc = 2^10 / that: amax*sc in [2^10, 2^11), |X·H| < 2^15
        p2 = (tl.maximum(xa, 1e-30).to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        sc = tl.div_rn(tl.full([BLOCK_M], 1024.0, tl.float32), p2)
        unsc = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32) * inv_sqrt_g, sc)
    else:
        sc = tl.full([BLOCK_M], 1.0, tl.float32)
        unsc = tl.full([BLOCK_M], 1.0, tl.float32) * inv_sqrt_g
    y1 = _kron_rotate(x1, h, sc[:, None], unsc[:, None], BLOCK_M, BLOCK_K, G1, BF16_IN, SPLIT, BATCHED, F16, EMU)
    if BK2 > 0:
        y2 = _kron_rotate(x2, h, sc[:, None], unsc[:, None], BLOCK_M, BK2, G1, BF16_IN, SPLIT, BATCHED, F16, EMU)
    if BK3 > 0:
        y3 = _kron_rotate(x3, h, sc[:, None], unsc[:, None], BLOCK_M, BK3, G1, BF16_IN, SPLIT, BATCHED, F16, EMU)
    if STATIC:
        s = tl.load(static_ptr + tl.zeros([BLOCK_M], dtype=tl.int32)).to(tl.float32)
    else:
        amax = tl.max(tl.abs(y1), axis=1)
        if BK2 > 0:
            amax = tl.maximum(amax, tl.max(tl.abs(y2), axis=1))
        if BK3 > 0:
            amax = tl.maximum(amax, tl.max(tl.abs(y3), axis=1))
        s = tl.div_rn(tl.maximum(amax, 1e-30), 127.0)
    r = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), s)
    q_row = q_ptr + rows[:, None] * K
    tl.store(q_row + c1[None, :], _codes(y1, s[:, None], r[:, None], FAST_DIV), mask=m1)
    if BK2 > 0:
        tl.store(q_row + c2[None, :], _codes(y2, s[:, None], r[:, None], FAST_DIV), mask=m2)
    if BK3 > 0:
        tl.store(q_row + c3[None, :], _codes(y3, s[:, None], r[:, None], FAST_DIV), mask=m3)
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
    if device.type != "cuda" or interpreting():
        return 1 << 30
    return _smem_budget_cached(device.index if device.index is not None else torch.cuda.current_device())


def _dot_needs_f32(x: torch.Tensor) -> bool:
    if x.dtype == torch.float32 or interpreting() or x.device.type != "cuda":
        return True
    if x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] < 8:
        return True   # no bf16 tensor cores before Ampere
    return False


# Per-row quantizer configurations, by next_pow2(K): (rows per program, warps, split into pow2 pieces).  The
# sweep (bench/kernel_sweep.py) overrides them through `config=`; K = 5120 / 13824 are the Wan-14B cases.
# H100 (Triton 3.6, M=32760, run 3): K=5120 bm1 w4 0.1705 ms (2.95 TB/s, the copy roofline; "pieces" 0.1712,
# old default 0.2097); K=13824 bm1 w8 0.4467 ms (3.04 TB/s; with pieces 0.6091).
PLAIN_CONFIGS = {1024: (8, 4, False), 2048: (4, 4, False), 4096: (2, 4, False), 8192: (1, 4, False),
                 16384: (1, 8, False)}
# Kronecker-rotated one-pass quantizer (g = 256): (rows per program, warps) by next_pow2(K).  H100 (Triton 3.6,
# M=32760, batched stage 2): K=5120 bm1 w8 0.391 ms (w4 0.407); K=13824 bm1 w4 0.900 ms (w8 1.244 ms).
# Run 9 (H100, fp16 x2 split + pieces): K=5120 bm1 w4 0.2498 ms (bf16 x3 w8 0.405, old default 0.398);
# K=13824 bm1 w4 0.6598 ms (old default 0.892); codes equal the oracle's (K=13824: 1.8e-7 differ by 1, as before).
KRON_CONFIGS = {256: (8, 4), 512: (4, 4), 1024: (2, 4), 2048: (1, 4), 4096: (1, 8), 8192: (1, 4), 16384: (1, 4)}
KRON_MAX_K = 16384
KRON_BATCHED = True    # stage 2 as a batched 3-D dot instead of two transposes (measured faster, all K)
KRON_PIECES = True     # K as power-of-two pieces (5120 -> 4096 + 1024) instead of padding to next_pow2(K)
KRON_F16 = True        # stage 2 as two fp16 dots of a power-of-two-scaled row (22 bits) instead of three bf16 dots
# g = G1 * G1 with H_g = H_G1 (x) H_G1 for both families (checked by tests against hadamard_matrix).
KRON_GROUPS = {256: 16}


def fast_div_default(device: torch.device) -> bool:
    """Reciprocal + one FMA correction instead of a per-element IEEE division (same bits; GPU only: the
    interpreter's fma rounds twice)."""
    return device.type == "cuda" and not interpreting() and os.environ.get("WAN_INT8_QUANT_EXACT_DIV", "0") == "0"


def _plain_config(kp2: int):
    for key in sorted(PLAIN_CONFIGS):
        if kp2 <= key:
            return PLAIN_CONFIGS[key]
    return (1, 8, False)


def k_pieces(k: int) -> Tuple[int, int, int]:
    """K as up to three power-of-two pieces (largest first) covering it: 5120 -> (4096, 1024, 0),
    13824 -> (8192, 4096, 2048), 96 -> (64, 32, 0); the last piece is masked where it overhangs K."""
    b1 = 1 << (k.bit_length() - 1)
    rem = k - b1
    if rem == 0:
        return b1, 0, 0
    b2 = 1 << (rem.bit_length() - 1)
    rem -= b2
    if rem == 0:
        return b1, b2, 0
    return b1, b2, triton.next_power_of_2(rem)


_PLANS: dict = {}    # call signature -> (Launcher, BLOCK_M, argument layout)


def clear_plans() -> None:
    """Forget the per-signature launch plans (after changing the config tables)."""
    _PLANS.clear()


def quantize_activation_triton(x: torch.Tensor, rotation_kind: str = "none", group_size: int = 0,
                               signs: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None,
                               out: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None,
                               block_m: Optional[int] = None,
                               chunk_loop: Optional[bool] = None,
                               config: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 of `x [M, K]` (rotation fused) -> (int8 codes [M, K] contiguous, fp32 scales [M]).

    `config` (benchmarks, tests) overrides the choice: BLOCK_M, num_warps, FAST_DIV, for the plain path
    PIECES (split K into power-of-two pieces), and for rotations method ("kron" one-pass, or "dense"
    two-pass), SPLIT (3: bf16x3 tensor-core stage 2, 2: hi+lo, 1: one bf16 dot, 0: fp32 dot), F16 (the
    split pieces in fp16, row pre-scaled by a power of two), BATCHED, PIECES (K in power-of-two pieces),
    num_stages.

    The kernel and its configuration are decided once per call signature (device, dtype, K, strides,
    rotation, static scale, small M, overrides); later calls launch the compiled kernel directly.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D activation [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    q = out if out is not None else torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = out_scale if out_scale is not None else torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"unsupported activation dtype {x.dtype}")
        if m:
            s.fill_(AMAX_FLOOR / QMAX) if input_scale is None else s.copy_(input_scale.float().reshape(()).expand(m))
        return q, s
    static = input_scale is not None
    has_signs = signs is not None
    sx0, sx1 = x.stride()
    sig = (x.device, x.dtype, k, sx0, sx1, rotation_kind, group_size, has_signs, static,
           m <= 64, m <= 16, block_m, chunk_loop, None if config is None else tuple(sorted(config.items())))
    static_t = input_scale.to(device=x.device, dtype=torch.float32).reshape(1) if static else s
    plan = _PLANS.get(sig)
    if plan is None:
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"unsupported activation dtype {x.dtype}")
        plan = _make_plan(x, q, s, static_t, signs, rotation_kind, group_size, block_m, chunk_loop, config or {})
        _PLANS[sig] = plan
        return q, s
    launcher, bm, layout, h = plan
    grid = ((m + bm - 1) // bm, 1, 1)
    # what Triton specializes on beyond the signature: M, and the pointers' alignment (dtypes: fixed/checked)
    spec = (m == 1, m % 16 == 0, x.data_ptr() % 16 == 0, q.data_ptr() % 16 == 0, s.data_ptr() % 16 == 0,
            static_t.data_ptr() % 16 == 0, static_t.dtype, q.dtype, s.dtype)
    if layout == 0:
        launcher.keyed(spec, grid, (x, q, s, static_t, m, k, sx0, sx1))
        return q, s
    sg = s
    if layout == 1:
        sg = signs
        if sg.dtype != torch.float32 or sg.device != x.device:
            sg = sg.to(device=x.device, dtype=torch.float32)
        if not sg.is_contiguous():
            sg = sg.contiguous()
        if sg.numel() != k:
            raise ValueError(f"sign vector has {sg.numel()} entries, expected K={k}")
    launcher.keyed(spec + (sg.data_ptr() % 16 == 0, h.data_ptr() % 16 == 0), grid,
                   (x, q, s, static_t, sg, h, m, k, sx0, sx1, 1.0 / math.sqrt(group_size)))
    return q, s


def _make_plan(x, q, s, static_t, signs, rotation_kind, group_size, block_m, chunk_loop, cfg):
    """Decide kernel + configuration for one call signature, run this call, return the plan."""
    from .triton_launch import Launcher
    m, k = x.shape
    static = static_t is not s
    fast_div = cfg.get("FAST_DIV", fast_div_default(x.device))
    if rotation_kind in (None, "none"):
        kp2 = triton.next_power_of_2(k)
        if kp2 <= ONE_PASS_MAX_K:
            bm, warps, pieces = _plain_config(kp2)
            if m <= 64:
                bm = 1 if kp2 >= 4096 else bm   # spread small M over more SMs
            one_pass = True
            pieces = cfg.get("PIECES", pieces)
            bk, bk2, bk3 = k_pieces(k) if pieces else (kp2, 0, 0)
        else:
            bk, bk2, bk3, bm, warps, one_pass = 4096, 0, 0, 1, 8, False
        bm = cfg.get("BLOCK_M", block_m or bm)
        warps = cfg.get("num_warps", warps)
        launcher = Launcher(_quant_rows_kernel, dict(BLOCK_M=bm, BLOCK_K=bk, ONE_PASS=one_pass, STATIC=static,
                                                     FAST_DIV=fast_div, BK2=bk2, BK3=bk3),
                            dict(num_warps=warps))
        launcher((triton.cdiv(m, bm), 1, 1), x, q, s, static_t, m, k, x.stride(0), x.stride(1))
        return launcher, bm, 0, None
    reason = rotation_unsupported(rotation_kind, group_size, k)
    if reason:
        raise ValueError(reason)
    g = group_size
    has_signs = signs is not None
    sg = signs.to(device=x.device, dtype=torch.float32).contiguous() if has_signs else s
    if has_signs and sg.numel() != k:
        raise ValueError(f"sign vector has {sg.numel()} entries, expected K={k}")
    layout = 1 if has_signs else 2
    dot_f32 = _dot_needs_f32(x)
    kp2 = triton.next_power_of_2(k)
    inv = 1.0 / math.sqrt(g)
    method = cfg.get("method", "kron" if g in KRON_GROUPS and kp2 <= KRON_MAX_K and chunk_loop is None else "dense")
    if method == "kron":
        g1 = KRON_GROUPS[g]
        h1 = pm1_hadamard(rotation_kind, g1, torch.float32, x.device)
        bm, warps = KRON_CONFIGS.get(kp2, (1, 8))
        bm = cfg.get("BLOCK_M", block_m or bm)
        warps = cfg.get("num_warps", warps)
        emu = interpreting() or x.device.type != "cuda"   # 16-bit dots as exact fp32 dots (see _pdot)
        bf16_in = x.dtype == torch.bfloat16 and (not dot_f32 or emu)
        f16 = bool(cfg.get("F16", KRON_F16))
        split = cfg.get("SPLIT", (2 if f16 else 3) if x.dtype == torch.bfloat16 and not dot_f32 else 0)
        if split not in (0, 1, 2, 3):
            raise ValueError(f"SPLIT must be 0, 1, 2 or 3, got {split}")
        if dot_f32 and not emu:
            split = 0   # no 16-bit tensor cores (pre-Ampere bf16) or fp32 input: fp32 dots throughout
        pieces = cfg.get("PIECES", KRON_PIECES)
        bk, bk2, bk3 = k_pieces(k) if pieces else (kp2, 0, 0)
        opts = dict(num_warps=warps)
        if "num_stages" in cfg:
            opts["num_stages"] = cfg["num_stages"]
        launcher = Launcher(_quant_rot_kron_kernel,
                            dict(BLOCK_M=bm, BLOCK_K=bk, G1=g1, HAS_SIGNS=has_signs, STATIC=static,
                                 BF16_IN=bf16_in, SPLIT=split, FAST_DIV=fast_div,
                                 BATCHED=cfg.get("BATCHED", KRON_BATCHED), BK2=bk2, BK3=bk3,
                                 F16=f16 and split != 0, EMU=emu), opts)
        launcher((triton.cdiv(m, bm), 1, 1), x, q, s, static_t, sg, h1, m, k, x.stride(0), x.stride(1), inv)
        return launcher, bm, layout, h1
    h_dtype = torch.float32 if dot_f32 else x.dtype
    h = pm1_hadamard(rotation_kind, g, h_dtype, x.device)
    hc = min(g, 64)
    bm = cfg.get("BLOCK_M", block_m or (16 if (m <= 16 or dot_f32) else 32))
    x_tile = bm * g * (4 if dot_f32 else x.element_size())
    if chunk_loop is None:
        chunk_loop = cfg.get("chunk_loop")
    if chunk_loop is None:
        # the hoisted H can be materialised once per pass (Hopper measured 296960 B for G=256): count it twice
        chunk_loop = 2 * g * g * h.element_size() + x_tile > _smem_budget(x.device)
    grid = (triton.cdiv(m, bm), 1, 1)

    def launcher_for(chunk):
        return Launcher(_quant_rotated_kernel, dict(BLOCK_M=bm, G=g, HC=hc, HAS_SIGNS=has_signs, STATIC=static,
                                                    DOT_F32=dot_f32, CHUNK_LOOP=chunk, FAST_DIV=fast_div),
                        dict(num_warps=cfg.get("num_warps", 4)))
    launcher = launcher_for(chunk_loop)
    try:
        launcher(grid, x, q, s, static_t, sg, h, m, k, x.stride(0), x.stride(1), inv)
    except Exception as exc:   # shared memory over the limit on this GPU: the chunked variant always fits
        if chunk_loop or "OutOfResources" not in type(exc).__name__ + str(exc):
            raise
        launcher = launcher_for(True)
        launcher(grid, x, q, s, static_t, sg, h, m, k, x.stride(0), x.stride(1), inv)
    return launcher, bm, layout, h
