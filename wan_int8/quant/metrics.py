"""Error metrics used by tests, the CLI and the benchmarks (computed in float64)."""
from __future__ import annotations

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (Frobenius), in float64; 0 when both are zero."""
    o, r = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denom = r.norm().item()
    num = (o - r).norm().item()
    return num / denom if denom > 0 else num


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref|."""
    o, r = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denom = r.abs().max().item()
    num = (o - r).abs().max().item() if o.numel() else 0.0
    return num / denom if denom > 0 else num


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.detach().to(torch.float64).flatten(), ref.detach().to(torch.float64).flatten()
    denom = (o.norm() * r.norm()).item()
    return (o @ r).item() / denom if denom > 0 else 1.0
