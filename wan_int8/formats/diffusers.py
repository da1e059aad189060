"""diffusers key names -> ComfyUI key names, applied on top of whichever quantization format a file has.

Wan (inverse of diffusers' `convert_wan_transformer_to_diffusers`; research/comfy_integration.md §6):
  condition_embedder.time_embedder.linear_1/2 -> time_embedding.0/2, time_proj -> time_projection.1,
  text_embedder.linear_1/2 -> text_embedding.0/2, image_embedder.{norm1,ff.net.0.proj,ff.net.2,norm2,pos_embed}
  -> img_emb.{proj.0,proj.1,proj.3,proj.4,emb_pos}; blocks.N.attn1/attn2 -> self_attn/cross_attn with
  to_q/to_k/to_v/to_out.0 -> q/k/v/o and add_k_proj/add_v_proj/norm_added_k -> k_img/v_img/norm_k_img;
  blocks.N.norm2 <-> norm3 (diffusers' norm2 is the affine cross-attention norm, ComfyUI's norm3);
  ffn.net.0.proj/ffn.net.2 -> ffn.0/ffn.2; blocks.N.scale_shift_table -> blocks.N.modulation;
  scale_shift_table -> head.modulation; proj_out -> head.head; vace_blocks.N.proj_in/out -> before/after_proj.
Z-Image (the seed's conversion, ComfyUI's Lumina NextDiT names): all_x_embedder.<a>-<b>. -> x_embedder.,
  all_final_layer.<a>-<b>. -> final_layer., .attention.to_out.0. -> .attention.out., norm_q/norm_k ->
  q_norm/k_norm, and to_q/to_k/to_v fused into attention.qkv (rows in q, k, v order).

Everything stays lazy: renamed sources keep their builds, fused ones call the parts' builds.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..quant.types import Int8Weight
from .base import Checkpoint, LayerSource, TensorSource
from .safetensors_io import CheckpointError

_WAN_SIGNS = (re.compile(r"^(transformer\.)?condition_embedder\."),
              re.compile(r"^(transformer\.)?blocks\.\d+\.attn[12]\.to_[qkv]\b"),
              re.compile(r"^(transformer\.)?blocks\.\d+\.scale_shift_table$"))
_ZIMAGE_SIGNS = (re.compile(r"(^|\.)all_x_embedder\."), re.compile(r"(^|\.)all_final_layer\."),
                 re.compile(r"(^|\.)layers\.\d+\.attention\.to_q\b"))

_B = r"^(blocks\.\d+\.)"
_WAN_RULES: List[Tuple[re.Pattern, object]] = [(re.compile(a), b) for a, b in (
    (r"^condition_embedder\.time_embedder\.linear_1\b", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2\b", "time_embedding.2"),
    (r"^condition_embedder\.time_proj\b", "time_projection.1"),
    (r"^condition_embedder\.text_embedder\.linear_1\b", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2\b", "text_embedding.2"),
    (r"^condition_embedder\.image_embedder\.norm1\b", "img_emb.proj.0"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\b", "img_emb.proj.1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\b", "img_emb.proj.3"),
    (r"^condition_embedder\.image_embedder\.norm2\b", "img_emb.proj.4"),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (_B + r"attn1\.to_q\b", r"\1self_attn.q"),
    (_B + r"attn1\.to_k\b", r"\1self_attn.k"),
    (_B + r"attn1\.to_v\b", r"\1self_attn.v"),
    (_B + r"attn1\.to_out\.0\b", r"\1self_attn.o"),
    (_B + r"attn1\.norm_([qk])\b", r"\1self_attn.norm_\2"),
    (_B + r"attn2\.to_q\b", r"\1cross_attn.q"),
    (_B + r"attn2\.to_k\b", r"\1cross_attn.k"),
    (_B + r"attn2\.to_v\b", r"\1cross_attn.v"),
    (_B + r"attn2\.to_out\.0\b", r"\1cross_attn.o"),
    (_B + r"attn2\.norm_([qk])\b", r"\1cross_attn.norm_\2"),
    (_B + r"attn2\.add_k_proj\b", r"\1cross_attn.k_img"),
    (_B + r"attn2\.add_v_proj\b", r"\1cross_attn.v_img"),
    (_B + r"attn2\.norm_added_k\b", r"\1cross_attn.norm_k_img"),
    (_B + r"norm2\b", r"\1norm3"),      # the swap: diffusers norm2 (affine, cross-attn) is ComfyUI norm3
    (_B + r"norm3\b", r"\1norm2"),
    (_B + r"ffn\.net\.0\.proj\b", r"\1ffn.0"),
    (_B + r"ffn\.net\.2\b", r"\1ffn.2"),
    (_B + r"scale_shift_table$", r"\1modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\b", "head.head"),
    (r"^(vace_blocks\.\d+\.)proj_in\b", r"\1before_proj"),
    (r"^(vace_blocks\.\d+\.)proj_out\b", r"\1after_proj"),
    (r"^(patch_embedding|blocks\.\d+\.norm1|vace_patch_embedding)\b", r"\1"),   # same name on both sides
)]

_ZIMAGE_RULES: List[Tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in (
    (r"(^|\.)all_x_embedder\.\d+-\d+\.", r"\1x_embedder."),
    (r"(^|\.)all_final_layer\.\d+-\d+\.", r"\1final_layer."),
    (r"\.attention\.to_out\.0\b", ".attention.out"),
    (r"\.attention\.norm_q\b", ".attention.q_norm"),
    (r"\.attention\.norm_k\b", ".attention.k_norm"),
)]
_ZIMAGE_SAME = frozenset(("t_embedder", "cap_embedder", "x_pad_token", "cap_pad_token", "layers", "noise_refiner",
                          "context_refiner", "x_embedder", "final_layer"))
_QKV = re.compile(r"^(.*\.attention)\.to_([qkv])$")


def detect(ckpt: Checkpoint) -> Optional[str]:
    """"wan" or "z-image" when the checkpoint's keys use diffusers names, else None."""
    names = list(ckpt.layers) + list(ckpt.tensors)
    if any(r.search(n) for r in _ZIMAGE_SIGNS for n in names):
        return "z-image"
    # Only Wan-specific names: proj_out / scale_shift_table alone also occur in ComfyUI-named LTX and Qwen files.
    if any(r.search(n) for r in _WAN_SIGNS for n in names):
        return "wan"
    return None


def to_comfy(ckpt: Checkpoint, kind: str) -> Checkpoint:
    """A new Checkpoint with ComfyUI names (and fused Z-Image qkv); sources stay lazy."""
    if kind == "wan":
        layers, tensors, unknown = _rename_all(ckpt, _rename_wan)
    elif kind == "z-image":
        layers, tensors, unknown = _rename_all(ckpt, _rename_zimage)
        layers, tensors = _fuse_qkv(ckpt.path, layers, tensors)
    else:
        raise ValueError(f"unknown diffusers model kind {kind!r} (expected 'wan' or 'z-image')")
    warnings = list(ckpt.warnings)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        warnings.append(f"{len(unknown)} diffusers {kind} key(s) have no known ComfyUI name and pass through "
                        f"unchanged: {shown}")
    return dataclasses.replace(ckpt, layers=layers, tensors=tensors, renamed_from=f"diffusers ({kind})",
                               warnings=warnings)


def _rename_wan(name: str) -> Tuple[str, bool]:
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    for pattern, repl in _WAN_RULES:
        new, n = pattern.subn(repl, name, count=1)
        if n:
            return new, True
    return name, False


def _rename_zimage(name: str) -> Tuple[str, bool]:
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    hit = False
    for pattern, repl in _ZIMAGE_RULES:
        name, n = pattern.subn(repl, name, count=1)
        hit = hit or bool(n)
    # the rest of diffusers' Z-Image names are ComfyUI's NextDiT names already
    return name, hit or name.split(".", 1)[0] in _ZIMAGE_SAME


def _rename_all(ckpt: Checkpoint, rename: Callable[[str], Tuple[str, bool]]):
    layers: Dict[str, LayerSource] = {}
    tensors: Dict[str, TensorSource] = {}
    unknown: List[str] = []
    for name, layer in ckpt.layers.items():
        new, known = rename(name)
        if not known:
            unknown.append(name)
        _put(layers, new, dataclasses.replace(layer, name=new), ckpt.path, name)
    for key, t in ckpt.tensors.items():
        new, known = rename(key)
        if not known:
            unknown.append(key)
        _put(tensors, new, dataclasses.replace(t, key=new), ckpt.path, key)
    return layers, tensors, unknown


def _put(d: dict, key: str, value, path: str, old: str) -> None:
    if key in d:
        raise CheckpointError(f"{path}: {old!r} renames to {key!r}, which another tensor already has")
    d[key] = value


# -- Z-Image q/k/v fusion ------------------------------------------------------------------------------

def _fuse_qkv(path: str, layers: Dict[str, LayerSource], tensors: Dict[str, TensorSource]):
    groups: Dict[str, Dict[str, str]] = {}
    for name in list(layers) + [k[: -len(".weight")] for k in tensors if k.endswith(".weight")]:
        m = _QKV.match(name)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2)] = name
    if not groups:
        return layers, tensors
    out_layers = {k: v for k, v in layers.items()}
    out_tensors = {k: v for k, v in tensors.items()}
    for attn, parts in groups.items():
        missing = [x for x in "qkv" if x not in parts]
        if missing:
            raise CheckpointError(f"{path}: {attn}.to_{missing[0]} is missing while {attn}.to_"
                                  f"{next(iter(parts))} exists; q/k/v must all be present to fuse {attn}.qkv")
        names = [parts[x] for x in "qkv"]
        kinds = ["int8" if n in layers else "float" for n in names]
        if len(set(kinds)) != 1:
            raise CheckpointError(f"{path}: {attn}: to_q/to_k/to_v mix int8 and float weights "
                                  f"({', '.join(f'{n}: {k}' for n, k in zip(names, kinds))}); cannot fuse them exactly")
        fused = f"{attn}.qkv"
        if kinds[0] == "int8":
            srcs = [out_layers.pop(n) for n in names]
            out_layers[fused] = _fuse_int8(path, fused, srcs)
        else:
            srcs = [out_tensors.pop(f"{n}.weight") for n in names]
            out_tensors[f"{fused}.weight"] = _cat_tensors(path, f"{fused}.weight", srcs)
        biases = [f"{n}.bias" for n in names]
        present = [b for b in biases if b in out_tensors]
        if len(present) == 3:
            out_tensors[f"{fused}.bias"] = _cat_tensors(path, f"{fused}.bias", [out_tensors.pop(b) for b in biases])
        elif present:
            raise CheckpointError(f"{path}: {present[0]!r} exists but not all of {', '.join(biases)}; "
                                  f"cannot build {fused}.bias")
        for n in names:   # anything else under to_q/to_k/to_v would be silently lost by the fusion
            left = [k for k in out_tensors if k.startswith(n + ".")]
            if left:
                raise CheckpointError(f"{path}: {left[0]!r} cannot be carried into the fused {fused}")
    return out_layers, out_tensors


def _cat_tensors(path: str, key: str, srcs: List[TensorSource]) -> TensorSource:
    tails = {tuple(s.shape[1:]) for s in srcs}
    if len(tails) != 1:
        raise CheckpointError(f"{path}: cannot fuse {', '.join(s.key for s in srcs)} into {key}: shapes "
                              f"{[list(s.shape) for s in srcs]}")
    dtype = srcs[0].dtype
    for s in srcs[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    shape = (sum(s.shape[0] for s in srcs),) + tuple(srcs[0].shape[1:])
    keys = tuple(k for s in srcs for k in s.source_keys)

    def build() -> torch.Tensor:
        return torch.cat([s.build().to(dtype) for s in srcs], dim=0)

    return TensorSource(key, shape, dtype, keys, build)


def _fuse_int8(path: str, name: str, srcs: List[LayerSource]) -> LayerSource:
    ks = {s.in_features for s in srcs}
    if len(ks) != 1:
        raise CheckpointError(f"{path}: cannot fuse {', '.join(s.name for s in srcs)} into {name}: input widths "
                              f"{sorted(ks)} differ")
    k = ks.pop()
    rots = {s.rotation for s in srcs}
    if len(rots) != 1:
        raise CheckpointError(f"{path}: cannot fuse {name}: q/k/v use different rotations "
                              f"({', '.join(s.name + ': ' + (s.rotation or 'none') for s in srcs)})")
    grouped = [s for s in srcs if s.granularity == "group"]
    g = 0
    if grouped:
        g = 0
        for s in grouped:
            g = math.gcd(g, s.group_size)
        if g % 16 or k % g:
            raise CheckpointError(f"{path}: cannot fuse {name}: group sizes {[s.group_size for s in grouped]} "
                                  f"have no common group (multiple of 16) dividing K={k}")
    n = sum(s.out_features for s in srcs)
    gran = "group" if g else "row"

    def build() -> Int8Weight:
        parts = [s.load() for s in srcs]
        ref = parts[0].rotation
        for p, s in zip(parts[1:], srcs[1:]):
            if not _same_rotation(ref, p.rotation):
                raise CheckpointError(f"{path}: cannot fuse {name}: {s.name} has a different rotation from {srcs[0].name}")
        scales = [_as_rows(p, g) for p in parts]
        inputs = [p.input_scale for p in parts]
        input_scale = None
        if all(i is not None for i in inputs) and all(torch.equal(i.reshape(()), inputs[0].reshape(())) for i in inputs):
            input_scale = inputs[0]
        return Int8Weight(torch.cat([p.qdata for p in parts], dim=0), torch.cat(scales, dim=0).contiguous(),
                          ref, input_scale)

    has_input = all(s.has_input_scale for s in srcs)
    note = "fused from " + ", ".join(s.name for s in srcs) + " (rows q, k, v; scales expanded per row, exact)"
    if any(s.has_input_scale for s in srcs):
        note += "; static input scales kept only if all three are equal"
    return LayerSource(name, n, k, gran, g or k, srcs[0].rotation, tuple(x for s in srcs for x in s.source_keys),
                       build, note=note, lossless=all(s.lossless for s in srcs), has_input_scale=has_input)


def _same_rotation(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if (a.kind, a.group_size) != (b.kind, b.group_size):
        return False
    if a.signs is None or b.signs is None:
        return a.signs is None and b.signs is None
    return torch.equal(a.signs, b.signs)


def _as_rows(w: Int8Weight, g: int) -> torch.Tensor:
    """The scale of `w` as per-row [N] (g == 0) or per-group [N, K/g] values: exact expansions only."""
    n, k = w.qdata.shape
    s = w.scale.to(torch.float32)
    if s.dim() == 0:
        s = s.expand(n)
    if not g:
        return s.reshape(n)
    if s.dim() == 1:
        return s[:, None].expand(n, k // g)
    return s.repeat_interleave(w.group_size // g, dim=1)
