"""INT8 math in plain torch: weight quantizers, the activation quantizer, dequantization, exact int GEMM.

This module is the numerics contract (DESIGN.md §3) written once; every fast kernel is tested against it.
- symmetric codes in [-127, 127], round half to even;
- weight scales: tensor `[]`, row `[N]`, group `[N, K/g]`; scale = absmax / 127 (absmax floored at 1e-30);
- activations: dynamic per token (row of the flattened `[M, K]`), scale = absmax / 127, q = rint(x / scale);
- output: `acc_int32 · s_x[m] · s_w[n] (+ bias)` in fp32, stored in the input dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .hadamard import rotate, unrotate
from .types import Int8Weight, QuantFormatError, Rotation

QMAX = 127.0
AMAX_FLOOR = 1e-30
GROUP_SIZES = (64, 128, 256)
# Rows per fp32 temporary when quantizing big weights: bounds the extra memory to ~256 MB.
_CHUNK_ELEMENTS = 1 << 26


def _codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8)


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    """absmax / 127 with IEEE division on every device.

    On CUDA, torch divides by a Python scalar as a multiplication by its reciprocal (not correctly rounded);
    dividing by a device tensor is a true division, which is what the Triton kernels do (tl.div_rn)."""
    return amax.clamp_min(AMAX_FLOOR) / torch.full((), QMAX, dtype=amax.dtype, device=amax.device)


def quantize_weight(w: torch.Tensor, granularity: str = "row", group_size: int = 128,
                    rotation: Optional[Rotation] = None) -> Int8Weight:
    """Quantize a float weight `[N, K]` (any float dtype, any device) to the canonical INT8 form.

    With `rotation`, the codes are of W·R (the activation is rotated by the same R at run time).
    Work is done in row chunks of fp32 so peak extra memory stays near one chunk, not the weight.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise QuantFormatError(f"cannot quantize a {w.dim()}-D {w.dtype} tensor: expected a 2-D float weight [N, K]")
    n, k = w.shape
    if granularity == "group":
        if group_size not in GROUP_SIZES and group_size % 16:
            raise QuantFormatError(f"group size {group_size} is not supported (use 64, 128 or 256)")
        if k % group_size:
            raise QuantFormatError(f"K={k} is not a multiple of group size {group_size}")
    elif granularity not in ("row", "tensor"):
        raise QuantFormatError(f"unknown granularity {granularity!r} (expected row, tensor or group)")
    if not bool(torch.isfinite(w).all()):
        raise QuantFormatError("weight contains NaN or Inf; refusing to quantize it")

    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))

    def chunks():
        for start in range(0, n, rows):
            part = w[start:start + rows].to(torch.float32)
            if rotation is not None:
                part = rotate(part, rotation.kind, rotation.group_size, rotation.signs)
            yield start, part

    qdata = torch.empty((n, k), dtype=torch.int8, device=w.device)
    if granularity == "tensor":
        amax = torch.zeros((), dtype=torch.float32, device=w.device)
        for _, part in chunks():
            amax = torch.maximum(amax, part.abs().amax())
        scale = _scale_of(amax)
        for start, part in chunks():
            qdata[start:start + part.shape[0]] = _codes(part, scale)
    elif granularity == "row":
        scale = torch.empty((n,), dtype=torch.float32, device=w.device)
        for start, part in chunks():
            s = _scale_of(part.abs().amax(dim=1))
            scale[start:start + part.shape[0]] = s
            qdata[start:start + part.shape[0]] = _codes(part, s[:, None])
    else:
        groups = k // group_size
        scale = torch.empty((n, groups), dtype=torch.float32, device=w.device)
        for start, part in chunks():
            g = part.reshape(part.shape[0], groups, group_size)
            s = _scale_of(g.abs().amax(dim=2))
            scale[start:start + part.shape[0]] = s
            qdata[start:start + part.shape[0]] = _codes(g, s[:, :, None]).reshape(part.shape)
    return Int8Weight(qdata, scale, rotation=rotation)


def expand_scale(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Broadcastable `[N, K]`-compatible view of any canonical scale."""
    if scale.dim() == 0:
        return scale
    if scale.dim() == 1:
        return scale[:, None]
    return scale.repeat_interleave(k // scale.shape[1], dim=1)


def dequantize(weight: Int8Weight, dtype: torch.dtype = torch.float32, rotated: bool = False) -> torch.Tensor:
    """The float weight `[N, K]` these codes stand for, in the original basis (un-rotated unless `rotated`)."""
    n, k = weight.qdata.shape
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    w = weight.qdata.to(compute) * expand_scale(weight.scale.to(compute), n, k)
    if weight.rotation is not None and not rotated:
        r = weight.rotation
        w = unrotate(w, r.kind, r.group_size, r.signs)
    return w.to(dtype)


def quantize_activation(x: torch.Tensor, rotation: Optional[Rotation] = None,
                        input_scale: Optional[torch.Tensor] = None,
                        chunk_rows: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric INT8 of a 2-D activation `[M, K]` -> (codes int8 `[M, K]`, scales fp32 `[M]`).

    Rotation (if any) is applied first, in fp32, `chunk_rows` rows at a time (0: all at once; the seed's
    HADAMARD_CHUNK_SIZE).  A static `input_scale` (scalar) replaces the per-token scale.
    """
    xf = x.to(torch.float32) if x.dtype != torch.float64 else x
    if rotation is not None:
        xf = rotate(xf, rotation.kind, rotation.group_size, rotation.signs, chunk_rows=chunk_rows,
                    out_dtype=xf.dtype)
    if input_scale is not None:
        s = input_scale.to(device=x.device, dtype=xf.dtype).reshape(()).expand(x.shape[0]).contiguous()
    else:
        s = _scale_of(xf.abs().amax(dim=1))
    return _codes(xf, s[:, None]), s.to(torch.float32)


def _int_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "cpu":
        return True
    if a.device.type != "cuda":
        return False
    return a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact `a·bᵀ` for int8 `a [M, K]`, `b [N, K]` -> int32 `[M, N]`.

    Uses `torch._int_mm` where its shape rules allow (padding M up to 32 rows on CUDA, where it needs
    M > 16); otherwise float64 (exact for any K below 2^39).
    """
    m = a.shape[0]
    if m == 0:
        return torch.zeros((0, b.shape[0]), dtype=torch.int32, device=a.device)
    if _int_mm_ok(a, b):
        if a.device.type == "cuda" and m <= 16:
            padded = torch.zeros((32, a.shape[1]), dtype=torch.int8, device=a.device)
            padded[:m] = a
            return torch._int_mm(padded, b.t())[:m]
        return torch._int_mm(a.contiguous(), b.t())
    return torch.round(a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int32)


def int8_linear_reference(x: torch.Tensor, weight: Int8Weight, bias: Optional[torch.Tensor] = None,
                          out_dtype: Optional[torch.dtype] = None, chunk_rows: int = 0) -> torch.Tensor:
    """The reference W8A8 linear: `x [..., K]` -> `[..., N]` in `out_dtype` (default: x.dtype).

    Rows are processed in chunks so fp32 temporaries stay bounded (long videos: M * N can pass 2^31).
    """
    k = weight.in_features
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the INT8 weight expects {k}")
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], weight.out_features
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    step = chunk_rows or max(1, min(m, _CHUNK_ELEMENTS // max(n, k, 1)))
    for start in range(0, max(m, 1), step):
        xs = x2[start:start + step]
        if xs.shape[0] == 0:
            break
        xq, sx = quantize_activation(xs, weight.rotation, weight.input_scale)
        out[start:start + xs.shape[0]] = _gemm_dequant(xq, sx, weight, bias).to(out_dtype)
    return out.reshape(*lead, n)


def _gemm_dequant(xq: torch.Tensor, sx: torch.Tensor, weight: Int8Weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    s = weight.scale
    if s.dim() < 2:
        y = int_matmul(xq, weight.qdata).to(torch.float32)
        y = y * s.to(y.device) if s.dim() == 0 else y * s.to(y.device)[None, :]
    else:
        groups = s.shape[1]
        g = weight.in_features // groups
        y = torch.zeros((xq.shape[0], weight.out_features), dtype=torch.float32, device=xq.device)
        for j in range(groups):
            acc = int_matmul(xq[:, j * g:(j + 1) * g], weight.qdata[:, j * g:(j + 1) * g])
            y += acc.to(torch.float32) * s[:, j].to(y.device)[None, :]
    y = y * sx[:, None]
    if bias is not None:
        y = y + bias.to(device=y.device, dtype=torch.float32)
    return y


def gated_rows(gate: torch.Tensor, m: int, seq: int, per: int) -> torch.Tensor:
    """`gate [B, G, N]` expanded to one row per token `[M, N]`: token m is `m % seq` of batch `m // seq`, its row
    `(m // seq, (m % seq) // per)` (ComfyUI's `repeat_e` of a per-frame modulation; G = 1: one row per batch)."""
    rows = torch.arange(m, device=gate.device)
    return gate[rows // seq, (rows % seq) // per]


def block_epilogue_reference(y: torch.Tensor, act: int = 0, residual: Optional[torch.Tensor] = None,
                             gate: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0) -> torch.Tensor:
    """The block epilogue after bias and LoRA on `y [M, N]` (in y's float dtype): act 1 = GELU (tanh), then
    `residual + y * gate[row]` (or `residual + y` without a gate).  The contract of the GEMM's `_post_ops`."""
    if act == 1:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    elif act:
        raise ValueError(f"unknown activation {act}")
    if residual is not None:
        res = residual.to(y.dtype)
        if gate is not None:
            seq = seq or y.shape[0]
            y = res + y * gated_rows(gate, y.shape[0], seq, per or seq).to(y.dtype)
        else:
            y = res + y
    return y
