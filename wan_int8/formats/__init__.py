"""Checkpoint formats: detect, read into the canonical lazy `Checkpoint`, write ComfyUI-native.

Detection runs the readers in order, most specific first; the first that recognises the file reads it.
A file none recognises is an error that says what was found.  Key renames (diffusers -> ComfyUI names) are
applied on top of whichever quantization format the file has.
"""
from __future__ import annotations

import logging
from typing import List, Tuple

from .base import Checkpoint, LayerSource, TensorSource, strip_prefix
from .safetensors_io import CheckpointError, SafetensorsFile, read_header
from . import comfy_native, diffusers, float_format, lightx2v, scaled_fp8, seed

log = logging.getLogger("wan_int8.formats")

# (module, needs) in detection order: ComfyUI markers beat everything; lightx2v is the narrowest unmarked int8.
READERS = (comfy_native, scaled_fp8, lightx2v, seed, float_format)


def detect_format(f: SafetensorsFile) -> Tuple[object, str, str]:
    """(reader module, prefix, evidence) for an open file; raises CheckpointError if nothing fits."""
    prefix = strip_prefix(f.keys())
    for reader in READERS:
        evidence = reader.detect(f, prefix)
        if evidence:
            return reader, prefix, evidence
    dtypes = sorted({i.dtype for i in f.header.tensors.values()})
    raise CheckpointError(
        f"{f.path}: unknown checkpoint layout ({len(f.keys())} tensors, dtypes {', '.join(dtypes) or 'none'}): no "
        f"ComfyUI quant markers, no int8 weights with scales, no 2-D float weights. If it is a quantized format "
        f"wan-int8 should know, please report it with the output of `wan-int8 inspect --json`.")


def open_checkpoint(path: str) -> Checkpoint:
    """Open a safetensors checkpoint of any supported format as a canonical, lazy `Checkpoint`."""
    f = SafetensorsFile(path)
    try:
        reader, prefix, evidence = detect_format(f)
        ckpt = reader.read(f, prefix, evidence)
        renamed = diffusers.detect(ckpt)
        if renamed:
            ckpt = diffusers.to_comfy(ckpt, renamed)
    except BaseException:
        f.close()
        raise
    for w in _summarise(ckpt.warnings):
        log.warning("%s: %s", path, w)
    return ckpt


def _summarise(warnings: List[str]) -> List[str]:
    """Collapse repeated warnings (one line per kind, with a count) so a 400-layer file logs a few lines."""
    counts = {}
    for w in warnings:
        counts[w] = counts.get(w, 0) + 1
    out = []
    for w, c in counts.items():
        if w.startswith("placeholder input_scale"):
            out.append(f"{c} layer(s) carry a {w.split(' ', 1)[1]} (a placeholder, not a calibrated scale): "
                       f"ignored, activations are quantized dynamically per token")
        else:
            out.append(w if c == 1 else f"{w} (x{c})")
    return out


__all__ = ["Checkpoint", "CheckpointError", "LayerSource", "TensorSource", "detect_format", "open_checkpoint",
           "read_header"]
