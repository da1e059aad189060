"""The canonical form of one INT8 linear layer: every file format converts to and from this."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch


class QuantFormatError(ValueError):
    """A tensor or layer cannot be interpreted; the message names it and says what to do."""


@dataclasses.dataclass(frozen=True)
class Rotation:
    """`R = diag(signs)·blockdiag(H_g)` along K; the weight is stored as W·R, the activation is rotated by R."""

    kind: str = "regular"              # "regular" (ComfyUI convrot) | "sylvester"
    group_size: int = 256
    signs: Optional[torch.Tensor] = None  # float ±1 of length K, or None

    def describe(self) -> str:
        return f"{self.kind}-hadamard-{self.group_size}" + ("+signs" if self.signs is not None else "")


@dataclasses.dataclass
class Int8Weight:
    """int8 codes `[N, K]` (symmetric, in [-127, 127]) and fp32 scales.

    scale shape: `[]` (tensor-wise), `[N]` (row-wise, one per output channel) or `[N, K/g]` (group-wise,
    groups of g consecutive input channels).  `rotation` says the codes are of W·R.  `input_scale`
    is a real static activation scale (a scalar) or None for dynamic per-token quantization.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    rotation: Optional[Rotation] = None
    input_scale: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return int(self.qdata.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qdata.shape[1])

    @property
    def granularity(self) -> str:
        return scale_granularity(self.scale)

    @property
    def group_size(self) -> int:
        """Input channels per scale group (K for tensor- and row-wise)."""
        if self.scale.dim() == 2:
            return self.in_features // int(self.scale.shape[1])
        return self.in_features

    def validate(self, name: str = "layer") -> "Int8Weight":
        q, s = self.qdata, self.scale
        if q.dtype != torch.int8 or q.dim() != 2:
            raise QuantFormatError(f"{name}: int8 weight must be a 2-D int8 tensor, got {tuple(q.shape)} {q.dtype}")
        n, k = q.shape
        if s.dtype != torch.float32:
            raise QuantFormatError(f"{name}: weight scale must be float32, got {s.dtype}")
        if s.dim() == 1 and s.shape[0] != n or s.dim() == 2 and (s.shape[0] != n or k % s.shape[1]) or s.dim() > 2:
            raise QuantFormatError(
                f"{name}: weight scale shape {tuple(s.shape)} fits neither tensor [], row [{n}] nor group "
                f"[{n}, K/g] scales for a weight of shape [{n}, {k}]")
        if s.dim() == 2 and (k // s.shape[1]) % 16:
            raise QuantFormatError(f"{name}: group size {k // s.shape[1]} must be a multiple of 16")
        if not bool(torch.isfinite(s).all()):
            raise QuantFormatError(f"{name}: weight scale contains NaN or Inf; the file is damaged, re-export it")
        if bool((s < 0).any()):
            raise QuantFormatError(f"{name}: weight scale has negative values; symmetric scales must be >= 0")
        r = self.rotation
        if r is not None:
            if k % r.group_size:
                raise QuantFormatError(f"{name}: rotation group {r.group_size} does not divide K={k}")
            if r.signs is not None and tuple(r.signs.shape) != (k,):
                raise QuantFormatError(f"{name}: rotation signs have shape {tuple(r.signs.shape)}, expected [{k}]")
        if self.input_scale is not None and self.input_scale.numel() != 1:
            raise QuantFormatError(f"{name}: static input_scale must be a scalar, got {tuple(self.input_scale.shape)}")
        return self

    def nbytes(self) -> int:
        total = self.qdata.numel() + self.scale.numel() * 4
        if self.rotation is not None and self.rotation.signs is not None:
            total += self.rotation.signs.numel() * self.rotation.signs.element_size()
        return total


def scale_granularity(scale: torch.Tensor) -> str:
    return {0: "tensor", 1: "row", 2: "group"}.get(scale.dim(), "invalid")
