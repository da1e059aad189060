"""LoRA on INT8 models: formats, exact key matching, stacking, strengths, cache, offload, accuracy, bake, CLI.

Every LoRA file here is synthetic, built in the test; references are float64 merges written here, not the
library's own merge code.
"""
import json
import os

import pytest
import torch
from torch import nn

from wan_int8.config import get_settings, set_settings, update_settings
from wan_int8.formats.safetensors_io import save_tensors
from wan_int8.layers import Int8Linear, QuantizeConfig, quantize_model
from wan_int8.lora import (LoraCache, LoraError, apply_loras, load_lora, lora_state, parse_lora_spec, parse_tensors,
                           remove_loras, set_lora_strength)
from wan_int8.lora.keys import ModelTargets, Target, resolve
from wan_int8.lora.runtime import match_lora
from wan_int8.models.tiny_wan import build_tiny_wan
from wan_int8.quant.int8 import dequantize
from wan_int8.quant.types import Rotation

D, F = 256, 512


def rnd(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def lora_tensors(base, n, k, r, g, alpha=None, down=".lora_down.weight", up=".lora_up.weight", scale=0.05):
    t = {base + down: rnd(g, r, k, scale=scale), base + up: rnd(g, n, r, scale=scale)}
    if alpha is not None:
        t[base + ".alpha"] = torch.tensor(float(alpha))
    return t


def delta_of(t, base, down=".lora_down.weight", up=".lora_up.weight"):
    d, u = t[base + down].double(), t[base + up].double()
    a = t.get(base + ".alpha")
    return (u @ d) * (float(a) / d.shape[0] if a is not None else 1.0)


@pytest.fixture(scope="module")
def wan_targets():
    return ModelTargets.from_model(build_tiny_wan(layers=1, model_type="i2v", dtype=torch.float32))


def int8_wan(layers=2, model_type="t2v", dtype=torch.float32, rotate=False, exclude=()):
    m = build_tiny_wan(layers=layers, model_type=model_type, dtype=dtype)
    quantize_model(m, QuantizeConfig(include=(r"blocks\.",), exclude=exclude, rotate=rotate))
    return m


class Layers(nn.Module):
    """A bag of named linears (INT8 or float) to put LoRAs on."""

    def __init__(self, specs, dtype=torch.float64, seed=0, rotation=None):
        super().__init__()
        torch.manual_seed(seed)
        for name, (n, k, kind) in specs.items():
            parent = self
            parts = name.split(".")
            for p in parts[:-1]:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            lin = nn.Linear(k, n).to(dtype)
            mod = Int8Linear.from_linear(lin, rotation=rotation, name=name) if kind == "int8" else lin
            if kind == "int8":
                mod.bias.data = mod.bias.data.to(dtype)
            parent.add_module(parts[-1], mod)


def weight_of(mod):
    return dequantize(mod.int8_weight(), torch.float64) if isinstance(mod, Int8Linear) else mod.weight.double()


# -- formats and key maps ------------------------------------------------------------------------------------
SPELLINGS = [
    ("lora_unet_blocks_0_self_attn_q", ".lora_down.weight", ".lora_up.weight"),          # kohya / musubi
    ("lora_unet__blocks_0_self_attn_q", ".lora_down.weight", ".lora_up.weight"),         # Wan-Fun
    ("diffusion_model.blocks.0.self_attn.q", ".lora_down.weight", ".lora_up.weight"),    # ComfyUI / lightx2v
    ("diffusion_model.blocks.0.self_attn.q", ".lora_A.weight", ".lora_B.weight"),        # diffusion-pipe
    ("transformer.blocks.0.attn1.to_q", ".lora_A.weight", ".lora_B.weight"),             # diffusers / PEFT
    ("base_model.model.blocks.0.attn1.to_q", ".lora_A.default.weight", ".lora_B.default.weight"),
    ("blocks.0.self_attn.q", ".lora.down.weight", ".lora.up.weight"),
    ("transformer.blocks.0.attn1.to_q", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    ("diffusion_model.blocks.0.self_attn.q", "_lora.down.weight", "_lora.up.weight"),
    ("lora_transformer_blocks_0_attn1_to_q", ".lora_down.weight", ".lora_up.weight"),     # kohya, diffusers names
]


@pytest.mark.parametrize("base,down,up", SPELLINGS)
def test_every_spelling_lands_on_the_same_layer(base, down, up, wan_targets):
    g = torch.Generator().manual_seed(1)
    t = lora_tensors(base, D, D, 4, g, alpha=2.0, down=down, up=up)
    lf = parse_tensors(t)
    m = match_lora(lf, wan_targets)
    assert list(m.report.layers) == ["blocks.0.self_attn.q"], m.report.summary()
    (target, adapter), = m.adapters
    torch.testing.assert_close(adapter.delta(), delta_of(t, base, down, up))


def test_diffusers_wan_names_and_patches(wan_targets):
    g = torch.Generator().manual_seed(2)
    t = {}
    for name in ("attn2.add_k_proj", "attn2.to_k", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"):
        n = F if name == "ffn.net.0.proj" else D
        k = F if name == "ffn.net.2" else D
        t.update(lora_tensors(f"transformer.blocks.0.{name}", n, k, 4, g, down=".lora_A.weight", up=".lora_B.weight"))
    t["transformer.blocks.0.attn2.to_k.lora_B.bias"] = rnd(g, D)
    t["diffusion_model.blocks.0.norm3.diff"] = rnd(g, D)                   # ComfyUI name
    t["transformer.blocks.0.attn2.norm_added_k.diff"] = rnd(g, D)
    t["diffusion_model.blocks.0.cross_attn.v_img.diff_b"] = rnd(g, D)
    t["diffusion_model.blocks.0.diff_m"] = rnd(g, 1, 6, D)
    rep = match_lora(parse_tensors(t), wan_targets).report
    assert set(rep.layers) == {"blocks.0.cross_attn.k_img", "blocks.0.cross_attn.k", "blocks.0.self_attn.o",
                               "blocks.0.ffn.0", "blocks.0.ffn.2"}
    assert rep.params == {"blocks.0.cross_attn.k.bias": "diff_b", "blocks.0.norm3.weight": "diff",
                          "blocks.0.cross_attn.norm_k_img.weight": "diff", "blocks.0.cross_attn.v_img.bias": "diff_b",
                          "blocks.0.modulation": "diff_m"}
    assert not rep.unmatched


def test_diffusers_norm2_is_comfy_norm3():
    targets = ModelTargets.from_model(build_tiny_wan(layers=1, dtype=torch.float32))
    lf = parse_tensors({"transformer.blocks.0.norm2.diff": torch.ones(D)})
    assert match_lora(lf, targets).report.params == {"blocks.0.norm3.weight": "diff"}


def test_k_img_never_overwrites_k():
    g = torch.Generator().manual_seed(3)
    t = {}
    for n in ("k", "k_img", "v", "v_img"):
        t.update(lora_tensors(f"lora_unet_blocks_0_cross_attn_{n}", D, D, 4, g))
    i2v = ModelTargets.from_model(build_tiny_wan(layers=1, model_type="i2v", dtype=torch.float32))
    m = match_lora(parse_tensors(t), i2v)
    by_target = {tg.name: a for tg, a in m.adapters}
    for n in ("k", "k_img", "v", "v_img"):
        torch.testing.assert_close(by_target[f"blocks.0.cross_attn.{n}"].delta(),
                                   delta_of(t, f"lora_unet_blocks_0_cross_attn_{n}"))
    # on a model without the image branch (Wan 2.2): k/v apply, k_img/v_img are reported as harmless misses
    t2v = ModelTargets.from_model(build_tiny_wan(layers=1, dtype=torch.float32))
    rep = match_lora(parse_tensors(t), t2v).report
    assert set(rep.layers) == {"blocks.0.cross_attn.k", "blocks.0.cross_attn.v"}
    assert not rep.unmatched and len(rep.harmless) == 2
    assert "Wan 2.1 I2V" in rep.summary() and "harmless" in rep.summary()


def test_unknown_keys_are_listed_and_text_encoder_is_harmless(wan_targets):
    g = torch.Generator().manual_seed(4)
    t = lora_tensors("lora_unet_blocks_0_self_attn_q", D, D, 4, g)
    t.update(lora_tensors("lora_unet_blocks_7_self_attn_q", D, D, 4, g))      # no block 7
    t.update(lora_tensors("lora_te1_text_model_encoder_layers_0_mlp_fc1", 8, 8, 2, g))
    rep = match_lora(parse_tensors(t), wan_targets).report
    assert [u[0] for u in rep.unmatched] == ["lora_unet_blocks_7_self_attn_q"]
    assert "text-encoder" in rep.harmless[0][1]


def test_zero_matches_is_an_error_not_success():
    model = int8_wan(layers=1)
    g = torch.Generator().manual_seed(5)
    lf = parse_tensors(lora_tensors("lora_unet_double_blocks_0_img_attn_qkv", 3 * D, D, 4, g), "flux.safetensors")
    with pytest.raises(LoraError, match="no key of this LoRA matches"):
        apply_loras(model, [(lf, 1.0)])
    assert lora_state(model) is None and all(m.lora is None for m in model.modules() if isinstance(m, Int8Linear))


def test_shape_mismatch_names_layer_and_shapes():
    model = int8_wan(layers=1)
    g = torch.Generator().manual_seed(6)
    lf = parse_tensors(lora_tensors("diffusion_model.blocks.0.self_attn.q", 5120, 5120, 2, g))
    with pytest.raises(LoraError, match=r"blocks\.0\.self_attn\.q.*\[5120, 5120\].*\[256, 256\]"):
        apply_loras(model, [(lf, 1.0)])


def test_zimage_fused_qkv_to_out_adaln():
    """The seed dropped to_out and adaLN and kept only the last of q/k/v on the fused layer."""
    dim = 64
    model = Layers({"layers.0.attention.qkv": (3 * dim, dim, "int8"), "layers.0.attention.out": (dim, dim, "int8"),
                    "layers.0.adaLN_modulation.1": (4 * dim, dim, "float")})
    g = torch.Generator().manual_seed(7)
    t = {}
    for n in ("to_q", "to_k", "to_v", "to_out.0"):
        t.update(lora_tensors(f"diffusion_model.layers.0.attention.{n}", dim, dim, 4, g, alpha=8,
                              down=".lora_A.weight", up=".lora_B.weight"))
    t.update(lora_tensors("diffusion_model.layers.0.adaLN_modulation.0", 4 * dim, dim, 4, g,
                          down=".lora_A.weight", up=".lora_B.weight"))
    x = torch.randn(7, dim, dtype=torch.float64)
    mods = {"qkv": model.get_submodule("layers.0.attention.qkv"), "out": model.get_submodule("layers.0.attention.out"),
            "ada": model.get_submodule("layers.0.adaLN_modulation.1")}
    base = {k: m(x) for k, m in mods.items()}
    rep = apply_loras(model, [(parse_tensors(t), 0.75)])
    assert rep.files[0].matched == 5 and not rep.files[0].unmatched, rep.summary()
    B = "diffusion_model.layers.0."
    qkv_delta = torch.cat([delta_of(t, B + f"attention.{n}", ".lora_A.weight", ".lora_B.weight")
                           for n in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(mods["qkv"](x) - base["qkv"], 0.75 * x @ qkv_delta.T)
    torch.testing.assert_close(mods["out"](x) - base["out"],
                               0.75 * x @ delta_of(t, B + "attention.to_out.0", ".lora_A.weight", ".lora_B.weight").T)
    torch.testing.assert_close(mods["ada"](x) - base["ada"],
                               0.75 * x @ delta_of(t, B + "adaLN_modulation.0", ".lora_A.weight", ".lora_B.weight").T)


def test_flux2_and_qwen_names():
    flux = ModelTargets.from_shapes({"double_blocks.0.img_attn.qkv.weight": (3 * D, D),
                                     "double_blocks.0.txt_attn.qkv.weight": (3 * D, D),
                                     "double_blocks.0.img_attn.proj.weight": (D, D),
                                     "double_blocks.0.img_mlp.0.weight": (F, D),
                                     "single_blocks.0.linear1.weight": (3 * D + F, D)})
    assert resolve("transformer.transformer_blocks.0.attn.to_k", flux) == Target("double_blocks.0.img_attn.qkv", 1, 3)
    assert resolve("transformer_blocks.0.attn.add_v_proj", flux) == Target("double_blocks.0.txt_attn.qkv", 2, 3)
    assert resolve("transformer_blocks.0.attn.to_out.0", flux) == Target("double_blocks.0.img_attn.proj")
    assert resolve("transformer_blocks.0.ff.linear_in", flux) == Target("double_blocks.0.img_mlp.0")
    assert resolve("single_transformer_blocks.0.attn.to_qkv_mlp_proj", flux) == Target("single_blocks.0.linear1")
    assert resolve("lora_unet_double_blocks_0_img_attn_qkv", flux) == Target("double_blocks.0.img_attn.qkv")
    qwen = ModelTargets.from_shapes({"transformer_blocks.0.attn.to_q.weight": (D, D),
                                     "transformer_blocks.0.attn.add_k_proj.weight": (D, D),
                                     "transformer_blocks.0.attn.to_out.0.weight": (D, D),
                                     "transformer_blocks.0.img_mlp.net.0.proj.weight": (F, D)})
    assert resolve("transformer.transformer_blocks.0.attn.to_q", qwen) == Target("transformer_blocks.0.attn.to_q")
    assert resolve("lora_unet_transformer_blocks_0_attn_add_k_proj", qwen) == Target("transformer_blocks.0.attn.add_k_proj")
    assert resolve("lora_transformer_transformer_blocks_0_attn_to_out_0", qwen) == Target("transformer_blocks.0.attn.to_out.0")
    assert resolve("transformer_blocks.0.attn.to_q_extra", qwen) is None


# -- adapter kinds -------------------------------------------------------------------------------------------
def test_loha_exact():
    g = torch.Generator().manual_seed(8)
    b = "diffusion_model.blocks.0.self_attn.q"
    t = {b + ".hada_w1_a": rnd(g, D, 4), b + ".hada_w1_b": rnd(g, 4, D), b + ".hada_w2_a": rnd(g, D, 3),
         b + ".hada_w2_b": rnd(g, 3, D), b + ".alpha": torch.tensor(2.0)}
    a = parse_tensors(t).adapters[b]
    ref = (t[b + ".hada_w1_a"].double() @ t[b + ".hada_w1_b"].double()) * \
          (t[b + ".hada_w2_a"].double() @ t[b + ".hada_w2_b"].double()) * (2.0 / 4)
    assert a.rank == 12          # factors are stored in fp32: exact up to fp32 rounding
    torch.testing.assert_close(a.delta(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factorized", [False, True])
def test_lokr_exact(factorized):
    g = torch.Generator().manual_seed(9)
    b = "diffusion_model.blocks.0.self_attn.q"
    w1 = rnd(g, 4, 4)
    t = {b + ".lokr_w1": w1, b + ".alpha": torch.tensor(3.0)}
    if factorized:    # small exact rank: stays low-rank
        t[b + ".lokr_w2_a"], t[b + ".lokr_w2_b"] = rnd(g, 64, 2), rnd(g, 2, 64)
        w2, scale = t[b + ".lokr_w2_a"].double() @ t[b + ".lokr_w2_b"].double(), 3.0 / 2
    else:             # full w2: rank too high -> an exact dense delta
        t[b + ".lokr_w2"] = rnd(g, 64, 64)
        w2, scale = t[b + ".lokr_w2"].double(), 1.0
    a = parse_tensors(t).adapters[b]
    assert (a.kind, type(a).__name__) == ("lokr", "LowRank" if factorized else "Dense")
    torch.testing.assert_close(a.delta(), torch.kron(w1.double(), w2) * scale, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_row", [False, True])
def test_int8_lora(per_row):
    g = torch.Generator().manual_seed(10)
    b = "diffusion_model.blocks.0.self_attn.q"
    up = torch.randint(-127, 128, (D, 8), generator=g, dtype=torch.int8)
    down = torch.randint(-127, 128, (8, D), generator=g, dtype=torch.int8)
    su = torch.rand(D, 1, generator=g) * 1e-3 if per_row else torch.tensor(1e-3)
    sd = torch.rand(8, generator=g) * 1e-3 if per_row else torch.tensor(2e-3)
    t = {b + ".lora_up.weight": up, b + ".lora_down.weight": down, b + ".lora_up.scale_weight": su,
         b + ".lora_down.scale_weight": sd, b + ".alpha": torch.tensor(8.0)}
    a = parse_tensors(t).adapters[b]
    ref = (up.double() * su.double().reshape(-1, 1) if per_row else up.double() * float(su)) @ \
          (down.double() * sd.double().reshape(-1, 1) if per_row else down.double() * float(sd))
    assert a.kind == "int8-lora"
    torch.testing.assert_close(a.delta(), ref, rtol=1e-5, atol=1e-6)


def comfy_dora_merge(w, delta, m, strength):
    """ComfyUI's weight_decompose, float64 (the reference)."""
    wc = w + delta
    if m.shape[0] == w.shape[0]:
        norm = w.norm(dim=1, keepdim=True)
    else:
        norm = wc.norm(dim=0, keepdim=True)
    wc = wc * (m.double() / (norm + torch.finfo(torch.float32).eps))
    return w + strength * (wc - w)


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("kind", ["float", "int8"])
def test_dora_exact(axis, kind):
    model = Layers({"blk.q": (96, 64, kind)})
    mod = model.blk.q
    g = torch.Generator().manual_seed(11)
    t = lora_tensors("diffusion_model.blk.q", 96, 64, 4, g, alpha=2.0, scale=0.2)
    m = (1 + 0.1 * rnd(g, 96, 1)) if axis == "output" else (1 + 0.1 * rnd(g, 1, 64))
    t["diffusion_model.blk.q.dora_scale"] = m
    x = torch.randn(9, 64, dtype=torch.float64)
    w = weight_of(mod)
    y0 = mod(x)
    apply_loras(model, [(parse_tensors(t), 0.6)])
    wp = comfy_dora_merge(w, delta_of(t, "diffusion_model.blk.q"), m, 0.6)
    # the change of output equals x·(W' − W)ᵀ (exact for both float and INT8 bases; INT8's own error cancels
    # in the row-scaled part only up to the activation quantization, so compare the int8 case on W·x)
    expected = y0 + x @ (wp - w).T
    if kind == "int8" and axis == "output":
        c = 1 + 0.6 * (m.reshape(-1).double() / (w.norm(dim=1) + torch.finfo(torch.float32).eps) - 1)
        expected = (y0 - mod.bias) * c + mod.bias + x @ (wp - c[:, None] * w).T
    torch.testing.assert_close(mod(x), expected, rtol=1e-9, atol=1e-9)


# -- stacking, strengths, removal -----------------------------------------------------------------------------
def two_loras(seed=12, n=96, k=64):
    g = torch.Generator().manual_seed(seed)
    t1 = lora_tensors("diffusion_model.blk.q", n, k, 4, g, alpha=2.0)
    t1["diffusion_model.blk.q.diff_b"] = rnd(g, n)
    t2 = lora_tensors("lora_unet_blk_q", n, k, 8, g, alpha=4.0, scale=0.1)
    t2.update(lora_tensors("lora_unet_blk_f", n, k, 2, g))
    return t1, t2


@pytest.mark.parametrize("rotation", [None, Rotation("regular", 64)])
def test_stack_exact_order_independent_and_removable(rotation):
    model = Layers({"blk.q": (96, 64, "int8"), "blk.f": (96, 64, "float")}, rotation=rotation)
    t1, t2 = two_loras()
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    y0q, y0f = model.blk.q(x), model.blk.f(x)
    bias0 = model.blk.q.bias.data
    a, b = parse_tensors(t1, "a"), parse_tensors(t2, "b")
    apply_loras(model, [(a, 0.7), (b, -1.3)])
    yq, yf = model.blk.q(x), model.blk.f(x)
    dq = 0.7 * delta_of(t1, "diffusion_model.blk.q") - 1.3 * delta_of(t2, "lora_unet_blk_q")
    # (the INT8 epilogue adds the patched bias in fp32, hence 1e-6 here; the low-rank part is float64-exact)
    torch.testing.assert_close(yq, y0q + x @ dq.T + 0.7 * t1["diffusion_model.blk.q.diff_b"].double(),
                               rtol=1e-6, atol=1e-6)
    bias = model.blk.q.bias.data
    model.blk.q.bias.data = bias0
    torch.testing.assert_close(model.blk.q(x), y0q + x @ dq.T, rtol=1e-10, atol=1e-10)
    model.blk.q.bias.data = bias
    torch.testing.assert_close(yf, y0f - 1.3 * x @ delta_of(t2, "lora_unet_blk_f").T, rtol=1e-10, atol=1e-10)
    assert model.blk.q.lora.parts and len(model.blk.q.lora.host_tensors()[0]) == 12   # one stacked A of rank 4+8
    apply_loras(model, [(b, -1.3), (a, 0.7)])                                         # other order
    torch.testing.assert_close(model.blk.q(x), yq, rtol=1e-12, atol=1e-12)
    remove_loras(model)
    assert torch.equal(model.blk.q(x), y0q) and torch.equal(model.blk.f(x), y0f)
    assert model.blk.q.bias.data_ptr() == bias0.data_ptr() and model.blk.q.lora is None
    apply_loras(model, [(a, 0.7), (b, -1.3)])                                         # re-application works
    assert torch.equal(model.blk.q(x), yq)


def test_second_stack_appends_instead_of_last_wins():
    model = Layers({"blk.q": (96, 64, "int8"), "blk.f": (96, 64, "float")})
    t1, t2 = two_loras()
    x = torch.randn(5, 64, dtype=torch.float64)
    apply_loras(model, [(parse_tensors(t1, "a"), 1.0), (parse_tensors(t2, "b"), 0.5)])
    both = model.blk.q(x)
    apply_loras(model, [(parse_tensors(t1, "a"), 1.0)])
    apply_loras(model, [(parse_tensors(t2, "b"), 0.5)], append=True)
    torch.testing.assert_close(model.blk.q(x), both, rtol=1e-12, atol=1e-12)
    assert len(lora_state(model).entries) == 2


def test_strength_change_without_reload(tmp_path):
    model = Layers({"blk.q": (96, 64, "int8"), "blk.f": (96, 64, "float")})
    t1, t2 = two_loras()
    p1, p2 = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_tensors(p1, t1)
    save_tensors(p2, t2)
    cache = LoraCache(4)
    x = torch.randn(5, 64, dtype=torch.float64)
    apply_loras(model, [(p1, 1.0), (p2, 0.5)], cache=cache)
    assert cache.reads == 2
    set_lora_strength(model, p1, 0.25)
    set_lora_strength(model, 1, 2.0)
    y = model.blk.q(x)
    assert cache.reads == 2
    fresh = Layers({"blk.q": (96, 64, "int8"), "blk.f": (96, 64, "float")})
    apply_loras(fresh, [(p1, 0.25), (p2, 2.0)], cache=cache)     # a second run: from the cache
    assert cache.reads == 2 and cache.hits == 2
    torch.testing.assert_close(y, fresh.blk.q(x), rtol=1e-12, atol=1e-12)
    assert lora_state(model).report().files[0].strength == 0.25


def test_cache_limit_and_invalidation(tmp_path):
    g = torch.Generator().manual_seed(13)
    paths = []
    for i in range(3):
        p = str(tmp_path / f"l{i}.safetensors")
        save_tensors(p, lora_tensors("diffusion_model.blk.q", 8, 8, 2, g))
        paths.append(p)
    cache = LoraCache(2)
    for p in paths:
        cache.load(p)
    assert len(cache) == 2 and cache.reads == 3
    cache.load(paths[2])
    assert cache.reads == 3                       # hit
    cache.load(paths[0])
    assert cache.reads == 4                       # evicted (least recently used), read again
    # rewrite in place: a new mtime makes a new key, the stale entry goes
    new = lora_tensors("diffusion_model.blk.q", 8, 8, 2, g)
    save_tensors(paths[0], new)
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    got = cache.load(paths[0])
    assert cache.reads == 5 and len(cache) == 2
    torch.testing.assert_close(got.adapters["diffusion_model.blk.q"].down, new["diffusion_model.blk.q.lora_down.weight"])
    # the default size follows Settings.lora_cache_size (INT8_LORA_CACHE_SIZE)
    old = get_settings()
    try:
        update_settings(lora_cache_size=1)
        c = LoraCache()
        c.load(paths[1])
        c.load(paths[2])
        assert len(c) == 1
        update_settings(lora_cache_size=0)
        c2 = LoraCache()
        c2.load(paths[1])
        assert len(c2) == 0
    finally:
        set_settings(old)


def test_offload_path_on_cpu():
    model = Layers({"blk.q": (96, 64, "int8"), "blk.f": (96, 64, "float")})
    t1, t2 = two_loras()
    x = torch.randn(5, 64, dtype=torch.float64)
    loras = [(parse_tensors(t1, "a"), 0.7), (parse_tensors(t2, "b"), 0.5)]
    apply_loras(model, loras)
    ref_q, ref_f = model.blk.q(x), model.blk.f(x)
    apply_loras(model, loras, offload_to_cpu=True)
    state = lora_state(model)
    assert state.offload and state.prefetcher is not None
    for _ in range(2):
        assert torch.equal(model.blk.q(x), ref_q) and torch.equal(model.blk.f(x), ref_f)
    assert state.prefetcher.copies >= 3                # copies issued one layer ahead
    set_lora_strength(model, 0, 0.0)
    set_lora_strength(model, 1, 0.0)
    remove_loras(model)


def test_parse_lora_spec():
    assert parse_lora_spec("a/b.safetensors:0.8") == ("a/b.safetensors", 0.8)
    assert parse_lora_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_spec(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert parse_lora_spec(r"C:\loras\x.safetensors:-1.5") == (r"C:\loras\x.safetensors", -1.5)


# -- the tiny Wan end to end -----------------------------------------------------------------------------------
def wan_lora(seed=14, layers=2, rank=8, with_patches=True):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(layers):
        for n in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o"):
            t.update(lora_tensors(f"diffusion_model.blocks.{i}.{n}", D, D, rank, g, alpha=rank, scale=0.12))
        t.update(lora_tensors(f"diffusion_model.blocks.{i}.ffn.0", F, D, rank, g, alpha=rank, scale=0.12))
        t.update(lora_tensors(f"diffusion_model.blocks.{i}.ffn.2", D, F, rank, g, alpha=rank, scale=0.12))
        if with_patches:
            t[f"diffusion_model.blocks.{i}.norm3.diff"] = rnd(g, D, scale=0.05)
            t[f"diffusion_model.blocks.{i}.self_attn.o.diff_b"] = rnd(g, D, scale=0.02)
    return t


def merge_float(model, t, strength):
    """Reference: merge the LoRA into a float model's weights (float64 math)."""
    with torch.no_grad():
        for key, v in t.items():
            if key.endswith(".lora_down.weight"):
                base = key[: -len(".lora_down.weight")]
                name = base[len("diffusion_model."):]
                mod = model.get_submodule(name)
                delta = delta_of(t, base)
                mod.weight.data = (mod.weight.double() + strength * delta).to(mod.weight.dtype)
            elif key.endswith(".diff") or key.endswith(".diff_b"):
                base, leaf = key.rsplit(".", 1)
                mod = model.get_submodule(base[len("diffusion_model."):])
                p = mod.weight if leaf == "diff" else mod.bias
                p.data = (p.double() + strength * v.double()).to(p.dtype)


def wan_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([700.0]),
            torch.cat([torch.randn(1, 16, 4096, generator=g), torch.zeros(1, 16, 4096)], 1))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("rotate", [False, True])
def test_tiny_wan_int8_lora_accuracy_vs_bf16_merged(rotate):
    t = wan_lora()
    x, ts, ctx = wan_inputs()
    ref = build_tiny_wan(dtype=torch.bfloat16)
    with torch.no_grad():
        y_ref = ref(x, ts, ctx)
        merge_float(ref, t, 0.8)
        y_ref_lora = ref(x, ts, ctx)
        model = int8_wan(dtype=torch.bfloat16, rotate=rotate)
        y_int8 = model(x, ts, ctx)
        rep = apply_loras(model, [(parse_tensors(t), 0.8)])
        y_int8_lora = model(x, ts, ctx)
        e0, e1 = rel(y_int8, y_ref), rel(y_int8_lora, y_ref_lora)
        assert rel(y_ref_lora, y_ref) > 5 * e0               # the LoRA matters more than quantization error
        assert e1 <= 1.1 * e0, (e0, e1)
        assert rep.files[0].matched == 2 * 8 + 4
        remove_loras(model)
        assert torch.equal(model(x, ts, ctx), y_int8)


def test_tiny_wan_kept_float_layers_and_offload():
    t = wan_lora(with_patches=False)
    x, ts, ctx = wan_inputs(1)
    with torch.no_grad():
        model = int8_wan(exclude=(r"ffn\.",))                # ffn stays float nn.Linear: hooks carry its LoRA
        assert type(model.blocks[0].ffn[0]) is nn.Linear
        apply_loras(model, [(parse_tensors(t), 1.0)])
        y = model(x, ts, ctx)
        apply_loras(model, [(parse_tensors(t), 1.0)], offload_to_cpu=True)
        torch.testing.assert_close(model(x, ts, ctx), y, rtol=0, atol=0)
        remove_loras(model)
        y0 = model(x, ts, ctx)
        assert rel(y, y0) > 1e-2


# -- bake and CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    from wan_int8.loader import LoadConfig, write_native
    from wan_int8.models.tiny_wan import build_tiny_wan_state_dict
    d = tmp_path_factory.mktemp("lora_wan")
    src = str(d / "tiny_bf16.safetensors")
    save_tensors(src, build_tiny_wan_state_dict(layers=2))
    out = {"bf16": src}
    for rot in (False, True):
        path = str(d / f"tiny_int8{'_rot' if rot else ''}.safetensors")
        write_native(src, path, LoadConfig(rotate=rot), measure_error=False)
        out["int8_rot" if rot else "int8"] = path
    lora = str(d / "lora.safetensors")
    save_tensors(lora, wan_lora())
    out["lora"] = lora
    return out


@pytest.mark.parametrize("which", ["int8", "int8_rot"])
def test_bake_matches_runtime(wan_files, tmp_path, which):
    from wan_int8.formats import open_checkpoint
    from wan_int8.loader import build_wan_model
    from wan_int8.lora import bake_loras
    out = str(tmp_path / "baked.safetensors")
    report, lrep = bake_loras(wan_files[which], [(wan_files["lora"], 0.8)], out)
    assert lrep.files[0].matched == 2 * 8 + 4
    with open_checkpoint(out) as ck:
        assert ck.format == "comfy-native"
        if which == "int8_rot":
            assert all(l.rotation.startswith("regular") for l in ck.layers.values())
    x, ts, ctx = wan_inputs(2)
    with torch.no_grad():
        baked, _ = build_wan_model(out, dtype=torch.float32)
        runtime, _ = build_wan_model(wan_files[which], dtype=torch.float32)
        apply_loras(runtime, [(wan_files["lora"], 0.8)])
        ref = build_tiny_wan(dtype=torch.float32)
        merge_float(ref, load_raw(wan_files["lora"]), 0.8)
        y_ref = ref(x, ts, ctx)
        e_baked, e_rt = rel(baked(x, ts, ctx), y_ref), rel(runtime(x, ts, ctx), y_ref)
    assert e_baked < 0.05 and e_rt < 0.05, (e_baked, e_rt)
    assert e_baked <= 1.5 * e_rt + 1e-3


def load_raw(path):
    from wan_int8.formats.safetensors_io import SafetensorsFile
    with SafetensorsFile(path) as f:
        return {k: f.get(k) for k in f.keys()}


def test_cli_lora_report(wan_files, tmp_path, capsys):
    from wan_int8.cli import main
    assert main(["lora", wan_files["lora"], "--model", wan_files["int8"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["matched_layers"] == 16 and info["matched_params"] == 4 and not info["unmatched"]
    assert main(["lora", wan_files["lora"], "--model", wan_files["bf16"]]) == 0
    assert "applied to 16 layers" in capsys.readouterr().out
    g = torch.Generator().manual_seed(15)
    bad = str(tmp_path / "flux.safetensors")
    save_tensors(bad, lora_tensors("lora_unet_double_blocks_0_img_attn_qkv", 3 * D, D, 4, g))
    assert main(["lora", bad, "--model", wan_files["int8"]]) == 2
    assert "no key" in capsys.readouterr().err
    out = str(tmp_path / "baked.safetensors")
    assert main(["bake-lora", wan_files["int8"], out, "--lora", wan_files["lora"] + ":0.5"]) == 0
    assert os.path.exists(out)
