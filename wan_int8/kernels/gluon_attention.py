"""Hopper INT8 attention in Gluon: the numerics of `_attn_kernel` (triton_attention.py) on the same quantized
inputs, laid out as FlashAttention-3 is: warp-specialised, several consumer warpgroups sharing each K/V tile.

Why (runs 18-32, H100): the Triton kernel's best configuration gives each CTA one warpgroup of 64 query rows,
three CTAs per SM.  Every CTA streams its head's whole K and V from L2, so at L=32760 the kernel pulls ~170 GB
through L2 in ~29 ms (~5.8 TB/s, about what an H100's L2 delivers).  Triton CTAs of 128 rows (two warpgroups)
measured slower (31-32 ms): we read that as the two warpgroups running in lockstep, both waiting on the tensor
cores at once.  Here one producer warpgroup loads K and Vᵀ tiles by TMA into a ring of shared-memory stages and
`NUM_CONSUMERS` consumer warpgroups (64 query rows each) read every stage, synchronised only through mbarriers:
three consumers cut the L2 traffic to a third and the warp schedulers interleave one consumer's softmax with
another's MMAs (run 32: 24.5 ms against the Triton kernel's 29.5 at L=32760).

Per step of BLOCK_N keys, per consumer (the Triton kernel's `_attn_step`, unmasked and tail-masked forms):
S = Q·Kᵀ (int8 wgmma, int32), the row max on the integers, P = exp2(S·c - m + log2 448) with the int->float
conversion folded into the FMA (magic number), O rescaled by exp2(m_old - m_new), then P·V in fp8 (wgmma, P from
registers).  P·V accumulates across blocks in the tensor cores (TWO_LEVEL=False: 64 registers fewer per consumer,
fit the registers only so) or, as in the Triton kernel, in a fresh fp32 tile added on the CUDA cores (the
default).  Cosine to SDPA: 0.99922 / 0.99919 single-level against 0.99923 two-level at L=32760 / 75600 (run 33).

Gluon has no CPU interpreter: this kernel runs only on a CUDA Hopper GPU (tests/test_attention.py checks it
against the torch oracle and the Triton kernel there); everywhere else the Triton kernel runs.
"""
from __future__ import annotations

from typing import Optional

import torch

import triton

from .gluon_common import TensorDescriptor, gl, gluon, hopper_unavailable, mbarrier, tma, warpgroup_mma

P_SHIFT_FP8 = 8.807354922057604   # log2(448)


def unavailable(device: torch.device, head_dim: int, forced: bool = False) -> Optional[str]:
    """Why the Gluon attention kernel cannot run here (None: it can); forced: AttentionConfig(backend="gluon")."""
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} (the Gluon kernel takes 64 or 128)"
    why = hopper_unavailable(device, "attention kernel", forced)
    if why is not None and why.startswith("Triton "):
        why += " (AttentionConfig(backend='gluon') tries it anyway)"
    return why


if gluon is not None:

    @gluon.jit
    def _producer(t, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  NUM_CONSUMERS: gl.constexpr, CID: gl.constexpr, P_SHIFT: gl.constexpr, TWO_LEVEL: gl.constexpr):
        """Q for every consumer, then K and V^T tiles into the stage ring, as fast as the consumers free stages.
        t: the run-time arguments shared by all partitions (see `_attn_ws_kernel`)."""
        (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, kv_ready, kv_empty, qs_ptr, ks_ptr, vs_ptr, o_ptr,
         Lq, Lk, Lqp, Lkp, stride_ob, stride_ol, stride_oh, stride_od, H) = t
        bh = gl.program_id(1)
        row_q = bh * Lqp + gl.program_id(0) * (BLOCK_M * NUM_CONSUMERS)
        q_bytes: gl.constexpr = NUM_CONSUMERS * BLOCK_M * HEAD_DIM          # int8 Q tiles
        kv_bytes: gl.constexpr = 2 * BLOCK_N * HEAD_DIM                    # an int8 K tile and an fp8 V^T tile
        mbarrier.expect(q_bar, q_bytes)
        for c in gl.static_range(NUM_CONSUMERS):
            tma.async_copy_global_to_shared(q_desc, [row_q + c * BLOCK_M, 0], q_bar, q_bufs.index(c))
        n_blocks = gl.cdiv(Lk, BLOCK_N)
        for i in range(n_blocks):
            s = i % STAGES
            mbarrier.wait(kv_empty.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(kv_ready.index(s), kv_bytes)
            tma.async_copy_global_to_shared(k_desc, [bh * Lkp + i * BLOCK_N, 0], kv_ready.index(s), k_bufs.index(s))
            tma.async_copy_global_to_shared(v_desc, [bh * HEAD_DIM, i * BLOCK_N], kv_ready.index(s),
                                            v_bufs.index(s))

    @gluon.jit
    def _step(acc, l_i, m_i, q_smem, k_smem, v_smem, c, cols, Lk,
              s_layout: gl.constexpr, p_layout: gl.constexpr, o_layout: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, P_SHIFT: gl.constexpr,
              MASK: gl.constexpr, TWO_LEVEL: gl.constexpr):
        """One block of BLOCK_N keys for one consumer (MASK: the ragged last block); Gluon's twin of the Triton
        kernel's `_attn_step` (fp8 P·V path)."""
        s = warpgroup_mma(q_smem, k_smem.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout),
                          use_acc=False)
        if MASK:
            u = gl.where(cols[None, :] < Lk, s.to(gl.float32) * c[:, None], float("-inf"))
            m_ij = gl.maximum(m_i, gl.max(u, 1))
            p = gl.exp2(u - (m_ij[:, None] - P_SHIFT))
        else:
            # float_bits(s + 0x4B400000) = s + 1.5*2^23 exactly (|s| < 2^22): s*c - m = bits*c - (m + 1.5*2^23*c)
            m_ij = gl.maximum(m_i, gl.max(s, 1).to(gl.float32) * c)
            off = m_ij - P_SHIFT + 12582912.0 * c
            p = (s + 0x4B400000).to(gl.float32, bitcast=True) * c[:, None] - off[:, None]
            p = gl.exp2(p)
        alpha = gl.exp2(m_i - m_ij)
        l_i = l_i * alpha + gl.sum(p, 1)
        p8 = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
        alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
        if TWO_LEVEL:   # this block's P·V in a fresh fp32 tile, added on the CUDA cores
            pv = warpgroup_mma(p8, v_smem.permute((1, 0)), gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout),
                               use_acc=False)
            acc = acc * alpha_o[:, None] + pv
        else:           # accumulated by the tensor cores (64 registers fewer; fp8 MMA accumulation precision)
            acc = warpgroup_mma(p8, v_smem.permute((1, 0)), acc * alpha_o[:, None], use_acc=True)
        return acc, l_i, m_ij

    @gluon.jit
    def _consumer(t, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  NUM_CONSUMERS: gl.constexpr, CID: gl.constexpr, P_SHIFT: gl.constexpr, TWO_LEVEL: gl.constexpr):
        """Consumer CID: query rows [CID*BLOCK_M, (CID+1)*BLOCK_M) of the CTA's block, over every K/V stage."""
        (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, kv_ready, kv_empty, qs_ptr, ks_ptr, vs_ptr, o_ptr,
         Lq, Lk, Lqp, Lkp, stride_ob, stride_ol, stride_oh, stride_od, H) = t
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        bh = gl.program_id(1)
        m0 = gl.program_id(0) * (BLOCK_M * NUM_CONSUMERS) + CID * BLOCK_M
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=row_s)
        qs = gl.load(qs_ptr + bh * Lqp + offs_m, mask=offs_m < Lqp, other=0.0)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        q_smem = q_bufs.index(CID)
        mbarrier.wait(q_bar, 0)
        n_full = Lk // BLOCK_N
        for i in range(n_full):
            s = i % STAGES
            mbarrier.wait(kv_ready.index(s), (i // STAGES) & 1)
            c = qs * gl.load(ks_ptr + bh * Lkp + i * BLOCK_N)
            acc, l_i, m_i = _step(acc, l_i, m_i, q_smem, k_bufs.index(s), v_bufs.index(s), c, offs_n, Lk,
                                  s_layout, p_layout, o_layout, BLOCK_M, BLOCK_N, HEAD_DIM, P_SHIFT, False, TWO_LEVEL)
            mbarrier.arrive(kv_empty.index(s), count=1)
        if n_full * BLOCK_N < Lk:
            s = n_full % STAGES
            mbarrier.wait(kv_ready.index(s), (n_full // STAGES) & 1)
            c = qs * gl.load(ks_ptr + bh * Lkp + n_full * BLOCK_N)
            acc, l_i, m_i = _step(acc, l_i, m_i, q_smem, k_bufs.index(s), v_bufs.index(s), c,
                                  n_full * BLOCK_N + offs_n, Lk, s_layout, p_layout, o_layout,
                                  BLOCK_M, BLOCK_N, HEAD_DIM, P_SHIFT, True, TWO_LEVEL)
            mbarrier.arrive(kv_empty.index(s), count=1)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        offs_mo = m0 + gl.arange(0, BLOCK_M, layout=row_o)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        vs = gl.load(vs_ptr + bh * HEAD_DIM + offs_d)
        out = acc * (vs[None, :] / gl.convert_layout(l_i, row_o)[:, None])
        b = bh // H
        h = bh % H
        optrs = (o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
                 + offs_mo[:, None].to(gl.int64) * stride_ol + offs_d[None, :] * stride_od)
        gl.store(optrs, out.to(o_ptr.dtype.element_ty), mask=(offs_mo[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))

    @gluon.jit
    def _attn_ws_kernel(q_desc, k_desc, v_desc, qs_ptr, ks_ptr, vs_ptr, o_ptr, Lq, Lk, Lqp, Lkp,
                        stride_ob, stride_ol, stride_oh, stride_od, H,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        NUM_CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, P_SHIFT: gl.constexpr,
                        TWO_LEVEL: gl.constexpr):
        q_bufs = gl.allocate_shared_memory(gl.int8, [NUM_CONSUMERS, BLOCK_M, HEAD_DIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, HEAD_DIM, BLOCK_N], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=NUM_CONSUMERS)
        t = (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, kv_ready, kv_empty, qs_ptr, ks_ptr, vs_ptr, o_ptr,
             Lq, Lk, Lqp, Lkp, stride_ob, stride_ol, stride_oh, stride_od, H)
        # (the constexprs go to each partition by name: inside a tuple they would become run-time values)
        if NUM_CONSUMERS == 2:
            gl.warp_specialize(
                [(_producer, (t, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, 0, P_SHIFT, TWO_LEVEL)),
                 (_consumer, (t, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, 0, P_SHIFT, TWO_LEVEL)),
                 (_consumer, (t, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, 1, P_SHIFT, TWO_LEVEL))],
                [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
        else:
            gl.warp_specialize(
                [(_producer, (t, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, 0, P_SHIFT, TWO_LEVEL)),
                 (_consumer, (t, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, 0, P_SHIFT, TWO_LEVEL)),
                 (_consumer, (t, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, 1, P_SHIFT, TWO_LEVEL)),
                 (_consumer, (t, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, 2, P_SHIFT, TWO_LEVEL))],
                [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])


# Runs 32-33 (H100, L=32760 / 75600, ms; cosine to SDPA): 3 consumers (192 query rows per CTA), two-level
# 24.6 / 127.4 (0.99923 / 0.99923), single-level 24.3 / 128.5 (0.99922 / 0.99919), 2 or 4 stages within 1%;
# 2 consumers 27.9-31.8 / 145-159.  FA3's schedules (P·V of block j-1 under block j's softmax, with or without
# ping-pong between consumers) measured 15-160% slower.  Two-level at 3 consumers spills a few registers (160 each
# beside the producer's) yet costs nothing measurable, and keeps the Triton kernel's accuracy.
DEFAULT_CONFIG = dict(NUM_CONSUMERS=3, STAGES=3, TWO_LEVEL=True)
MIN_KEYS = 2048   # "auto" below this: the Triton kernel (512 text keys: 0.92 ms against the Gluon kernel's 1.32)
_CONFIG_OVERRIDE: Optional[dict] = None
BLOCK_M, BLOCK_N = 64, 128


def set_config_override(config: Optional[dict]) -> None:
    """Benchmarks and tests: run with these NUM_CONSUMERS / STAGES / TWO_LEVEL (None restores the default)."""
    global _CONFIG_OVERRIDE
    _CONFIG_OVERRIDE = dict(config) if config else None


def consumer_regs(consumers: int) -> int:
    """Registers per consumer thread; the producer warpgroup keeps 32 of the SM's 64K per thread."""
    return 240 if consumers == 2 else 160


def attention(q8: torch.Tensor, qs: torch.Tensor, k8: torch.Tensor, ks: torch.Tensor, vt: torch.Tensor,
              vs: torch.Tensor, out: torch.Tensor, heads: int, lq: int, lk: int) -> torch.Tensor:
    """The fp8 P·V attention on quantize_tokens/quantize_v_fp8 outputs (see triton_attention.int8_attention):
    q8 [BH, Lqp, D] int8, qs [BH, Lqp], k8 [BH, Lkp, D] int8, ks [BH, Lkp], vt [BH, D, Lkp] fp8, vs [BH, D];
    out [B, Lq, H, D] (any strides) is written and returned."""
    cfg = dict(DEFAULT_CONFIG, **(_CONFIG_OVERRIDE or {}))
    nc, stages = cfg["NUM_CONSUMERS"], cfg["STAGES"]
    if nc not in (2, 3):
        raise ValueError(f"Gluon attention: NUM_CONSUMERS must be 2 or 3, got {nc}")
    bh, lqp, d = q8.shape
    lkp = k8.shape[1]
    i8 = gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], gl.int8)
    q_desc = TensorDescriptor.from_tensor(q8.view(bh * lqp, d), [BLOCK_M, d], i8)
    k_desc = TensorDescriptor.from_tensor(k8.view(bh * lkp, d), [BLOCK_N, d],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], gl.int8))
    v_desc = TensorDescriptor.from_tensor(vt.view(bh * d, lkp), [d, BLOCK_N],
                                          gl.NVMMASharedLayout.get_default_for([d, BLOCK_N], gl.float8e4nv))
    grid = (triton.cdiv(lq, BLOCK_M * nc), bh)
    _attn_ws_kernel[grid](q_desc, k_desc, v_desc, qs, ks, vs, out, lq, lk, lqp, lkp, *out.stride(), heads,
                          HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=stages, NUM_CONSUMERS=nc,
                          CONSUMER_REGS=consumer_regs(nc), P_SHIFT=P_SHIFT_FP8, TWO_LEVEL=bool(cfg["TWO_LEVEL"]),
                          num_warps=4)
    return out
