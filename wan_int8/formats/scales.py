"""Weight-scale shapes seen in the wild, interpreted by shape (and metadata), never by guessing.

| on disk                         | meaning                                   | canonical           |
|---------------------------------|-------------------------------------------|---------------------|
| numel 1 (`[]`, `[1]`, `[1,1]`)  | one scale for the tensor                  | `[]`                |
| `[N]`, `[N,1]`                  | one per output row                        | `[N]`               |
| `[N, K/g, 1]` (seed blockwise)  | one per row per K-group of g              | `[N, K/g]`          |
| `[N, K/g]` (2-D group)          | same                                      | `[N, K/g]`          |
| `[ceil(N/b), K/b]` (tiles b x b)| one per b x b tile (convert_to_quant)     | rows repeated: `[N, K/b]` (exact) |
Anything else is an error naming the tensor.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..quant.types import QuantFormatError


def scale_kind(shape: Tuple[int, ...], n: int, k: int, where: str, group_hint: Optional[int] = None) -> Tuple[str, int, str]:
    """(granularity, group size, note) for a scale of `shape` on a weight [n, k]; raises on anything ambiguous."""
    numel = 1
    for d in shape:
        numel *= d
    dims = tuple(d for d in shape)
    if numel == 1 and n != 1:
        return "tensor", k, ""
    if dims in ((n,), (n, 1)):
        return "row", k, ""
    if len(dims) == 3 and dims[0] == n and dims[2] == 1:
        dims = dims[:2]
    if len(dims) == 2 and dims[0] == n and dims[1] > 1 and k % dims[1] == 0:
        g = k // dims[1]
        if group_hint and group_hint != g:
            raise QuantFormatError(f"{where}: scale {list(shape)} means groups of {g}, but the metadata says {group_hint}")
        _check_group(g, where, shape)
        return "group", g, ""
    if len(dims) == 2 and dims[1] > 0 and k % dims[1] == 0:
        b = k // dims[1]
        if dims[0] == -(-n // b) and b > 1:
            if group_hint and group_hint != b:
                raise QuantFormatError(f"{where}: tile scale {list(shape)} means {b}x{b} tiles, metadata says {group_hint}")
            _check_group(b, where, shape)
            return "group", b, f"{b}x{b} tile scales expanded to per-row groups (exact)"
    raise QuantFormatError(
        f"{where}: scale shape {list(shape)} does not fit a weight of shape [{n}, {k}] as tensor [], row [{n}] / "
        f"[{n},1], group [{n}, K/g] / [{n}, K/g, 1] or tile [N/b, K/b] scales; the file's layout is unknown")


def _check_group(g: int, where: str, shape) -> None:
    if g % 16:
        raise QuantFormatError(f"{where}: scale {list(shape)} implies a group of {g} channels; groups must be a multiple of 16")


def is_scalar_or_row(shape: Tuple[int, ...], n: int) -> bool:
    """True for a scale of one value (any shape of numel 1) or one per row ([n] or [n, 1])."""
    numel = 1
    for d in shape:
        numel *= d
    return numel == 1 or tuple(shape) in ((n,), (n, 1))


def canonical_scale(scale: torch.Tensor, n: int, k: int, where: str, group_hint: Optional[int] = None) -> torch.Tensor:
    """The canonical fp32 scale: `[]`, `[N]` or `[N, K/g]` (see the module table)."""
    if not scale.is_floating_point():
        raise QuantFormatError(f"{where}: weight scale has dtype {scale.dtype}; a scale must be a float tensor")
    kind, g, _ = scale_kind(tuple(scale.shape), n, k, where, group_hint)
    s = scale.to(torch.float32)
    if kind == "tensor":
        return s.reshape(())
    if kind == "row":
        return s.reshape(n).contiguous()
    groups = k // g
    if s.dim() == 3:
        s = s[:, :, 0]
    if s.shape[0] != n:  # tiles: one row of scales per b rows of the weight
        s = s.repeat_interleave(g, dim=0)[:n]
    return s.reshape(n, groups).contiguous()


def check_scale_values(scale: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(scale).all()):
        raise QuantFormatError(f"{where}: scale contains NaN or Inf; the file is damaged, re-export it")
    if bool((scale < 0).any()):
        raise QuantFormatError(f"{where}: scale has negative values; symmetric INT8 scales must be >= 0")
