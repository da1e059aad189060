"""Triton INT8 GEMM with the dequantization epilogue fused: `y = (A·Bᵀ) * s_x[m] * s_w (+ bias)`.

A: int8 codes `[M, K]` (the quantized activation), B: the int8 weight `[N, K]` read in place as the K-major
`Bᵀ` (no copy; on Hopper int8 wgmma needs both operands K-major, which this is).  int32 accumulation by
`tl.dot`, fp32 epilogue in the oracle's order (`quant.int8._gemm_dequant`): `acc * s_w`, then `* s_x`, then
`+ bias`, stored as bf16/fp16/fp32.  Weight scales: tensor (scalar), row `[N]` or group `[N, K/g]`; for
groups the int32 partial dot of each K-group is folded into an fp32 accumulator inside the K loop
(`acc_f += acc_g * s_w[n, group]`), so BLOCK_K divides g.

LoRA epilogue (`lora_t`, `lora_b`): `y += t · Bᵀ` with t `[M, R]` = a stacked LoRA's (x·A_catᵀ)·diag(s) and
B = B_cat `[N, R]`, added in fp32 after the bias and before the one cast/store (`_lora_add`: bf16/fp16 tensor-
core dots with fp32 accumulation, unrolled over R in R_CHUNK steps; fp32 operands: a 3xTF32 dot).  The
output is written once, where a separate `addmm_` re-read and re-wrote it; the sum is rounded once (the unfused
path rounds the INT8 output and then the sum to the model dtype), so fused and unfused agree to the model
dtype's rounding and the fused one is the more accurate.

Numerics: acc is exact; the epilogue is the oracle's sequence of fp32 operations, but the compiler may fuse a
multiply-add into one FMA (one rounding fewer), so fp32 outputs agree with the oracle to ~1 ulp (a few ulps of
the largest partial for group scales); bf16/fp16 outputs to 1 ulp of the output type.

Dispatch: one `@triton.jit` kernel; autotuned wrappers are built lazily per (architecture class, scale mode,
group size, small-M) from short explicit config lists, keyed on (M bucket, N, K) where the M bucket is the
next power of two of M, capped, so videos of different lengths do not re-tune.  `set_config_override`
replaces every list (tests use one tiny config; the CPU interpreter is slow).  On Hopper, calls with M > 1024
go to the warp-specialised Gluon GEMM (`gluon_gemm.py`, Triton 3.6) where it can take them (`_gluon_refusal`);
it computes the same epilogue in the same order.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import torch

import triton
import triton.language as tl

from ..logs import log_once
from .triton_launch import interpreting

log = logging.getLogger("wan_int8.kernels")

M_BUCKET_CAP = 8192
SMALL_M = 64
SW_TENSOR, SW_ROW, SW_GROUP = 0, 1, 2


@triton.jit
def _i2f_exact(v):
    """int32 -> fp32 for |v| < 2^22 without a conversion instruction (I2F runs at 1/8 of the FMA rate on
    Hopper: 16/clk/SM): the bit pattern of 1.5*2^23 plus v is the float 1.5*2^23 + v, exactly."""
    return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _fold(acc_f, part, sw, FOLD: tl.constexpr):
    """acc_f + part * sw[None, :] (one K-group's int32 partial dot, scaled by its weight scales)."""
    if FOLD == 0:
        return acc_f + part.to(tl.float32) * sw[None, :]
    else:
        return acc_f + _i2f_exact(part) * sw[None, :]


@triton.jit
def _lora_dot(t, b, y, LORA_F32: tl.constexpr):
    """y + t·b.  LORA_F32 0: the operands' own dtype (bf16/fp16 tensor cores, fp32 accumulation, exact products);
    1: upcast to fp32, IEEE dot (the interpreter, whose bf16 dot is wrong); 2: fp32 operands on a GPU, 3xTF32
    tensor-core dot (about fp32 accuracy; an IEEE fp32 dot of a 128x256 tile spills heavily)."""
    if LORA_F32 == 1:
        return tl.dot(t.to(tl.float32), b.to(tl.float32), y, input_precision="ieee")
    elif LORA_F32 == 2:
        return tl.dot(t, b, y, input_precision="tf32x3")
    else:
        return tl.dot(t, b, y)


@triton.jit
def _lora_add(y, t_ptr, lb_ptr, offs_am, offs_bn, R, stride_tm, stride_lbn,
              R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, EVEN_R: tl.constexpr, LORA_F32: tl.constexpr):
    """y + t[m, :R] · lb[n, :R]ᵀ in fp32: the LoRA up-projection fused into the epilogue (t = (x·A_catᵀ)·diag(s),
    lb = B_cat, both with unit stride along R).  Unrolled over R in R_CHUNK steps (R_PAD = R rounded up to
    R_CHUNK, a constexpr: no loop for the pipeliner / loop flattening to see); ranks past R are masked to zero
    unless EVEN_R.  LORA_F32: see `_lora_dot`."""
    rr = tl.arange(0, R_CHUNK)
    for r0 in tl.static_range(0, R_PAD, R_CHUNK):
        t_ptrs = t_ptr + offs_am[:, None] * stride_tm + (r0 + rr)[None, :]
        b_ptrs = lb_ptr + offs_bn[None, :] * stride_lbn + (r0 + rr)[:, None]
        if EVEN_R:
            t = tl.load(t_ptrs)
            b = tl.load(b_ptrs)
        else:
            t = tl.load(t_ptrs, mask=(r0 + rr)[None, :] < R, other=0.0)
            b = tl.load(b_ptrs, mask=(r0 + rr)[:, None] < R, other=0.0)
        y = _lora_dot(t, b, y, LORA_F32)
    return y


@triton.jit
def _dequant_tile(acc, acc_f, sw_ptr, sx_ptr, bias_ptr, offs_am, offs_bn, SW_MODE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The oracle's epilogue order in fp32: acc * s_w (tensor or row; group scales were folded into acc_f in the
    K loop), then * s_x[m], then + bias."""
    if SW_MODE == 2:
        y = acc_f
    elif SW_MODE == 1:
        y = acc.to(tl.float32) * tl.load(sw_ptr + offs_bn)[None, :]
    else:
        y = acc.to(tl.float32) * tl.load(sw_ptr + tl.zeros([BLOCK_N], dtype=tl.int32))[None, :]
    y = y * tl.load(sx_ptr + offs_am)[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_bn).to(tl.float32)[None, :]
    return y


@triton.jit
def _gelu_tanh(y):
    """GELU, tanh approximation (torch's approximate="tanh"), in fp32; tanh(u) = 1 - 2 / (exp(2u) + 1) saturates
    cleanly at both ends."""
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * tl.minimum(u, 20.0)) + 1.0))   # u > 20: tanh is 1 in fp32


@triton.jit
def _gate_rows(gate_ptr, off_m, offs_am, offs_bn, M, SEQ, PER, stride_gb, stride_gg):
    """The gate for the rows of a tile, when they span at most two gate rows (every run of tokens sharing a gate
    row is at least BLOCK_M long): the row where the gate changes is found once per tile with scalar arithmetic,
    then two vector loads and a per-row choice (no per-row division, no gather over the tile)."""
    first = off_m.to(tl.int64)
    b = first // SEQ
    grp = (first - b * SEQ) // PER
    change = b * SEQ + tl.minimum((grp + 1) * PER, SEQ)          # first row of the next gate row
    r0 = b * stride_gb + grp * stride_gg
    nb = change // SEQ                                           # the next gate row: next group, or next batch's first
    r1 = nb * stride_gb + ((change - nb * SEQ) // PER) * stride_gg
    g0 = tl.load(gate_ptr + r0 + offs_bn).to(tl.float32)
    g1 = tl.load(gate_ptr + tl.where(change < M, r1, r0) + offs_bn).to(tl.float32)
    return tl.where((offs_am < change)[:, None], g0[None, :], g1[None, :])


@triton.jit
def _post_ops(y, r_desc, off_m, off_n, offs_am, offs_bn, res_ptr, gate_ptr, stride_rm, M, SEQ, PER, stride_gb,
              stride_gg, ACT: tl.constexpr, RES: tl.constexpr, RES_TMA: tl.constexpr, GATE_TWO: tl.constexpr):
    """The block epilogue after bias and LoRA, in fp32, on a tile (or a stored half-tile at off_m, off_n): ACT 1 =
    GELU (tanh); RES 1 = `res + y * gate[row]` (Wan's gated residual; row m is token m % SEQ of batch m // SEQ,
    gate row (m // SEQ, (m % SEQ) // PER)), RES 2 = `res + y`.  The residual tile comes through its tensor
    descriptor r_desc (RES_TMA: coalesced, straight to shared memory) or by pointers; the gate as two row vectors
    (GATE_TWO, `_gate_rows`) or gathered per row."""
    if ACT == 1:
        y = _gelu_tanh(y)
    if RES > 0:
        if RES_TMA:
            r = r_desc.load([off_m, off_n]).to(tl.float32)
        else:
            r = tl.load(res_ptr + offs_am[:, None] * stride_rm + offs_bn[None, :]).to(tl.float32)
        if RES == 1:
            if GATE_TWO:
                g = _gate_rows(gate_ptr, off_m, offs_am, offs_bn, M, SEQ, PER, stride_gb, stride_gg)
            else:
                bi = offs_am // SEQ
                grow = bi * stride_gb + ((offs_am - bi * SEQ) // PER) * stride_gg
                g = tl.load(gate_ptr + grow[:, None] + offs_bn[None, :]).to(tl.float32)
            y = r + y * g
        else:
            y = r + y
    return y


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, K, M_BUCKET,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_sw,
                      t_ptr, lb_ptr, R, stride_tm, stride_lbn,
                      res_ptr, gate_ptr, stride_rm, SEQ, PER, stride_gb, stride_gg,
                      SW_MODE: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, FOLD: tl.constexpr = 0,
                      HAS_LORA: tl.constexpr = False, R_PAD: tl.constexpr = 16, R_CHUNK: tl.constexpr = 16,
                      EVEN_R: tl.constexpr = True, LORA_F32: tl.constexpr = 0, ACT: tl.constexpr = 0,
                      RES: tl.constexpr = 0):
    """FOLD (group scales): 0 int->float by conversion; 1 exact magic-number conversion (needs GROUP_K <= 256:
    a group's partial |sum| <= 256*128*127 < 2^22); 2 as 1, deferred by one K step so the fold of step k
    overlaps the (async wgmma) dot of step k+1 (BLOCK_K == GROUP_K only)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles sweep N together so their B tiles stay in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap out-of-range rows/cols onto valid ones (loads stay in bounds, stores are masked)
    offs_am = tl.where(offs_m < M, offs_m, 0)
    offs_bn = tl.where(offs_n < N, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_bn[None, :] * stride_bn + offs_k[:, None].to(tl.int64) * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if SW_MODE == 2:
        acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sw_ptrs = sw_ptr + offs_bn * stride_sw
        if FOLD == 2 and GROUP_K == BLOCK_K:
            sw_prev = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        if SW_MODE == 2:
            if FOLD == 2 and GROUP_K == BLOCK_K:   # fold the previous step's partial after issuing this dot
                part = tl.dot(a, b, out_dtype=tl.int32)
                acc_f = _fold(acc_f, acc, sw_prev, 1)
                acc = part
                sw_prev = tl.load(sw_ptrs + kb)
            elif GROUP_K == BLOCK_K:   # BLOCK_K == g: each step's dot is one group's partial sum
                part = tl.dot(a, b, out_dtype=tl.int32)
                acc_f = _fold(acc_f, part, tl.load(sw_ptrs + kb), FOLD)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
                if (kb + 1) % (GROUP_K // BLOCK_K) == 0:   # last step of a group: fold it in, restart
                    acc_f = _fold(acc_f, acc, tl.load(sw_ptrs + kb // (GROUP_K // BLOCK_K)), FOLD)
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if SW_MODE == 2:
        if FOLD == 2 and GROUP_K == BLOCK_K:
            acc_f = _fold(acc_f, acc, sw_prev, 1)
        y = _dequant_tile(acc, acc_f, sw_ptr, sx_ptr, bias_ptr, offs_am, offs_bn, SW_MODE, HAS_BIAS, BLOCK_N)
    else:
        y = _dequant_tile(acc, acc, sw_ptr, sx_ptr, bias_ptr, offs_am, offs_bn, SW_MODE, HAS_BIAS, BLOCK_N)
    if HAS_LORA:
        y = _lora_add(y, t_ptr, lb_ptr, offs_am, offs_bn, R, stride_tm, stride_lbn, R_PAD, R_CHUNK, EVEN_R, LORA_F32)
    if ACT != 0 or RES != 0:
        y = _post_ops(y, None, 0, 0, offs_am, offs_bn, res_ptr, gate_ptr, stride_rm, M, SEQ, PER, stride_gb,
                      stride_gg, ACT, RES, False, False)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _int8_gemm_persistent_kernel(a_ptr, b_ptr, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, K, M_BUCKET,
                                 stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_sw,
                                 t_ptr, lb_ptr, R, stride_tm, stride_lbn,
                                 res_ptr, gate_ptr, stride_rm, SEQ, PER, stride_gb, stride_gg,
                                 SW_MODE: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, USE_TMA: tl.constexpr,
                                 FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr, FOLD: tl.constexpr = 0,
                                 EPI: tl.constexpr = 0, HAS_LORA: tl.constexpr = False, R_PAD: tl.constexpr = 16,
                                 R_CHUNK: tl.constexpr = 16, EVEN_R: tl.constexpr = True,
                                 LORA_F32: tl.constexpr = 0, LORA_TMA: tl.constexpr = False,
                                 ACT: tl.constexpr = 0, RES: tl.constexpr = 0, POST_HALVES: tl.constexpr = False,
                                 RES_TMA: tl.constexpr = False, GATE_TWO: tl.constexpr = False):
    """Persistent variant: NUM_SMS programs loop over the output tiles (grouped order).  USE_TMA: operands
    (and the output) through device-side tensor descriptors (Hopper TMA; needs contiguous K-major a and b, K
    and N*elem 16-byte aligned, and `triton.set_allocator`); else pointer loads (any strides, interpreter).
    Same epilogue and numerics as `_int8_gemm_kernel` (FOLD 0/1 as there).  EPI (with TMA): 0 one
    [BLOCK_M, BLOCK_N] TMA store; 1 two [BLOCK_M, BLOCK_N/2] stores (half the epilogue shared memory: lets
    128x256 tiles keep 3 operand stages); 2 masked pointer stores from registers (no output descriptor)."""
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
        if EPI == 0:
            c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N])
        elif EPI == 1:
            c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N // 2])
    r_desc = None
    if RES_TMA and USE_TMA and EPI == 1 and RES > 0:
        r_desc = tl.make_tensor_descriptor(res_ptr, shape=[M, N], strides=[stride_rm, 1],
                                           block_shape=[BLOCK_M, BLOCK_N // 2])
    if HAS_LORA and LORA_TMA:   # LoRA tiles straight to shared memory (no registers; TMA zero-fills past R, M, N)
        t_desc = tl.make_tensor_descriptor(t_ptr, shape=[M, R], strides=[stride_tm, 1], block_shape=[BLOCK_M, R_CHUNK])
        lb_desc = tl.make_tensor_descriptor(lb_ptr, shape=[N, R], strides=[stride_lbn, 1],
                                            block_shape=[BLOCK_N, R_CHUNK])
    offs_k = tl.arange(0, BLOCK_K)
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_n = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        offs_am = tl.where(offs_m < M, offs_m, 0)
        offs_bn = tl.where(offs_n < N, offs_n, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if SW_MODE == 2:
            acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k_tiles):
            if USE_TMA:
                a = a_desc.load([off_m, kb * BLOCK_K])
                b = b_desc.load([off_n, kb * BLOCK_K]).T
            else:
                kk = kb * BLOCK_K + offs_k
                a = tl.load(a_ptr + offs_am[:, None] * stride_am + kk[None, :].to(tl.int64) * stride_ak,
                            mask=kk[None, :] < K, other=0)
                b = tl.load(b_ptr + offs_bn[None, :] * stride_bn + kk[:, None].to(tl.int64) * stride_bk,
                            mask=kk[:, None] < K, other=0)
            if SW_MODE == 2:
                if GROUP_K == BLOCK_K:
                    part = tl.dot(a, b, out_dtype=tl.int32)
                    acc_f = _fold(acc_f, part, tl.load(sw_ptr + offs_bn * stride_sw + kb), FOLD)
                else:
                    acc = tl.dot(a, b, acc, out_dtype=tl.int32)
                    if (kb + 1) % (GROUP_K // BLOCK_K) == 0:
                        sw_g = tl.load(sw_ptr + offs_bn * stride_sw + kb // (GROUP_K // BLOCK_K))
                        acc_f = _fold(acc_f, acc, sw_g, FOLD)
                        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if SW_MODE == 2:
            y = _dequant_tile(acc, acc_f, sw_ptr, sx_ptr, bias_ptr, offs_am, offs_bn, SW_MODE, HAS_BIAS, BLOCK_N)
        else:
            y = _dequant_tile(acc, acc, sw_ptr, sx_ptr, bias_ptr, offs_am, offs_bn, SW_MODE, HAS_BIAS, BLOCK_N)
        if HAS_LORA and LORA_TMA:
            for r0 in tl.static_range(0, R_PAD, R_CHUNK):
                lt = t_desc.load([off_m, r0])
                lb = lb_desc.load([off_n, r0]).T
                y = _lora_dot(lt, lb, y, LORA_F32)
        elif HAS_LORA:
            y = _lora_add(y, t_ptr, lb_ptr, offs_am, offs_bn, R, stride_tm, stride_lbn, R_PAD, R_CHUNK, EVEN_R,
                          LORA_F32)
        HALVES: tl.constexpr = POST_HALVES and USE_TMA and EPI == 1 and (ACT != 0 or RES != 0)
        if (ACT != 0 or RES != 0) and not HALVES:
            y = _post_ops(y, None, 0, 0, offs_am, offs_bn, res_ptr, gate_ptr, stride_rm, M, SEQ, PER, stride_gb,
                          stride_gg, ACT, RES, False, False)
        if HALVES:   # the block epilogue on each half of the tile as it is stored: half the residual registers
            y3 = tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            y0, y1 = tl.split(y3)
            offs_h = off_n.to(tl.int64) + tl.arange(0, BLOCK_N // 2)
            y0 = _post_ops(y0, r_desc, off_m, off_n, offs_am, tl.where(offs_h < N, offs_h, 0), res_ptr, gate_ptr,
                           stride_rm, M, SEQ, PER, stride_gb, stride_gg, ACT, RES, RES_TMA, GATE_TWO)
            c_desc.store([off_m, off_n], y0.to(c_ptr.dtype.element_ty))
            offs_h += BLOCK_N // 2
            y1 = _post_ops(y1, r_desc, off_m, off_n + BLOCK_N // 2, offs_am, tl.where(offs_h < N, offs_h, 0),
                           res_ptr, gate_ptr, stride_rm, M, SEQ, PER, stride_gb, stride_gg, ACT, RES, RES_TMA,
                           GATE_TWO)
            c_desc.store([off_m, off_n + BLOCK_N // 2], y1.to(c_ptr.dtype.element_ty))
        elif USE_TMA and EPI == 0:
            c_desc.store([off_m, off_n], y.to(c_ptr.dtype.element_ty))
        elif USE_TMA and EPI == 1:
            y3 = tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            y0, y1 = tl.split(y3)
            c_desc.store([off_m, off_n], y0.to(c_ptr.dtype.element_ty))
            c_desc.store([off_m, off_n + BLOCK_N // 2], y1.to(c_ptr.dtype.element_ty))
        else:
            c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
            tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ------------------------------------------------------------------------------------------------------------
# configurations

def _c(bm, bn, bk, warps, stages, gm=8, **kw):
    d = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)
    d.update(kw)
    return d


# Hopper (sm_90): int8 wgmma; 228 KB shared memory.  Order = measured rank (bench/kernel_sweep.py, H100, Triton
# 3.6, M=32760): 128x256x128 w8 s3 1185 TOPS at 5120x5120 (4.008 ms at K=5120,N=13824), 256x128x128 w8 s3
# 4.086 ms at K=13824,N=5120; the rest are kept as autotune alternatives.
_HOPPER = [_c(128, 256, 128, 8, 3), _c(256, 128, 128, 8, 3), _c(128, 256, 128, 8, 3, 16),
           _c(128, 128, 128, 8, 5), _c(128, 128, 256, 8, 3)]
# Group scales (g = 128): the fold runs once per K step on the CUDA cores, so 128x128 tiles (fold cost per
# output element is the same, more programs in flight) were measured ahead; the big tiles stay as alternatives.
_HOPPER_GROUP = [_c(128, 128, 128, 8, 4), _c(128, 128, 128, 8, 3), _c(128, 256, 128, 8, 3), _c(256, 128, 128, 8, 3)]
# Hopper, 64 < M <= 1024: too few 128x128 tiles to fill 132 SMs (M=512, N=5120: 160), so narrower tiles too.
# M=512, 5120x5120: 64x128x128 w4 s4 0.0431 ms, 128x64x128 0.0453 ms, 64x64x128 0.0508 ms.
_HOPPER_MID = [_c(64, 128, 128, 4, 4), _c(128, 64, 128, 4, 4), _c(64, 64, 128, 4, 4, 1), _c(128, 128, 128, 8, 4)]
# Persistent TMA kernel (Hopper), see `_int8_gemm_persistent_kernel`; extra keys FLATTEN/WARP_SPEC/EPI allowed.
# 128x256 tiles need EPI=1 (halved epilogue staging) to fit 3 stages (278552 B > 232448 B measured with EPI=0).
# H100 (Triton 3.6, M=32760, run 3): 128x256x128 s3 EPI1 FLATTEN 1284 TOPS at 5120x5120; GROUP_M 16 EPI1
# 1326 TOPS (1.90x bf16) at K=13824,N=5120; 128x256 EPI1 1207 TOPS at K=5120,N=13824.  Autotune picks per shape.
_HOPPER_PERSISTENT = [_c(128, 256, 128, 8, 3, EPI=1, FLATTEN=True), _c(128, 256, 128, 8, 3, 16, EPI=1),
                      _c(128, 256, 128, 8, 3, EPI=1), _c(256, 128, 128, 8, 3, EPI=1), _c(256, 128, 128, 8, 3, EPI=2)]
# A100 (sm_80): 164 KB shared memory, mma.sync.
_AMPERE = [_c(128, 256, 64, 8, 3), _c(256, 128, 64, 8, 3), _c(128, 128, 64, 4, 4), _c(128, 128, 128, 8, 3),
           _c(64, 128, 128, 4, 4)]
# sm_86/89 (RTX 30xx/40xx): ~100 KB shared memory per block.
_ADA = [_c(128, 128, 64, 4, 4), _c(128, 256, 64, 8, 3), _c(256, 128, 64, 8, 3), _c(128, 128, 128, 8, 2),
        _c(64, 128, 64, 4, 4)]
# M <= 64: weight-bandwidth bound; narrow N tiles so enough programs cover the SMs.
# H100, 5120x5120: M=16 16x32x256 w4 s4 0.0196 ms; M=1 16x64x128 0.0239 ms.
_SMALL_M = [_c(16, 32, 256, 4, 4, 1), _c(16, 64, 128, 4, 4, 1), _c(32, 64, 128, 4, 4, 1),
            _c(64, 64, 128, 4, 4, 1), _c(16, 128, 128, 4, 3, 1)]

_OVERRIDE: Optional[List[dict]] = None
_KERNELS: Dict[tuple, object] = {}


def set_config_override(configs: Optional[Sequence[dict]]) -> None:
    """Use exactly `configs` (dicts as `_c` makes) for every GEMM from now on; None restores the defaults."""
    global _OVERRIDE
    _OVERRIDE = [dict(c) for c in configs] if configs is not None else None
    _KERNELS.clear()
    _PLANS.clear()


def _arch(device: torch.device) -> str:
    if interpreting() or device.type != "cuda":
        return "interp"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "hopper"     # also sm_100/120: these tiles are valid there (wgmma is sm_90a only; Triton picks)
    if (major, minor) == (8, 0):
        return "ampere"
    if major == 8:
        return "ada"
    return "turing"


def _config_list(arch: str, small: bool, group: int, mid: bool = False, persistent: bool = False) -> List[dict]:
    if _OVERRIDE is not None:
        cfgs = _OVERRIDE
    elif arch == "turing":
        # Triton 3.x cannot lower an int8 tl.dot for sm_75 (TritonGPUAccelerateMatmul fails); the backend's
        # check() refuses these GPUs, so reaching this is a caller bug.
        raise RuntimeError("the Triton INT8 GEMM needs compute capability 8.0 or newer")
    elif arch == "interp":
        cfgs = [_c(16, 32, 32, 4, 1, 1)]
    elif persistent:
        cfgs = _HOPPER_PERSISTENT
    elif small:
        cfgs = _SMALL_M
    elif mid and arch == "hopper":
        cfgs = _HOPPER_MID
    elif group and arch == "hopper":
        cfgs = _HOPPER_GROUP
    else:
        cfgs = {"hopper": _HOPPER, "ampere": _AMPERE, "ada": _ADA}[arch]
    if group:
        fixed = []
        for c in cfgs:
            c = dict(c)
            while group % c["BLOCK_K"]:
                c["BLOCK_K"] //= 2
            if c not in fixed:
                fixed.append(c)
        cfgs = fixed
    return cfgs


def fold_default(group: int) -> int:
    """Group-scale fold.  0: int->float convert per step; 1: exact magic-number int->float (partials < 2^22).
    Run 3 (H100, g=128): FOLD0 2.92 ms, FOLD1 3.16 ms, FOLD2 4.66 ms at 32760x5120x5120: 0 stays the default."""
    return 0


def _tuning_bench(fn, quantiles=None, **_):
    """Autotuning timer: the median of more runs than Triton's default.  Configurations within a few percent of
    each other were picked differently from one process to the next (INT8 alone 3.82-4.42 ms at
    32760x5120x13824 across H100 runs 11 and 13); a longer, median-based measurement settles them."""
    return triton.testing.do_bench(fn, warmup=50, rep=250, quantiles=quantiles, return_mode="median")


def _autotune_kwargs() -> dict:
    """Persist autotune results across processes where this Triton supports it (3.4+: cache_results), and time
    candidates with `_tuning_bench` where the autotuner takes a timer (do_bench=)."""
    import inspect
    out = {}
    try:
        params = inspect.signature(triton.autotune).parameters
    except (TypeError, ValueError):
        return out
    if "cache_results" in params:
        out["cache_results"] = True
    if "do_bench" in params and not interpreting():
        out["do_bench"] = _tuning_bench
    return out


def _kernel(arch: str, small: bool, group: int, mid: bool = False, persistent: bool = False):
    key = (arch, small, group, mid, persistent)
    fn = _KERNELS.get(key)
    if fn is None:
        configs = []
        for c in _config_list(arch, small, group, mid, persistent):
            c = dict(c)
            warps, stages = c.pop("num_warps"), c.pop("num_stages")
            if persistent:
                c.setdefault("FLATTEN", False)
                c.setdefault("WARP_SPEC", False)
                c.setdefault("EPI", 0)
            c.setdefault("FOLD", fold_default(group))
            configs.append(triton.Config(c, num_warps=warps, num_stages=stages))
        keys = ["M_BUCKET", "N", "K", "SW_MODE", "GROUP_K", "HAS_BIAS", "HAS_LORA", "R_PAD", "ACT", "RES"]
        if persistent:
            fn = triton.autotune(configs=configs, key=keys, prune_configs_by={"early_config_prune": _prune_configs},
                                 **_autotune_kwargs())(_int8_gemm_persistent_kernel)
        else:
            heur = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_int8_gemm_kernel)
            fn = triton.autotune(configs=configs, key=keys, **_autotune_kwargs())(heur)
        _KERNELS[key] = fn
    return fn


# -- persistent / TMA support ----------------------------------------------------------------------------------

_ALLOCATOR_SET = False
_NUM_SMS: Dict[int, int] = {}
# Use the persistent TMA kernel by default on Hopper (set after bench/kernel_sweep.py shows it wins there).
# Run 3 (H100): the TMA persistent kernel beat the pointer kernel on all three Wan-14B shapes (1.61-1.90x bf16
# vs 1.55-1.73x).  WAN_INT8_GEMM_PERSISTENT=0 goes back to the pointer kernel.
PERSISTENT_DEFAULT = os.environ.get("WAN_INT8_GEMM_PERSISTENT", "1") == "1"


def tma_supported(device: torch.device) -> Optional[str]:
    """None when device-side tensor descriptors can run here, else why not."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"Triton {triton.__version__} has no tl.make_tensor_descriptor"
    if not hasattr(triton, "set_allocator"):
        return f"Triton {triton.__version__} has no triton.set_allocator"
    if interpreting():
        return None
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return "TMA needs a Hopper (sm_90) or newer GPU"
    return None


def _ensure_allocator() -> None:
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")
        triton.set_allocator(alloc)
        _ALLOCATOR_SET = True


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _tma_operands_ok(a, b, c) -> bool:
    return (a.stride(1) == 1 and b.stride(1) == 1 and c.stride(1) == 1 and a.stride(0) % 16 == 0
            and b.stride(0) % 16 == 0 and (c.stride(0) * c.element_size()) % 16 == 0
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0 and c.data_ptr() % 16 == 0)


def m_bucket(m: int) -> int:
    return min(1 << max(0, (m - 1).bit_length()), M_BUCKET_CAP)


_PLANS: Dict[tuple, tuple] = {}   # call signature -> (Launcher, BLOCK_M, BLOCK_N, persistent?)
_ARCH: Dict[torch.device, str] = {}


def _arch_cached(device: torch.device) -> str:
    arch = _ARCH.get(device)
    if arch is None:
        arch = _ARCH[device] = _arch(device)
    return arch


def _split_config(cfg: dict) -> tuple:
    """A config dict (as `_c` makes, or `triton.Config.all_kwargs()`) -> (constexprs, launch options)."""
    opts = {k: cfg[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg", "ir_override") if k in cfg}
    return {k: v for k, v in cfg.items() if k not in opts}, opts


def int8_gemm(a: torch.Tensor, b: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
              out: Optional[torch.Tensor] = None, variant: Optional[str] = None,
              config: Optional[dict] = None, lora_t: Optional[torch.Tensor] = None,
              lora_b: Optional[torch.Tensor] = None, act: int = 0, residual: Optional[torch.Tensor] = None,
              gate: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0) -> torch.Tensor:
    """`(a [M, K] int8) · (b [N, K] int8)ᵀ * sx[M] * sw (+ bias) (+ lora_t · lora_bᵀ)` -> `[M, N]` in `out_dtype`.

    `lora_t [M, R]`, `lora_b [N, R]` (same float dtype; a stacked LoRA's down-projected, strength-scaled input
    and its up-projection): added in fp32 in the epilogue, before the one cast and store (see `_lora_add`).

    Block epilogue (`_post_ops`, after the LoRA term, in fp32): `act` 1 applies GELU (tanh); `residual [M, N]`
    (unit stride along N) gives `residual + y * gate[row]` with `gate [B, G, N]` (unit stride along N; row m is
    token m % seq of batch m // seq, gate row (m // seq, (m % seq) // per)), or `residual + y` without a gate.

    `variant`: "ptr" (grid of tiles, pointer loads), "persistent" (persistent, pointer loads), "tma"
    (persistent, tensor descriptors) or "gluon" (`gluon_gemm.ws_gemm`, Hopper); default: "gluon" where
    GLUON_DEFAULT and `_gluon_refusal` allows, else "tma" where PERSISTENT_DEFAULT and supported, else "ptr".
    `config` (benchmarks): one explicit configuration (dict as `_c` makes) instead of autotuning.

    `sw` is fp32: a scalar (tensor-wise), `[N]` (row-wise) or `[N, K/g]` (group-wise).  `a` and `b` may have
    any strides (K-contiguous is the fast case); `sx` is fp32 `[M]`; `bias` any float `[N]`.

    Host cost: the first call per signature (device, M bucket, N, K, strides, dtypes, scale mode, bias,
    variant, config) autotunes and compiles; later calls launch the chosen compiled kernel directly
    (`triton_launch.Launcher`), a few microseconds of Python.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise ValueError("int8_gemm expects 2-D int8 a [M, K] and b [N, K]")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a has K={k}, b has K={b.shape[1]}")
    c = out if out is not None else torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    sw_dim = sw.dim()
    if sw_dim == 0 or sw.numel() == 1 and sw_dim <= 1 and n != 1:
        mode, group, stride_sw = SW_TENSOR, 0, 0   # any one-element tensor: the kernel reads sw_ptr[0]
    elif sw_dim == 1:
        mode, group, stride_sw = SW_ROW, 0, 0
    else:
        groups = sw.shape[1]
        if k % groups or sw.shape[0] != n:
            raise ValueError(f"group scales {tuple(sw.shape)} do not fit weight [{n}, {k}]")
        mode, group, stride_sw = SW_GROUP, k // groups, sw.stride(0)
        if sw.stride(1) != 1:
            sw = sw.contiguous()
            stride_sw = sw.stride(0)
        if group % 16:
            raise ValueError(f"group size {group} must be a multiple of 16")
    if sw.dtype != torch.float32 or sx.dtype != torch.float32:
        raise ValueError("scales must be float32")
    has_lora = lora_t is not None and lora_t.shape[1] > 0
    if has_lora:
        r = lora_t.shape[1]
        if lora_b is None or tuple(lora_b.shape) != (n, r) or lora_t.shape[0] != m or lora_t.dim() != 2:
            raise ValueError(f"LoRA operands must be t [M={m}, R] and b [N={n}, R], got {tuple(lora_t.shape)} and "
                             f"{None if lora_b is None else tuple(lora_b.shape)}")
        if lora_t.dtype != lora_b.dtype or lora_t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"LoRA operands must share one of bf16/fp16/fp32, got {lora_t.dtype}, {lora_b.dtype}")
        if lora_t.stride(1) != 1:
            lora_t = lora_t.contiguous()
        if lora_b.stride(1) != 1:
            lora_b = lora_b.contiguous()
    if k == 0:
        y = torch.zeros((m, n), dtype=torch.float32, device=a.device)
        if bias is not None:
            y += bias.float()
        if has_lora:
            y += lora_t.float() @ lora_b.float().t()
        from ..quant.int8 import block_epilogue_reference
        c.copy_(block_epilogue_reference(y, act, residual, gate, seq, per))
        return c
    has_bias = bias is not None
    res_mode = 0 if residual is None else 1 if gate is not None else 2
    if res_mode:
        if tuple(residual.shape) != (m, n) or residual.stride(1) != 1:
            raise ValueError(f"residual must be [M={m}, N={n}] with unit stride along N, got {tuple(residual.shape)} "
                             f"strides {residual.stride()}")
        seq = seq or m
        per = per or seq
        if res_mode == 1:
            if gate.dim() != 3 or gate.shape[-1] != n or gate.stride(-1) != 1 or m % seq \
                    or gate.shape[0] != m // seq or gate.shape[1] < (seq + per - 1) // per:
                raise ValueError(f"gate must be [B={m // max(seq, 1)}, G, N={n}] (G groups of {per} of {seq} tokens) "
                                 f"with unit stride along N, got {tuple(gate.shape)} strides {gate.stride()}")
            rest = (residual, gate, residual.stride(0), seq, per, gate.stride(0), gate.stride(1))
        else:
            rest = (residual, residual, residual.stride(0), seq, per, 0, 0)
    else:
        rest = (sx, sx, 0, 1, 1, 0, 0)
    mb = min(1 << max(0, (m - 1).bit_length()), M_BUCKET_CAP)   # m_bucket(m), inlined (hot path)
    sa0, sa1 = a.stride()
    sb0, sb1 = b.stride()
    sc0, sc1 = (n, 1) if out is None else c.stride()
    bias_ = bias if has_bias else sx
    if has_lora:
        lt, lb, stm, slbn = lora_t, lora_b, lora_t.stride(0), lora_b.stride(0)
        es = lt.element_size()
        lsig = (lt.dtype, r, stm, slbn, (r * es) % 16 == 0 and (stm * es) % 16 == 0 and (slbn * es) % 16 == 0
                and lt.data_ptr() % 16 == 0 and lb.data_ptr() % 16 == 0)   # [4]: TMA-loadable
    else:
        lt, lb, r, stm, slbn, lsig = sx, sx, 0, 0, 0, None
    args = (a, b, c, sx, sw, bias_, m, n, k, mb, sa0, sa1, sb0, sb1, sc0, sc1, stride_sw, lt, lb, r, stm, slbn) + rest
    esig = (act, res_mode) + ((rest[0].dtype, rest[1].dtype) + rest[5:] if res_mode else ())
    if res_mode:   # residual TMA-loadable (16-byte aligned rows); every run of rows sharing a gate row >= 256 long
        r0, seq_, per_ = rest[0], rest[3], rest[4]
        shortest = min(per_, seq_ - ((seq_ - 1) // per_) * per_)
        esig += ((r0.stride(0) * r0.element_size()) % 16 == 0 and r0.data_ptr() % 16 == 0, shortest >= 256)
    sig = (a.device, mb, n, k, sa0, sa1, sb0, sb1, sc0, sc1, c.dtype, mode, group, stride_sw,
           bias.dtype if has_bias else None, variant, None if config is None else tuple(sorted(config.items())),
           a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0 and c.data_ptr() % 16 == 0, lsig, esig)
    plan = _PLANS.get(sig)
    if plan is not None:
        launcher, bm, bn, persistent = plan
        tiles = ((m + bm - 1) // bm) * ((n + bn - 1) // bn)
        if persistent:
            if launcher.constexprs["USE_TMA"]:
                _ensure_allocator()
            tiles = max(1, min(launcher.constexprs["NUM_SMS"], tiles))
        # everything Triton specializes on that the plan's signature does not fix: M, the scale/bias pointers
        spec = (m == 1, m % 16 == 0, sx.data_ptr() % 16 == 0, sw.data_ptr() % 16 == 0,
                bias_.data_ptr() % 16 == 0, bias_.dtype, sw.dtype, sx.dtype,
                lt.data_ptr() % 16 == 0, lb.data_ptr() % 16 == 0)
        if res_mode:   # the residual's row stride and the token mapping vary per call
            spec += (rest[0].data_ptr() % 16 == 0, rest[1].data_ptr() % 16 == 0) + \
                tuple((v == 1, v % 16 == 0) for v in rest[2:5])
        launcher.keyed(spec, (tiles, 1, 1), args)
        return c
    _PLANS[sig] = _first_call(a, b, c, args, m, n, mode, group, has_bias, variant, config, lsig,
                              dict(ACT=act, RES=res_mode), esig[-2:] if res_mode else (False, False))
    return c


# LoRA epilogue: ranks per tl.dot step (multiples of 16).  Offline sm_90 compiles (Triton 3.9, 128x256 tiles,
# 8 warps): pointer loads of the t/B tiles go through registers, and 16-rank steps keep those kernels at or under
# 255 registers without spills where 32/64 spill; TMA loads (the persistent TMA kernel, TMA-aligned operands)
# go straight to shared memory: 32 ranks per step, 224 registers, no spills, no extra shared memory without
# FLATTEN (the operand stages are reused).
LORA_R_CHUNK_PTR = int(os.environ.get("WAN_INT8_LORA_R_CHUNK_PTR", "16"))
LORA_R_CHUNK_TMA = int(os.environ.get("WAN_INT8_LORA_R_CHUNK_TMA", "32"))
# With FLATTEN, the pipeliner multi-buffers the epilogue's LoRA TMA loads (shared memory grows with R: 205 KB
# at R=64, 329 KB at R=128): FLATTEN configs are dropped above this padded rank.
LORA_FLATTEN_MAX_R = 64


# Block epilogue (GELU / gated residual) of 128x256 TMA tiles applied per stored half (fewer live registers).
POST_HALVES = os.environ.get("WAN_INT8_GEMM_POST_HALVES", "1") == "1"
# ... with the residual tile through a tensor descriptor (needs POST_HALVES).
RES_TMA_DEFAULT = os.environ.get("WAN_INT8_GEMM_RES_TMA", "1") == "1"


def lora_constexprs(lsig: Optional[tuple], use_tma: bool) -> dict:
    """The kernel's LoRA constexprs for a LoRA signature (dtype, R, strides, TMA-loadable) or None (no LoRA)."""
    if lsig is None:
        return dict(HAS_LORA=False)
    dtype, r, tma_ok = lsig[0], lsig[1], lsig[4]
    lora_tma = bool(use_tma and tma_ok)
    rc = LORA_R_CHUNK_TMA if lora_tma else LORA_R_CHUNK_PTR
    if r <= 16:
        rc = 16
    r_pad = -(-r // rc) * rc
    interp = interpreting()
    out = dict(HAS_LORA=True, R_PAD=r_pad, R_CHUNK=rc, EVEN_R=r == r_pad,
               LORA_F32=1 if interp else 2 if dtype == torch.float32 else 0)
    if use_tma:
        out["LORA_TMA"] = lora_tma
    return out


def _prune_configs(configs, named_args, **kwargs):
    if kwargs.get("HAS_LORA") and kwargs.get("LORA_TMA") and kwargs.get("R_PAD", 0) > LORA_FLATTEN_MAX_R:
        kept = [c for c in configs if not c.kwargs.get("FLATTEN")]
        return kept or configs
    return configs


# Hopper, M > 1024: the warp-specialised Gluon GEMM (gluon_gemm.py) where it can run, with the LoRA (bf16/fp16,
# R <= 128) and the block epilogues (GELU, residual, gated residual).  H100 (Triton 3.6, M=32760, Wan-14B shapes,
# GEMM alone): 1.75-1.95x bf16 where the persistent TMA kernel ran 1.51-1.59x; group scales 1.23-1.37x where the
# Triton kernel's whole linear ran 0.69-0.79x (bench/RESULTS.md runs 35-44).  WAN_INT8_GEMM_GLUON=0 turns it off.
GLUON_DEFAULT = os.environ.get("WAN_INT8_GEMM_GLUON", "1") == "1"


class _GluonPlan:
    """A plan entry running the Gluon GEMM (same hot-path interface as `triton_launch.Launcher.keyed`): its checks
    were made by `_gluon_refusal` for the call signature, so each call goes to `gluon_gemm.launch` directly."""

    def __init__(self, has_bias: bool, act: int, res_mode: int, has_lora: bool):
        from .gluon_gemm import launch
        self.launch = launch
        self.has_bias = has_bias
        self.act = act
        self.res_mode = res_mode
        self.has_lora = has_lora

    def keyed(self, spec, grid, args):
        a, b, c, sx, sw, bias = args[:6]
        lora_t, lora_b = (args[17], args[18]) if self.has_lora else (None, None)
        if self.res_mode:
            residual, gate, seq, per = args[22], args[23] if self.res_mode == 1 else None, args[25], args[26]
        else:
            residual = gate = None
            seq = per = 0
        self.launch(a, b, sx, sw, bias if self.has_bias else None, c.dtype, out=c, act=self.act,
                    residual=residual, gate=gate, seq=seq, per=per, lora_t=lora_t, lora_b=lora_b)


def _gluon_refusal(a, b, c, sw, m, mode, lsig, epi, args, res_flags) -> Optional[str]:
    """None when the Gluon GEMM takes this call; else why not: "" for calls it is not meant for (off Hopper,
    M <= 1024, tensor-wise scales: nothing to log), the reason otherwise."""
    if not GLUON_DEFAULT or m <= 1024 or _arch_cached(a.device) != "hopper" or mode == SW_TENSOR:
        return ""
    from .gluon_gemm import call_unsupported
    lora = (args[17], args[18]) if lsig is not None else (None, None)
    why = call_unsupported(a, b, sw, c.dtype, c, args[22] if epi.get("RES") else None, *lora)
    if why is None and epi.get("RES"):
        if not res_flags[0]:
            why = "a residual whose rows are not 16-byte aligned (TMA)"
        elif epi["RES"] == 1 and not res_flags[1]:
            why = "gate rows shared by runs of fewer than 256 tokens"
    return why


def _first_call(a, b, c, args, m, n, mode, group, has_bias, variant, config, lsig, epi, res_flags):
    """Resolve the variant and configuration for one call signature (autotuning if needed), run the call, and
    return the plan later calls of the signature launch directly."""
    from .triton_launch import Launcher
    arch = _arch_cached(a.device)
    k = a.shape[1]
    if variant == "gluon" or variant is None and config is None:
        why = _gluon_refusal(a, b, c, args[4], m, mode, lsig, epi, args, res_flags)
        if variant == "gluon" and why is not None:
            raise ValueError(f"the Gluon GEMM cannot run this call: {why or 'not a Hopper call with M > 1024'}")
        level = logging.INFO
        if why is None:
            plan = _GluonPlan(has_bias, epi["ACT"], epi["RES"], lsig is not None)
            try:
                plan.keyed(None, None, args)
                return plan, 1, 1, False
            except Exception as exc:
                from .triton_backend import _looks_like_compile_failure
                if variant == "gluon" or not _looks_like_compile_failure(exc):
                    raise
                why = f"it failed to build: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                level = logging.WARNING
        if why:
            log_once(f"gemm gluon: {why}", level, "INT8 GEMM: the warp-specialised Gluon kernel is not used "
                     "(%s); the Triton kernel runs", why, logger=log.name)
    if variant is None:
        variant = "ptr"
        if PERSISTENT_DEFAULT and arch == "hopper" and m > 1024 and mode != SW_GROUP \
                and tma_supported(a.device) is None \
                and _tma_operands_ok(a, b, c):
            variant = "tma"
    if variant in ("tma", "persistent"):
        use_tma = variant == "tma"
        if use_tma:
            why = tma_supported(a.device)
            if why is not None or not _tma_operands_ok(a, b, c):
                raise ValueError(f"TMA GEMM cannot run here: {why or 'operands not contiguous/16-byte aligned'}")
            _ensure_allocator()
        nsm = _num_sms(a.device)

        def pgrid(meta):
            return (max(1, min(nsm, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]))),)
        fixed = dict(SW_MODE=mode, GROUP_K=group, HAS_BIAS=has_bias, NUM_SMS=nsm, USE_TMA=use_tma,
                     **lora_constexprs(lsig, use_tma), **epi, POST_HALVES=POST_HALVES,
                     RES_TMA=bool(res_flags[0] and use_tma and RES_TMA_DEFAULT), GATE_TWO=bool(res_flags[1]))
        if config is not None:
            cfg = dict(config)
            cfg.setdefault("FLATTEN", False)
            cfg.setdefault("WARP_SPEC", False)
            cfg.setdefault("EPI", 0)
            cfg.setdefault("FOLD", fold_default(group))
        else:
            fn = _kernel(arch, False, group, False, True)
            fn[pgrid](*args, **fixed)
            cfg = fn.best_config.all_kwargs()
        if cfg.get("FOLD") and not fold_default(group):
            cfg["FOLD"] = 0
        consts, opts = _split_config(cfg)
        launcher = Launcher(_int8_gemm_persistent_kernel, {**consts, **fixed}, opts)
        if config is not None:
            launcher(pgrid(consts), *args)
        return launcher, consts["BLOCK_M"], consts["BLOCK_N"], True

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    fixed = dict(SW_MODE=mode, GROUP_K=group, HAS_BIAS=has_bias, **lora_constexprs(lsig, False), **epi)
    if config is not None:
        cfg = dict(config)
        cfg.setdefault("FOLD", fold_default(group))
    else:
        fn = _kernel(arch, m <= SMALL_M, group, SMALL_M < m <= 1024)
        fn[grid](*args, **fixed)
        cfg = fn.best_config.all_kwargs()
    if cfg.get("FOLD") and not fold_default(group):
        cfg["FOLD"] = 0   # magic-number fold only where a group's partial fits 2^22
    consts, opts = _split_config(cfg)
    consts["EVEN_K"] = k % consts["BLOCK_K"] == 0
    launcher = Launcher(_int8_gemm_kernel, {**consts, **fixed}, opts)
    if config is not None:
        launcher(grid(consts), *args)
    return launcher, consts["BLOCK_M"], consts["BLOCK_N"], False


def best_configs() -> Dict[str, str]:
    """The configuration each autotuned wrapper picked, per key (for logs and the benchmark)."""
    out = {}
    for key, fn in _KERNELS.items():
        for tkey, cfg in getattr(fn, "cache", {}).items():
            out[f"{key} {tkey}"] = str(cfg)
    return out
