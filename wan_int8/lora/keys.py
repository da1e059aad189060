"""LoRA key names -> the model's module names, exactly.

A LoRA tensor key is `<base><suffix>`: the suffix says what the tensor is (`.lora_down.weight`, `.alpha`,
`.hada_w1_a`, `.diff_b`...), the base names a layer in one of many spellings:

- kohya / musubi:          `lora_unet_blocks_0_self_attn_q` (Wan-Fun: `lora_unet__blocks_...`)
- ComfyUI / lightx2v / diffusion-pipe: `diffusion_model.blocks.0.self_attn.q`
- PEFT / diffusers:        `transformer.blocks.0.attn1.to_q`, `base_model.model.blocks.0.attn1.to_q`
- kohya with diffusers names: `lora_transformer_single_transformer_blocks_0_attn_to_q`

Matching is a dictionary lookup against the model's own names (`ModelTargets`), never a prefix/substring
test, so `cross_attn_k` can never land on `cross_attn_k_img` (the seed's bug).  Underscore names are resolved
first through a table built from the model (`lora_unet_` + name with "." -> "_", as ComfyUI does), then by
re-dotting with a vocabulary of known multi-word identifiers.  Diffusers spellings are renamed to ComfyUI's
with the same tables the checkpoint readers use (`formats.diffusers`), plus Flux 2's diffusers names here.
A q/k/v LoRA whose model has one fused `qkv` Linear (Z-Image `attention.qkv`, Flux `img_attn.qkv`) targets
a row slice of it: `Target(module, part, parts)`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..formats.diffusers import _rename_wan, _rename_zimage

# -- suffixes ---------------------------------------------------------------------------------------------
# (suffix, role).  Longest first, so `.lora_up.scale_weight` is not read as `.scale_weight`.
SUFFIXES: Tuple[Tuple[str, str], ...] = tuple(sorted((
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_mid.weight", "mid"),
    ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"), (".lora_B", "up"), (".lora_A", "down"),
    (".lora_B.bias", "diff_b"), (".lora_B.default.bias", "diff_b"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".up.weight", "up"), (".down.weight", "down"), (".up_proj.weight", "up"), (".down_proj.weight", "down"),
    # the seed's INT8 LoRAs: int8 up/down with a scale (scalar or one per row)
    (".lora_up.scale_weight", "up_scale"), (".lora_down.scale_weight", "down_scale"),
    (".lora_B.scale_weight", "up_scale"), (".lora_A.scale_weight", "down_scale"),
    (".up.scale_weight", "up_scale"), (".down.scale_weight", "down_scale"),
    (".lora_up.weight_scale", "up_scale"), (".lora_down.weight_scale", "down_scale"),
    (".alpha", "alpha"), (".lora_alpha", "alpha"), (".dora_scale", "dora_scale"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"), (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_t2", "lokr_t2"),
    (".diff", "diff"), (".diff_b", "diff_b"), (".diff_m", "diff_m"),
    (".set_weight", "set_weight"), (".reshape_weight", "reshape_weight"),
    (".a1.weight", "glora"), (".a2.weight", "glora"), (".b1.weight", "glora"), (".b2.weight", "glora"),
    (".oft_blocks", "oft"), (".rescale", "oft"), (".lora_magnitude_vector", "peft_magnitude"),
), key=lambda s: -len(s[0])))


def split_key(key: str) -> Tuple[Optional[str], Optional[str]]:
    """(base, role) of a LoRA tensor key, or (None, None) when no known suffix ends it."""
    for suffix, role in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None, None


# -- prefixes and underscore names ---------------------------------------------------------------------------
_DOT_PREFIXES = ("base_model.model.model.", "base_model.model.", "model.diffusion_model.", "diffusion_model.",
                 "transformer.", "unet.", "model.")
TEXT_ENCODER = re.compile(r"^(lora_te\d?_|lora_te_|text_encoders?\.|te\d?\.|text_model\.|clip_[lg]\.|t5xxl\.|"
                          r"lora_clip|conditioner\.)")
# Multi-word identifiers of the supported families (ComfyUI and diffusers spellings), for re-dotting
# underscore (kohya) names that the model table does not resolve.
_VOCAB = sorted({
    "self_attn", "cross_attn", "k_img", "v_img", "norm_k_img", "norm_q", "norm_k", "img_emb", "emb_pos",
    "patch_embedding", "text_embedding", "time_embedding", "time_projection", "vace_blocks", "before_proj",
    "after_proj", "to_q", "to_k", "to_v", "to_out", "to_add_out", "add_q_proj", "add_k_proj", "add_v_proj",
    "norm_added_k", "norm_added_q", "q_proj", "k_proj", "v_proj", "out_proj", "output_proj", "ffn", "proj_out",
    "proj_in", "condition_embedder", "time_embedder", "text_embedder", "image_embedder", "time_proj",
    "linear_1", "linear_2", "scale_shift_table", "transformer_blocks", "single_transformer_blocks",
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "img_in", "txt_in", "final_layer", "adaLN_modulation", "feed_forward", "ff_context", "linear_in",
    "linear_out", "to_qkv_mlp_proj", "double_stream_modulation_img", "double_stream_modulation_txt",
    "single_stream_modulation", "x_embedder", "context_embedder", "cap_embedder", "t_embedder",
    "noise_refiner", "context_refiner", "q_norm", "k_norm", "norm_out", "time_text_embed",
    "timestep_embedder", "img_mlp", "txt_mlp", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2",
    "time_guidance_embed", "guidance_embedder", "mlp_layer", "layer1", "layer2", "llm_adapter",
}, key=len, reverse=True)
_VOCAB_RES = [(re.compile(r"(?<![^.])" + re.escape(w.replace("_", ".")) + r"(?![^.])"), w) for w in _VOCAB if "_" in w]


def strip_prefixes(base: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _DOT_PREFIXES:
            if base.startswith(p):
                base, changed = base[len(p):], True
    return base


def redot(name: str) -> str:
    """`blocks_0_self_attn_q` -> `blocks.0.self_attn.q` using the vocabulary of multi-word identifiers."""
    dotted = name.replace("_", ".")
    for pattern, word in _VOCAB_RES:
        dotted = pattern.sub(word, dotted)
    return dotted


# -- Flux 2 diffusers -> ComfyUI (LoRA side; inverse of diffusers' convert_flux2_to_diffusers) -----------------
_FLUX2_RULES = [(re.compile(a), b, part) for a, b, part in (
    (r"^transformer_blocks\.(\d+)\.attn\.to_([qkv])$", r"double_blocks.\1.img_attn.qkv", "qkv"),
    (r"^transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj$", r"double_blocks.\1.txt_attn.qkv", "qkv"),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0$", r"double_blocks.\1.img_attn.proj", None),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out$", r"double_blocks.\1.txt_attn.proj", None),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_in$", r"double_blocks.\1.img_mlp.0", None),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_out$", r"double_blocks.\1.img_mlp.2", None),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_in$", r"double_blocks.\1.txt_mlp.0", None),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_out$", r"double_blocks.\1.txt_mlp.2", None),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj$", r"single_blocks.\1.linear1", None),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_out$", r"single_blocks.\1.linear2", None),
    (r"^double_stream_modulation_(img|txt)\.linear$", r"double_stream_modulation_\1.lin", None),
    (r"^single_stream_modulation\.linear$", r"single_stream_modulation.lin", None),
    (r"^x_embedder$", "img_in", None),
    (r"^context_embedder$", "txt_in", None),
    (r"^proj_out$", "final_layer.linear", None),
    (r"^norm_out\.linear$", "final_layer.adaLN_modulation.1", None),
)]
_QKV_PART = {"q": 0, "k": 1, "v": 2}


def _rename_flux2(name: str) -> Optional[Tuple[str, Optional[int]]]:
    for pattern, repl, part in _FLUX2_RULES:
        m = pattern.match(name)
        if m:
            new = pattern.sub(repl, name)
            return new, (_QKV_PART[m.group(2)] if part else None)
    return None


# -- the model side ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelTargets:
    """What a LoRA can land on: linears {name: (N, K)} and float parameters {key: shape}."""

    linears: Dict[str, Tuple[int, int]]
    params: Dict[str, Tuple[int, ...]]

    def __post_init__(self):
        owners = set(self.linears) | {k.rpartition(".")[0] for k in self.params} | set(self.params)
        self.kohya = {"lora_unet_" + n.replace(".", "_"): n for n in owners if n}

    @classmethod
    def from_model(cls, model) -> "ModelTargets":
        from torch import nn
        from ..layers import has_lora_slot
        linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) or has_lora_slot(m)}
        params = {n: tuple(p.shape) for n, p in model.named_parameters() if p.is_floating_point()}
        return cls(linears, params)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "ModelTargets":
        """From a checkpoint's state-dict shapes (ComfyUI names): 2-D `.weight`s are taken as linears."""
        linears = {k[: -len(".weight")]: (int(s[0]), int(s[1])) for k, s in shapes.items()
                   if k.endswith(".weight") and len(s) == 2}
        params = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        return cls(linears, params)

    def has_img_branch(self) -> bool:
        return any(".k_img" in n for n in self.linears)


@dataclasses.dataclass(frozen=True)
class Target:
    """A linear layer (or a row slice of a fused one: part i of `parts` equal slices) or a parameter."""

    name: str
    part: Optional[int] = None
    parts: int = 1


_ALTERNATES = ((re.compile(r"\.to_out\.0$"), (".to_out", ".out", ".o")),
               (re.compile(r"\.to_out$"), (".to_out.0", ".out", ".o")),
               (re.compile(r"\.adaLN_modulation\.0$"), (".adaLN_modulation.1",)),
               (re.compile(r"\.adaLN_modulation\.1$"), (".adaLN_modulation.0",)))
_FUSED = re.compile(r"^(.*)\.(?:to_)?([qkv])(?:_proj)?$")


def dotted_candidates(base: str, targets: ModelTargets) -> List[str]:
    """Dotted, prefix-free spellings of a LoRA base name, most literal first."""
    if base.startswith("lora_unet__"):
        base = "lora_unet_" + base[len("lora_unet__"):]     # Wan-Fun (ComfyUI's convert_lora does the same)
    if base in targets.kohya:
        return [targets.kohya[base]]
    for p in ("lora_unet_", "lora_transformer_", "lycoris_", "lora_"):
        if base.startswith(p) and "." not in base[len(p):]:
            return [redot(base[len(p):])]
    return [strip_prefixes(base)]


def resolve(base: str, targets: ModelTargets, want: str = "linear") -> Optional[Target]:
    """The model target of a LoRA base name (`want`: "linear" or "param"), or None."""
    for name in dotted_candidates(base, targets):
        found = _resolve_dotted(name, targets, want)
        if found is not None:
            return found
    return None


def _spellings(name: str) -> Iterable[Tuple[str, Optional[int]]]:
    yield name, None
    for rename in (_rename_wan, _rename_zimage):
        new, known = rename(name)
        if known and new != name:
            yield new, None
    flux = _rename_flux2(name)
    if flux is not None:
        yield flux


def _resolve_dotted(name: str, targets: ModelTargets, want: str) -> Optional[Target]:
    table = targets.linears if want == "linear" else targets.params
    for spelled, part in _spellings(name):
        if part is not None:
            if spelled in targets.linears and want == "linear":
                return Target(spelled, part, 3)
            continue
        if spelled in table:
            return Target(spelled)
        for pattern, alts in _ALTERNATES:
            if pattern.search(spelled):
                for alt in alts:
                    cand = pattern.sub(alt, spelled)
                    if cand in table:
                        return Target(cand)
        if want == "linear":
            m = _FUSED.match(spelled)
            if m and f"{m.group(1)}.qkv" in targets.linears:
                return Target(f"{m.group(1)}.qkv", _QKV_PART[m.group(2)], 3)
    return None


def param_target(base: str, role: str, targets: ModelTargets) -> Optional[Target]:
    """Where a `diff` / `diff_b` / `diff_m` patch goes: a parameter key of the model."""
    if role == "diff_m":     # lightx2v / Kijai: `blocks.N.diff_m` is a delta of `blocks.N.modulation`
        for name in dotted_candidates(base, targets):
            for spelled, _ in _spellings(name + ".modulation"):
                if spelled in targets.params:
                    return Target(spelled)
        return None
    leaf = "bias" if role == "diff_b" else "weight"
    for name in dotted_candidates(base, targets):
        for spelled, _ in _spellings(name):
            key = f"{spelled}.{leaf}"
            if key in targets.params:
                return Target(key)
            if role == "diff" and spelled in targets.params:   # e.g. `blocks.0.modulation.diff`
                return Target(spelled)
    return None


_WAN_IMG = re.compile(r"(^| )(blocks\.\d+\.(cross_attn\.(k_img|v_img|norm_k_img)|attn2\.(add_k_proj|add_v_proj|"
                      r"norm_added_k))|img_emb\.|condition_embedder\.image_embedder\.)")


def harmless_reason(base: str, targets: ModelTargets) -> Optional[str]:
    """Why an unmatched key is expected (shown as harmless in the report), or None."""
    if TEXT_ENCODER.match(base):
        return "text-encoder key (not part of the diffusion model)"
    dotted = " ".join(dotted_candidates(base, targets))
    if _WAN_IMG.search(dotted) and not targets.has_img_branch():
        return "Wan 2.1 I2V image cross-attention: this model has none (Wan 2.2 / t2v), harmless"
    return None
