"""FP8 (e4m3) row-wise W8A8, emulated in plain torch: the accuracy reference point INT8 is compared with.

What Hopper's `torch._scaled_mm` rowwise path computes, written so it runs anywhere (CPU included):
- weight `[N, K]`: one fp32 scale per output row, absmax / 448, codes cast to `torch.float8_e4m3fn`;
- activation `[M, K]`: one fp32 scale per token (row), absmax / 448, cast the same way;
- the GEMM on the decoded codes in fp32, then `· s_x[m] · s_w[n] (+ bias)`, output in the input dtype.
The cast rounds to nearest-even on the e4m3 grid (3 mantissa bits, subnormals below 2^-6, max 448);
values are clamped to ±448 first because e4m3fn has no infinity (an out-of-range cast would be NaN).
This is a numerics reference, not a fast path: it exists so `wan-int8 accuracy` can put INT8's error
next to FP8's on the same model and inputs, without an FP8 GPU.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..layers import KeepsStorageDtypes

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-30


def quantize_fp8_rowwise(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 of a 2-D float tensor -> (codes float8_e4m3fn `[R, C]`, scales fp32 `[R]`)."""
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"expected a 2-D float tensor, got {t.dim()}-D {t.dtype}")
    tf = t.to(torch.float32) if t.dtype != torch.float64 else t
    scale = tf.abs().amax(dim=1).clamp_min(AMAX_FLOOR) / FP8_MAX
    codes = (tf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale.to(torch.float32)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor row-wise FP8 codes stand for."""
    return (codes.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def fp8_linear_emulated(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`x [..., K]` through a row-wise FP8 weight, with per-token FP8 activations; fp32 math, `[..., N]` out."""
    k = w_codes.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the FP8 weight expects {k}")
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return torch.zeros((*lead, w_codes.shape[0]), dtype=out_dtype, device=x.device)
    xq, sx = quantize_fp8_rowwise(x2)
    y = xq.to(torch.float32) @ w_codes.to(device=x.device, dtype=torch.float32).t()
    y = y * sx[:, None] * w_scale.to(device=x.device, dtype=torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(device=x.device, dtype=torch.float32)
    return y.to(out_dtype).reshape(*lead, w_codes.shape[0])


class Fp8Linear(KeepsStorageDtypes):
    """A linear layer holding row-wise e4m3 weights, run by `fp8_linear_emulated` (CPU or GPU, any dtype)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None, name: str = ""):
        super().__init__()
        self.out_features, self.in_features = int(codes.shape[0]), int(codes.shape[1])
        self.layer_name = name
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale.to(torch.float32))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "") -> "Fp8Linear":
        w = linear.weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {name or '?'}: weight contains NaN or Inf; refusing to quantize it")
        codes, scale = quantize_fp8_rowwise(w)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(codes, scale, bias, name)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear_emulated(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8-e4m3 rowwise (emulated)"


def fp8_quantize_model(model: nn.Module, config=None, family: Optional[str] = None,
                       progress: Optional[Callable[[str], None]] = None) -> Dict[str, str]:
    """Replace, in place, the `nn.Linear` layers chosen by the same rules as `quantize_model` with `Fp8Linear`.

    `config` is a `QuantizeConfig` (its include/exclude/min_features decide; granularity and rotation are
    ignored); with `family` (e.g. "wan") the family's INT8 rules are used instead.  Returns
    {module name: "fp8 rowwise" | "kept"} for every Linear seen.
    """
    from ..layers import QuantizeConfig, _set_submodule

    if family is not None:
        config = family_rules(family)
    config = config or QuantizeConfig()
    report: Dict[str, str] = {}
    for name, linear in [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]:
        if not config.wants(name, linear):
            report[name] = "kept"
            continue
        _set_submodule(model, name, Fp8Linear.from_linear(linear, name=name))
        report[name] = "fp8 rowwise"
        if progress:
            progress(name)
    return report


def family_rules(family: str, **changes):
    """The `QuantizeConfig` that selects exactly the layers a model family quantizes on the fly."""
    from ..layers import QuantizeConfig
    from ..models.families import get_family

    fam = get_family(family)
    return QuantizeConfig(include=tuple(f"^(?:{p})$" for p in fam.quantize), min_features=1, **changes)
