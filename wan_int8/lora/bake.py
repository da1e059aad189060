"""Bake: merge LoRAs into an INT8 checkpoint and write ComfyUI-native INT8 (an explicit export, never the
runtime default).

Per targeted INT8 layer: dequantize (to the original, unrotated basis), add Σ strength·delta exactly as the
runtime path does (DoRA included), requantize row-wise with the layer's own rotation.  Re-rotating the merged
weight is the same as rotating the delta the way the stored weight is rotated (R is linear), so baked convrot
layers stay consistent.  Float linears that the loader quantizes get the delta before quantization; norms,
biases and modulation get their `diff` / `diff_b` / `diff_m`.  The output streams through the loader's
native writer (one layer in memory at a time) and loads in stock ComfyUI and in wan-int8.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..formats import Checkpoint, open_checkpoint
from ..formats.base import LayerSource, TensorSource
from ..loader import LoadConfig, LoadReport, write_native
from ..quant.int8 import dequantize, quantize_weight
from ..quant.types import Int8Weight
from .keys import ModelTargets, Target
from .parse import LoraCache, LoraError, load_lora
from .runtime import DORA_EPS, FileReport, LoraReport, match_lora, parse_lora_spec

log = logging.getLogger("wan_int8.lora")

Part = Tuple[float, Target, object]


def merged_weight(w: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
    """W + Σ strength·delta in float64 (DoRA as in ComfyUI's weight_decompose, each relative to the base W)."""
    base = w.to(torch.float64)
    out = base.clone()
    n = base.shape[0]
    for strength, target, adapter in parts:
        rows = n // target.parts
        r0 = (target.part or 0) * rows
        ws = base[r0:r0 + rows]
        delta = adapter.delta(torch.float64)
        m = adapter.dora_scale
        if m is None:
            out[r0:r0 + rows] += strength * delta
        elif m.numel() == rows and (m.dim() == 1 or m.shape[0] == rows):
            g = m.reshape(-1).double() / (ws.norm(dim=1) + DORA_EPS)
            out[r0:r0 + rows] += strength * (g[:, None] * (ws + delta) - ws)
        else:
            wc = ws + delta
            h = m.reshape(-1).double() / (wc.norm(dim=0) + DORA_EPS)
            out[r0:r0 + rows] += strength * (wc * h[None, :] - ws)
    return out


def match_checkpoint(lora_path: str, model: Union[str, Checkpoint], strength: float = 1.0,
                     cache: Optional[LoraCache] = None) -> FileReport:
    """The match report of one LoRA file against a checkpoint's names and shapes (nothing is loaded)."""
    ckpt = open_checkpoint(model) if isinstance(model, str) else model
    try:
        targets = ModelTargets.from_shapes(ckpt.shapes())
    finally:
        if isinstance(model, str):
            ckpt.close()
    return match_lora(load_lora(lora_path, cache), targets, strength).report


def bake_loras(source: Union[str, Checkpoint], loras: Sequence[Union[str, Tuple[str, float]]], out_path: str,
               config: LoadConfig = LoadConfig(), cache: Optional[LoraCache] = None, progress=None
               ) -> Tuple[LoadReport, LoraReport]:
    """Merge LoRAs into a checkpoint (any supported format) and write ComfyUI-native INT8 to `out_path`."""
    start = time.perf_counter()
    ckpt = open_checkpoint(source) if isinstance(source, str) else source
    try:
        targets = ModelTargets.from_shapes(ckpt.shapes())
        layer_parts: Dict[str, List[Part]] = {}
        param_parts: Dict[str, List[Tuple[float, torch.Tensor]]] = {}
        reports: List[FileReport] = []
        for spec in loras:
            path, strength = parse_lora_spec(spec) if isinstance(spec, str) else spec
            match = match_lora(load_lora(path, cache), targets, float(strength))
            if match.report.matched == 0:
                raise LoraError(f"{path}: no key of this LoRA matches {ckpt.path}\n{match.report.summary()}")
            reports.append(match.report)
            for target, adapter in match.adapters:
                layer_parts.setdefault(target.name, []).append((float(strength), target, adapter))
            for key, _, delta in match.patches:
                param_parts.setdefault(key, []).append((float(strength), delta))

        layers = dict(ckpt.layers)
        for name, parts in layer_parts.items():
            if name in layers:
                layers[name] = _baked_layer(layers[name], parts)
        tensors = dict(ckpt.tensors)
        for name, parts in layer_parts.items():
            key = f"{name}.weight"
            if name not in ckpt.layers and key in tensors:
                tensors[key] = _patched_tensor(tensors[key], lambda t, p=parts: merged_weight(t, p))
        for key, deltas in param_parts.items():
            if key in tensors:
                tensors[key] = _patched_tensor(tensors[key], lambda t, d=deltas: _add_deltas(t, d))
            else:
                raise LoraError(f"{key}: a LoRA patches it but the checkpoint stores it as INT8")
        baked = dataclasses.replace(ckpt, layers=layers, tensors=tensors)
        report = write_native(baked, out_path, config, progress=progress, measure_error=False)
    finally:
        if isinstance(source, str):
            ckpt.close()
    lora_report = LoraReport(reports, False, time.perf_counter() - start)
    return report, lora_report


def bake_layer(name: str, weight: Int8Weight, stack: Sequence[Tuple[object, float]]) -> Int8Weight:
    """One INT8 layer with the stack's LoRAs merged (row-wise requantized, same rotation); `weight` itself when
    no LoRA of the stack targets `name`.  `stack` holds (parsed LoraFile, strength) pairs (the ComfyUI saver)."""
    n, k = weight.qdata.shape
    targets = ModelTargets({name: (n, k)}, {})
    parts: List[Part] = []
    for lora, strength in stack:
        for target, adapter in match_lora(lora, targets, float(strength)).adapters:
            parts.append((float(strength), target, adapter))
    return _merged_int8(weight, parts) if parts else weight


def _add_deltas(t: torch.Tensor, deltas) -> torch.Tensor:
    out = t.to(torch.float64).clone()
    for strength, d in deltas:
        out += strength * d.reshape(out.shape).to(torch.float64)
    return out


def _patched_tensor(src: TensorSource, fn) -> TensorSource:
    return dataclasses.replace(src, build=lambda: fn(src.build()).to(src.dtype))


def _merged_int8(w: Int8Weight, parts: Sequence[Part]) -> Int8Weight:
    out = quantize_weight(merged_weight(dequantize(w, torch.float64), parts), "row", rotation=w.rotation)
    out.input_scale = w.input_scale
    return out


def _baked_layer(layer: LayerSource, parts: Sequence[Part]) -> LayerSource:
    def build() -> Int8Weight:
        return _merged_int8(layer.load(), parts)
    return dataclasses.replace(layer, granularity="row", group_size=layer.in_features, build=build, lossless=False,
                               note=(layer.note + "; " if layer.note else "") + "LoRA baked in")
