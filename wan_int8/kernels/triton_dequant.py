"""Triton dequant epilogue for an int32 GEMM result (the cuBLASLt backend): `acc * s_w[n] * s_x[m] + bias`.

One pass: read int32, write the output dtype; the same fp32 operation order as the torch oracle.
"""
from __future__ import annotations

from typing import Optional

import torch

import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(acc_ptr, out_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, SW_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    acc = tl.load(acc_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0).to(tl.float32)
    if SW_ROW:
        sw = tl.load(sw_ptr + cols, mask=cols < N, other=0.0)
    else:
        sw = tl.load(sw_ptr + tl.zeros([BLOCK_N], dtype=tl.int32))
    y = acc * sw[None, :]
    y = y * tl.load(sx_ptr + rows, mask=rows < M, other=0.0)[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def dequant_epilogue(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: Optional[torch.Tensor],
                     out_dtype: torch.dtype) -> torch.Tensor:
    acc = acc.contiguous()
    m, n = acc.shape
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    block_m, block_n = 32, 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _dequant_kernel[grid](acc, out, sx.contiguous(), sw.contiguous().reshape(-1), bias if bias is not None else sx,
                          m, n, SW_ROW=sw.dim() == 1, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                          num_warps=4)
    return out
