"""Write a loaded ComfyUI model in ComfyUI's native INT8 format, optionally with its LoRAs merged in.

Streams layer by layer with `StreamingWriter`: the header is planned from the model's tensors (a merged layer
keeps its shapes), then each layer is produced, merged if asked, and written before the next one.
"""
from __future__ import annotations

import json
import logging
from typing import Iterator, List, Optional, Tuple

import torch

from ..formats.safetensors_io import OutEntry, StreamingWriter
from ..quant.int8 import quantize_weight
from ..quant.types import Int8Weight, Rotation
from .load import native_layer_tensors
from .ops import GROUP_LAYOUT, NATIVE_LAYOUT

log = logging.getLogger("wan_int8.comfy")


def int8_weight_of(module) -> Optional[Int8Weight]:
    """The canonical INT8 weight behind one of our Linears (None for float layers)."""
    w = getattr(module, "weight", None)
    layout = getattr(module, "layout_type", None)
    if w is None or layout not in (NATIVE_LAYOUT, GROUP_LAYOUT) or not hasattr(w, "_qdata"):
        return None
    p = w._params
    scale = p.scale.to(torch.float32)
    if layout == NATIVE_LAYOUT:
        scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1)
        rot = Rotation("regular", int(p.convrot_groupsize)) if p.convrot else None
    else:
        rot = Rotation("regular", int(p.rotation_group)) if p.rotation_group else None
    input_scale = getattr(module, "wan_input_scale", None)
    return Int8Weight(w._qdata.cpu(), scale.cpu(), rot, None if input_scale is None else input_scale.cpu())


def _items(model: torch.nn.Module) -> Iterator[Tuple[str, object]]:
    """(layer name, Int8Weight) for INT8 layers and (key, tensor) for everything else, in module order."""
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        w = int8_weight_of(module)
        if w is not None:
            yield mname, w
            if getattr(module, "bias", None) is not None:
                yield f"{prefix}bias", module.bias.detach()
            continue
        skip = getattr(module, "_non_persistent_buffers_set", set()) | {"wan_input_scale"}
        for pname, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and pname not in skip:
                yield prefix + pname, t.detach()


def _comfy_patched(patcher, key: str, w: Int8Weight) -> Optional[torch.Tensor]:
    """The float weight with ComfyUI's own patches for `key` applied (None if there are none)."""
    patches = getattr(patcher, "patches", {}).get(key) if patcher is not None else None
    if not patches:
        return None
    import comfy.lora
    from ..quant.int8 import dequantize
    return comfy.lora.calculate_weight(patches, dequantize(w), key, intermediate_dtype=torch.float32)


def save_native(patcher, path: str, bake: bool = False, backend=None) -> str:
    """Write `patcher`'s diffusion model to `path` (ComfyUI-native INT8 safetensors). Returns a summary."""
    from .lora import stack_of
    model = patcher.model.diffusion_model
    stack = stack_of(patcher) if bake else None
    active = stack.active() if stack is not None else []
    bake_backend = backend or (stack.backend if stack is not None else None)
    if not bake and (stack_of(patcher) is not None or getattr(patcher, "patches", None)):
        log.warning("wan-int8 saver: this model has LoRAs; they are not in the file (bake_loras=enable merges them)")

    # plan: every output key with dtype and shape, from the un-merged tensors (merging keeps shapes)
    entries: List[OutEntry] = []
    for name, item in _items(model):
        tensors = native_layer_tensors(name, item) if isinstance(item, Int8Weight) else {name: item}
        entries += [OutEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    merged = 0
    meta = {"wan_int8": json.dumps({"saved_from": "ComfyUI", "loras_baked": bool(bake and (active or patcher.patches))})}
    with StreamingWriter(path, entries, meta) as writer:
        for name, item in _items(model):
            if isinstance(item, Int8Weight):
                new = item
                if bake:
                    new = _bake(patcher, name, item, active, bake_backend)
                    merged += new is not item
                for k, t in native_layer_tensors(name, new).items():
                    writer.write(k, t.cpu())
            else:
                writer.write(name, item.cpu())
    return f"{sum(e.key.endswith('.comfy_quant') for e in entries)} INT8 layers, {merged} with LoRAs merged"


def _bake(patcher, name: str, w: Int8Weight, active, backend) -> Int8Weight:
    if active:
        w = backend.bake(name, w, active)
    patched = _comfy_patched(patcher, f"diffusion_model.{name}.weight", w)
    if patched is not None:   # stock LoraLoader patches on this patcher: merge and requantize like ComfyUI does
        gs = w.group_size
        w = quantize_weight(patched, w.granularity, gs, w.rotation)
    return w
