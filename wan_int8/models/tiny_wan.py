"""Tiny Wan: a Wan-architecture state dict with ComfyUI key names, made in code from a seed.

Why: the demo and the end-to-end tests need a real Wan forward (same modules, same key names, same math)
that is small enough for a CPU, and whose INT8 quantization error looks like the real model's.  Real Wan
has a few hidden-state channels with activations ~20x the rest; per-token INT8 then spends its range on
them and the other channels lose precision.  A plain Gaussian model would hide that, so this one builds
them in: 4 residual-stream channels (patch embedding rows), 4 text-context channels (text_embedding.2
rows) and 4 FFN hidden units (ffn.0 rows) are ~20x larger.  Everything else is N(0, 1/fan_in) so the
activations stay O(1) through the blocks, with non-trivial norm weights and modulation.

Every tensor is drawn from its own CPU generator seeded by (seed, key), so e.g. blocks.0 is the same
whatever the number of layers, and the result does not depend on the device or torch's default dtype.
"""
from __future__ import annotations

import logging
import zlib
from typing import Dict

import torch

from .wan import WanConfig, WanModel

log = logging.getLogger("wan_int8")

OUTLIER_GAIN = 20.0
NUM_OUTLIERS = 4


def tiny_wan_config(layers: int = 2, model_type: str = "t2v") -> WanConfig:
    """dim 256 (2 heads of 128, as ComfyUI assumes head_dim 128), ffn 512, 16 latent channels."""
    in_dim = 36 if model_type == "i2v" else 16
    return WanConfig(dim=256, ffn_dim=512, num_layers=layers, in_dim=in_dim, out_dim=16, freq_dim=256,
                     text_dim=4096, model_type=model_type)


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))


def _outliers(seed: int, what: str, n: int) -> torch.Tensor:
    """The fixed set of outlier indices for one kind of activation (shared by every block)."""
    return torch.randperm(n, generator=_generator(seed, "outliers/" + what))[:NUM_OUTLIERS]


def _init(key: str, shape, seed: int, cfg: WanConfig) -> torch.Tensor:
    g = _generator(seed, key)
    randn = lambda *s: torch.randn(s, generator=g, dtype=torch.float32)  # noqa: E731
    name = key.rsplit(".", 1)[-1]
    if key == "patch_embedding.weight":                      # [D, C, 1, 2, 2]
        w = randn(*shape) / (shape[1] * 4) ** 0.5
        w[_outliers(seed, "hidden", cfg.dim)] *= OUTLIER_GAIN
        return w
    if key == "patch_embedding.bias":
        b = 0.1 * randn(*shape)
        b[_outliers(seed, "hidden", cfg.dim)] = OUTLIER_GAIN * (0.5 + 0.5 * randn(NUM_OUTLIERS).abs())
        return b
    if name == "modulation":                                 # [1, 6, D] / [1, 2, D]
        m = 0.1 * randn(*shape)
        if shape[1] == 6:                                    # gates (2, 5) around 0.3: blocks matter
            m[:, 2] += 0.3
            m[:, 5] += 0.3
        return m
    if name == "emb_pos":
        return 0.02 * randn(*shape)
    is_norm = "norm" in key or key.startswith("img_emb.proj.0") or key.startswith("img_emb.proj.4")
    if is_norm:
        return (1.0 + 0.2 * randn(*shape)) if name == "weight" else 0.05 * randn(*shape)
    if name == "bias":                                       # Linear bias
        return 0.02 * randn(*shape)
    if name == "weight" and len(shape) == 2:                 # Linear [N, K]
        gain = 1.0
        if key.startswith("time_projection"):                # keep modulation O(0.1)
            gain = 0.1
        w = gain * randn(*shape) / shape[1] ** 0.5
        if key == "text_embedding.2.weight":
            w[_outliers(seed, "context", cfg.dim)] *= OUTLIER_GAIN
        elif key.endswith("ffn.0.weight"):
            w[_outliers(seed, "ffn", cfg.ffn_dim)] *= OUTLIER_GAIN
        return w
    raise KeyError(f"tiny Wan: no init rule for {key} {tuple(shape)}")


def wan_state_dict(cfg: WanConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """A seeded Wan state dict of any size (ComfyUI keys) with the tiny Wan's statistics and outlier channels."""
    shapes = {k: tuple(v.shape) for k, v in WanModel(cfg, dtype=torch.float32, device="meta").state_dict().items()}
    return {k: _init(k, s, seed, cfg).to(dtype) for k, s in shapes.items()}


def build_tiny_wan_state_dict(seed: int = 0, layers: int = 2, model_type: str = "t2v",
                              dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """ComfyUI-key-named tiny Wan state dict (what a checkpoint file would hold), deterministic in `seed`."""
    return wan_state_dict(tiny_wan_config(layers, model_type), seed, dtype)


def build_tiny_wan(seed: int = 0, layers: int = 2, model_type: str = "t2v", dtype: torch.dtype = torch.bfloat16,
                   device=None, weight_dtype: torch.dtype = torch.bfloat16) -> WanModel:
    """A WanModel (compute dtype `dtype`) holding the tiny weights, rounded to `weight_dtype` first.

    The weights go through `weight_dtype` (the checkpoint dtype, bf16 like real Wan files) even when the
    model runs in fp32, so fp32 and bf16 runs of one seed start from the same numbers.
    """
    sd = build_tiny_wan_state_dict(seed, layers, model_type, weight_dtype)
    model = WanModel(tiny_wan_config(layers, model_type), dtype=dtype, device=device)
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)
