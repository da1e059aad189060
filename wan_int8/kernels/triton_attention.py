"""Triton INT8 attention: INT8 Q·Kᵀ (per-token scales, K mean-smoothed), fp32 online softmax, P·V in fp8 e4m3
(Hopper/Ada) or in the inputs' 16-bit dtype (Ampere and older), for non-causal attention without a mask.

Contract: `wan_int8.attention.int8_attention_reference` (the torch oracle).  Two kernels:

- `_quant_tokens_kernel` reads q or k in their own layout ([B, L, H, D], any strides), optionally subtracts the
  per-(b, h) channel mean (K smoothing: q·mean is the same for every key of a row, so softmax is unchanged),
  and writes int8 codes [B*H, Lp, Dp] and fp32 scales [B*H, Lp] (Lp: L padded to 128, Dp: D padded to a power
  of two >= 16; padding is zero).  Q's scale carries softmax_scale·log2(e), so the kernel works in exp2.
- `_v_fp8_kernel` writes V as fp8 e4m3, transposed per head to [B*H, Dp, Lkp] (the fp8 wgmma wants the reduction
  dim contiguous in both operands), scaled per channel by amax/448.
- `_attn_kernel` streams K/V blocks past a resident Q block.  P is produced as exp2(s - m + log2 448), i.e.
  already scaled to e4m3's range, so the fp8 cast needs no multiply; every block's P·V goes into a fresh fp32
  accumulator that is then added (two-level accumulation: Hopper's fp8 MMA keeps fewer accumulator bits).
  The int32 scores become fp32 by the exact magic-number trick (|s| <= 128·127² < 2^22), not I2F.

The CPU interpreter's fp32->fp8 conversion rounds wrongly across powers of two (7.87 -> 4.0 in Triton 3.9), so
under TRITON_INTERPRET the kernels round to e4m3 precision by integer arithmetic first (exact values convert
correctly); on a GPU the hardware cvt (round-to-nearest-even, saturating) is used.  Its 16-bit tl.dot is wrong
too, so there the fp16/bf16 P·V runs on the same rounded operands upcast to fp32.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import torch

import triton
import triton.language as tl

from .triton_gemm import _autotune_kwargs, _ensure_allocator, _i2f_exact, tma_supported
from .triton_launch import interpreting

FP8_MAX = 448.0
LOG2E = 1.4426950408889634
LOG2_FP8_MAX = math.log2(FP8_MAX)
SEQ_PAD = 128          # L is padded to this for the int8/fp8 copies: every kernel block size divides it
QMAX = 127.0
TMA_DEFAULT = os.environ.get("WAN_INT8_ATTN_TMA", "1") == "1"   # tensor-descriptor (TMA) loads on Hopper
EXP_F16_DEFAULT = os.environ.get("WAN_INT8_ATTN_EXP16", "0") == "1"   # fp8 P·V: exp2 on fp16 pairs (GPU)
# Run 20 (H100): no gain (31.3 vs 30.9 ms at L=32760, 165 vs 160 ms at 75600): the exponentials are not the
# limit, the loop's lack of overlap between tensor-core and softmax work is. Off by default.


@triton.jit
def _round_e4m3(x):
    """Round non-negative-or-negative fp32 |x| <= 448 to e4m3's grid (3 mantissa bits, subnormal step 2^-9), RNE,
    by integer arithmetic: the interpreter's own conversion is wrong, an exact value converts correctly."""
    a = tl.abs(x)
    u = a.to(tl.int32, bitcast=True)
    normal = (u + 0x7FFFF + ((u >> 20) & 1)) & ~0xFFFFF
    r = tl.where(a >= 0.015625, normal.to(tl.float32, bitcast=True), ((a * 512.0 + 12582912.0) - 12582912.0) / 512.0)
    r = tl.minimum(r, 448.0)
    return tl.where(x < 0, -r, r)


@triton.jit
def _to_fp8(x, EMULATE: tl.constexpr):
    if EMULATE:
        x = _round_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _token_tile(H, L, D, BLOCK_L: tl.constexpr, DP: tl.constexpr):
    """This program's (b*H + h, b, h, token offsets, channel offsets, in-bounds mask) for the [B, L, H, D] passes."""
    bh = tl.program_id(1).to(tl.int64)
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, DP)
    return bh, bh // H, bh % H, offs_l, offs_d, (offs_l[:, None] < L) & (offs_d[None, :] < D)


@triton.jit
def _quant_tokens_kernel(x_ptr, mean_ptr, q_ptr, s_ptr, H, L, D, Lp, mul,
                         stride_b, stride_l, stride_h, stride_d,
                         HAS_MEAN: tl.constexpr, PER_BLOCK: tl.constexpr, DP: tl.constexpr, BLOCK_L: tl.constexpr):
    bh, b, h, offs_l, offs_d, mask = _token_tile(H, L, D, BLOCK_L, DP)
    ptrs = x_ptr + b * stride_b + h * stride_h + offs_l[:, None].to(tl.int64) * stride_l + offs_d[None, :] * stride_d
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:
        mu = tl.load(mean_ptr + bh * D + offs_d, mask=offs_d < D, other=0.0)
        x = tl.where(mask, x - mu[None, :], 0.0)
    amax = tl.max(tl.abs(x), axis=1)
    if PER_BLOCK:   # one scale for the block's tokens (K: the attention kernel then scales a score tile by a vector)
        amax = tl.zeros_like(amax) + tl.max(amax, axis=0)
    scale = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    v = tl.minimum(tl.maximum(x * inv[:, None], -127.0), 127.0)
    code = (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000     # round half even, exact
    tl.store(q_ptr + bh * Lp * DP + offs_l[:, None].to(tl.int64) * DP + offs_d[None, :], code.to(tl.int8))
    tl.store(s_ptr + bh * Lp + offs_l, scale * mul)


@triton.jit
def _v_fp8_kernel(v_ptr, vs_ptr, out_ptr, H, L, D, Lp,
                  stride_b, stride_l, stride_h, stride_d,
                  DP: tl.constexpr, BLOCK_L: tl.constexpr, EMULATE_FP8: tl.constexpr):
    bh, b, h, offs_l, offs_d, mask = _token_tile(H, L, D, BLOCK_L, DP)
    x = tl.load(v_ptr + b * stride_b + h * stride_h + offs_l[:, None].to(tl.int64) * stride_l
                + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    vs = tl.load(vs_ptr + bh * DP + offs_d)                     # amax / 448 (0 for an all-zero channel)
    inv = tl.where(vs > 0, 1.0 / tl.maximum(vs, 1e-30), 0.0)
    y = _to_fp8(tl.minimum(tl.maximum(x * inv[None, :], -448.0), 448.0), EMULATE_FP8)
    tl.store(out_ptr + bh * DP * Lp + offs_d[None, :].to(tl.int64) * Lp + offs_l[:, None], y)


@triton.jit
def _exp2_f16x2(x):
    """exp2 of fp16 values two at a time (one MUFU op per pair): half the exponential cost of fp32 exp2."""
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _scores(q, k_desc, k_base, row_k, start_n, offs_n, offs_d, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Q·K_blockᵀ in int32 (|s| <= 128*127^2 < 2^22)."""
    if USE_TMA:
        k = k_desc.load([row_k + start_n, 0])                                         # [BN, Dp] int8
    else:
        k = tl.load(k_base + (start_n + offs_n)[:, None] * HEAD_DIM + offs_d[None, :])  # (padded: no mask)
    return tl.dot(q, tl.trans(k))


@triton.jit
def _attn_step(acc, l_i, m_i, s, qs, ks_base, v_desc, v_base, row_v, start_n, Lk, D,
               stride_vl, stride_vd, Lkp, offs_n, offs_d,
               HEAD_DIM: tl.constexpr, PV_FP8: tl.constexpr, MASK: tl.constexpr, EVEN_D: tl.constexpr,
               EMULATE_FP8: tl.constexpr, P_SHIFT: tl.constexpr, USE_TMA: tl.constexpr, EXP_F16: tl.constexpr):
    cols = start_n + offs_n
    c = qs * tl.load(ks_base + start_n)          # [BM]: s_q[i] * s_k(block) * softmax_scale * log2(e)
    if MASK:
        u = tl.where(cols[None, :] < Lk, _i2f_exact(s) * c[:, None], float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(u, 1))
        p = tl.math.exp2(u - (m_ij[:, None] - P_SHIFT))
    else:
        # the row max on the integers; the int->float conversion folded into the exp2 argument's one FMA:
        # float_bits(s + 0x4B400000) = s + 1.5*2^23 exactly, so s*c - m = bits*c - (m + 1.5*2^23*c)
        m_ij = tl.maximum(m_i, tl.max(s, 1).to(tl.float32) * c)
        off = m_ij - P_SHIFT + 12582912.0 * c
        p = (s + 0x4B400000).to(tl.float32, bitcast=True) * c[:, None] - off[:, None]
        if EXP_F16:   # P is rounded to fp8 next: an fp16 exponent argument and result lose nothing that matters
            p = _exp2_f16x2(p.to(tl.float16))
        else:
            p = tl.math.exp2(p)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    if PV_FP8:
        if USE_TMA:
            vt = v_desc.load([row_v, start_n])                                # [Dp, BN] fp8
        else:
            vt = tl.load(v_base + offs_d[:, None] * Lkp + cols[None, :])      # (padded: no mask)
        acc = acc * alpha[:, None] + tl.dot(_to_fp8(p, EMULATE_FP8), tl.trans(vt))
    else:
        vptrs = v_base + cols[:, None].to(tl.int64) * stride_vl + offs_d[None, :] * stride_vd
        if MASK:
            v = tl.load(vptrs, mask=(cols[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
        elif EVEN_D:
            v = tl.load(vptrs)
        else:
            v = tl.load(vptrs, mask=offs_d[None, :] < D, other=0.0)
        if EMULATE_FP8:   # the interpreter: its 16-bit dot is wrong; the same rounded operands in fp32
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_ij


@triton.jit
def _attn_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr,
                 H, Lq, Lk, D, Lqp, Lkp,
                 stride_vb, stride_vl, stride_vh, stride_vd,
                 stride_ob, stride_ol, stride_oh, stride_od,
                 LQ_BUCKET, LK_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PV_FP8: tl.constexpr, EVEN_D: tl.constexpr, EMULATE_FP8: tl.constexpr, P_SHIFT: tl.constexpr,
                 USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, PIPELINE: tl.constexpr, EXP_F16: tl.constexpr):
    # P_SHIFT: log2(448) on the fp8 path (P = exp2(s - m + P_SHIFT) lands in e4m3's range), else 0
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    BH = tl.num_programs(1)
    row_k = (bh * Lkp).to(tl.int32)
    row_v = (bh * HEAD_DIM).to(tl.int32)
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[BH * Lqp, HEAD_DIM], strides=[HEAD_DIM, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[BH * Lkp, HEAD_DIM], strides=[HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        q = q_desc.load([(bh * Lqp).to(tl.int32) + pid_m * BLOCK_M, 0])
    else:
        k_desc = k_ptr
        q = tl.load(q_ptr + bh * Lqp * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    qs = tl.load(qs_ptr + bh * Lqp + offs_m)
    k_base = k_ptr + bh * Lkp * HEAD_DIM
    ks_base = ks_ptr + bh * Lkp
    if PV_FP8:
        v_base = v_ptr + bh * HEAD_DIM * Lkp
        if USE_TMA:
            v_desc = tl.make_tensor_descriptor(v_ptr, shape=[BH * HEAD_DIM, Lkp], strides=[Lkp, 1],
                                               block_shape=[HEAD_DIM, BLOCK_N])
        else:
            v_desc = v_ptr
    else:
        v_base = v_ptr + b * stride_vb + h * stride_vh
        v_desc = v_ptr
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    if PIPELINE:
        # QK of the next block is issued before this block's softmax, so the tensor cores work while the
        # exponentials run (K is padded by one block: the last prefetch stays in bounds)
        s = _scores(q, k_desc, k_base, row_k, 0, offs_n, offs_d, HEAD_DIM, USE_TMA)
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            s_next = _scores(q, k_desc, k_base, row_k, start_n + BLOCK_N, offs_n, offs_d, HEAD_DIM, USE_TMA)
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, s, qs, ks_base, v_desc, v_base, row_v, start_n, Lk, D,
                                       stride_vl, stride_vd, Lkp, offs_n, offs_d,
                                       HEAD_DIM, PV_FP8, False, EVEN_D, EMULATE_FP8, P_SHIFT, USE_TMA, EXP_F16)
            s = s_next
    else:
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            s = _scores(q, k_desc, k_base, row_k, start_n, offs_n, offs_d, HEAD_DIM, USE_TMA)
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, s, qs, ks_base, v_desc, v_base, row_v, start_n, Lk, D,
                                       stride_vl, stride_vd, Lkp, offs_n, offs_d,
                                       HEAD_DIM, PV_FP8, False, EVEN_D, EMULATE_FP8, P_SHIFT, USE_TMA, EXP_F16)
    if n_full < Lk:
        s = _scores(q, k_desc, k_base, row_k, n_full, offs_n, offs_d, HEAD_DIM, USE_TMA)
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, s, qs, ks_base, v_desc, v_base, row_v, n_full, Lk, D,
                                   stride_vl, stride_vd, Lkp, offs_n, offs_d,
                                   HEAD_DIM, PV_FP8, True, EVEN_D, EMULATE_FP8, P_SHIFT, USE_TMA, EXP_F16)
    if PV_FP8:
        vs = tl.load(vs_ptr + bh * HEAD_DIM + offs_d)
        out = acc * (vs[None, :] / l_i[:, None])
    else:
        out = acc / l_i[:, None]
    optrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :] * stride_od
    tl.store(optrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))


# -- configurations -----------------------------------------------------------------------------------------------

def _cfg(bm: int, bn: int, warps: int, stages: int, ws: bool = False, pipe: bool = False,
         maxnreg: Optional[int] = None) -> dict:
    c = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, WARP_SPEC=ws, PIPELINE=pipe)
    if maxnreg:
        c["maxnreg"] = maxnreg   # a register cap: more CTAs per SM to interleave softmax with the other's MMAs
    return c


_CONFIGS: Dict[str, List[dict]] = {
    "hopper": [_cfg(128, 128, 8, 3), _cfg(64, 128, 4, 3), _cfg(64, 128, 4, 3, True),
               _cfg(128, 128, 8, 3, pipe=True), _cfg(64, 128, 4, 3, pipe=True), _cfg(128, 128, 8, 2, pipe=True),
               _cfg(64, 128, 4, 2, pipe=True), _cfg(128, 64, 4, 3, pipe=True),
               # runs 29-30 (H100): a 168-register cap (3 CTAs per SM instead of 2), 2 stages: 28.9 ms alone at
               # L=32760 (the autotuned set 27.7-29.4 ms, before 29.7-30.3); L=75600 151.6 ms (before 160-165 ms);
               # a 128-register cap spills (47 ms)
               _cfg(64, 128, 4, 2, maxnreg=168), _cfg(64, 128, 4, 3, maxnreg=168)],
    "ada": [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3), _cfg(64, 128, 4, 3)],
    "ampere": [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3), _cfg(64, 128, 4, 2)],
    "interpret": [_cfg(32, 16, 4, 1, pipe=True)],
}
_CONFIG_OVERRIDE: Optional[List[dict]] = None
_KERNELS: Dict[tuple, object] = {}


def _check_config(c: dict) -> dict:
    """The kernel takes one K scale per step: a step of BLOCK_N keys must lie inside one SEQ_PAD block of keys
    (BLOCK_N = 256 read one scale for two blocks: cosine 0.983, run 29)."""
    if SEQ_PAD % c["BLOCK_N"]:
        raise ValueError(f"attention BLOCK_N {c['BLOCK_N']} must divide the K-scale block {SEQ_PAD}")
    return c


def set_config_override(configs: Optional[List[dict]]) -> None:
    """Benchmarks only: restrict the autotuner to these configurations (None restores the defaults)."""
    global _CONFIG_OVERRIDE
    _CONFIG_OVERRIDE = [_check_config(dict(c)) for c in configs] if configs else None
    _KERNELS.clear()


def arch_of(device: torch.device) -> str:
    if interpreting() or device.type != "cuda":
        return "interpret"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "hopper"
    if (major, minor) >= (8, 9):
        return "ada"
    return "ampere"


def fp8_pv_supported(device: torch.device) -> bool:
    """fp8 tensor cores: Ada (sm_89) and Hopper and later.  The interpreter runs the fp8 path too (emulated)."""
    return arch_of(device) in ("hopper", "ada", "interpret")


def _kernel(arch: str):
    key = (arch, None if _CONFIG_OVERRIDE is None else tuple(tuple(sorted(c.items())) for c in _CONFIG_OVERRIDE))
    fn = _KERNELS.get(key)
    if fn is None:
        configs = []
        for c in (_CONFIG_OVERRIDE or _CONFIGS[arch]):
            c = _check_config(dict(c))
            warps, stages, nreg = c.pop("num_warps"), c.pop("num_stages"), c.pop("maxnreg", None)
            configs.append(triton.Config(c, num_warps=warps, num_stages=stages, maxnreg=nreg))
        fn = triton.autotune(configs=configs, key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "PV_FP8", "EVEN_D", "USE_TMA",
                                                   "EXP_F16"],
                             **_autotune_kwargs())(_attn_kernel)
        _KERNELS[key] = fn
    return fn


def _bucket(n: int) -> int:
    """Sequence-length bucket for the autotune key: powers of two (tuning per exact L would retune each video)."""
    return 1 << max(n - 1, 1).bit_length()


def padded_head_dim(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _padded_len(n: int) -> int:
    return -(-n // SEQ_PAD) * SEQ_PAD


def quantize_tokens(x: torch.Tensor, mean: Optional[torch.Tensor], mul: float,
                    per_block: bool = False, extra: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> int8 [B*H, Lp, Dp], fp32 scales [B*H, Lp] (times `mul`); `mean` [B, H, D] fp32 or None.
    per_block: one scale per SEQ_PAD tokens (stored for each of them), as the attention kernel wants for K;
    extra: more zero rows of padding (K: one block, for the kernel's prefetch of the next block)."""
    b, n, h, d = x.shape
    dp, lp = padded_head_dim(d), _padded_len(n) + extra
    codes = torch.empty((b * h, lp, dp), dtype=torch.int8, device=x.device)
    scales = torch.empty((b * h, lp), dtype=torch.float32, device=x.device)
    block = SEQ_PAD if per_block else 64
    grid = (lp // block, b * h)
    _quant_tokens_kernel[grid](x, mean if mean is not None else scales, codes, scales, h, n, d, lp, float(mul),
                               *x.stride(), HAS_MEAN=mean is not None, PER_BLOCK=per_block, DP=dp, BLOCK_L=block,
                               num_warps=8 if block * dp >= 16384 else 4)
    return codes, scales


def quantize_v_fp8(v: torch.Tensor, extra: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """v [B, L, H, D] -> fp8 e4m3 [B*H, Dp, Lp] (transposed; Lp = L padded to SEQ_PAD, plus `extra` zero columns,
    so that it matches K's padding) and fp32 per-channel scales [B*H, Dp] (amax/448)."""
    b, n, h, d = v.shape
    dp, lp = padded_head_dim(d), _padded_len(n) + extra
    vs = torch.zeros((b, h, dp), dtype=torch.float32, device=v.device)
    # max |v| per channel in one reduction (v.abs() would first write a copy of V: ~0.2 ms at L=32760)
    vs[..., :d] = torch.linalg.vector_norm(v, ord=float("inf"), dim=1).float() / FP8_MAX
    vs = vs.reshape(b * h, dp)
    out = torch.empty((b * h, dp, lp), dtype=torch.float8_e4m3fn, device=v.device)
    block = 64
    grid = (lp // block, b * h)
    _v_fp8_kernel[grid](v, vs, out, h, n, d, lp, *v.stride(), DP=dp, BLOCK_L=block, EMULATE_FP8=interpreting())
    return out, vs


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pv_fp8: bool,
                   smooth_k: bool = True, out: Optional[torch.Tensor] = None, kernel: str = "triton") -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] (any strides; 16-bit or fp32) -> [B, Lq, H, D] in q's dtype.
    kernel: "triton" (`_attn_kernel`) or "gluon" (gluon_attention: Hopper, fp8 P·V; the same quantized inputs)."""
    if kernel == "gluon" and not pv_fp8:
        raise ValueError("the Gluon attention kernel runs P·V in fp8 only")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    mean = k.mean(dim=1, dtype=torch.float32).contiguous() if smooth_k else None
    q8, qs = quantize_tokens(q, None, scale * LOG2E)
    k8, ks = quantize_tokens(k, mean, 1.0, per_block=True, extra=SEQ_PAD)
    if pv_fp8:
        vq, vs = quantize_v_fp8(v, extra=SEQ_PAD)
        sv = (0, 0, 0, 0)
    else:
        vq, vs = (v if v.dtype in (torch.float16, torch.bfloat16) else v.to(torch.bfloat16)), qs
        sv = vq.stride()
    if out is None:
        out = torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device)
    if kernel == "gluon":
        from .gluon_attention import attention as gluon_attention
        return gluon_attention(q8, qs, k8, ks, vq, vs, out, h, lq, lk)
    dp = q8.shape[-1]
    use_tma = pv_fp8 and TMA_DEFAULT and tma_supported(q.device) is None
    if use_tma and not interpreting():
        _ensure_allocator()
    fn = _kernel(arch_of(q.device))

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), b * h)

    fn[grid](q8, qs, k8, ks, vq, vs, out, h, lq, lk, d, q8.shape[1], k8.shape[1], *sv, *out.stride(),
             _bucket(lq), _bucket(lk), HEAD_DIM=dp, PV_FP8=pv_fp8, EVEN_D=dp == d, EMULATE_FP8=interpreting(),
             P_SHIFT=LOG2_FP8_MAX if pv_fp8 else 0.0, USE_TMA=use_tma,
             EXP_F16=pv_fp8 and EXP_F16_DEFAULT and q.device.type == "cuda" and not interpreting())
    return out
