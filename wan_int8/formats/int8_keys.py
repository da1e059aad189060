"""Reading unmarked INT8 layers (no comfy_quant): the scale spellings the seed, convert_to_quant and lightx2v use.

Shared by the lightx2v and seed readers: they differ in what else a file may hold, not in how a scale is found.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from ..quant.types import Int8Weight, QuantFormatError, Rotation
from .base import LayerSource
from .comfy_native import _input_scale
from .safetensors_io import CheckpointError, SafetensorsFile
from .scales import canonical_scale, check_scale_values, scale_kind

# Spellings of the weight scale, relative to the layer prefix "<p>." (the seed accepted all of these).
WEIGHT_SCALE_SUFFIXES = ("weight_scale", "scale_weight", "scale", "weight.scale", "weight.weight_scale")
INPUT_SCALE_SUFFIXES = ("input_scale", "act_scale", "input.scale", "input.input_scale", "scale_input")


def int8_layer_names(f: SafetensorsFile) -> List[str]:
    return [k[: -len(".weight")] for k, i in f.header.tensors.items()
            if k.endswith(".weight") and i.dtype == "I8" and len(i.shape) == 2]


def find_one(f: SafetensorsFile, p: str, suffixes, what: str) -> Optional[str]:
    found = [f"{p}.{s}" for s in suffixes if f"{p}.{s}" in f]
    if len(found) > 1:
        raise CheckpointError(f"{f.path}: layer {p!r} has {len(found)} {what} tensors ({', '.join(found)}); "
                              f"which one is meant is ambiguous, so the file is refused")
    return found[0] if found else None


def plain_int8_layer(f: SafetensorsFile, name: str, p: str, warnings: list,
                     rotation: Optional[Rotation] = None) -> Tuple[LayerSource, set]:
    """A LayerSource for `<p>.weight` (int8) with its scale under any known spelling; returns (layer, keys used)."""
    n, k = f.info(f"{p}.weight").shape
    skey = find_one(f, p, WEIGHT_SCALE_SUFFIXES, "weight-scale")
    if skey is None:
        raise CheckpointError(f"{f.path}: int8 tensor {p}.weight has no scale (looked for "
                              f"{', '.join(p + '.' + s for s in WEIGHT_SCALE_SUFFIXES)}); cannot dequantize it")
    where = f"{f.path}: {skey}"
    try:
        gran, g, note = scale_kind(f.info(skey).shape, n, k, where)
    except QuantFormatError as exc:
        raise CheckpointError(str(exc)) from None
    ikey = find_one(f, p, INPUT_SCALE_SUFFIXES, "input-scale")
    input_scale = _input_scale(f, ikey, warnings) if ikey else None

    def build() -> Int8Weight:
        scale = canonical_scale(f.get(skey), n, k, where)
        check_scale_values(scale, where)
        return Int8Weight(f.get(f"{p}.weight"), scale, rotation, input_scale)

    used = {f"{p}.weight", skey} | ({ikey} if ikey else set())
    layer = LayerSource(name, n, k, gran, g, rotation.describe() if rotation else "", tuple(sorted(used)), build,
                        note=note, has_input_scale=input_scale is not None)
    return layer, used
