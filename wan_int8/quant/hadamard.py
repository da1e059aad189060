"""Block-diagonal Hadamard rotations along the reduction axis K.

A rotation R is orthonormal, so `x·Wᵀ = (x·R)·(W·R)ᵀ`: the weight is stored as `W·R` (rotated once, at
quantization time) and the activation is rotated by the same R right before it is quantized.  R is
block-diagonal: the same `g x g` Hadamard matrix H on every K-group of g channels, optionally preceded by a
fixed ±1 sign vector over all K (`R = diag(signs)·blockdiag(H)`).

Two Hadamard families:
- "regular": Kronecker powers of H4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]] / sqrt(g), g a power
  of 4.  This is ComfyUI/comfy-kitchen "convrot": every row sums to +1, so a group's mean is spread rather
  than piled into one coefficient.  It is symmetric, so W·Hᵀ (ComfyUI's stored weight) equals W·H.
- "sylvester": Kronecker powers of [[1,1],[1,-1]] / sqrt(g), g a power of 2 (the seed's Hadamard-QuIP files).
Both are symmetric and orthonormal, hence self-inverse.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))
_H2 = ((1, 1), (1, -1))
REGULAR_GROUP_SIZES = (4, 16, 64, 256, 1024)


def is_power_of(n: int, base: int) -> bool:
    if n < 1:
        return False
    while n % base == 0:
        n //= base
    return n == 1


@functools.lru_cache(maxsize=32)
def _hadamard_cpu(kind: str, size: int) -> torch.Tensor:
    if kind == "regular":
        if not is_power_of(size, 4):
            raise ValueError(f"regular (convrot) Hadamard size must be a power of 4, got {size}")
        base = torch.tensor(_H4, dtype=torch.float64)
    elif kind == "sylvester":
        if not is_power_of(size, 2):
            raise ValueError(f"Sylvester Hadamard size must be a power of 2, got {size}")
        base = torch.tensor(_H2, dtype=torch.float64)
    else:
        raise ValueError(f"unknown Hadamard kind {kind!r} (expected 'regular' or 'sylvester')")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.kron(h, base)
    return (h / math.sqrt(size)).contiguous()


def hadamard_matrix(kind: str, size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal `size x size` Hadamard matrix of the given family."""
    return _hadamard_cpu(kind, size).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, kind: str, group_size: int, signs: Optional[torch.Tensor] = None,
           chunk_rows: int = 0, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Return `x·R` along the last axis (R = diag(signs)·blockdiag(H_g)), computed in fp32 (float64 in, float64 out).

    `chunk_rows` > 0 bounds the fp32 temporaries for very large inputs (HADAMARD_CHUNK_SIZE).
    """
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"cannot rotate width {k} in groups of {group_size}: {k} is not a multiple of {group_size}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = out_dtype or (compute if x.dtype in (torch.int8, torch.int32) else x.dtype)
    h = hadamard_matrix(kind, group_size, dtype=compute, device=x.device)
    flat = x.reshape(-1, k)
    out = torch.empty(flat.shape, dtype=out_dtype, device=x.device)
    step = chunk_rows if chunk_rows and chunk_rows > 0 else max(flat.shape[0], 1)
    for start in range(0, flat.shape[0], step):
        part = flat[start:start + step].to(compute)
        if signs is not None:
            part = part * signs.to(device=part.device, dtype=compute)
        part = (part.reshape(-1, k // group_size, group_size) @ h).reshape(-1, k)
        out[start:start + step] = part.to(out_dtype)
    return out.reshape(x.shape)


def unrotate(x: torch.Tensor, kind: str, group_size: int, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of `rotate`: `x·Rᵀ` (H is symmetric, so apply H then the signs)."""
    y = rotate(x, kind, group_size)
    if signs is not None:
        y = y * signs.to(device=y.device, dtype=y.dtype)
    return y


def default_group_size(k: int, preferred: int = 256, kind: str = "regular") -> Optional[int]:
    """The largest valid group size <= `preferred` that divides K (None if none >= 16 does)."""
    sizes = REGULAR_GROUP_SIZES if kind == "regular" else tuple(2 ** i for i in range(4, 13))
    for g in sorted((s for s in sizes if s <= preferred), reverse=True):
        if g >= 16 and k % g == 0:
            return g
    return None
