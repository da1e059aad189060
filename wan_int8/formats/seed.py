"""Unmarked INT8 files from the seed (ThunderFun/ComfyUI-Wan-INT8) and convert_to_quant /
convert_to_quant_QuIP_INT8: int8 weights whose scale may be spelled several ways, no comfy_quant marker.

Plain layers: `<p>.weight` int8 [N, K] and one weight scale under any known spelling, shaped as tensor,
row, blockwise `[N, K/g, 1]`, group `[N, K/g]` or tile `[N/b, K/b]` (scales.py); an optional static
input scale (a placeholder 1.0 is ignored with a warning).  These load losslessly.

Hadamard-QuIP layers (convert_to_quant_QuIP_INT8 with `store_transformed`; read the semantics from its
`converters/quip_int8.py` (`_apply_incoherence`, `convert`) and `quantization.py`, and the seed's
`int8_quant.dequantize`):
  `<p>.weight`           int8 [S_out, S_in], the transformed weight, padded to powers of two
  `<p>.weight_scale`     one scale per *transformed* row ([S_out], [S_out, 1]) or a scalar
  `<p>.hadamard_quip`    int8 flag 1;  `<p>.hadamard_size_out/_in` int32 (0-d) = S_out, S_in
  `<p>.sign_row/_col`    ±1 vectors of length S_out / S_in
  W_pad = diag(sign_row) · H_out · (scale ⊙ Q) · H_in · diag(sign_col)      (H: orthonormal Sylvester)
  W     = W_pad[:out, :in]
  with `<p>.smooth_factors` (SmoothQuant, length in): the converter quantized W·diag(s), so W /= s per column.
The original [out, in] is not stored: out comes from `<p>.bias`, in from `<p>.smooth_factors`, otherwise from
the one feature size of the file that next_pow2 maps onto S (ambiguity is an error), and the padded
region of the reconstruction is checked to hold only quantization noise.  We dequantize exactly in float64
and requantize row-wise behind a regular (convrot) Hadamard, so the outlier smoothing is kept; that second
rounding makes these layers lossy (LayerSource.lossless=False).

`smooth_factors` on a *plain* layer is not applied: the converter divides the smoothing back out before it
requantizes to the original basis (quip_int8.py, step "Undo SmoothQuant" precedes the requantization), so
the stored weight is already W.  Legacy `quip_s_u/quip_s_v` are refused (their semantics are ambiguous).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Set, Tuple

import torch

from ..quant.hadamard import default_group_size, hadamard_matrix
from ..quant.int8 import quantize_weight
from ..quant.types import Int8Weight, Rotation
from .base import Checkpoint, LayerSource, passthrough_rest, unprefixed
from .int8_keys import INPUT_SCALE_SUFFIXES, WEIGHT_SCALE_SUFFIXES, find_one, int8_layer_names, plain_int8_layer
from .safetensors_io import CheckpointError, SafetensorsFile
from .scales import is_scalar_or_row

NAME = "seed"
HADAMARD_SUFFIXES = ("hadamard_quip", "hadamard_size_in", "hadamard_size_out", "sign_row", "sign_col")
LEGACY_QUIP = ("quip_s_u", "quip_s_v")
KNOWN_SUFFIXES = frozenset(("weight", "bias", "smooth_factors") + WEIGHT_SCALE_SUFFIXES + INPUT_SCALE_SUFFIXES
                           + HADAMARD_SUFFIXES + LEGACY_QUIP)
# A per-layer key we do not know whose name says it is quantization data: refusing beats ignoring it.
_QUANT_LIKE = re.compile(r"scale|quant|smooth|sign|hadamard|quip|zero|amax|g_idx|qweight|perm")
# Slack on the padded-region check: LDLQ rounding may exceed half a step per entry, never by this much.
_PAD_SLACK = 4.0


def detect(f: SafetensorsFile, prefix: str) -> Optional[str]:
    names = int8_layer_names(f)
    if not names:
        return None
    had = sum(f"{p}.hadamard_quip" in f for p in names)
    return f"{len(names)} unmarked int8 weights (seed / convert_to_quant layout)" + (
        f", {had} of them Hadamard-QuIP" if had else "")


def read(f: SafetensorsFile, prefix: str, detail: str) -> Checkpoint:
    names = int8_layer_names(f)
    keys = f.keys()
    feature_sizes = feature_sizes_of(f, names)
    layers: Dict[str, LayerSource] = {}
    used: Set[str] = set()
    warnings: List[str] = []
    children = _children(keys, names)
    for p in names:
        name = unprefixed(p, prefix)
        own = children.get(p, [])
        for key in own:
            suffix = key[len(p) + 1:]
            if suffix not in KNOWN_SUFFIXES and _QUANT_LIKE.search(suffix):
                raise CheckpointError(
                    f"{f.path}: tensor {key!r} is a quantization key wan-int8 does not know for int8 layer {p!r}; "
                    f"ignoring it could misread the weight, so the file is refused (please report it)")
        for legacy in LEGACY_QUIP:
            if f"{p}.{legacy}" in f:
                raise CheckpointError(
                    f"{f.path}: tensor {p}.{legacy!s} is a legacy QuIP# transform; its semantics are ambiguous "
                    f"(the seed applies U·W·Vᵀ, the converter's inverse is Uᵀ·W·V), so wan-int8 refuses it. "
                    f"Re-export the model with a current convert_to_quant (QuIP stored in the original basis)")
        if f"{p}.hadamard_quip" in f:
            layer, keys_used = hadamard_quip_layer(f, name, p, feature_sizes, warnings)
        else:
            extra = [f"{p}.{s}" for s in HADAMARD_SUFFIXES if f"{p}.{s}" in f]
            if extra:
                raise CheckpointError(f"{f.path}: tensor {extra[0]!r} belongs to a Hadamard-QuIP layer but "
                                      f"{p}.hadamard_quip is missing; the layout is ambiguous, re-export it")
            layer, keys_used = plain_int8_layer(f, name, p, warnings)
            skey = f"{p}.smooth_factors"
            if skey in f:
                keys_used = keys_used | {skey}
                layer.note = (layer.note + "; " if layer.note else "") + (
                    "smooth_factors not applied: convert_to_quant stores this weight in the original basis "
                    "(smoothing already divided out)")
                warnings.append("smooth_factors on non-Hadamard layers not applied (the converter stored those "
                                "weights with the smoothing already undone)")
        layers[name] = layer
        used |= keys_used
    tensors = passthrough_rest(f, prefix, used)
    return Checkpoint(f.path, NAME, detail, layers, tensors, dict(f.header.metadata), f, warnings=warnings)


def _children(keys, names) -> Dict[str, List[str]]:
    """{layer prefix: keys under it}, each key given to its longest matching layer prefix."""
    by_prefix = set(names)
    out: Dict[str, List[str]] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            p = ".".join(parts[:i])
            if p in by_prefix:
                out.setdefault(p, []).append(key)
                break
    return out


# -- Hadamard-QuIP ---------------------------------------------------------------------------------

def feature_sizes_of(f: SafetensorsFile, names) -> Set[int]:
    """Every dimension of the file's tensors that is not a padded Hadamard-QuIP size."""
    skip = set()
    for p in names:
        if f"{p}.hadamard_quip" in f:
            skip |= {f"{p}.{s}" for s in ("weight",) + HADAMARD_SUFFIXES + WEIGHT_SCALE_SUFFIXES}
    sizes = set()
    for key, info in f.header.tensors.items():
        if key not in skip:
            sizes.update(int(d) for d in info.shape if d > 1)
    return sizes


def _int_value(f: SafetensorsFile, key: str) -> int:
    t = f.get(key)
    if t.numel() != 1 or t.is_floating_point() and float(t.reshape(())) != int(float(t.reshape(()))):
        raise CheckpointError(f"{f.path}: tensor {key!r} must be a single integer, got {list(t.shape)} {t.dtype}")
    return int(t.reshape(()).item())


def _original_size(f: SafetensorsFile, p: str, side: str, padded: int, exact_key: str,
                   feature_sizes: Set[int]) -> Tuple[int, str]:
    """The unpadded size of one side of a Hadamard-QuIP layer and where it came from."""
    if exact_key in f:
        shape = f.info(exact_key).shape
        n = 1
        for d in shape:
            n *= d
        if not (padded // 2 < n <= padded) and padded != 1:
            raise CheckpointError(f"{f.path}: {exact_key} has {n} entries, which does not pad to "
                                  f"hadamard_size_{side}={padded}")
        return n, exact_key
    candidates = sorted(d for d in feature_sizes if padded // 2 < d <= padded)
    if len(candidates) == 1:
        return candidates[0], "the file's feature sizes"
    what = "none" if not candidates else ", ".join(map(str, candidates))
    raise CheckpointError(
        f"{f.path}: Hadamard-QuIP layer {p!r} is stored padded to {padded} {side}put channels and the file does "
        f"not say the original width ({exact_key} is absent; feature sizes that pad to {padded}: {what}). "
        f"Re-export it in the original basis (convert_to_quant without --quip-store-transformed)")


def hadamard_quip_layer(f: SafetensorsFile, name: str, p: str, feature_sizes: Set[int],
                    warnings: list) -> Tuple[LayerSource, set]:
    flag = _int_value(f, f"{p}.hadamard_quip")
    if flag != 1:
        raise CheckpointError(f"{f.path}: {p}.hadamard_quip is {flag}, expected 1; the layout is ambiguous")
    wkey = f"{p}.weight"
    rows, cols = f.info(wkey).shape
    sizes = {}
    for side, stored in (("out", rows), ("in", cols)):
        key = f"{p}.hadamard_size_{side}"
        if key not in f:
            raise CheckpointError(f"{f.path}: Hadamard-QuIP layer {p!r} has no {key!r}")
        s = _int_value(f, key)
        if s and (s & (s - 1)):
            raise CheckpointError(f"{f.path}: {key} = {s} is not a power of two")
        if s and s != stored:
            raise CheckpointError(f"{f.path}: {wkey} is [{rows}, {cols}] but {key} = {s}: the transformed weight "
                                  f"must be stored padded to the Hadamard size; the file is not understood")
        sizes[side] = s
    signs = {}
    for side, sname, n in (("out", "sign_row", rows), ("in", "sign_col", cols)):
        key = f"{p}.{sname}"
        if sizes[side]:
            if key not in f:
                raise CheckpointError(f"{f.path}: Hadamard-QuIP layer {p!r} has no {key!r}")
            if f.info(key).shape not in ((n,), (n, 1), (1, n)):
                raise CheckpointError(f"{f.path}: {key} has shape {list(f.info(key).shape)}, expected [{n}]")
            signs[side] = key
    skey = find_one(f, p, WEIGHT_SCALE_SUFFIXES, "weight-scale")
    if skey is None:
        raise CheckpointError(f"{f.path}: Hadamard-QuIP tensor {wkey} has no weight scale")
    sshape = f.info(skey).shape
    if not is_scalar_or_row(sshape, rows):
        raise CheckpointError(f"{f.path}: {skey} has shape {list(sshape)}; a Hadamard-QuIP scale is one per "
                              f"transformed row [{rows}] / [{rows}, 1] or a scalar")
    out_f, out_from = (_original_size(f, p, "out", rows, f"{p}.bias", feature_sizes) if sizes["out"]
                       else (rows, "stored"))
    smooth = f"{p}.smooth_factors" if f"{p}.smooth_factors" in f else None
    in_f, in_from = (_original_size(f, p, "in", cols, f"{p}.smooth_factors", feature_sizes) if sizes["in"]
                     else (cols, "stored"))
    if smooth and f.info(smooth).shape not in ((in_f,), (1, in_f)):
        raise CheckpointError(f"{f.path}: {smooth} has shape {list(f.info(smooth).shape)}, expected [{in_f}]")
    ikey = find_one(f, p, INPUT_SCALE_SUFFIXES, "input-scale")
    if ikey:
        warnings.append("static input_scale on Hadamard-QuIP layers dropped (it scales transformed activations; "
                        "the converted layer quantizes activations dynamically)")
    g = default_group_size(in_f)
    rotation = Rotation("regular", g) if g else None

    def build() -> Int8Weight:
        q = f.get(wkey)
        scale = f.get(skey).to(torch.float64).reshape(-1)
        sr = _signs(f, signs.get("out"))
        sc = _signs(f, signs.get("in"))
        w = hadamard_quip_dequantize(q, scale, sr, sc, out_f, in_f, where=f"{f.path}: {wkey}")
        if smooth:
            s = f.get(smooth).to(torch.float64).reshape(-1)
            if not bool(torch.isfinite(s).all()) or bool((s == 0).any()):
                raise CheckpointError(f"{f.path}: {smooth} has zero or non-finite entries")
            w = w / s[None, :]
        return quantize_weight(w.to(torch.float32), "row", rotation=rotation)

    note = (f"Hadamard-QuIP (stored [{rows}, {cols}]) dequantized in float64 to [{out_f}, {in_f}] "
            f"(out from {out_from}, in from {in_from})" + (", smooth_factors divided out" if smooth else "")
            + (f", requantized row-wise behind a regular Hadamard-{g} (outlier smoothing kept)" if g else
               f", requantized row-wise without rotation (no Hadamard group divides K={in_f})")
            + ": lossy (second rounding)")
    used = {wkey, skey, f"{p}.hadamard_quip", f"{p}.hadamard_size_out", f"{p}.hadamard_size_in"}
    used |= set(signs.values()) | ({smooth} if smooth else set()) | ({ikey} if ikey else set())
    layer = LayerSource(name, out_f, in_f, "row", in_f, rotation.describe() if rotation else "",
                        tuple(sorted(used)), build, note=note, lossless=False)
    return layer, used


def _signs(f: SafetensorsFile, key: Optional[str]) -> Optional[torch.Tensor]:
    if key is None:
        return None
    s = f.get(key).to(torch.float64).reshape(-1)
    if not bool(((s == 1) | (s == -1)).all()):
        raise CheckpointError(f"{f.path}: {key} must hold only +1/-1")
    return s


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal natural-order (Sylvester) Walsh-Hadamard transform along the last axis: x·H_n.

    H_n = H_a ⊗ H_b (a·b = n, both powers of two), so x·H_n is two small matrix products per row, which
    BLAS does far faster than log2(n) butterfly passes.
    """
    rows, n = x.shape
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    bits = n.bit_length() - 1
    a, b = 1 << (bits // 2), 1 << (bits - bits // 2)
    ha = hadamard_matrix("sylvester", a, dtype=x.dtype, device=x.device)
    hb = hadamard_matrix("sylvester", b, dtype=x.dtype, device=x.device)
    y = x.reshape(rows, a, b) @ hb
    return torch.matmul(ha, y).reshape(rows, n)


def hadamard_quip_dequantize(q: torch.Tensor, scale: torch.Tensor, sign_row: Optional[torch.Tensor],
                             sign_col: Optional[torch.Tensor], out_features: int, in_features: int,
                             where: str = "Hadamard-QuIP weight", chunk_elements: int = 1 << 24) -> torch.Tensor:
    """W = (diag(sign_row)·H_out·(scale ⊙ Q)·H_in·diag(sign_col))[:out, :in] in float64.

    A missing sign vector means that side is not transformed (hadamard_size 0).  Works in row chunks for
    H_in and column chunks for H_out, so the extra memory is one [S_out, in] float64 buffer plus a chunk.
    Raises CheckpointError if the padded region (which was zero before quantization) holds more than
    quantization noise, i.e. if [out, in] is not the original shape.
    """
    s_out, s_in = q.shape
    scale = scale.to(torch.float64).reshape(-1)
    if scale.numel() not in (1, s_out):
        raise CheckpointError(f"{where}: scale has {scale.numel()} entries, expected 1 or {s_out}")
    row_scale = scale.expand(s_out) if scale.numel() == 1 else scale
    pad_energy = 0.0
    a = torch.empty((s_out, in_features), dtype=torch.float64)
    step = max(1, chunk_elements // max(s_in, 1))
    for r0 in range(0, s_out, step):
        part = q[r0:r0 + step].to(torch.float64) * row_scale[r0:r0 + step, None]
        if sign_col is not None:
            part = fwht(part) * sign_col[None, :]
        pad_energy += float(part[:, in_features:].square().sum())
        a[r0:r0 + part.shape[0]] = part[:, :in_features]
    w = torch.empty((out_features, in_features), dtype=torch.float64)
    step = max(1, chunk_elements // max(s_out, 1))
    for c0 in range(0, in_features, step):
        part = a[:, c0:c0 + step].t()
        if sign_row is not None:
            part = fwht(part.contiguous()) * sign_row[None, :]
        pad_energy += float(part[:, out_features:].square().sum())
        w[:, c0:c0 + part.shape[0]] = part[:, :out_features].t()
    # Each transformed entry is off by about half a step at most (round to nearest), and the transforms are
    # orthonormal: the padded region's energy is bounded by the total quantization error energy.
    noise = float(row_scale.square().sum()) * s_in / 4.0
    if pad_energy > (_PAD_SLACK ** 2) * noise + 1e-30:
        raise CheckpointError(
            f"{where}: reconstructed to [{s_out}, {s_in}], the region outside [{out_features}, {in_features}] holds "
            f"weight (rms {math.sqrt(pad_energy / max(s_out * s_in - out_features * in_features, 1)):.3g}, far above "
            f"quantization noise), so [{out_features}, {in_features}] is not the layer's original shape")
    return w
