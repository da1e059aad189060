"""Model families: how each is recognised from its keys, and which linears are worth INT8.

Rules are data (regular expressions over ComfyUI module names, anchored), not substring lists: the seed's
substring matching missed `text_embedding` and let `k` patterns hit `k_img`.  Only the big per-block
projections are quantized on the fly; embedders, modulation/adaLN (they run with M = batch, where INT8
gains nothing and error hurts most), heads, norms and refiners stay in high precision.  Layers that a file
already stores as INT8 are always run as INT8: these rules only decide what to quantize.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    label: str
    detect_all: Tuple[str, ...]         # every pattern must match some key
    quantize: Tuple[str, ...]           # module names (no ".weight") quantized on the fly
    keep_note: str                      # what stays in high precision, in words

    def wants_int8(self, module_name: str) -> bool:
        return any(re.fullmatch(p, module_name) for p in self.quantize)

    def matches(self, keys: Sequence[str]) -> bool:
        return all(any(re.fullmatch(p, k) for k in keys) for p in self.detect_all)


_B = r"blocks\.\d+"
FAMILIES: Tuple[Family, ...] = (
    Family("wan", "Wan 2.1/2.2",
           (r"head\.modulation", rf"{_B}\.self_attn\.q\.weight"),
           (rf"(vace_)?{_B}\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)", rf"(vace_)?{_B}\.ffn\.(0|2)"),
           "patch/text/time embeddings, time_projection, head, img_emb, norms, modulation"),
    Family("flux2", "Flux 2",
           (r"double_stream_modulation_img\.lin\.weight",),
           (r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.(0|2))", r"single_blocks\.\d+\.linear(1|2)"),
           "img_in, txt_in, time/guidance embedders, stream modulation, final_layer"),
    Family("chroma", "Chroma",
           (r"distilled_guidance_layer\..*",),
           (r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.(0|2))", r"single_blocks\.\d+\.linear(1|2)"),
           "distilled_guidance_layer, img_in, txt_in, final_layer, nerf layers"),
    Family("z-image", "Z-Image",
           (r"cap_embedder\..*", r"layers\.\d+\.attention\.(qkv|to_q)\.weight"),
           (r"layers\.\d+\.attention\.(qkv|out)", r"layers\.\d+\.feed_forward\.w(1|2|3)"),
           "x/cap/t embedders, adaLN modulation, noise/context refiners, final_layer"),
    Family("qwen-image", "Qwen-Image",
           (r"transformer_blocks\.\d+\.img_mod\.1\.weight", r"txt_in\.weight"),
           (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)",
            r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)"),
           "img_in, txt_in, time_text_embed, img_mod/txt_mod (M = batch), norm_out, proj_out"),
    Family("ltx2", "LTX-2",
           (r"adaln_single\..*", r"transformer_blocks\.\d+\.attn1\.to_q\.weight"),
           (r"transformer_blocks\.\d+\.[a-z0-9_]*attn[a-z0-9_]*\.(to_q|to_k|to_v|to_out\.0)",
            r"transformer_blocks\.\d+\.[a-z0-9_]*ff\.net\.(0\.proj|2)"),
           "adaln_single, caption/patchify projections, proj_out, scale-shift tables, audio embedders"),
    Family("anima", "Anima",
           (r"llm_adapter\..*", rf"{_B}\.self_attn\.q_proj\.weight"),
           (rf"{_B}\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|output_proj)", rf"{_B}\.mlp\.layer(1|2)"),
           "t/x embedders, adaLN modulation, llm_adapter, final_layer"),
)
BY_NAME = {f.name: f for f in FAMILIES}
ALIASES = {"wan2.1": "wan", "wan2.2": "wan", "wan21": "wan", "wan22": "wan", "zimage": "z-image", "qwen": "qwen-image",
           "ltxv2": "ltx2", "ltx-2": "ltx2", "flux": "flux2", "flux.2": "flux2"}


def get_family(name: str) -> Family:
    key = ALIASES.get(name.lower(), name.lower())
    try:
        return BY_NAME[key]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(BY_NAME)}") from None


def detect_family(keys: Iterable[str]) -> Optional[Family]:
    """The family whose key signature the (prefix-free, ComfyUI-named) keys show, or None."""
    keys = list(keys)
    hits = [f for f in FAMILIES if f.matches(keys)]
    if len(hits) > 1 and {h.name for h in hits} == {"flux2", "chroma"}:
        hits = [BY_NAME["chroma"]]
    return hits[0] if len(hits) == 1 else None


def wan_variant(shapes) -> str:
    """A short Wan label from shapes: '14B t2v', '1.3B', '5B ti2v', '14B i2v (2.1)'."""
    dim = shapes.get("head.modulation", (0, 0, 0))[-1]
    size = {1536: "1.3B", 3072: "5B", 5120: "14B"}.get(dim, f"dim {dim}")
    if "img_emb.proj.0.bias" in shapes:
        return f"{size} i2v (2.1)"
    pe = shapes.get("patch_embedding.weight")
    if pe is not None and pe[1] == 36:
        return f"{size} i2v (2.2)"
    if pe is not None and pe[1] == 48:
        return f"{size} ti2v"
    return f"{size} t2v"
