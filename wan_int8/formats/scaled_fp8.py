"""FP8 checkpoints without comfy_quant markers, converted to INT8 row-wise at load.

- ComfyUI legacy "scaled fp8": a `scaled_fp8` marker tensor at the model prefix; each fp8 Linear `<p>`
  has `<p>.weight` (float8_e4m3fn / e5m2) and `<p>.scale_weight` (the dequantization scale, w = fp8 · s;
  scalar, or per output row), optionally `<p>.scale_input` (ComfyUI drops it when it is 1.0).
  ComfyUI's `convert_old_quants` turns these into `float8_e4m3fn` comfy_quant layers.
- Unmarked fp8 files: plain fp8 casts (e.g. the `*_fp8_e4m3fn` Wan files: no scale at all) and the
  modelopt/BFL layout (`<p>.weight_scale` and `<p>.input_scale` scalars).

Every 2-D fp8 `.weight` is dequantized in fp32 and requantized row-wise (`quantize_weight(w, "row")`): a
second rounding, so these layers are lossy (LayerSource.lossless=False).  fp8 input scales describe fp8
activations (amax / 448), not INT8 ones, so they are dropped.  Other fp8 tensors (norms, modulation,
convolutions) become bf16.  The marker itself is dropped.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..quant.int8 import quantize_weight
from ..quant.types import Int8Weight
from .base import Checkpoint, LayerSource, TensorSource, passthrough, unprefixed
from .int8_keys import find_one
from .safetensors_io import CheckpointError, SafetensorsFile
from .scales import is_scalar_or_row

NAME = "scaled-fp8"
FP8 = ("F8_E4M3", "F8_E5M2")
WEIGHT_SCALES = ("scale_weight", "weight_scale")
INPUT_SCALES = ("scale_input", "input_scale")


def detect(f: SafetensorsFile, prefix: str) -> Optional[str]:
    marker = f"{prefix}scaled_fp8"
    if marker in f:
        return f"legacy ComfyUI scaled-fp8 marker {marker!r}"
    fp8 = [k for k, i in f.header.tensors.items() if k.endswith(".weight") and i.dtype in FP8 and len(i.shape) == 2]
    if not fp8 or any(i.dtype == "I8" and k.endswith(".weight") for k, i in f.header.tensors.items()):
        return None
    scaled = sum(any(f"{k[:-len('.weight')]}.{s}" in f for s in WEIGHT_SCALES) for k in fp8)
    return f"{len(fp8)} unmarked fp8 weights ({scaled} with a weight scale)"


def read(f: SafetensorsFile, prefix: str, detail: str) -> Checkpoint:
    marker = f"{prefix}scaled_fp8"
    layers: Dict[str, LayerSource] = {}
    used = {marker} if marker in f else set()
    warnings = []
    for key, info in f.header.tensors.items():
        if info.dtype == "I8" and key.endswith(".weight"):
            raise CheckpointError(f"{f.path}: {key!r} is int8 in an fp8 checkpoint; mixed fp8/int8 files without "
                                  f"comfy_quant markers are not understood")
        if not (key.endswith(".weight") and info.dtype in FP8 and len(info.shape) == 2):
            continue
        p = key[: -len(".weight")]
        name = unprefixed(p, prefix)
        skey = find_one(f, p, WEIGHT_SCALES, "fp8 weight-scale")
        ikey = find_one(f, p, INPUT_SCALES, "fp8 input-scale")
        layers[name] = _fp8_layer(f, name, key, skey, info)
        used |= {key} | ({skey} if skey else set()) | ({ikey} if ikey else set())
        if ikey:
            warnings.append("fp8 input scales dropped (they scale fp8 activations; INT8 activations are "
                            "quantized dynamically per token)")
    tensors = {}
    for key, info in f.header.tensors.items():
        if key in used:
            continue
        out = unprefixed(key, prefix)
        if info.dtype in FP8:
            tensors[out] = TensorSource(out, info.shape, torch.bfloat16, (key,),
                                        lambda key=key: f.get(key).to(torch.float32).to(torch.bfloat16))
        else:
            tensors[out] = passthrough(f, key, out)
    return Checkpoint(f.path, NAME, detail, layers, tensors, dict(f.header.metadata), f, warnings=warnings)


def _fp8_layer(f: SafetensorsFile, name: str, wkey: str, skey: Optional[str], info) -> LayerSource:
    n, k = info.shape
    if skey is not None:
        sshape = f.info(skey).shape
        if not is_scalar_or_row(sshape, n):
            raise CheckpointError(f"{f.path}: {skey} has shape {list(sshape)}; an fp8 weight scale must be a scalar "
                                  f"or one per output row [{n}]")

    def build() -> Int8Weight:
        w = f.get(wkey).to(torch.float32)
        if skey is not None:
            s = f.get(skey).to(torch.float32)
            if not bool(torch.isfinite(s).all()):
                raise CheckpointError(f"{f.path}: {skey} contains NaN or Inf")
            w = w * (s.reshape(()) if s.numel() == 1 else s.reshape(n, 1))
        return quantize_weight(w, "row")

    kind = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}[info.dtype]
    return LayerSource(name, n, k, "row", k, "", (wkey,) + ((skey,) if skey else ()), build,
                       note=f"{kind} weight{' x ' + skey.rsplit('.', 1)[-1] if skey else ''} converted to int8 "
                            f"row-wise at load (lossy: second rounding)",
                       lossless=False)
