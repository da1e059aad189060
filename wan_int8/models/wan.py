"""A minimal Wan 2.1/2.2 diffusion transformer in pure torch, with ComfyUI's module tree and key names.

Why it exists: the library must be testable end to end (quantize -> load -> generate -> compare) without
ComfyUI.  The module tree is identical to ComfyUI's `comfy/ldm/wan/model.py` WanModel, so a ComfyUI-format
state dict (official Wan keys) loads with `strict=True`, and every Linear is a plain `nn.Linear`, so
`quantize_model` can swap it for `Int8Linear`.  The math follows ComfyUI (modulation, gates and residuals in
the model dtype with addcmul; RoPE in fp32; patch embedding in fp32), not the original Wan code (which keeps
the residual stream in fp32), because ComfyUI is what our users run.

Only the plain t2v / i2v (and FLF2V) variants are built: VACE, camera, S2V, etc. are out of scope.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("wan_int8")

PATCH_SIZE = (1, 2, 2)
HEAD_DIM = 128            # ComfyUI assumes it: num_heads = dim // 128
CLIP_DIM = 1280           # CLIP ViT-H/14 penultimate features (Wan 2.1 i2v / flf2v)
ROPE_THETA = 10000.0
_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")


# -- configuration -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Architecture of one Wan checkpoint.  Defaults are Wan 2.1 T2V 1.3B."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    model_type: str = "t2v"           # "t2v" | "i2v" (i2v = Wan 2.1 CLIP image branch; Wan 2.2 I2V is "t2v")
    eps: float = 1e-6
    flf_pos_embed_token_number: Optional[int] = None   # FLF2V only: img_emb.emb_pos [1, 514, 1280]

    def __post_init__(self):
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % HEAD_DIM:
            raise ValueError(f"dim {self.dim} is not a multiple of the head size {HEAD_DIM}")

    @property
    def num_heads(self) -> int:
        return self.dim // HEAD_DIM

    @property
    def head_dim(self) -> int:
        return HEAD_DIM

    @property
    def vae_stride(self) -> Tuple[int, int, int]:
        """Pixel -> latent stride: the Wan 2.2 VAE (48 channels) is 4x16x16, the Wan 2.1 VAE 4x8x8."""
        return (4, 16, 16) if self.out_dim == 48 else (4, 8, 8)

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "WanConfig":
        """Detect the config from key names and shapes only, as ComfyUI's `detect_unet_config` does.

        `shapes` maps key -> shape (a tuple, `torch.Size`, or anything with `.shape`, e.g. a tensor or a
        safetensors slice).  Works on int8 checkpoints too: their weights are still `[N, K]`.  A
        `model.diffusion_model.`-style prefix is accepted.
        """
        shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
        prefix = next((p for p in _KEY_PREFIXES if p + "head.modulation" in shapes), None)
        if prefix is None:
            raise ValueError("not a Wan diffusion model state dict (no head.modulation)")
        get = lambda name: shapes[prefix + name]  # noqa: E731
        blocks = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
        indices = {int(m.group(1)) for k in shapes for m in [blocks.match(k)] if m}
        num_layers = 0
        while num_layers in indices:   # ComfyUI's count_blocks: consecutive from 0
            num_layers += 1
        emb_pos = shapes.get(prefix + "img_emb.emb_pos")
        text = shapes.get(prefix + "text_embedding.0.weight")
        freq = shapes.get(prefix + "time_embedding.0.weight")
        return cls(
            dim=get("head.modulation")[-1],
            ffn_dim=get("blocks.0.ffn.0.weight")[0],
            num_layers=num_layers,
            in_dim=get("patch_embedding.weight")[1],
            out_dim=get("head.head.weight")[0] // math.prod(PATCH_SIZE),
            freq_dim=freq[1] if freq else 256,
            text_dim=text[1] if text else 4096,
            model_type="i2v" if prefix + "img_emb.proj.0.bias" in shapes else "t2v",
            flf_pos_embed_token_number=emb_pos[1] if emb_pos else None,
        )


# -- building blocks ---------------------------------------------------------------------------------------
def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Timestep embedding [cos | sin] in fp32 (Wan's order: cos first)."""
    half = dim // 2
    position = position.to(torch.float32)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float32, device=position.device) / half)
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axes(head_dim: int = HEAD_DIM) -> Tuple[int, int, int]:
    """Per-axis (t, h, w) RoPE widths: 44, 42, 42 for head_dim 128."""
    d6 = head_dim // 6
    return head_dim - 4 * d6, 2 * d6, 2 * d6


def rope_freqs(grid: Sequence[int], head_dim: int = HEAD_DIM, device=None) -> torch.Tensor:
    """RoPE rotations for a (t, h, w) token grid as ComfyUI's EmbedND builds them: [1, L, 1, head_dim/2, 2, 2].

    Each pair (x[2i], x[2i+1]) of a head is rotated by [[cos, -sin], [sin, cos]]; the angles are computed in
    float64 and stored in fp32 like ComfyUI (positions are token indices along each axis).
    """
    t, h, w = grid
    ids = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)
    ids = ids.reshape(-1, 3).to(torch.float64)
    parts = []
    for axis, width in enumerate(rope_axes(head_dim)):
        omega = 1.0 / ROPE_THETA ** torch.linspace(0, (width - 2) / width, steps=width // 2, dtype=torch.float64)
        angle = ids[:, axis, None] * omega                                  # [L, width/2]
        cos, sin = torch.cos(angle), torch.sin(angle)
        parts.append(torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angle.shape, 2, 2))
    freqs = torch.cat(parts, dim=1).to(torch.float32)                       # [L, head_dim/2, 2, 2]
    return freqs[None, :, None].to(device)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by freqs [1, L, 1, D/2, 2, 2] in fp32 (float64 stays float64), back to x.dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    f = freqs.to(dtype)
    pairs = x.to(dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = f[..., 0] * pairs[..., 0] + f[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head SDPA on [B, L, H*D] tensors (ComfyUI's optimized_attention layout)."""
    b = q.shape[0]
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1])


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class WanSelfAttention(nn.Module):
    """q/k/v/o Linears; RMSNorm over all heads on q and k; RoPE on q and k.  `attention_fn` (q, k, v, heads) on
    [B, L, H*D] tensors: SDPA unless `WanModel.set_attention` chose another (e.g. INT8 attention)."""

    def __init__(self, dim: int, num_heads: int, eps: float, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.attention_fn: AttentionFn = attention
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, **kw) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True, **kw)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True, **kw)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, s, n = x.shape[0], x.shape[1], self.num_heads
        q = apply_rope(self.norm_q(self.q(x)).view(b, s, n, -1), freqs)
        k = apply_rope(self.norm_k(self.k(x)).view(b, s, n, -1), freqs)
        out = self.attention_fn(q.view(b, s, -1), k.view(b, s, -1), self.v(x), n)
        return self.o(out)


class WanT2VCrossAttention(WanSelfAttention):
    """Cross-attention to the text tokens; no RoPE."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img_len: Optional[int] = None) -> torch.Tensor:
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(context))
        return self.o(self.attention_fn(q, k, self.v(context), self.num_heads))


class WanI2VCrossAttention(WanSelfAttention):
    """Wan 2.1 i2v: the same query also attends to the CLIP image tokens (the first `context_img_len`)."""

    def __init__(self, dim: int, num_heads: int, eps: float, dtype=None, device=None):
        super().__init__(dim, num_heads, eps, dtype, device)
        self.k_img = nn.Linear(dim, dim, dtype=dtype, device=device)
        self.v_img = nn.Linear(dim, dim, dtype=dtype, device=device)
        self.norm_k_img = nn.RMSNorm(dim, eps=eps, elementwise_affine=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img_len: Optional[int] = None) -> torch.Tensor:
        # like ComfyUI: context_img_len None (no clip_fea) slices [:None] / [None:], i.e. the whole context
        context_img, context = context[:, :context_img_len], context[:, context_img_len:]
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(context))
        k_img = self.norm_k_img(self.k_img(context_img))
        img = self.attention_fn(q, k_img, self.v_img(context_img), self.num_heads)
        txt = self.attention_fn(q, k, self.v(context), self.num_heads)
        return self.o(txt + img)


class WanAttentionBlock(nn.Module):
    """Self-attn (modulated, gated), cross-attn (affine norm3, no gate), FFN (modulated, gated)."""

    def __init__(self, cfg: WanConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False, **kw)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps, **kw)
        self.norm3 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=True, **kw)
        cross = WanI2VCrossAttention if cfg.model_type == "i2v" else WanT2VCrossAttention
        self.cross_attn = cross(dim, cfg.num_heads, cfg.eps, **kw)
        self.norm2 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False, **kw)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim, **kw), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim, **kw))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim, **kw))

    fused = False            # run `wan_int8.fused.fused_block_forward` where it can (WanModel.set_fused_blocks)
    fused_needs_kernels = True   # False: run it on its torch references where no Triton kernel can run

    def forward(self, x: torch.Tensor, e: torch.Tensor, freqs: torch.Tensor, context: torch.Tensor,
                context_img_len: Optional[int] = None) -> torch.Tensor:
        if self.fused:
            from ..fused import fused_block_forward, fused_block_unavailable, log_decision
            why = fused_block_unavailable(self, x, self.fused_needs_kernels)
            log_decision(why, "the unfused block")
            if why is None:
                return fused_block_forward(self, x, e, freqs, context, context_img_len,
                                           self.self_attn.attention_fn, self.cross_attn.attention_fn)
        # e: [B, G, 6, D] -> six [B, G, D] (shift, scale, gate) x (attn, ffn), in the model dtype as ComfyUI;
        # G > 1 (per-frame timesteps, Wan 2.2 TI2V) is spread over the tokens as ComfyUI's repeat_e
        e = [repeat_e(p, x) for p in (self.modulation.to(x.dtype).unsqueeze(0) + e).unbind(2)]
        y = self.self_attn(torch.addcmul(e[0], self.norm1(x), 1 + e[1]), freqs)
        x = torch.addcmul(x, y, e[2])
        x = x + self.cross_attn(self.norm3(x), context, context_img_len=context_img_len)
        y = self.ffn(torch.addcmul(e[3], self.norm2(x), 1 + e[4]))
        return torch.addcmul(x, y, e[5])


def modulation_per(seq: int, groups: int) -> int:
    """Tokens per modulation row when `groups` rows cover `seq` tokens, as ComfyUI's `repeat_e` spreads them:
    seq // groups, or one more when groups does not divide seq (the last row then covers fewer)."""
    if groups <= 1:
        return seq
    repeats = seq // groups
    return repeats if repeats * groups == seq else repeats + 1


def repeat_e(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's `repeat_e`: a modulation `[B, G, D]` with G > 1 rows repeated to cover x's L tokens."""
    if e.size(1) <= 1:
        return e
    return torch.repeat_interleave(e, modulation_per(x.size(1), e.size(1)), dim=1)[:, :x.size(1)]


class Head(nn.Module):
    def __init__(self, cfg: WanConfig, dtype=None, device=None):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False, dtype=dtype, device=device)
        self.head = nn.Linear(cfg.dim, math.prod(PATCH_SIZE) * cfg.out_dim, dtype=dtype, device=device)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # e: [B, 1, D] (time_embedding output, not the projection)
        shift, scale = (self.modulation.to(x.dtype).unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(torch.addcmul(shift, self.norm(x), 1 + scale))


class MLPProj(nn.Module):
    """CLIP image features [B, 257, 1280] -> image context tokens [B, 257, D] (Wan 2.1 i2v / flf2v)."""

    def __init__(self, in_dim: int, out_dim: int, flf_tokens: Optional[int] = None, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.proj = nn.Sequential(nn.LayerNorm(in_dim, **kw), nn.Linear(in_dim, in_dim, **kw), nn.GELU(),
                                  nn.Linear(in_dim, out_dim, **kw), nn.LayerNorm(out_dim, **kw))
        self.emb_pos = nn.Parameter(torch.zeros(1, flf_tokens, in_dim, **kw)) if flf_tokens else None

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if self.emb_pos is not None:
            n = min(image_embeds.shape[1], self.emb_pos.shape[1])
            image_embeds = image_embeds[:, :self.emb_pos.shape[1]] + self.emb_pos[:, :n].to(image_embeds.dtype)
        return self.proj(image_embeds)


# -- the model -----------------------------------------------------------------------------------------------
class WanModel(nn.Module):
    """Wan 2.1/2.2 DiT.  `forward(x [B, in_dim, T, H, W], t [B] in 0..1000, context [B, L, text_dim])`
    returns the flow (velocity) prediction [B, out_dim, T, H, W] in the model dtype.
    """

    def __init__(self, config: WanConfig, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        cfg = self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, device=device)
        # ComfyUI creates the patch embedding in fp32 whatever the model dtype, and runs it in fp32
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE,
                                         dtype=torch.float32, device=device)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim, **kw), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim, **kw))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim, **kw), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim, **kw))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim, **kw))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg, **kw) for _ in range(cfg.num_layers))
        self.head = Head(cfg, **kw)
        self.img_emb = (MLPProj(CLIP_DIM, cfg.dim, cfg.flf_pos_embed_token_number, **kw)
                        if cfg.model_type == "i2v" else None)
        self._freqs: Dict[tuple, torch.Tensor] = {}   # (grid, device) -> RoPE; not state, rebuilt on demand

    def set_attention(self, fn: Optional[AttentionFn] = None, cross: bool = True) -> None:
        """Run every self-attention (and, with `cross`, every cross-attention) through `fn(q, k, v, heads)` on
        [B, L, H*D] tensors; None restores SDPA."""
        for block in self.blocks:
            block.self_attn.attention_fn = fn or attention
            block.cross_attn.attention_fn = (fn if cross else None) or attention

    def set_fused_blocks(self, enabled: bool = True, require_kernels: bool = True) -> None:
        """Run every block through the fused passes (`wan_int8.fused`) where their Triton kernels can run, else as
        before (logged once); `require_kernels=False` also runs them on their torch references (accuracy runs on
        a CPU: the same math, no speed)."""
        for block in self.blocks:
            block.fused = bool(enabled)
            block.fused_needs_kernels = bool(require_kernels)

    def rope(self, grid: Sequence[int], device) -> torch.Tensor:
        """RoPE for a token grid, cached: built on the CPU in float64, so worth not redoing every step."""
        key = (tuple(grid), str(device))
        if key not in self._freqs:
            if len(self._freqs) >= 8:
                self._freqs.clear()
            self._freqs[key] = rope_freqs(grid, HEAD_DIM, device=device)
        return self._freqs[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.config
        b, _, frames, height, width = x.shape
        dtype = self.dtype
        t = t.reshape(1).expand(b) if t.dim() == 0 else t
        x = pad_to_patch_size(x.to(dtype), PATCH_SIZE)
        x = self.patch_embedding(x.float()).to(dtype)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        freqs = self.rope(grid, x.device)

        e = self.time_embedding(sinusoidal_embedding_1d(cfg.freq_dim, t.flatten()).to(dtype))
        e = e.reshape(t.shape[0], -1, cfg.dim)                       # [B, 1, D]
        e0 = self.time_projection(e).unflatten(2, (6, cfg.dim))     # [B, 1, 6, D]

        context = self.text_embedding(context.to(dtype))
        context_img_len = None
        if clip_fea is not None:
            if self.img_emb is not None:
                context = torch.cat([self.img_emb(clip_fea.to(dtype)), context], dim=1)
            context_img_len = clip_fea.shape[-2]

        for block in self.blocks:
            x = block(x, e=e0, freqs=freqs, context=context, context_img_len=context_img_len)
        x = self.head(x, e)
        return self.unpatchify(x, grid)[:, :, :frames, :height, :width]

    def unpatchify(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """[B, L, prod(patch) * C] -> [B, C, T*pt, H*ph, W*pw]."""
        c, b = self.config.out_dim, x.shape[0]
        u = x[:, :math.prod(grid)].reshape(b, *grid, *PATCH_SIZE, c)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(b, c, *(g * p for g, p in zip(grid, PATCH_SIZE)))


def pad_to_patch_size(x: torch.Tensor, patch: Sequence[int] = PATCH_SIZE) -> torch.Tensor:
    """Pad the last len(patch) dims up to a multiple of the patch, circularly (as ComfyUI)."""
    pad = ()
    for i, p in enumerate(patch):
        pad = (0, (p - x.shape[i + 2] % p) % p) + pad
    return F.pad(x, pad, mode="circular") if any(pad) else x


# -- inputs and sampling ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class WanInputs:
    """Everything a deterministic generation needs besides the model."""

    noise: torch.Tensor                     # [B, out_dim, T, H, W] latent noise
    context: torch.Tensor                   # [B, text_len, text_dim] text-encoder output (padding zeroed)
    cond: Optional[torch.Tensor] = None     # [B, in_dim - out_dim, T, H, W] image conditioning (i2v-style)
    clip_fea: Optional[torch.Tensor] = None  # [B, 257, 1280] CLIP features (Wan 2.1 i2v only)


def latent_shape(config: WanConfig, frames: int, height: int, width: int) -> Tuple[int, int, int]:
    """Pixel video size -> latent (T, H, W) with the VAE's stride: T = (frames - 1)/4 + 1."""
    st, sh, sw = config.vae_stride
    return (frames - 1) // st + 1, max(1, height // sh), max(1, width // sw)


def seeded_inputs(config: WanConfig, seed: int, frames: int, height: int, width: int, batch: int = 1,
                  text_len: int = 512, prompt_tokens: int = 32, device=None,
                  dtype: torch.dtype = torch.float32) -> WanInputs:
    """Latent noise and a random text context from a seed; `frames/height/width` are pixel sizes.

    Everything is drawn on the CPU in fp32 from one `torch.Generator`, noise first, so the same seed gives
    the same inputs whatever the checkpoint format, model dtype or device.  Only the first `prompt_tokens`
    context rows are non-zero, as ComfyUI zeroes the umT5 padding.  `cond`/`clip_fea` are drawn last (only
    for models that take them), so a t2v and an i2v model see the same noise and text for one seed.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    t, h, w = latent_shape(config, frames, height, width)
    noise = torch.randn((batch, config.out_dim, t, h, w), generator=g, dtype=torch.float32)
    context = torch.randn((batch, text_len, config.text_dim), generator=g, dtype=torch.float32)
    context[:, min(prompt_tokens, text_len):] = 0
    cond = clip = None
    if config.in_dim > config.out_dim:
        cond = torch.randn((batch, config.in_dim - config.out_dim, t, h, w), generator=g, dtype=torch.float32)
    if config.model_type == "i2v":
        clip = torch.randn((batch, config.flf_pos_embed_token_number or 257, CLIP_DIM), generator=g,
                           dtype=torch.float32)
    move = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return WanInputs(move(noise), move(context), move(cond), move(clip))


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """sigma(t) = shift*t / (1 + (shift-1)*t): the flow-matching shift ComfyUI applies (Wan: 8, 5B: 5)."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def flow_sigmas(steps: int, shift: float = 8.0, timesteps: int = 1000) -> torch.Tensor:
    """ComfyUI's "simple" schedule over ModelSamplingDiscreteFlow: steps+1 sigmas from 1.0 down to 0."""
    table = time_snr_shift(shift, torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps)
    stride = timesteps / steps
    sig = [float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]
    return torch.tensor(sig, dtype=torch.float32)


@torch.no_grad()
def sample(model: Callable, noise: torch.Tensor, context: torch.Tensor, steps: int = 20, shift: float = 8.0,
           clip_fea: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
           negative: Optional[torch.Tensor] = None, cfg: float = 1.0,
           callback: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Flow-matching Euler, as ComfyUI's `euler` sampler + `simple` scheduler on a Wan model.

    x_0 = sigma_max * noise; each step x <- x + (sigma_next - sigma) * v(x, 1000*sigma).  The latent is kept
    in fp32 (as ComfyUI's sampler does); the model sees it in its own dtype.  `cond` (extra input channels,
    e.g. the i2v mask + image latent) is concatenated to x on the channel axis.  With `negative` and
    cfg != 1 the two predictions are combined as uncond + cfg * (cond - uncond).  Deterministic.
    """
    sigmas = flow_sigmas(steps, shift).tolist()
    x = noise.float() * sigmas[0]
    b = x.shape[0]
    use_cfg = negative is not None and cfg != 1.0
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        inp = x if cond is None else torch.cat([x, cond.to(x)], dim=1)
        t = torch.full((b,), s * 1000.0, dtype=torch.float32, device=x.device)
        v = model(inp, t, context, clip_fea=clip_fea).float()
        if use_cfg:
            v_neg = model(inp, t, negative, clip_fea=clip_fea).float()
            v = v_neg + cfg * (v - v_neg)
        x = x + (s_next - s) * v
        if callback is not None:
            callback(i, x)
    return x


def state_dict_shapes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}
