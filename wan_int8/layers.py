"""`Int8Linear`, the INT8 W8A8 layer, and `quantize_model`, which swaps `nn.Linear` layers for it by rules."""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .kernels.ops import int8_linear
from .quant.hadamard import default_group_size
from .quant.int8 import quantize_weight
from .quant.types import Int8Weight, QuantFormatError, Rotation

log = logging.getLogger("wan_int8")


class KeepsStorageDtypes(nn.Module):
    """Moving the module moves its buffers; casting it (`model.to(torch.bfloat16)`) leaves quantized codes and
    fp32 scales in their own dtypes (a bf16 scale would silently lose precision)."""

    def _apply(self, fn, recurse=True):
        keep = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, before in keep.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return self


class Int8Linear(KeepsStorageDtypes):
    """A linear layer with int8 weights `[N, K]`, fp32 scales, optional rotation, float bias.

    State-dict keys: `weight` (int8), `weight_scale` (fp32 `[]`, `[N]` or `[N, K/g]`), `bias`, and when present
    `input_scale` (static activation scale) and `rotation_signs`.  The scales stay fp32 whatever dtype the
    module is moved to; `weight` stays int8.  Forward: per-token INT8 activations, int8 GEMM, fp32 epilogue,
    output in the input dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, granularity: str = "row",
                 group_size: int = 128, rotation: Optional[Rotation] = None, device=None,
                 bias_dtype: torch.dtype = torch.float32, name: str = ""):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.layer_name = name
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.int8, device=device))
        scale_shape = {"tensor": (), "row": (out_features,), "group": (out_features, in_features // group_size)}
        if granularity not in scale_shape:
            raise ValueError(f"unknown granularity {granularity!r}")
        self.register_buffer("weight_scale", torch.ones(scale_shape[granularity], dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.register_buffer("input_scale", None)
        self.register_buffer("rotation_signs", None)
        self._set_rotation(rotation)

    def _set_rotation(self, rotation: Optional[Rotation]) -> None:
        self.rotation_kind = rotation.kind if rotation is not None else "none"
        self.rotation_group = rotation.group_size if rotation is not None else 0
        signs = rotation.signs if rotation is not None else None
        self.register_buffer("rotation_signs", None if signs is None else signs.to(torch.float32).clone())

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_int8_weight(cls, weight: Int8Weight, bias: Optional[torch.Tensor] = None, name: str = "") -> "Int8Linear":
        weight.validate(name or "layer")
        n, k = weight.qdata.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise QuantFormatError(f"{name or 'layer'}: bias has shape {list(bias.shape)}, expected [{n}]")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.layer_name = k, n, name
        layer.register_buffer("weight", weight.qdata)
        layer.register_buffer("weight_scale", weight.scale)
        layer.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        scale_in = weight.input_scale
        layer.register_buffer("input_scale", None if scale_in is None else scale_in.reshape(()).to(torch.float32))
        layer.register_buffer("rotation_signs", None)
        layer._set_rotation(weight.rotation)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "row", group_size: int = 128,
                    rotation: Optional[Rotation] = None, name: str = "") -> "Int8Linear":
        w = linear.weight.detach()
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls.from_int8_weight(quantize_weight(w, granularity, group_size, rotation), bias, name)

    def int8_weight(self) -> Int8Weight:
        return Int8Weight(self.weight, self.weight_scale, self.rotation, self.input_scale)

    @property
    def rotation(self) -> Optional[Rotation]:
        if self.rotation_kind == "none":
            return None
        return Rotation(self.rotation_kind, self.rotation_group, self.rotation_signs)

    # -- run ------------------------------------------------------------------------------------
    # LoRA: an object with `apply(x, y) -> y` (wan_int8.lora) installed by the LoRA machinery; it adds its
    # low-rank term into the INT8 output and never touches the int8 weight.  None: no LoRA.  When it also has
    # `fused_parts(x) -> (t, B, state)` and `finish(x, y, state) -> y`, the low-rank term `t·Bᵀ` goes into the
    # INT8 op (the Triton GEMM adds it in its epilogue: y is written once) and `finish` adds the rest.
    lora = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora
        fused = getattr(lora, "fused_parts", None) if lora is not None else None
        if fused is not None:
            t, b, state = fused(x)
            y = int8_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale, self.rotation_kind,
                            self.rotation_group, self.rotation_signs, self.layer_name, lora_t=t, lora_b=b)
            return lora.finish(x, y, state)
        y = int8_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale, self.rotation_kind,
                        self.rotation_group, self.rotation_signs, self.layer_name)
        if lora is not None:
            y = lora.apply(x, y)
        return y

    # The fused Wan block (wan_int8.fused) talks to INT8 layers through these two methods.
    def int8_activation(self, x: torch.Tensor) -> Optional[tuple]:
        """How this layer quantizes its input -- (rotation kind, group, signs) -- when it can take pre-quantized
        per-token codes instead of x (one quantization shared by layers with the same key); None when it cannot
        (a static input scale)."""
        if self.input_scale is not None:
            return None
        return (self.rotation_kind, self.rotation_group, self.rotation_signs)

    def int8_call(self, x: torch.Tensor, sx: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                  lora_t: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None, **epilogue) -> torch.Tensor:
        """The INT8 op on x (or on pre-quantized codes x with scales sx) with a fused LoRA term and block epilogue
        (`act`, `residual`, `gate`, `seq`, `per`: see `kernels.ops.int8_linear`); no LoRA slot handling."""
        return int8_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale, self.rotation_kind,
                           self.rotation_group, self.rotation_signs, self.layer_name, lora_t=lora_t, lora_b=lora_b,
                           sx=sx, out_dtype=out_dtype, **epilogue)

    def extra_repr(self) -> str:
        gran = {0: "tensor", 1: "row", 2: f"group{self.in_features // max(1, self.weight_scale.shape[-1])}"}
        text = f"in={self.in_features}, out={self.out_features}, scale={gran[self.weight_scale.dim()]}"
        if self.rotation_kind != "none":
            text += f", rotation={self.rotation_kind}{self.rotation_group}"
        if self.input_scale is not None:
            text += ", static-input-scale"
        return text


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """How `quantize_model` quantizes: which layers (regexes on qualified module names) and how.

    A Linear is quantized when it matches one of `include` (or `include` is empty), matches none of
    `exclude`, and both its dimensions are at least `min_features`.
    """

    granularity: str = "row"
    group_size: int = 128
    rotate: bool = False
    rotation_group: int = 256
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    min_features: int = 16

    def wants(self, name: str, linear: nn.Module) -> bool:
        w = getattr(linear, "weight", None)
        if w is None or w.dim() != 2 or min(w.shape) < self.min_features:
            return False
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)

    def rotation_for(self, k: int) -> Optional[Rotation]:
        if not self.rotate:
            return None
        g = default_group_size(k, self.rotation_group)
        return Rotation("regular", g) if g else None


def quantize_model(model: nn.Module, config: QuantizeConfig = QuantizeConfig(),
                   progress: Optional[Callable[[str], None]] = None) -> Dict[str, str]:
    """Replace, in place, every `nn.Linear` that `config` selects with an `Int8Linear`.

    Returns {module name: "int8 <granularity>[ rot]" or "kept: <why>"} for every Linear seen.
    """
    report: Dict[str, str] = {}
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    for name, linear in targets:
        if not config.wants(name, linear):
            report[name] = "kept"
            continue
        rotation = config.rotation_for(linear.in_features)
        if config.rotate and rotation is None:
            log.info("layer %s: K=%d has no power-of-4 group size dividing it; quantized without rotation",
                     name, linear.in_features)
        try:
            q = Int8Linear.from_linear(linear, config.granularity, config.group_size, rotation, name=name)
        except QuantFormatError as exc:
            raise QuantFormatError(f"layer {name}: {exc}") from None
        _set_submodule(model, name, q)
        report[name] = f"int8 {config.granularity}" + (" rot" if rotation else "")
        if progress:
            progress(name)
    return report


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def has_lora_slot(module: nn.Module) -> bool:
    """Layers that take a wan-int8 LoRA stack in a `lora` slot (`apply(x, y) -> y`): our Int8Linear and the
    ComfyUI glue's Linear.  Other linears (plain nn.Linear) get a forward hook instead."""
    return "lora" in dir(type(module)) and hasattr(module, "in_features") and hasattr(module, "out_features")


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a linear computes with, in the original (unrotated) basis, as float64."""
    if isinstance(module, Int8Linear):
        from .quant.int8 import dequantize
        return dequantize(module.int8_weight(), torch.float64)
    w = module.weight
    if hasattr(w, "dequantize"):   # ComfyUI QuantizedTensor: dequantize() un-rotates convrot weights
        w = w.dequantize()
    return w.detach().to(torch.float64)


