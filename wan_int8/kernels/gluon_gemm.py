"""Hopper INT8 GEMMs in Gluon, warp-specialised: the GEMM `triton_gemm.int8_gemm` runs on Hopper for M > 1024
(`triton_gemm._gluon_refusal` says when it does not).

`y = sx[m] * sw[n] * (a[m] · b[n]) (+ bias)` (row scales) or `sx[m] * sum_g sw[n, g] * (a[m, g] · b[n, g])`
(group scales, one per 128-wide K-group), then the LoRA term `t · B_catᵀ` and the block epilogue (GELU; residual,
gated or not): the contract of `quant.int8.int8_linear_reference` and `block_epilogue_reference`, operations in
the Triton kernel's order.

Layout: a persistent grid; in each program one producer warpgroup streams A [64·C, 128] and B [BN, 128] tiles by
TMA into a ring of stages (running ahead into the next tile while the consumers finish one), and C consumer
warpgroups each own 64 rows of the 64·C x BN tile.  Tiles are ordered in GROUP_M bands so a wave of programs
shares its A and B tiles through L2.  Each consumer writes its tile through shared memory with one TMA store.
- Row scales: C = 2, 128x256 tiles (two N = 128 instructions: an int8 wgmma of N = 256 does not lower in Triton
  3.6), one int32 accumulator, one wgmma in flight, a stage released as the wgmma that read it retires.
- Group scales: each K-group's int32 partial is folded on the CUDA cores (magic-number int->float, exact since
  |partial| <= 128·127² < 2^22, then one FMA with the group's scales, loaded a step ahead).  C = 3 (default
  without LoRA or block epilogue): 192x128 tiles, one int32 tile per consumer, each folding after its own wgmma
  while the others' wgmmas run.  C = 2: 128x128 tiles, group g's wgmma in flight while group g-1 is folded, the
  loop alternating two int32 tiles so no tile is copied.  The tile size matters because the group loop is
  bound by L2 bandwidth (see bench/RESULTS.md runs 42-43).
- Residual and LoRA epilogues: 128-wide tiles; the residual tile comes by TMA into the consumer's output buffer;
  the producer loads the LoRA operands (R <= 128) once per tile and each consumer adds them with a 16-bit wgmma.

H100 (Triton 3.6, bench/RESULTS.md runs 35-44): row 1.75-2.15x bf16 GEMM alone at the Wan-14B shapes (the
persistent Triton TMA kernel 1.51-1.59x); group 1.23-1.37x (the Triton kernel's whole linear 0.69-0.86x).

Checked by tests/test_gluon.py on a Hopper GPU (WAN_INT8_TEST_DEVICE=cuda) against float64; timed by
`bench/linear.py` (op_*/raw_* go through the dispatcher; gluongemm_* call `ws_gemm` directly, with :s/:g/:c
suffixes for stages, GROUP_M and consumers).
"""
from __future__ import annotations

from typing import Optional

import torch

import triton

from .gluon_common import TensorDescriptor, gl, gluon, hopper_unavailable, mbarrier, tma, warpgroup_mma
from .gluon_common import fence_async_shared, warpgroup_mma_wait
from .triton_gemm import _num_sms

BLOCK_M = 128                 # two consumers x 64 rows (three consumers: 192, see `ws_gemm`)
WIDE_N, NARROW_N = 256, 128  # tile widths: row scales, or (narrow) group scales -- two int32 tiles and the fp32
                              # sum per consumer -- and residual epilogues (the residual tile beside y: spills)
BLOCK_K = 128                 # = the group size
CONSUMER_REGS = {2: 232, 3: 160}   # per consumer thread, by consumer count (the producer keeps the rest)


def unavailable(a: torch.Tensor, b: torch.Tensor, sw: torch.Tensor) -> Optional[str]:
    """Why the Gluon GEMM cannot take these operands (None: it can): row scales `sw [N]` or group scales
    `sw [N, K/128]`, K a multiple of 128, K-contiguous 16-byte aligned operands, a Hopper GPU."""
    k = a.shape[1]
    if sw.dim() == 2 and (k % sw.shape[1] or k // sw.shape[1] != BLOCK_K):
        return f"group scales {tuple(sw.shape)} for K={k}: the Gluon kernel takes groups of {BLOCK_K}"
    if sw.dim() not in (1, 2) or sw.shape[0] != b.shape[0]:
        return f"scales {tuple(sw.shape)}: the Gluon kernel takes row [N] or group [N, K/{BLOCK_K}] scales"
    if k % BLOCK_K:
        return f"K={k} is not a multiple of {BLOCK_K}"
    if a.stride(1) != 1 or b.stride(1) != 1 or (a.stride(0) % 16) or (b.stride(0) % 16):
        return "operands must be K-contiguous with 16-byte aligned rows (TMA)"
    return hopper_unavailable(a.device, "GEMM")


if gluon is not None:

    @gluon.jit
    def _tile_offsets(tile, tiles_m, tiles_n, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
        """Row and column offsets of tile number `tile`: GROUP_M row tiles sweep N together, so a wave of
        programs shares its A and B tiles through L2 (a wave walking M alone streams all of A once per column)."""
        in_group = GROUP_M * tiles_n
        first_m = (tile // in_group) * GROUP_M
        size_m = gl.minimum(tiles_m - first_m, GROUP_M)
        return (first_m + tile % size_m) * BM, ((tile % in_group) // size_m) * BN

    @gluon.jit
    def _producer(t, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, CID: gl.constexpr,
                  HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr, GROUP_M: gl.constexpr, LORA_CH: gl.constexpr,
                  LORA_BYTES: gl.constexpr, NC: gl.constexpr):
        """A [64·NC, BLOCK_K] and B [BN, BLOCK_K] tiles of every K step into the stage ring (and the LoRA operands
        once per tile)."""
        (a_desc, b_desc, c_desc, r_desc, a_bufs, b_bufs, c_bufs, ready, empty, rbar, sx_ptr, sw_ptr, bias_ptr,
         gate_ptr, M, N, K, stride_sw, SEQ, PER, stride_gb, stride_gg, lt_desc, lb_desc, lt_bufs, lb_bufs,
         l_ready, l_empty) = t
        step_bytes: gl.constexpr = (NC * 64 + BN) * BLOCK_K
        steps = K // BLOCK_K
        tiles_m = gl.cdiv(M, NC * 64)
        tiles_n = gl.cdiv(N, BN)
        j = 0                      # K steps loaded so far by this program: the stage ring runs across tiles
        n_done = 0                 # tiles loaded so far (the LoRA buffer's phase)
        for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, tiles_m, tiles_n, NC * 64, BN, GROUP_M)
            for i in range(steps):
                s = j % STAGES
                mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), step_bytes)
                if NC == 2:
                    tma.async_copy_global_to_shared(a_desc, [off_m, i * BLOCK_K], ready.index(s), a_bufs.index(s))
                else:   # (shared buffers need power-of-two shapes: three 64-row tiles)
                    for c in gl.static_range(NC):
                        tma.async_copy_global_to_shared(a_desc, [off_m + c * 64, i * BLOCK_K], ready.index(s),
                                                        a_bufs.index(s * NC + c))
                tma.async_copy_global_to_shared(b_desc, [off_n, i * BLOCK_K], ready.index(s), b_bufs.index(s))
                j += 1
            if LORA_CH > 0:
                # the tile's LoRA operands (t rows, B_cat rows), once the consumers are done with the previous
                # tile's: issued after this tile's K steps, so the wait overlaps the consumers' K loop
                mbarrier.wait(l_empty.index(0), (n_done & 1) ^ 1)
                mbarrier.expect(l_ready.index(0), LORA_BYTES)
                for c in gl.static_range(LORA_CH):
                    tma.async_copy_global_to_shared(lt_desc, [off_m, c * 64], l_ready.index(0), lt_bufs.index(c))
                    tma.async_copy_global_to_shared(lb_desc, [off_n, c * 64], l_ready.index(0), lb_bufs.index(c))
            n_done += 1

    @gluon.jit
    def _fold(acc_f, part, sw):
        """acc_f + float(part) * sw[None, :]: the int32 -> fp32 conversion by the magic number (exact for
        |part| < 2^22), one integer add and one fp32 subtract instead of the quarter-rate I2F."""
        return acc_f + ((part + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0) * sw[None, :]

    @gluon.jit
    def _columns(ptr, off_n, N, layout: gl.constexpr, BN: gl.constexpr):
        """ptr[off_n : off_n + BN] as fp32 in the accumulator's column layout: loaded one per thread, then spread
        (loading in the column layout directly needs an address per accumulator column and thread: spills)."""
        flat: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        offs = off_n + gl.arange(0, BN, layout=flat)
        v = gl.load(ptr + offs, mask=offs < N, other=0.0).to(gl.float32)
        return gl.convert_layout(v, gl.SliceLayout(0, layout))

    @gluon.jit
    def _scale_rows(sw_ptr, stride_sw, off_n, N, BN: gl.constexpr):
        """Pointers to the tile's group-scale rows (add the group index) and their mask, one column per thread:
        the scales are spread to the accumulator's column layout after loading (a pointer per accumulator column
        would hold 32 64-bit addresses per thread across the loop: spills)."""
        flat: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        offs_f = off_n + gl.arange(0, BN, layout=flat)
        return sw_ptr + offs_f * stride_sw, offs_f < N

    @gluon.jit
    def _group_step(j, i, a_bufs, b_bufs, ready, empty, sw_row, f_ok, acc_f, part, sw_part,
                    layout: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, CID: gl.constexpr):
        """K step i: issue its wgmma into a fresh int32 tile, fold the previous group's `part` with its scales
        `sw_part` while it runs, wait.  Returns (acc_f, this step's tile, its scales loaded for the next fold, j)."""
        col: gl.constexpr = gl.SliceLayout(0, layout)
        # this group's scales are loaded a K step before their fold (an L2 round trip otherwise stalls the fold)
        sw_next = gl.load(sw_row + i, mask=f_ok, other=0.0)
        s = j % STAGES
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        tok = warpgroup_mma(a_bufs.index(s).slice(CID * 64, 64), b_bufs.index(s).permute((1, 0)),
                            gl.zeros([64, BN], gl.int32, layout), use_acc=False, is_async=True)
        acc_f = _fold(acc_f, part, gl.convert_layout(sw_part, col))
        tile = warpgroup_mma_wait(0, deps=(tok,))
        mbarrier.arrive(empty.index(s), count=1)
        return acc_f, tile, sw_next, j + 1

    @gluon.jit
    def _group_tile(j, a_bufs, b_bufs, ready, empty, sw_ptr, stride_sw, off_n, N, steps,
                    layout: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, CID: gl.constexpr):
        """One tile's K loop with group scales: group g's wgmma runs while group g-1 is folded.  Returns the fp32
        tile (sx not applied) and the updated step counter.

        The loop is unrolled by two with the int32 tiles alternating (a, b): with one loop-carried tile the
        compiler copied each finished tile out of the wgmma's registers (64 MOVs per step after the wait, run 35's
        SASS), serialised with the tensor cores."""
        col: gl.constexpr = gl.SliceLayout(0, layout)
        flat: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        sw_row, f_ok = _scale_rows(sw_ptr, stride_sw, off_n, N, BN)
        acc_f = gl.zeros([64, BN], gl.float32, layout)
        # step 0: nothing to fold yet (a zero tile with zero scales)
        acc_f, tile_a, sw_a, j = _group_step(j, 0, a_bufs, b_bufs, ready, empty, sw_row, f_ok, acc_f,
                                             gl.zeros([64, BN], gl.int32, layout),
                                             gl.zeros([BN], gl.float32, flat), layout, STAGES, BN, CID)
        for i in range(1, steps - 1, 2):
            acc_f, tile_b, sw_b, j = _group_step(j, i, a_bufs, b_bufs, ready, empty, sw_row, f_ok, acc_f, tile_a,
                                                 sw_a, layout, STAGES, BN, CID)
            acc_f, tile_a, sw_a, j = _group_step(j, i + 1, a_bufs, b_bufs, ready, empty, sw_row, f_ok, acc_f,
                                                 tile_b, sw_b, layout, STAGES, BN, CID)
        if steps % 2 == 0:
            acc_f, tile_b, sw_b, j = _group_step(j, steps - 1, a_bufs, b_bufs, ready, empty, sw_row, f_ok, acc_f,
                                                 tile_a, sw_a, layout, STAGES, BN, CID)
            acc_f = _fold(acc_f, tile_b, gl.convert_layout(sw_b, col))
        else:
            acc_f = _fold(acc_f, tile_a, gl.convert_layout(sw_a, col))
        return acc_f, j

    @gluon.jit
    def _group_tile_serial(j, a_bufs, b_bufs, ready, empty, sw_ptr, stride_sw, off_n, N, steps,
                           layout: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, CID: gl.constexpr):
        """The group K loop for three consumers (registers for one int32 tile and the fp32 sum only): each
        consumer folds group g after its wgmma, while the other consumers' wgmmas keep the tensor cores busy."""
        col: gl.constexpr = gl.SliceLayout(0, layout)
        sw_row, f_ok = _scale_rows(sw_ptr, stride_sw, off_n, N, BN)
        acc_f = gl.zeros([64, BN], gl.float32, layout)
        sw_next = gl.load(sw_row, mask=f_ok, other=0.0)
        for i in range(steps):
            sw_cur = sw_next
            sw_next = gl.load(sw_row + gl.minimum(i + 1, steps - 1), mask=f_ok, other=0.0)
            s = j % STAGES
            mbarrier.wait(ready.index(s), (j // STAGES) & 1)
            tok = warpgroup_mma(a_bufs.index(s * 3 + CID), b_bufs.index(s).permute((1, 0)),
                                gl.zeros([64, BN], gl.int32, layout), use_acc=False, is_async=True)
            part = warpgroup_mma_wait(0, deps=(tok,))
            mbarrier.arrive(empty.index(s), count=1)
            acc_f = _fold(acc_f, part, gl.convert_layout(sw_cur, col))
            j += 1
        return acc_f, j

    @gluon.jit
    def _row_tile(j, a_bufs, b_bufs, ready, empty, sw_ptr, off_n, N, steps,
                  layout: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, CID: gl.constexpr):
        """One tile's K loop with row scales: one int32 accumulator, one wgmma kept in flight; a stage is
        released when the wgmma that read it has retired.  Returns the fp32 tile times sw (sx not applied)."""
        acc = gl.zeros([64, BN], gl.int32, layout)
        prev_s = 0
        for i in range(steps):
            s = j % STAGES
            mbarrier.wait(ready.index(s), (j // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s).slice(CID * 64, 64), b_bufs.index(s).permute((1, 0)), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc,))
            if i > 0:
                mbarrier.arrive(empty.index(prev_s), count=1)
            prev_s = s
            j += 1
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index(prev_s), count=1)
        return acc.to(gl.float32) * _columns(sw_ptr, off_n, N, layout, BN)[None, :], j

    @gluon.jit
    def _gelu_tanh(y):
        """GELU, tanh approximation, as `triton_gemm._gelu_tanh` (the same fp32 operations)."""
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        return 0.5 * y * (2.0 - 2.0 / (gl.exp(2.0 * gl.minimum(u, 20.0)) + 1.0))

    @gluon.jit
    def _gate_tile(gate_ptr, off_m, offs_m, off_n, N, M, SEQ, PER, stride_gb, stride_gg,
                   layout: gl.constexpr, BN: gl.constexpr):
        """The gate for a tile's 64 rows, which span at most two gate rows (the dispatcher checks that every run
        of tokens sharing a gate row is at least 256 long), as `triton_gemm._gate_rows`."""
        first = off_m.to(gl.int64)
        b = first // SEQ
        grp = (first - b * SEQ) // PER
        change = b * SEQ + gl.minimum((grp + 1) * PER, SEQ)
        nb = change // SEQ
        r0 = b * stride_gb + grp * stride_gg
        r1 = nb * stride_gb + ((change - nb * SEQ) // PER) * stride_gg
        r1 = gl.where(change < M, r1, r0)
        g0 = _columns(gate_ptr + r0, off_n, N, layout, BN)
        g1 = _columns(gate_ptr + r1, off_n, N, layout, BN)
        return gl.where((offs_m < change)[:, None], g0[None, :], g1[None, :])

    @gluon.jit
    def _consumer(t, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, CID: gl.constexpr,
                  HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr, GROUP_M: gl.constexpr, ACT: gl.constexpr,
                  RES: gl.constexpr, OUT_BYTES: gl.constexpr, LORA_CH: gl.constexpr, NC: gl.constexpr):
        """Rows [CID*64, CID*64 + 64) of each of the program's tiles."""
        (a_desc, b_desc, c_desc, r_desc, a_bufs, b_bufs, c_bufs, ready, empty, rbar, sx_ptr, sw_ptr, bias_ptr,
         gate_ptr, M, N, K, stride_sw, SEQ, PER, stride_gb, stride_gg, lt_desc, lb_desc, lt_bufs, lb_bufs,
         l_ready, l_empty) = t
        # (an int8 wgmma of N = 256 does not lower in Triton 3.6: 256-wide tiles are two N = 128 instructions)
        INSTR_N: gl.constexpr = 128 if BN > 128 else BN
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, INSTR_N, 32])
        steps = K // BLOCK_K
        tiles_m = gl.cdiv(M, NC * 64)
        tiles_n = gl.cdiv(N, BN)
        j = 0                      # K steps consumed so far by this program (the producer's counter)
        r_phase = 0
        n_done = 0
        for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, tiles_m, tiles_n, NC * 64, BN, GROUP_M)
            off_m += CID * 64
            if GROUPED and NC == 3:
                y, j = _group_tile_serial(j, a_bufs, b_bufs, ready, empty, sw_ptr, stride_sw, off_n, N, steps,
                                          layout, STAGES, BN, CID)
            elif GROUPED:
                y, j = _group_tile(j, a_bufs, b_bufs, ready, empty, sw_ptr, stride_sw, off_n, N, steps, layout,
                                   STAGES, BN, CID)
            else:
                y, j = _row_tile(j, a_bufs, b_bufs, ready, empty, sw_ptr, off_n, N, steps, layout, STAGES, BN, CID)
            offs_m = off_m + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
            y = y * gl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
            if HAS_BIAS:
                y = y + _columns(bias_ptr, off_n, N, layout, BN)[None, :]
            if LORA_CH > 0:
                # y += t · B_catᵀ on the tensor cores (16-bit operands, accumulated into y in fp32, as the
                # Triton kernel's tl.dot(t, b, y)); ranks past R are TMA's zero fill
                l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                   instr_shape=[16, INSTR_N, 16])
                mbarrier.wait(l_ready.index(0), n_done & 1)
                yl = gl.convert_layout(y, l_layout)
                for c in gl.static_range(LORA_CH):
                    yl = warpgroup_mma(lt_bufs.index(c).slice(CID * 64, 64), lb_bufs.index(c).permute((1, 0)), yl,
                                       is_async=True)
                yl = warpgroup_mma_wait(0, deps=(yl,))
                mbarrier.arrive(l_empty.index(0), count=1)
                y = gl.convert_layout(yl, layout)
            n_done += 1
            if ACT == 1:
                y = _gelu_tanh(y)
            # out through shared memory and one TMA store (it clips the M and N tails); the previous tile's store
            # must have left this consumer's buffer first
            c_smem = c_bufs.index(CID)
            tma.store_wait(0)
            if RES > 0:
                # the residual tile (the output's dtype) comes by TMA into the same buffer; each warp then reads
                # and overwrites only its own fragment, so no barrier is needed between the load and the store
                mbarrier.expect(rbar.index(CID), 64 * BN * OUT_BYTES)
                tma.async_copy_global_to_shared(r_desc, [off_m, off_n], rbar.index(CID), c_smem)
                mbarrier.wait(rbar.index(CID), r_phase)
                r_phase ^= 1
                r = c_smem.load(layout).to(gl.float32)
                if RES == 1:
                    y = r + y * _gate_tile(gate_ptr, off_m, offs_m, off_n, N, M, SEQ, PER, stride_gb, stride_gg,
                                           layout, BN)
                else:
                    y = r + y
            c_smem.store(y.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
        tma.store_wait(0)

    @gluon.jit
    def _ws_gemm_kernel(a_desc, b_desc, c_desc, r_desc, lt_desc, lb_desc, sx_ptr, sw_ptr, bias_ptr, gate_ptr,
                        M, N, K, stride_sw, SEQ, PER, stride_gb, stride_gg,
                        HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr, BLOCK_K: gl.constexpr, BN: gl.constexpr,
                        STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        ACT: gl.constexpr, RES: gl.constexpr, OUT_BYTES: gl.constexpr, LORA_CH: gl.constexpr,
                        LORA_BYTES: gl.constexpr, NC: gl.constexpr):
        if NC == 2:
            a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, 2 * 64, BLOCK_K], a_desc.layout)
        else:
            a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES * NC, 64, BLOCK_K], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BLOCK_K], b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [NC, 64, BN], c_desc.layout)    # one per consumer
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        rbar = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())   # residual tiles
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NC)
        for i in gl.static_range(NC):
            mbarrier.init(rbar.index(i), count=1)
        # LoRA operands: LORA_CH chunks of 64 ranks of t [128 rows] and B_cat [BN rows], one buffer per program
        if LORA_CH > 0:
            lt_bufs = gl.allocate_shared_memory(lt_desc.dtype, [LORA_CH, NC * 64, 64], lt_desc.layout)
            lb_bufs = gl.allocate_shared_memory(lb_desc.dtype, [LORA_CH, BN, 64], lb_desc.layout)
        else:
            lt_bufs = c_bufs      # unused
            lb_bufs = c_bufs
        l_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        l_empty = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(l_ready.index(0), count=1)
        mbarrier.init(l_empty.index(0), count=NC)
        t = (a_desc, b_desc, c_desc, r_desc, a_bufs, b_bufs, c_bufs, ready, empty, rbar, sx_ptr, sw_ptr, bias_ptr,
             gate_ptr, M, N, K, stride_sw, SEQ, PER, stride_gb, stride_gg, lt_desc, lb_desc, lt_bufs, lb_bufs,
             l_ready, l_empty)
        # (the constexprs go to each partition by name: inside a tuple they would become run-time values)
        if NC == 2:
            gl.warp_specialize(
                [(_producer, (t, BLOCK_K, STAGES, BN, 0, HAS_BIAS, GROUPED, GROUP_M, LORA_CH, LORA_BYTES, NC)),
                 (_consumer, (t, BLOCK_K, STAGES, BN, 0, HAS_BIAS, GROUPED, GROUP_M, ACT, RES, OUT_BYTES, LORA_CH, NC)),
                 (_consumer, (t, BLOCK_K, STAGES, BN, 1, HAS_BIAS, GROUPED, GROUP_M, ACT, RES, OUT_BYTES, LORA_CH, NC))],
                [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
        else:
            gl.warp_specialize(
                [(_producer, (t, BLOCK_K, STAGES, BN, 0, HAS_BIAS, GROUPED, GROUP_M, LORA_CH, LORA_BYTES, NC)),
                 (_consumer, (t, BLOCK_K, STAGES, BN, 0, HAS_BIAS, GROUPED, GROUP_M, ACT, RES, OUT_BYTES, LORA_CH, NC)),
                 (_consumer, (t, BLOCK_K, STAGES, BN, 1, HAS_BIAS, GROUPED, GROUP_M, ACT, RES, OUT_BYTES, LORA_CH, NC)),
                 (_consumer, (t, BLOCK_K, STAGES, BN, 2, HAS_BIAS, GROUPED, GROUP_M, ACT, RES, OUT_BYTES, LORA_CH, NC))],
                [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])


DEFAULT_STAGES = {NARROW_N: 4, WIDE_N: 3}   # shared memory: 4 x 32 KB + 2 x 16 KB; 3 x 48 KB + 2 x 32 KB
# H100, M=32760, Wan-14B shapes: GROUP_M 16 ahead of 8 (1.88x vs 1.84x bf16, GEMM alone) and of 1 (1.63x)
DEFAULT_GROUP_M = 16
SHARED_LIMIT = 232448                  # bytes per block on sm_90
MAX_LORA_RANK = 128                    # two 64-rank chunks of t and B_cat: 64 KB beside 4 stages of 128x128
_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def tile_width(grouped: bool, residual: bool) -> int:
    return NARROW_N if grouped or residual else WIDE_N


def lora_unsupported(lora_t: torch.Tensor, lora_b: torch.Tensor) -> Optional[str]:
    """Why the Gluon GEMM cannot add this LoRA in its epilogue (None: it can)."""
    r = lora_t.shape[1]
    if lora_t.dtype not in (torch.bfloat16, torch.float16) or lora_b.dtype != lora_t.dtype:
        return f"LoRA operands in {lora_t.dtype}/{lora_b.dtype} (the Gluon epilogue takes bf16 or fp16)"
    if r > MAX_LORA_RANK:
        return f"a stacked LoRA rank of {r} (the Gluon epilogue holds at most {MAX_LORA_RANK})"
    for name, v in (("t", lora_t), ("B", lora_b)):
        if v.stride(1) != 1 or (v.stride(0) * v.element_size()) % 16 or v.data_ptr() % 16:
            return f"LoRA {name} is not TMA-loadable (unit stride along R, 16-byte aligned rows)"
    return None


def stages_that_fit(bn: int, out_dtype: torch.dtype, wanted: Optional[int] = None, lora_bytes: int = 0,
                    consumers: int = 2) -> int:
    """The stage count: `wanted` (default DEFAULT_STAGES), less where the stages, the consumers' output tiles
    and the LoRA operands would not fit in shared memory (fp32 output of 256-wide tiles: 2 stages)."""
    step = (consumers * 64 + bn) * BLOCK_K
    out_tiles = consumers * 64 * bn * out_dtype.itemsize
    fit = (SHARED_LIMIT - out_tiles - lora_bytes - 1024) // step
    return max(1, min(wanted or DEFAULT_STAGES[bn], fit))


def call_unsupported(a: torch.Tensor, b: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype,
                     out: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                     lora_t: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why `ws_gemm` cannot run this call (None: it can): the operands (`unavailable`), the output, the residual
    and the LoRA.  `triton_gemm` asks once per call signature, then calls `launch`."""
    why = unavailable(a, b, sw)
    if why is None and out_dtype not in _GL_DTYPES:
        why = f"output dtype {out_dtype}"
    if why is None and (b.shape[0] * out_dtype.itemsize) % 16:
        why = f"N={b.shape[0]}: output rows must be 16-byte aligned for the TMA store"
    if why is None and out is not None and (not out.is_contiguous() or out.dtype != out_dtype):
        why = "the output must be a contiguous tensor of the output dtype"
    if why is None and residual is not None and (residual.dtype != out_dtype or not residual.is_contiguous()
                                                 or residual.shape != (a.shape[0], b.shape[0])):
        why = "the residual must be a contiguous [M, N] tensor of the output dtype (it is loaded by TMA)"
    if why is None and lora_t is not None:
        why = lora_unsupported(lora_t, lora_b)
    return why


def _default_consumers(sw: torch.Tensor, lora_t, residual, act: int) -> int:
    return 3 if sw.dim() == 2 and lora_t is None and residual is None and not act else 2


def ws_gemm(a: torch.Tensor, b: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
            bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
            stages: Optional[int] = None, group_m: int = DEFAULT_GROUP_M,
            out: Optional[torch.Tensor] = None, act: int = 0, residual: Optional[torch.Tensor] = None,
            gate: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0, lora_t: Optional[torch.Tensor] = None,
            lora_b: Optional[torch.Tensor] = None, consumers: Optional[int] = None) -> torch.Tensor:
    """a [M, K] int8 (per-token codes), b [N, K] int8, sx [M] fp32, sw [N] (row) or [N, K/128] (group) fp32,
    bias [N] or None -> [M, N] in out_dtype (into `out`, contiguous, when given).

    Block epilogue as `triton_gemm.int8_gemm`'s (`quant.int8.block_epilogue_reference`): act 1 = GELU (tanh);
    `residual [M, N]` (out_dtype, contiguous) plus `y * gate[row]` (`gate [B, G, N]`, unit stride along N, every
    run of `per` tokens sharing a gate row at least 64 long) or plus `y`.
    LoRA (`lora_t [M, R]`, `lora_b [N, R]`, bf16 or fp16, R <= 128, unit stride along R, 16-byte aligned rows):
    `y += lora_t · lora_bᵀ` in fp32 after the bias, before the block epilogue, as `triton_gemm._lora_add`.
    `consumers`: 2, or 3 (group scales without LoRA: 192x128 tiles, each consumer folding after its own wgmma);
    default 3 for group scales without LoRA or block epilogue (run 42: 1.20-1.44x bf16 against 1.02-1.19x), else 2.
    Raises RuntimeError (with the reason) where it cannot run."""
    why = call_unsupported(a, b, sw, out_dtype, out, residual, lora_t, lora_b)
    if consumers is None:
        consumers = _default_consumers(sw, lora_t, residual, act)
    if why is None and (consumers not in (2, 3) or (consumers == 3 and (sw.dim() != 2 or lora_t is not None))):
        why = f"{consumers} consumers (2, or 3 with group scales and no LoRA)"
    if why is not None:
        raise RuntimeError(f"Gluon GEMM: {why}")
    return launch(a, b, sx, sw, bias, out_dtype, stages, group_m, out, act, residual, gate, seq, per, lora_t,
                  lora_b, consumers)


def launch(a: torch.Tensor, b: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: Optional[torch.Tensor],
           out_dtype: torch.dtype, stages: Optional[int] = None, group_m: int = DEFAULT_GROUP_M,
           out: Optional[torch.Tensor] = None, act: int = 0, residual: Optional[torch.Tensor] = None,
           gate: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0, lora_t: Optional[torch.Tensor] = None,
           lora_b: Optional[torch.Tensor] = None, consumers: Optional[int] = None) -> torch.Tensor:
    """`ws_gemm` without its checks, for callers that made them (`call_unsupported`) once per call signature:
    `triton_gemm`'s plans, on the hot path."""
    if consumers is None:
        consumers = _default_consumers(sw, lora_t, residual, act)
    esize = out_dtype.itemsize
    grouped = sw.dim() == 2
    m, k = a.shape
    n = b.shape[0]
    bn = tile_width(grouped, residual is not None or lora_t is not None)
    sw = sw.contiguous()
    c = out if out is not None else torch.empty((m, n), dtype=out_dtype, device=a.device)
    bm = 64 * consumers
    a_box = [bm if consumers == 2 else 64, BLOCK_K]
    a_desc = TensorDescriptor.from_tensor(a, a_box, gl.NVMMASharedLayout.get_default_for(a_box, gl.int8))
    b_desc = TensorDescriptor.from_tensor(b, [bn, BLOCK_K], gl.NVMMASharedLayout.get_default_for([bn, BLOCK_K], gl.int8))
    c_layout = gl.NVMMASharedLayout.get_default_for([64, bn], getattr(gl, _GL_DTYPES[out_dtype]))
    c_desc = TensorDescriptor.from_tensor(c, [64, bn], c_layout)
    r_desc = TensorDescriptor.from_tensor(residual, [64, bn], c_layout) if residual is not None else c_desc
    lora_ch, lora_bytes = 0, 0
    lt_desc = lb_desc = c_desc
    if lora_t is not None:
        ldt = getattr(gl, _GL_DTYPES[lora_t.dtype])
        lora_ch = -(-lora_t.shape[1] // 64)
        lora_bytes = lora_ch * (bm + bn) * 64 * lora_t.element_size()
        lt_desc = TensorDescriptor.from_tensor(lora_t, [bm, 64], gl.NVMMASharedLayout.get_default_for([bm, 64], ldt))
        lb_desc = TensorDescriptor.from_tensor(lora_b, [bn, 64], gl.NVMMASharedLayout.get_default_for([bn, 64], ldt))
    res = 0 if residual is None else 1 if gate is not None else 2
    seq = seq or m
    per = per or seq
    gate_args = (gate, gate.stride(0), gate.stride(1)) if res == 1 else (sx, 0, 0)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = (min(tiles, _num_sms(a.device)),)   # persistent
    _ws_gemm_kernel[grid](a_desc, b_desc, c_desc, r_desc, lt_desc, lb_desc, sx, sw, bias if bias is not None else sx,
                          gate_args[0], m, n, k, sw.stride(0) if grouped else 0, seq, per, gate_args[1], gate_args[2],
                          HAS_BIAS=bias is not None, GROUPED=grouped, BLOCK_K=BLOCK_K, BN=bn,
                          STAGES=stages_that_fit(bn, out_dtype, stages, lora_bytes, consumers), GROUP_M=group_m,
                          CONSUMER_REGS=CONSUMER_REGS[consumers], ACT=act, RES=res, OUT_BYTES=esize,
                          LORA_CH=lora_ch, LORA_BYTES=lora_bytes, NC=consumers, num_warps=4)
    return c
