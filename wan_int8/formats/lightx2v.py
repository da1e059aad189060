"""lightx2v INT8 Wan checkpoints (e.g. wan2.2_i2v_A14b_*_int8_lightx2v_4step): int8 weights with fp32
`weight_scale [N, 1]` (symmetric, per output row), no marker; biases, norms, embeddings and modulation in fp32.

Recognised when every int8 weight has exactly a `weight_scale` of shape [N, 1] (or [N]) and the file carries
no other quantization keys; anything else unmarked goes to the seed/convert_to_quant reader.
"""
from __future__ import annotations

from typing import Dict, Optional

from .base import Checkpoint, LayerSource, passthrough_rest, unprefixed
from .int8_keys import int8_layer_names, plain_int8_layer
from .safetensors_io import SafetensorsFile

NAME = "lightx2v"
_OTHER_MARKERS = ("scale_weight", "input_scale", "hadamard_quip", "sign_row", "sign_col", "smooth_factors",
                  "quip_s_u", "quip_s_v", "scaled_fp8", "comfy_quant")


def detect(f: SafetensorsFile, prefix: str) -> Optional[str]:
    names = int8_layer_names(f)
    if not names:
        return None
    for p in names:
        info = f.header.tensors.get(f"{p}.weight_scale")
        n = f.info(f"{p}.weight").shape[0]
        if info is None or info.dtype != "F32" or info.shape not in ((n, 1), (n,)):
            return None
    if any(k.rsplit(".", 1)[-1] in _OTHER_MARKERS or k.endswith(".weight.scale") for k in f.keys()):
        return None
    return f"{len(names)} int8 weights with fp32 per-row weight_scale, no markers"


def read(f: SafetensorsFile, prefix: str, detail: str) -> Checkpoint:
    layers: Dict[str, LayerSource] = {}
    used = set()
    warnings = []
    for p in int8_layer_names(f):
        name = unprefixed(p, prefix)
        layers[name], keys = plain_int8_layer(f, name, p, warnings)
        used |= keys
    tensors = passthrough_rest(f, prefix, used)
    return Checkpoint(f.path, NAME, detail, layers, tensors, dict(f.header.metadata), f, warnings=warnings)
