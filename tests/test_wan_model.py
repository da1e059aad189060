"""The pure-torch Wan model: config detection, module tree parity with ComfyUI, block math, RoPE, sampling."""
import json
import math
import pathlib

import pytest
import torch
from torch import nn

from wan_int8.models.tiny_wan import build_tiny_wan, build_tiny_wan_state_dict, tiny_wan_config
from wan_int8.models.wan import (WanConfig, WanModel, flow_sigmas, rope_axes, rope_freqs, sample, seeded_inputs,
                                 state_dict_shapes)

KEYS_DIR = pathlib.Path(__file__).parent / "data" / "model_keys"
WAN_KEY_FILES = sorted(KEYS_DIR.glob("wan*.json"))

# Fallback when the ComfyUI key dumps are absent: the configurations of comfy_integration.md §1.2.
TABLE_CONFIGS = {
    "wan21_t2v_1_3b": WanConfig(1536, 8960, 30, 16, 16),
    "wan21_t2v_14b": WanConfig(5120, 13824, 40, 16, 16),
    "wan21_i2v_14b": WanConfig(5120, 13824, 40, 36, 16, model_type="i2v"),
    "wan22_ti2v_5b": WanConfig(3072, 14336, 30, 48, 48),
    "wan22_i2v_a14b": WanConfig(5120, 13824, 40, 36, 16),
}


def meta_shapes(cfg: WanConfig):
    return state_dict_shapes(WanModel(cfg, dtype=torch.bfloat16, device="meta").state_dict())


# -- config detection and module tree ------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
@pytest.mark.parametrize("layers", [2, 3])
def test_detect_tiny(model_type, layers):
    sd = build_tiny_wan_state_dict(seed=0, layers=layers, model_type=model_type)
    cfg = WanConfig.from_state_dict_shapes(state_dict_shapes(sd))
    assert cfg == tiny_wan_config(layers, model_type)
    assert (cfg.num_heads, cfg.head_dim) == (2, 128)
    assert WanConfig.from_state_dict_shapes(sd) == cfg     # tensors are accepted too (only .shape is read)


@pytest.mark.skipif(not WAN_KEY_FILES, reason="no ComfyUI key dumps in tests/data/model_keys")
@pytest.mark.parametrize("path", WAN_KEY_FILES, ids=lambda p: p.stem)
def test_detect_and_module_tree_match_comfyui_dump(path):
    """The dumps are ComfyUI's WanModel state dicts (meta device): same detection, same keys and shapes."""
    dump = json.loads(path.read_text())
    keys = {k: tuple(v) for k, v in dump["keys"].items()}
    unet = dump["unet_config"]
    cfg = WanConfig.from_state_dict_shapes(keys)
    for field in ("dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "freq_dim", "eps", "model_type",
                  "num_heads"):
        assert getattr(cfg, field) == unet[field], field
    ours = meta_shapes(cfg)
    assert ours == keys                       # identical module tree: load_state_dict(strict=True) works
    assert sum(math.prod(s) for s in ours.values()) == dump["num_params"]
    prefixed = {"model.diffusion_model." + k: s for k, s in keys.items()}
    assert WanConfig.from_state_dict_shapes(prefixed) == cfg


@pytest.mark.parametrize("name", sorted(TABLE_CONFIGS))
def test_detect_real_configs_from_table(name):
    cfg = TABLE_CONFIGS[name]
    assert WanConfig.from_state_dict_shapes(meta_shapes(cfg)) == cfg
    assert cfg.num_heads == {1536: 12, 3072: 24, 5120: 40}[cfg.dim]


def test_detect_int8_checkpoint_shapes():
    """Int8 files keep weights [N, K] and add scale / marker keys: detection must not change."""
    cfg = TABLE_CONFIGS["wan21_i2v_14b"]
    shapes = meta_shapes(cfg)
    int8 = dict(shapes)
    for k, s in shapes.items():
        if k.startswith("blocks.") and k.endswith(".weight") and len(s) == 2:
            int8[k[:-len("weight")] + "weight_scale"] = (s[0], 1)
            int8[k[:-len("weight")] + "comfy_quant"] = (40,)
    int8["scaled_fp8"] = (0,)
    assert WanConfig.from_state_dict_shapes(int8) == cfg


def test_detect_rejects_non_wan():
    with pytest.raises(ValueError):
        WanConfig.from_state_dict_shapes({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)})


def test_every_linear_is_plain_nn_linear():
    for model_type, per_block in (("t2v", 10), ("i2v", 12)):
        model = WanModel(tiny_wan_config(2, model_type), dtype=torch.float32, device="meta")
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        assert all(type(model.get_submodule(n)) is nn.Linear for n in linears)
        assert sum(n.startswith("blocks.0.") for n in linears) == per_block
    assert model.patch_embedding.weight.dtype == torch.float32


# -- forward ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_forward_shapes(model_type):
    model = build_tiny_wan(seed=0, model_type=model_type, dtype=torch.bfloat16)
    inp = seeded_inputs(model.config, seed=1, frames=5, height=72, width=56, batch=2, text_len=64)
    assert inp.noise.shape == (2, 16, 2, 9, 7)          # odd latent H/W: padded to the patch, then cropped
    x = inp.noise if inp.cond is None else torch.cat([inp.noise, inp.cond], dim=1)
    assert x.shape[1] == model.config.in_dim
    t = torch.tensor([999.0, 3.0])
    with torch.no_grad():
        out = model(x, t, inp.context, clip_fea=inp.clip_fea)
        assert out.shape == inp.noise.shape and out.dtype == torch.bfloat16
        assert torch.isfinite(out).all()
        assert 0.1 < out.float().std() < 10
        if model_type == "i2v":   # the CLIP branch changes the result; without clip_fea it still runs
            assert not torch.equal(out, model(x, t, inp.context))
    assert not torch.equal(out[0], out[1])


def test_fp32_and_bf16_runs_agree():
    m32 = build_tiny_wan(seed=0, dtype=torch.float32)
    m16 = build_tiny_wan(seed=0, dtype=torch.bfloat16)
    inp = seeded_inputs(m32.config, seed=4, frames=1, height=64, width=64, text_len=32)
    t = torch.tensor([700.0])
    with torch.no_grad():
        a = m32(inp.noise, t, inp.context)
        b = m16(inp.noise, t, inp.context).float()
    assert (a - b).norm() / a.norm() < 0.05


def test_unpatchify_layout():
    model = WanModel(tiny_wan_config(1), dtype=torch.float64)
    grid, c = (2, 3, 4), model.config.out_dim
    tokens = torch.randn(1, math.prod(grid), 4 * c, dtype=torch.float64)
    out = model.unpatchify(tokens, grid)
    assert out.shape == (1, c, 2, 6, 8)
    for f in range(2):
        for h in range(3):
            for w in range(4):
                tok = tokens[0, (f * 3 + h) * 4 + w].view(1, 2, 2, c)        # (p, q, r, c)
                for q in range(2):
                    for r in range(2):
                        assert torch.equal(out[0, :, f, 2 * h + q, 2 * w + r], tok[0, q, r])


# -- seeded inputs -----------------------------------------------------------------------------------------
def test_seeded_inputs_deterministic():
    cfg = tiny_wan_config()
    a = seeded_inputs(cfg, 7, 9, 64, 80, batch=2)
    b = seeded_inputs(cfg, 7, 9, 64, 80, batch=2, dtype=torch.bfloat16)
    c = seeded_inputs(cfg, 8, 9, 64, 80, batch=2)
    i2v = seeded_inputs(tiny_wan_config(model_type="i2v"), 7, 9, 64, 80, batch=2)
    assert a.noise.shape == (2, 16, 3, 8, 10) and a.context.shape == (2, 512, 4096)
    assert torch.equal(a.noise, seeded_inputs(cfg, 7, 9, 64, 80, batch=2).noise)
    assert torch.equal(b.noise, a.noise.bfloat16()) and torch.equal(b.context, a.context.bfloat16())
    assert not torch.equal(a.noise, c.noise)
    assert torch.equal(i2v.noise, a.noise) and torch.equal(i2v.context, a.context)
    assert i2v.cond.shape == (2, 20, 3, 8, 10) and i2v.clip_fea.shape == (2, 257, 1280)
    assert a.cond is None and a.clip_fea is None
    assert a.context[:, 32:].abs().sum() == 0 and a.context[:, :32].abs().sum() > 0
    five_b = seeded_inputs(TABLE_CONFIGS["wan22_ti2v_5b"], 0, 121, 704, 1280, text_len=8)
    assert five_b.noise.shape == (1, 48, 31, 44, 80)                     # Wan 2.2 VAE stride 4x16x16


def test_tiny_state_dict_deterministic_and_realistic():
    a = build_tiny_wan_state_dict(seed=0, layers=2)
    b = build_tiny_wan_state_dict(seed=0, layers=3)
    c = build_tiny_wan_state_dict(seed=1, layers=2)
    assert all(torch.equal(a[k], b[k]) for k in a)                       # per-key generators
    assert not torch.equal(a["blocks.0.self_attn.q.weight"], c["blocks.0.self_attn.q.weight"])
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    # a few hidden-state channels dominate, as in real Wan: per-token absmax >> typical magnitude
    model = build_tiny_wan(seed=0, dtype=torch.float32)
    seen = {}
    model.blocks[0].self_attn.q.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    inp = seeded_inputs(model.config, 0, 1, 64, 64, text_len=32)
    with torch.no_grad():
        model(inp.noise, torch.tensor([500.0]), inp.context)
    x = seen["x"][0]
    ratio = (x.abs().amax(-1) / x.abs().mean(-1)).median()
    assert ratio > 15, ratio
    top = x.abs().mean(0).topk(8).values
    assert top[3] > 8 * top[4]                                           # exactly 4 outlier channels


# -- block math: an independent float64 implementation ---------------------------------------------------------
def _layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _rms_norm(x, w, eps=1e-6):
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * w


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _linear(x, lin):
    return torch.einsum("...k,nk->...n", x, lin.weight) + lin.bias


def _rope_naive(x, positions):
    """x [L, 128] one head; positions [L, 3].  Pair j of the head belongs to axis t, h or w (44/42/42 wide)."""
    out = torch.empty_like(x)
    widths = rope_axes(128)
    for l in range(x.shape[0]):
        j = 0
        for axis, width in enumerate(widths):
            for i in range(width // 2):
                angle = float(positions[l][axis]) * 10000.0 ** (-2.0 * i / width)
                z = complex(float(x[l, 2 * j]), float(x[l, 2 * j + 1])) * complex(math.cos(angle), math.sin(angle))
                out[l, 2 * j], out[l, 2 * j + 1] = z.real, z.imag
                j += 1
    return out


def _attend(q, k, v):
    """One head, plain softmax attention."""
    scores = torch.einsum("ld,md->lm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("lm,md->ld", torch.softmax(scores, dim=-1), v)


def _block_naive(block, x, e0, context, grid, img_len=None):
    heads = block.self_attn.num_heads
    positions = [(f, h, w) for f in range(grid[0]) for h in range(grid[1]) for w in range(grid[2])]
    mod = [block.modulation[0, i] + e0[:, 0, i] for i in range(6)]        # each [B, D]
    out = []
    for b in range(x.shape[0]):
        xb, ctx = x[b], context[b]
        sa = block.self_attn
        h = _layer_norm(xb) * (1 + mod[1][b]) + mod[0][b]
        q = _rms_norm(_linear(h, sa.q), sa.norm_q.weight)
        k = _rms_norm(_linear(h, sa.k), sa.norm_k.weight)
        v = _linear(h, sa.v)
        att = torch.cat([_attend(_rope_naive(q[:, n * 128:(n + 1) * 128], positions),
                                 _rope_naive(k[:, n * 128:(n + 1) * 128], positions),
                                 v[:, n * 128:(n + 1) * 128]) for n in range(heads)], dim=-1)
        xb = xb + _linear(att, sa.o) * mod[2][b]

        ca = block.cross_attn
        h = _layer_norm(xb) * block.norm3.weight + block.norm3.bias
        q = _rms_norm(_linear(h, ca.q), ca.norm_q.weight)
        txt = ctx if img_len is None else ctx[img_len:]
        k = _rms_norm(_linear(txt, ca.k), ca.norm_k.weight)
        v = _linear(txt, ca.v)
        att = torch.cat([_attend(q[:, n * 128:(n + 1) * 128], k[:, n * 128:(n + 1) * 128],
                                 v[:, n * 128:(n + 1) * 128]) for n in range(heads)], dim=-1)
        if img_len is not None:
            img = ctx[:img_len]
            k = _rms_norm(_linear(img, ca.k_img), ca.norm_k_img.weight)
            v = _linear(img, ca.v_img)
            att = att + torch.cat([_attend(q[:, n * 128:(n + 1) * 128], k[:, n * 128:(n + 1) * 128],
                                           v[:, n * 128:(n + 1) * 128]) for n in range(heads)], dim=-1)
        xb = xb + _linear(att, ca.o)

        h = _layer_norm(xb) * (1 + mod[4][b]) + mod[3][b]
        y = _linear(_gelu_tanh(_linear(h, block.ffn[0])), block.ffn[2])
        out.append(xb + y * mod[5][b])
    return torch.stack(out)


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_block_matches_naive_float64(model_type):
    model = build_tiny_wan(seed=2, model_type=model_type, dtype=torch.float64, weight_dtype=torch.float64)
    block = model.blocks[0]
    g = torch.Generator().manual_seed(0)
    grid = (2, 2, 3)
    x = torch.randn(2, math.prod(grid), 256, generator=g, dtype=torch.float64)
    x[..., :4] *= 20                                                      # outlier channels
    e0 = 0.3 * torch.randn(2, 1, 6, 256, generator=g, dtype=torch.float64)
    img_len = 5 if model_type == "i2v" else None
    context = torch.randn(2, 7 + (img_len or 0), 256, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours = block(x, e0, rope_freqs(grid), context, context_img_len=img_len)
        ref = _block_naive(block, x, e0, context, grid, img_len)
    assert (ours - ref).abs().max() < 1e-6
    assert (ours - x).abs().max() > 0.1                                   # the block does something


def test_rope_only_in_self_attention():
    model = build_tiny_wan(seed=0, dtype=torch.float64, weight_dtype=torch.float64)
    block = model.blocks[0]
    g = torch.Generator().manual_seed(1)
    grid = (2, 3, 4)
    L = math.prod(grid)
    x = torch.randn(1, L, 256, generator=g, dtype=torch.float64)
    ctx = torch.randn(1, 6, 256, generator=g, dtype=torch.float64)
    perm = torch.randperm(L, generator=g)
    freqs = rope_freqs(grid)
    with torch.no_grad():
        # cross-attention has no position dependence: permuting the queries permutes the output
        torch.testing.assert_close(block.cross_attn(x[:, perm], ctx), block.cross_attn(x, ctx)[:, perm])
        # self-attention depends on positions only through RoPE: permuting tokens and rotations together
        # permutes the output, permuting the tokens alone does not
        sa = block.self_attn(x, freqs)
        torch.testing.assert_close(block.self_attn(x[:, perm], freqs[:, perm]), sa[:, perm])
        assert (block.self_attn(x[:, perm], freqs) - sa[:, perm]).abs().max() > 1e-3
    assert freqs.shape == (1, L, 1, 64, 2, 2) and freqs.dtype == torch.float32


# -- sampling ----------------------------------------------------------------------------------------------------
def test_flow_sigmas():
    for steps, shift in [(4, 8.0), (20, 5.0), (7, 1.0)]:
        s = flow_sigmas(steps, shift)
        u = torch.tensor([(1000 - int(i * 1000 / steps)) / 1000 for i in range(steps)], dtype=torch.float64)
        expect = shift * u / (1 + (shift - 1) * u)
        assert s.shape == (steps + 1,) and s[0] == 1.0 and s[-1] == 0.0
        torch.testing.assert_close(s[:-1].double(), expect, rtol=1e-6, atol=1e-7)
        assert (s[1:] < s[:-1]).all()


def test_sample_is_exact_euler():
    calls = []

    def fake(x, t, context, clip_fea=None):
        calls.append((x.clone(), t.clone(), context))
        return 0.5 * x[:, :3] - t[:, None, None, None, None] / 1000 + context.mean()

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 1, 4, 4, generator=g)
    cond = torch.randn(2, 2, 1, 4, 4, generator=g)
    ctx, neg = torch.ones(2, 5, 8), torch.zeros(2, 5, 8)
    steps, shift = 5, 8.0
    out = sample(fake, noise, ctx, steps=steps, shift=shift, cond=cond)
    sig = flow_sigmas(steps, shift).tolist()
    x = noise * sig[0]
    for i in range(steps):
        inp, t, c = calls[i]
        assert torch.equal(inp, torch.cat([x, cond], 1)) and c is ctx
        assert torch.equal(t, torch.full((2,), sig[i] * 1000.0))
        x = x + (sig[i + 1] - sig[i]) * fake(inp, t, ctx)
    assert len(calls) == 2 * steps                                         # (the reference re-called fake)
    assert torch.equal(out, x)

    calls.clear()
    guided = sample(fake, noise, ctx, steps=1, shift=shift, negative=neg, cfg=3.0)
    v_pos = 0.5 * noise - 1.0 + 1.0
    v_neg = 0.5 * noise - 1.0
    torch.testing.assert_close(guided, noise - (v_neg + 3.0 * (v_pos - v_neg)))


def test_sample_tiny_deterministic():
    model = build_tiny_wan(seed=0, dtype=torch.float32)
    inp = seeded_inputs(model.config, 3, 1, 32, 32, text_len=16)
    a = sample(model, inp.noise, inp.context, steps=3)
    b = sample(model, inp.noise, inp.context, steps=3)
    assert torch.equal(a, b) and a.shape == inp.noise.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, inp.noise)
