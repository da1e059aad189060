"""ComfyUI's native quantized format (`comfy_quant`), read and written.

Per quantized linear `<p>`: `<p>.weight` (int8 [N, K]), `<p>.weight_scale` (fp32 scalar or per-row [N, 1]),
`<p>.comfy_quant` (uint8 tensor of JSON: `{"format": "int8_tensorwise", "convrot": true,
"convrot_groupsize": 256}`), or instead of the per-layer tensors a safetensors header entry
`_quantization_metadata = {"layers": {"<p>": {...}}}`.  With `convrot` the stored weight is W·H per
256-wide K-group (regular Hadamard), and the activation is rotated by the same H.

We write `int8_tensorwise` (row or tensor scales, convrot when rotated with the regular Hadamard and no
signs): stock ComfyUI >= 0.29 loads those files as they are.  Group scales have no native spelling; we write
them as `{"format": "int8_groupwise", "group_size": g}` which only wan-int8 reads (stock ComfyUI refuses
it by name rather than misreading it).
"""
from __future__ import annotations

import json
import logging
from typing import Dict, Optional

import torch

from ..quant.int8 import quantize_weight
from ..quant.types import Int8Weight, QuantFormatError, Rotation
from .base import (Checkpoint, LayerSource, decode_json_tensor, encode_json_tensor, passthrough_rest,
                   unprefixed)
from .safetensors_io import CheckpointError, SafetensorsFile
from .scales import canonical_scale, check_scale_values, scale_kind

log = logging.getLogger("wan_int8.formats")

NAME = "comfy-native"
INT8_FORMATS = ("int8_tensorwise", "int8_blockwise", "int8_groupwise")
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
SCALE_KEYS = ("weight_scale", "input_scale", "weight_scale_2", "pre_quant_scale")


def detect(f: SafetensorsFile, prefix: str) -> Optional[str]:
    if "_quantization_metadata" in f.header.metadata:
        return "safetensors header _quantization_metadata"
    n = sum(k.endswith(".comfy_quant") for k in f.keys())
    return f"{n} layers carry comfy_quant markers" if n else None


def layer_configs(f: SafetensorsFile, prefix: str) -> Dict[str, dict]:
    """{layer name without prefix: comfy_quant dict} from per-layer tensors and/or the header."""
    configs: Dict[str, dict] = {}
    raw = f.header.metadata.get("_quantization_metadata")
    if raw:
        try:
            layers = json.loads(raw).get("layers", {})
        except (json.JSONDecodeError, AttributeError) as exc:
            raise CheckpointError(f"{f.path}: damaged _quantization_metadata header: {exc}") from None
        for name, conf in layers.items():
            if not isinstance(conf, dict):
                raise CheckpointError(f"{f.path}: _quantization_metadata entry for {name!r} is not an object")
            configs[unprefixed(name, prefix)] = conf
    for key in f.keys():
        if key.endswith(".comfy_quant"):
            name = unprefixed(key[: -len(".comfy_quant")], prefix)
            configs[name] = decode_json_tensor(f.get(key), f"{f.path}: {key}")
    return configs


def read(f: SafetensorsFile, prefix: str, detail: str) -> Checkpoint:
    configs = layer_configs(f, prefix)
    keys = set(f.keys())
    layers: Dict[str, LayerSource] = {}
    used = set()
    warnings = []
    sizes = None
    for name, conf in configs.items():
        fmt = conf.get("format")
        p = prefix + name
        wkey = f"{p}.weight"
        if wkey not in keys:
            raise CheckpointError(f"{f.path}: layer {name!r} has a comfy_quant marker but no tensor {wkey!r}")
        own = {wkey, f"{p}.comfy_quant"} | {f"{p}.{s}" for s in SCALE_KEYS if f"{p}.{s}" in keys}
        if f"{p}.hadamard_quip" in keys:
            # convert_to_quant_QuIP_INT8 --comfy_quant marks transformed-domain (two-sided QuIP) layers as
            # int8_tensorwise; their weights are not W·H per group, so they go through the QuIP conversion.
            from . import seed
            if sizes is None:
                sizes = seed.feature_sizes_of(f, [n for n in seed.int8_layer_names(f)])
            layers[name], quip_keys = seed.hadamard_quip_layer(f, name, p, sizes, warnings)
            used |= own | quip_keys
            continue
        if fmt in INT8_FORMATS:
            layers[name] = _int8_layer(f, name, p, conf, warnings)
        elif fmt in FP8_FORMATS:
            layers[name] = _fp8_layer(f, name, p, conf)
        else:
            raise CheckpointError(
                f"{f.path}: layer {name!r} uses quantization format {fmt!r}, which wan-int8 does not run "
                f"(it runs int8_tensorwise/int8_blockwise and converts float8); load this file with stock "
                f"ComfyUI's UNETLoader instead")
        if conf.get("full_precision_matrix_mult"):
            warnings.append(f"layer {name}: full_precision_matrix_mult is set; wan-int8 runs it as W8A8 anyway")
        used |= own
    used |= {key for key in f.keys() if key.endswith(".comfy_quant")}   # markers are read above, never passed on
    tensors = passthrough_rest(f, prefix, used)
    return Checkpoint(f.path, NAME, detail, layers, tensors, dict(f.header.metadata), f, warnings=warnings)


def _int8_layer(f: SafetensorsFile, name: str, p: str, conf: dict, warnings) -> LayerSource:
    winfo = f.info(f"{p}.weight")
    if winfo.dtype != "I8" or len(winfo.shape) != 2:
        raise CheckpointError(f"{f.path}: layer {name!r} is marked {conf.get('format')} but its weight is "
                              f"{winfo.dtype} {list(winfo.shape)} (expected a 2-D int8 tensor)")
    n, k = winfo.shape
    skey = f"{p}.weight_scale"
    if skey not in f:
        raise CheckpointError(f"{f.path}: int8 layer {name!r} has no {skey!r}")
    hint = conf.get("group_size") if conf.get("format") != "int8_tensorwise" else None
    where = f"{f.path}: {skey}"
    try:
        gran, g, note = scale_kind(f.info(skey).shape, n, k, where, hint)
    except QuantFormatError as exc:
        raise CheckpointError(str(exc)) from None
    rotation = None
    if conf.get("convrot"):
        rotation = Rotation("regular", int(conf.get("convrot_groupsize", 256)))
        if k % rotation.group_size:
            raise CheckpointError(f"{f.path}: layer {name!r}: convrot group {rotation.group_size} does not divide K={k}")
    input_scale = _input_scale(f, f"{p}.input_scale", warnings)

    def build() -> Int8Weight:
        scale = canonical_scale(f.get(skey), n, k, where, hint)
        check_scale_values(scale, where)
        return Int8Weight(f.get(f"{p}.weight"), scale, rotation, input_scale)

    return LayerSource(name, n, k, gran, g, rotation.describe() if rotation else "", (f"{p}.weight", skey), build,
                       note=note, has_input_scale=input_scale is not None)


def _fp8_layer(f: SafetensorsFile, name: str, p: str, conf: dict) -> LayerSource:
    winfo = f.info(f"{p}.weight")
    n, k = winfo.shape
    skey = f"{p}.weight_scale"

    def build() -> Int8Weight:
        w = f.get(f"{p}.weight").to(torch.float32)
        if skey in f:
            s = f.get(skey).to(torch.float32)
            w = w * (s.reshape(()) if s.numel() == 1 else s.reshape(n, -1) if s.shape[0] == n else s)
        return quantize_weight(w, "row")

    return LayerSource(name, n, k, "row", k, "", (f"{p}.weight", skey), build,
                       note=f"{conf.get('format')} weights converted to int8 row-wise at load", lossless=False)


PLACEHOLDER = 1.0


def _input_scale(f: SafetensorsFile, key: str, warnings) -> Optional[torch.Tensor]:
    """A real static activation scale, or None (absent, placeholder 1.0, or not a scalar: dynamic is used)."""
    if key not in f:
        return None
    t = f.get(key).to(torch.float32)
    if t.numel() != 1:
        warnings.append(f"{key}: per-channel input_scale {list(t.shape)} is not a static per-tensor scale; ignored "
                        f"(dynamic per-token activation quantization is used)")
        return None
    value = float(t.reshape(()))
    if value == PLACEHOLDER or not (value > 0) or value != value:
        warnings.append(f"placeholder input_scale={value:g}")
        return None
    return t.reshape(())


# -- writing -------------------------------------------------------------------------------------

def layer_marker(granularity: str, group_size: int, rotation: Optional[Rotation]) -> dict:
    """The comfy_quant JSON for one layer (raises if the native format cannot express it)."""
    if granularity == "group":
        conf = {"format": "int8_groupwise", "group_size": group_size}
    else:
        conf = {"format": "int8_tensorwise"}
    if rotation is not None:
        if rotation.kind != "regular" or rotation.signs is not None or granularity != "row":
            raise QuantFormatError(
                f"rotation {rotation.describe()} with {granularity} scales has no ComfyUI-native spelling "
                f"(convrot is the regular Hadamard without signs, with row scales)")
        conf.update({"convrot": True, "convrot_groupsize": rotation.group_size})
    return conf


def layer_tensors(name: str, weight: Int8Weight) -> Dict[str, torch.Tensor]:
    """The tensors that store one canonical INT8 layer in native format, by key."""
    s = weight.scale
    marker = layer_marker(weight.granularity, weight.group_size, weight.rotation)
    # Per-row scales go out as [N, 1]: ComfyUI's int8 matmul takes [N] too, but its dequantize (LoRA merges,
    # weight patches) needs [N, 1].  A tensor-wise scale stays a true 0-d tensor.
    out = {f"{name}.weight": weight.qdata,
           f"{name}.weight_scale": s.reshape(-1, 1) if s.dim() == 1 else s,
           f"{name}.comfy_quant": encode_json_tensor(marker)}
    if weight.input_scale is not None:
        out[f"{name}.input_scale"] = weight.input_scale.reshape(()).to(torch.float32)
    return out


def native_loaders(layers) -> str:
    """Which loaders can run a checkpoint made of these canonical layers."""
    if all(l.granularity in ("tensor", "row") and (not l.rotation or l.rotation.startswith("regular")) for l in layers):
        return "wan-int8, stock ComfyUI (native int8_tensorwise)"
    return "wan-int8 only (group scales have no ComfyUI-native format)"
