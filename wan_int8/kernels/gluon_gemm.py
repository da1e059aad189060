"""Hopper INT8 GEMMs in Gluon, warp-specialised (experimental: not yet run on a GPU, not used by the dispatcher).

`y = sx[m] * sum_g sw[n, g] * (a[m, gK:(g+1)K] · b[n, gK:(g+1)K]) (+ bias)` for weights with one scale per
K-group (`sw [N, K/g]`, g = 128): the contract of `triton_gemm.int8_gemm`'s group mode and of
`quant.int8.int8_linear_reference`.

Why (runs 1-27, H100): the Triton group-scale GEMM runs 0.65-0.87x bf16 (target 1.3x).  Each K-group's int32
partial must be converted to fp32 and folded with its scales on the CUDA cores, and in Triton that fold sits
between the MMAs (the tensor cores wait); I2F has a fraction of the FMA throughput, and the exact magic-number
conversion needs a second accumulator that spills at 128x256 tiles (run 3: slower).  Here a producer warpgroup streams A and B
tiles by TMA (running ahead into a program's next tile while its consumers finish one: persistent grid) and two
consumer warpgroups (64 rows each of a 128 x BLOCK_N tile) issue group g's wgmma
asynchronously into a fresh int32 tile, fold group g-1's partial (magic-number int->float, exact since
|partial| <= 128·127² < 2^22, then one FMA with the group's scales) while it runs, then wait.  Registers per
consumer thread at BLOCK_N = 128: two int32 tiles and the fp32 sum, 3 x 64.

The same skeleton with row scales (`sw [N]`, one int32 accumulator, one wgmma in flight, 128x256 tiles as the
Triton kernel's best) asks whether warp specialisation also pays for the plain GEMM (issue 3's 1.6x target).
Both store each tile through shared memory with one TMA store per consumer.

Checked by tests/test_gluon.py on a Hopper GPU (WAN_INT8_TEST_DEVICE=cuda) against float64; timed by
`bench/linear.py --methods gluon_group128,gluongemm_group128,gluon_row,gluongemm_row`.
"""
from __future__ import annotations

from typing import Optional

import torch

import triton

from .gluon_common import TensorDescriptor, gl, gluon, hopper_unavailable, mbarrier, tma, warpgroup_mma
from .gluon_common import fence_async_shared, warpgroup_mma_wait
from .triton_gemm import _num_sms

BLOCK_M = 128                 # two consumers x 64 rows
BLOCK_N = {True: 128, False: 256}   # per scale mode (grouped: two int32 tiles and the fp32 sum per consumer)
BLOCK_K = 128                 # = the group size
CONSUMER_REGS = 232           # per consumer thread; the producer keeps 48


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
    def _tile_offsets(tile, tiles_m, tiles_n, BN: gl.constexpr, GROUP_M: gl.constexpr):
        """Row and column offsets of tile number `tile`: GROUP_M row tiles sweep N together, so a wave of
        programs shares its A and B tiles through L2 (a wave walking M alone streams all of A once per column)."""
        in_group = GROUP_M * tiles_n
        first_m = (tile // in_group) * GROUP_M
        size_m = gl.minimum(tiles_m - first_m, GROUP_M)
        return (first_m + tile % size_m) * (2 * 64), ((tile % in_group) // size_m) * BN

    @gluon.jit
    def _producer(t, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, CID: gl.constexpr,
                  HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr, GROUP_M: gl.constexpr):
        """A [128, BLOCK_K] and B [BN, BLOCK_K] tiles of every K step into the stage ring."""
        (a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, sx_ptr, sw_ptr, bias_ptr, M, N, K,
         stride_sw) = t
        step_bytes: gl.constexpr = (2 * 64 + BN) * BLOCK_K
        steps = K // BLOCK_K
        tiles_m = gl.cdiv(M, 2 * 64)
        tiles_n = gl.cdiv(N, BN)
        j = 0                      # K steps loaded so far by this program: the stage ring runs across tiles
        for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, tiles_m, tiles_n, BN, GROUP_M)
            for i in range(steps):
                s = j % STAGES
                mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), step_bytes)
                tma.async_copy_global_to_shared(a_desc, [off_m, i * BLOCK_K], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [off_n, i * BLOCK_K], ready.index(s), b_bufs.index(s))
                j += 1

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
    def _group_tile(j, a_bufs, b_bufs, ready, empty, sw_ptr, stride_sw, off_n, N, steps,
                    layout: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, CID: gl.constexpr):
        """One tile's K loop with group scales: group g's wgmma runs while group g-1 is folded.  Returns the fp32
        tile (sx not applied) and the updated step counter."""
        col: gl.constexpr = gl.SliceLayout(0, layout)
        # the group scales are loaded one per thread and then spread to the accumulator's column layout (a
        # pointer per accumulator column would hold 32 64-bit addresses per thread across the loop: spills)
        flat: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        offs_f = off_n + gl.arange(0, BN, layout=flat)
        f_ok = offs_f < N
        sw_row = sw_ptr + offs_f * stride_sw
        acc_f = gl.zeros([64, BN], gl.float32, layout)
        # a group's scales are loaded one K step before their fold needs them (an L2 round trip per step
        # otherwise sits between the MMAs)
        sw_next = gl.load(sw_row, mask=f_ok, other=0.0)
        s = j % STAGES
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        tok = warpgroup_mma(a_bufs.index(s).slice(CID * 64, 64), b_bufs.index(s).permute((1, 0)),
                            gl.zeros([64, BN], gl.int32, layout), use_acc=False, is_async=True)
        prev = warpgroup_mma_wait(0, deps=(tok,))
        mbarrier.arrive(empty.index(s), count=1)
        j += 1
        for i in range(1, steps):
            s = j % STAGES
            sw_cur = sw_next
            sw_next = gl.load(sw_row + i, mask=f_ok, other=0.0)
            mbarrier.wait(ready.index(s), (j // STAGES) & 1)
            tok = warpgroup_mma(a_bufs.index(s).slice(CID * 64, 64), b_bufs.index(s).permute((1, 0)),
                                gl.zeros([64, BN], gl.int32, layout), use_acc=False, is_async=True)
            acc_f = _fold(acc_f, prev, gl.convert_layout(sw_cur, col))
            prev = warpgroup_mma_wait(0, deps=(tok,))
            mbarrier.arrive(empty.index(s), count=1)
            j += 1
        acc_f = _fold(acc_f, prev, gl.convert_layout(sw_next, col))
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
    def _consumer(t, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, CID: gl.constexpr,
                  HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr, GROUP_M: gl.constexpr):
        """Rows [CID*64, CID*64 + 64) of each of the program's tiles."""
        (a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, sx_ptr, sw_ptr, bias_ptr, M, N, K,
         stride_sw) = t
        # (an int8 wgmma of N = 256 does not lower in Triton 3.6: 256-wide tiles are two N = 128 instructions)
        INSTR_N: gl.constexpr = 128 if BN > 128 else BN
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, INSTR_N, 32])
        steps = K // BLOCK_K
        tiles_m = gl.cdiv(M, 2 * 64)
        tiles_n = gl.cdiv(N, BN)
        j = 0                      # K steps consumed so far by this program (the producer's counter)
        for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, tiles_m, tiles_n, BN, GROUP_M)
            off_m += CID * 64
            if GROUPED:
                y, j = _group_tile(j, a_bufs, b_bufs, ready, empty, sw_ptr, stride_sw, off_n, N, steps, layout,
                                   STAGES, BN, CID)
            else:
                y, j = _row_tile(j, a_bufs, b_bufs, ready, empty, sw_ptr, off_n, N, steps, layout, STAGES, BN, CID)
            offs_m = off_m + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
            y = y * gl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
            if HAS_BIAS:
                y = y + _columns(bias_ptr, off_n, N, layout, BN)[None, :]
            # through shared memory and one TMA store (it clips the M and N tails); the previous tile's store
            # must have left this consumer's buffer first
            c_smem = c_bufs.index(CID)
            tma.store_wait(0)
            c_smem.store(y.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
        tma.store_wait(0)

    @gluon.jit
    def _ws_gemm_kernel(a_desc, b_desc, c_desc, sx_ptr, sw_ptr, bias_ptr, M, N, K, stride_sw,
                        HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr, BLOCK_K: gl.constexpr, BN: gl.constexpr,
                        STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, 2 * 64, BLOCK_K], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BLOCK_K], b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, 64, BN], c_desc.layout)     # one per consumer
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        t = (a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, sx_ptr, sw_ptr, bias_ptr, M, N, K,
             stride_sw)
        gl.warp_specialize([(_producer, (t, BLOCK_K, STAGES, BN, 0, HAS_BIAS, GROUPED, GROUP_M)),
                            (_consumer, (t, BLOCK_K, STAGES, BN, 0, HAS_BIAS, GROUPED, GROUP_M)),
                            (_consumer, (t, BLOCK_K, STAGES, BN, 1, HAS_BIAS, GROUPED, GROUP_M))],
                           [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


DEFAULT_STAGES = {True: 4, False: 3}   # shared memory: grouped 4 x 32 KB + 2 x 16 KB; row 3 x 48 KB + 2 x 32 KB
# H100, M=32760, Wan-14B shapes: GROUP_M 16 ahead of 8 (1.88x vs 1.84x bf16, GEMM alone) and of 1 (1.63x)
DEFAULT_GROUP_M = 16
SHARED_LIMIT = 232448                  # bytes per block on sm_90
_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def stages_that_fit(grouped: bool, out_dtype: torch.dtype, wanted: Optional[int] = None) -> int:
    """The stage count: `wanted` (default DEFAULT_STAGES), less where the stages and the two consumers' output
    tiles would not fit in shared memory (fp32 output of 256-wide tiles: 2 stages)."""
    bn = BLOCK_N[grouped]
    step = (BLOCK_M + bn) * BLOCK_K
    out_tiles = 2 * 64 * bn * torch.empty((), dtype=out_dtype).element_size()
    fit = (SHARED_LIMIT - out_tiles - 1024) // step
    return max(1, min(wanted or DEFAULT_STAGES[grouped], fit))


def ws_gemm(a: torch.Tensor, b: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
            bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
            stages: Optional[int] = None, group_m: int = DEFAULT_GROUP_M,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a [M, K] int8 (per-token codes), b [N, K] int8, sx [M] fp32, sw [N] (row) or [N, K/128] (group) fp32,
    bias [N] or None -> [M, N] in out_dtype (into `out`, contiguous, when given).  Raises RuntimeError (with the
    reason) where it cannot run."""
    why = unavailable(a, b, sw)
    if why is None and out_dtype not in _GL_DTYPES:
        why = f"output dtype {out_dtype}"
    if why is None and (b.shape[0] * torch.empty((), dtype=out_dtype).element_size()) % 16:
        why = f"N={b.shape[0]}: output rows must be 16-byte aligned for the TMA store"
    if why is None and out is not None and (not out.is_contiguous() or out.dtype != out_dtype):
        why = "the output must be a contiguous tensor of the output dtype"
    if why is not None:
        raise RuntimeError(f"Gluon GEMM: {why}")
    grouped = sw.dim() == 2
    m, k = a.shape
    n = b.shape[0]
    bn = BLOCK_N[grouped]
    sw = sw.contiguous()
    c = out if out is not None else torch.empty((m, n), dtype=out_dtype, device=a.device)
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, BLOCK_K],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8))
    b_desc = TensorDescriptor.from_tensor(b, [bn, BLOCK_K], gl.NVMMASharedLayout.get_default_for([bn, BLOCK_K], gl.int8))
    c_desc = TensorDescriptor.from_tensor(c, [64, bn], gl.NVMMASharedLayout.get_default_for(
        [64, bn], getattr(gl, _GL_DTYPES[out_dtype])))
    tiles = triton.cdiv(m, BLOCK_M) * triton.cdiv(n, bn)
    grid = (min(tiles, _num_sms(a.device)),)   # persistent
    _ws_gemm_kernel[grid](a_desc, b_desc, c_desc, sx, sw, bias if bias is not None else sx, m, n, k,
                          sw.stride(0) if grouped else 0, HAS_BIAS=bias is not None, GROUPED=grouped,
                          BLOCK_K=BLOCK_K, BN=bn, STAGES=stages_that_fit(grouped, out_dtype, stages),
                          GROUP_M=group_m, CONSUMER_REGS=CONSUMER_REGS, num_warps=4)
    return c

