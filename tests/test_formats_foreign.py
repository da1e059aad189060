"""Foreign checkpoint layouts (seed / convert_to_quant int8, Hadamard-QuIP, scaled fp8, diffusers names) read
through `open_checkpoint` and checked against float64 math written out here, independently of the readers."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from wan_int8.formats import CheckpointError, open_checkpoint
from wan_int8.formats.safetensors_io import save_tensors
from wan_int8.quant import dequantize

SPELLINGS = ("weight_scale", "scale_weight", "scale", "weight.scale", "weight.weight_scale")


def _save(tmp_path, tensors, name="model.safetensors"):
    path = os.path.join(str(tmp_path), name)
    save_tensors(path, tensors)
    return path


def _codes(n, k, gen):
    return torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int64).to(torch.int8)


def _pos(shape, gen):
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.02 + 1e-3).to(torch.float32)


def _deq(layer):
    return dequantize(layer.load(), torch.float64)


def _sylvester(n):
    """Orthonormal natural-order Hadamard: H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    i = torch.arange(n)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    pop = torch.zeros_like(bits)
    while bool(bits.any()):
        pop += bits & 1
        bits = bits >> 1
    return (1 - 2 * (pop % 2)).to(torch.float64) / n ** 0.5


def _row_bound_ok(deq, ref, layer_weight):
    """Row-wise requantization: each row is off by at most sqrt(K) * s_row / 2 (rotation is orthonormal)."""
    n, k = deq.shape
    s = layer_weight.scale.to(torch.float64).reshape(-1).expand(n)
    err = (deq - ref).norm(dim=1)
    return bool((err <= s * k ** 0.5 / 2 * 1.001 + 1e-7).all()), float((err / (s * k ** 0.5 / 2)).max())


# -- plain seed / convert_to_quant layers -------------------------------------------------------------------

@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_scale_spelling(tmp_path, spelling):
    gen = torch.Generator().manual_seed(1)
    q = _codes(32, 64, gen)
    s = torch.tensor(0.0123, dtype=torch.float32)
    path = _save(tmp_path, {"blocks.0.ffn.0.weight": q, f"blocks.0.ffn.0.{spelling}": s,
                            "blocks.0.ffn.0.bias": torch.randn(32, generator=gen)})
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "seed"
        layer = ckpt.layers["blocks.0.ffn.0"]
        assert layer.lossless and layer.granularity == "tensor"
        assert torch.equal(_deq(layer), q.to(torch.float64) * s.double())
        assert set(ckpt.tensors) == {"blocks.0.ffn.0.bias"}


def test_group_blockwise_and_tile_scales(tmp_path):
    gen = torch.Generator().manual_seed(2)
    n, k = 48, 256
    q1, q2, q3 = _codes(n, k, gen), _codes(n, k, gen), _codes(n, k, gen)
    block3d = _pos((n, k // 128, 1), gen)          # seed blockwise [N, K/g, 1], g = 128
    group2d = _pos((n, k // 64), gen)              # [N, K/g], g = 64
    tiles = _pos(((n + 31) // 32, k // 32), gen)   # [ceil(N/b), K/b], b = 32
    path = _save(tmp_path, {"a.weight": q1, "a.weight_scale": block3d, "b.weight": q2, "b.scale_weight": group2d,
                            "c.weight": q3, "c.scale": tiles})
    with open_checkpoint(path) as ckpt:
        a, b, c = (ckpt.layers[x] for x in "abc")
        assert (a.granularity, a.group_size) == ("group", 128)
        assert (b.granularity, b.group_size) == ("group", 64)
        assert (c.granularity, c.group_size) == ("group", 32)
        ref_a = q1.double() * block3d.double()[:, :, 0].repeat_interleave(128, dim=1)
        ref_b = q2.double() * group2d.double().repeat_interleave(64, dim=1)
        ref_c = torch.empty(n, k, dtype=torch.float64)
        for i in range(n):
            for j in range(k):
                ref_c[i, j] = q3[i, j].double() * tiles[i // 32, j // 32].double()
        assert torch.equal(_deq(a), ref_a)
        assert torch.equal(_deq(b), ref_b)
        assert torch.equal(_deq(c), ref_c)


def test_placeholder_input_scale_ignored_with_one_warning(tmp_path, caplog):
    gen = torch.Generator().manual_seed(3)
    t = {}
    for i in range(3):
        t[f"blocks.{i}.q.weight"] = _codes(16, 32, gen)
        t[f"blocks.{i}.q.scale_weight"] = torch.tensor(0.01)
        t[f"blocks.{i}.q.scale_input"] = torch.tensor(1.0)
    path = _save(tmp_path, t)
    with caplog.at_level(logging.WARNING, logger="wan_int8.formats"):
        ckpt = open_checkpoint(path)
    with ckpt:
        for i in range(3):
            layer = ckpt.layers[f"blocks.{i}.q"]
            assert not layer.has_input_scale and layer.load().input_scale is None
        assert not ckpt.tensors
    hits = [r for r in caplog.records if "placeholder" in r.getMessage()]
    assert len(hits) == 1 and "3 layer" in hits[0].getMessage()


def test_real_input_scale_honoured(tmp_path):
    gen = torch.Generator().manual_seed(4)
    path = _save(tmp_path, {"x.weight": _codes(16, 32, gen), "x.weight_scale": torch.tensor(0.02),
                            "x.input_scale": torch.tensor(0.037)})
    with open_checkpoint(path) as ckpt:
        layer = ckpt.layers["x"]
        assert layer.has_input_scale
        assert float(layer.load().input_scale) == pytest.approx(0.037)


def test_legacy_quip_refused(tmp_path):
    gen = torch.Generator().manual_seed(5)
    path = _save(tmp_path, {"x.weight": _codes(16, 32, gen), "x.weight_scale": torch.tensor(0.02),
                            "x.quip_s_u": torch.ones(16), "x.quip_s_v": torch.ones(32)})
    with pytest.raises(CheckpointError, match=r"x\.quip_s_u.*ambiguous"):
        open_checkpoint(path)


def test_two_scale_spellings_refused(tmp_path):
    gen = torch.Generator().manual_seed(6)
    path = _save(tmp_path, {"x.weight": _codes(16, 32, gen), "x.weight_scale": torch.tensor(0.02),
                            "x.scale_weight": torch.tensor(0.02)})
    with pytest.raises(CheckpointError, match=r"x\.weight_scale.*x\.scale_weight|ambiguous"):
        open_checkpoint(path)


def test_unknown_quant_key_refused(tmp_path):
    gen = torch.Generator().manual_seed(7)
    path = _save(tmp_path, {"x.weight": _codes(16, 32, gen), "x.weight_scale": torch.tensor(0.02),
                            "x.weight_scale_2": torch.tensor(0.5)})
    with pytest.raises(CheckpointError, match=r"x\.weight_scale_2"):
        open_checkpoint(path)


def test_smooth_factors_on_plain_layer_not_applied_but_reported(tmp_path):
    gen = torch.Generator().manual_seed(8)
    q = _codes(16, 32, gen)
    path = _save(tmp_path, {"x.weight": q, "x.weight_scale": torch.tensor(0.02), "x.smooth_factors": _pos(32, gen)})
    with open_checkpoint(path) as ckpt:
        assert torch.equal(_deq(ckpt.layers["x"]), q.double() * torch.tensor(0.02).double())
        assert any("smooth_factors" in w for w in ckpt.warnings)
        assert "x.smooth_factors" not in ckpt.tensors


# -- Hadamard-QuIP (store_transformed) ----------------------------------------------------------------------

def _next_pow2(n):
    return 1 << (n - 1).bit_length()


def _quip_file(out, inp, gen, *, scalar_scale=False, smooth=False, bias=True, extra=None):
    """Build a layer the way convert_to_quant_QuIP_INT8 stores it (nearest rounding instead of LDLQ)."""
    so, si = _next_pow2(out), _next_pow2(inp)
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64) * 0.05
    w[:, 3] *= 40.0                                          # an outlier input channel
    s = torch.rand(inp, generator=gen, dtype=torch.float64) + 0.5 if smooth else None
    ws = w * s[None, :] if smooth else w                     # SmoothQuant: the converter quantizes W·diag(s)
    sr = (torch.randint(0, 2, (so,), generator=gen) * 2 - 1).to(torch.float64)
    sc = (torch.randint(0, 2, (si,), generator=gen) * 2 - 1).to(torch.float64)
    pad = torch.zeros(so, si, dtype=torch.float64)
    pad[:out, :inp] = ws
    wt = _sylvester(so) @ (sr[:, None] * pad * sc[None, :]) @ _sylvester(si)
    amax = wt.abs().amax() if scalar_scale else wt.abs().amax(dim=1, keepdim=True)
    scale = (amax / 127.0).to(torch.float32)
    q = torch.round(wt / scale.double()).clamp(-127, 127).to(torch.int8)
    t = {"blk.lin.weight": q, "blk.lin.weight_scale": scale.reshape(()) if scalar_scale else scale,
         "blk.lin.hadamard_quip": torch.tensor(1, dtype=torch.int8),
         "blk.lin.hadamard_size_out": torch.tensor(so, dtype=torch.int32),
         "blk.lin.hadamard_size_in": torch.tensor(si, dtype=torch.int32),
         "blk.lin.sign_row": sr.float(), "blk.lin.sign_col": sc.float()}
    if bias:
        t["blk.lin.bias"] = torch.randn(out, generator=gen)
    if smooth:
        t["blk.lin.smooth_factors"] = s.float()
    t.update(extra or {})
    # the exact reconstruction of what is stored, in float64, from the formula alone
    rec = _sylvester(so) @ (scale.double() * q.double()) @ _sylvester(si)
    rec = (sr[:, None] * rec * sc[None, :])[:out, :inp]
    if smooth:
        rec = rec / s.float().double()[None, :]
    return t, w, rec


@pytest.mark.parametrize("out,inp,scalar,smooth", [(48, 200, False, True), (96, 320, False, False),
                                                   (64, 256, True, False), (40, 48, False, True)])
def test_hadamard_quip_any_width(tmp_path, out, inp, scalar, smooth):
    gen = torch.Generator().manual_seed(out * 1000 + inp)
    extra = {} if smooth else {"blk.norm.weight": torch.ones(inp)}   # tells the reader the input width
    t, w_true, rec = _quip_file(out, inp, gen, scalar_scale=scalar, smooth=smooth, extra=extra)
    path = _save(tmp_path, t)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "seed"
        layer = ckpt.layers["blk.lin"]
        assert (layer.out_features, layer.in_features) == (out, inp)
        assert not layer.lossless and "Hadamard-QuIP" in layer.note
        weight = layer.load()
        assert weight.qdata.shape == (out, inp)
        deq = dequantize(weight, torch.float64)
        ok, worst = _row_bound_ok(deq, rec, weight)
        assert ok, f"requantization error {worst:.3f}x the bound"
        rel = float((deq - w_true).norm() / w_true.norm())
        assert rel < 0.06          # two roundings, a 40x outlier channel; the bound above is the real check
        assert set(ckpt.tensors) == {"blk.lin.bias"} | set(extra)
        if inp % 16 == 0:
            assert weight.rotation is not None and weight.rotation.kind == "regular"


def test_hadamard_quip_exact_float64_reconstruction():
    from wan_int8.formats.seed import hadamard_quip_dequantize
    gen = torch.Generator().manual_seed(11)
    t, _, rec = _quip_file(48, 200, gen)
    w = hadamard_quip_dequantize(t["blk.lin.weight"], t["blk.lin.weight_scale"], t["blk.lin.sign_row"].double(),
                                 t["blk.lin.sign_col"].double(), 48, 200, chunk_elements=1000)
    assert torch.allclose(w, rec, rtol=0, atol=1e-12)


def test_hadamard_quip_unknown_width_refused(tmp_path):
    gen = torch.Generator().manual_seed(12)
    t, _, _ = _quip_file(48, 200, gen)                      # no smooth_factors, nothing of width 129..256
    with pytest.raises(CheckpointError, match=r"blk\.lin.*original width"):
        open_checkpoint(_save(tmp_path, t))


def test_hadamard_quip_wrong_shape_detected(tmp_path):
    gen = torch.Generator().manual_seed(13)
    t, _, _ = _quip_file(48, 200, gen, smooth=True)
    t["blk.lin.bias"] = torch.zeros(40)                     # claims out=40: rows 40..47 hold real weight
    with open_checkpoint(_save(tmp_path, t)) as ckpt:
        with pytest.raises(CheckpointError, match=r"not the layer's original shape"):
            ckpt.layers["blk.lin"].load()


# -- scaled fp8 -------------------------------------------------------------------------------------------

def test_scaled_fp8_converted(tmp_path):
    gen = torch.Generator().manual_seed(20)
    p = "model.diffusion_model."
    w1 = (torch.randn(32, 64, generator=gen) * 100).to(torch.float8_e4m3fn)
    w2 = (torch.randn(32, 64, generator=gen) * 10).to(torch.float8_e5m2)
    s1 = torch.tensor(0.001)
    s2 = _pos(32, gen)
    mod = torch.randn(1, 6, 64, generator=gen).to(torch.float8_e4m3fn)
    path = _save(tmp_path, {f"{p}scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
                            f"{p}blocks.0.q.weight": w1, f"{p}blocks.0.q.scale_weight": s1,
                            f"{p}blocks.0.q.scale_input": torch.tensor(1.0),
                            f"{p}blocks.0.k.weight": w2, f"{p}blocks.0.k.scale_weight": s2,
                            f"{p}blocks.0.q.bias": torch.randn(32, generator=gen).bfloat16(),
                            f"{p}blocks.0.modulation": mod})
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "scaled-fp8"
        assert set(ckpt.layers) == {"blocks.0.q", "blocks.0.k"}
        assert set(ckpt.tensors) == {"blocks.0.q.bias", "blocks.0.modulation"}
        for name, w, s in (("blocks.0.q", w1, s1.double()), ("blocks.0.k", w2, s2.double()[:, None])):
            layer = ckpt.layers[name]
            assert not layer.lossless
            weight = layer.load()
            ok, worst = _row_bound_ok(dequantize(weight, torch.float64), w.double() * s, weight)
            assert ok, worst
        m = ckpt.tensors["blocks.0.modulation"]
        assert m.dtype == torch.bfloat16 and torch.equal(m.build(), mod.float().bfloat16())


def test_unmarked_fp8_cast_converted(tmp_path):
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(16, 32, generator=gen).to(torch.float8_e4m3fn)
    with open_checkpoint(_save(tmp_path, {"head.head.weight": w})) as ckpt:
        assert ckpt.format == "scaled-fp8"
        weight = ckpt.layers["head.head"].load()
        assert _row_bound_ok(dequantize(weight, torch.float64), w.double(), weight)[0]


# -- diffusers names ----------------------------------------------------------------------------------------

WAN_MAP = {
    "condition_embedder.time_embedder.linear_1.weight": "time_embedding.0.weight",
    "condition_embedder.time_embedder.linear_2.bias": "time_embedding.2.bias",
    "condition_embedder.time_proj.weight": "time_projection.1.weight",
    "condition_embedder.text_embedder.linear_1.weight": "text_embedding.0.weight",
    "condition_embedder.image_embedder.norm1.weight": "img_emb.proj.0.weight",
    "condition_embedder.image_embedder.ff.net.0.proj.weight": "img_emb.proj.1.weight",
    "condition_embedder.image_embedder.ff.net.2.weight": "img_emb.proj.3.weight",
    "condition_embedder.image_embedder.norm2.bias": "img_emb.proj.4.bias",
    "patch_embedding.weight": "patch_embedding.weight",
    "blocks.0.attn1.to_k.weight": "blocks.0.self_attn.k.weight",
    "blocks.0.attn1.to_out.0.weight": "blocks.0.self_attn.o.weight",
    "blocks.0.attn1.norm_q.weight": "blocks.0.self_attn.norm_q.weight",
    "blocks.0.attn2.to_v.bias": "blocks.0.cross_attn.v.bias",
    "blocks.0.attn2.add_k_proj.weight": "blocks.0.cross_attn.k_img.weight",
    "blocks.0.attn2.add_v_proj.weight": "blocks.0.cross_attn.v_img.weight",
    "blocks.0.attn2.norm_added_k.weight": "blocks.0.cross_attn.norm_k_img.weight",
    "blocks.0.norm2.weight": "blocks.0.norm3.weight",
    "blocks.0.norm2.bias": "blocks.0.norm3.bias",
    "blocks.0.ffn.net.0.proj.weight": "blocks.0.ffn.0.weight",
    "blocks.0.ffn.net.2.bias": "blocks.0.ffn.2.bias",
    "blocks.0.scale_shift_table": "blocks.0.modulation",
    "scale_shift_table": "head.modulation",
    "proj_out.weight": "head.head.weight",
    "proj_out.bias": "head.head.bias",
}


def test_diffusers_wan_renames(tmp_path):
    gen = torch.Generator().manual_seed(30)
    t = {}
    for src in WAN_MAP:
        shape = (8, 16) if src.endswith("weight") and "norm" not in src else (1, 6, 16) if "table" in src else (8,)
        t[src] = torch.randn(shape, generator=gen)
    t["blocks.0.attn1.to_q.weight"] = q = _codes(16, 32, gen)
    t["blocks.0.attn1.to_q.scale_weight"] = torch.tensor(0.01)
    t["blocks.0.mystery.weight"] = torch.randn(4, generator=gen)
    with open_checkpoint(_save(tmp_path, t)) as ckpt:
        assert ckpt.renamed_from.startswith("diffusers")
        assert set(ckpt.layers) == {"blocks.0.self_attn.q"}
        assert torch.equal(_deq(ckpt.layers["blocks.0.self_attn.q"]), q.double() * torch.tensor(0.01).double())
        assert ckpt.layers["blocks.0.self_attn.q"].name == "blocks.0.self_attn.q"
        for src, dst in WAN_MAP.items():
            assert torch.equal(ckpt.tensors[dst].build(), t[src]), (src, dst)
            assert ckpt.tensors[dst].key == dst
        assert "blocks.0.mystery.weight" in ckpt.tensors
        assert any("blocks.0.mystery.weight" in w for w in ckpt.warnings)
        assert len(ckpt.tensors) == len(WAN_MAP) + 1


def test_diffusers_norm3_becomes_norm2(tmp_path):
    # diffusers' FFN norm has no parameters, but if a file carries one it must land on ComfyUI's norm2
    t = {"blocks.0.attn1.to_q.weight": torch.randn(8, 8), "blocks.0.norm3.weight": torch.full((8,), 3.0),
         "blocks.0.norm2.weight": torch.full((8,), 2.0)}
    with open_checkpoint(_save(tmp_path, t)) as ckpt:
        assert float(ckpt.tensors["blocks.0.norm2.weight"].build()[0]) == 3.0
        assert float(ckpt.tensors["blocks.0.norm3.weight"].build()[0]) == 2.0


def test_zimage_int8_qkv_fusion_exact(tmp_path):
    gen = torch.Generator().manual_seed(40)
    t = {}
    parts = {}
    for x, s in zip("qkv", (0.011, 0.023, 0.0047)):
        parts[x] = _codes(32, 64, gen)
        t[f"layers.0.attention.to_{x}.weight"] = parts[x]
        t[f"layers.0.attention.to_{x}.scale_weight"] = torch.tensor(s)
        t[f"layers.0.attention.to_{x}.bias"] = torch.randn(32, generator=gen)
    t["layers.0.attention.to_out.0.weight"] = _codes(64, 32, gen)
    t["layers.0.attention.to_out.0.scale_weight"] = torch.tensor(0.02)
    t["layers.0.attention.norm_q.weight"] = torch.randn(16, generator=gen)
    t["all_x_embedder.2-1.weight"] = torch.randn(64, 16, generator=gen)
    t["all_final_layer.2-1.linear.weight"] = torch.randn(16, 64, generator=gen)
    with open_checkpoint(_save(tmp_path, t)) as ckpt:
        assert ckpt.renamed_from.startswith("diffusers")
        assert set(ckpt.layers) == {"layers.0.attention.qkv", "layers.0.attention.out"}
        fused = ckpt.layers["layers.0.attention.qkv"]
        assert (fused.out_features, fused.in_features, fused.granularity) == (96, 64, "row")
        ref = torch.cat([parts[x].double() * float(torch.tensor(s)) for x, s in zip("qkv", (0.011, 0.023, 0.0047))])
        assert torch.equal(_deq(fused), ref)
        bias = ckpt.tensors["layers.0.attention.qkv.bias"].build()
        assert torch.equal(bias, torch.cat([t[f"layers.0.attention.to_{x}.bias"] for x in "qkv"]))
        assert set(ckpt.tensors) == {"layers.0.attention.qkv.bias", "layers.0.attention.q_norm.weight",
                                     "x_embedder.weight", "final_layer.linear.weight"}


def test_zimage_float_fusion_and_group_scales(tmp_path):
    gen = torch.Generator().manual_seed(41)
    t = {f"noise_refiner.0.attention.to_{x}.weight": torch.randn(8, 16, generator=gen) for x in "qkv"}
    sc = {x: _pos((32, 64 // g), gen) for x, g in zip("qkv", (64, 32, 64))}
    for x, g in zip("qkv", (64, 32, 64)):
        t[f"layers.0.attention.to_{x}.weight"] = _codes(32, 64, gen)
        t[f"layers.0.attention.to_{x}.weight_scale"] = sc[x]
    with open_checkpoint(_save(tmp_path, t)) as ckpt:
        w = ckpt.tensors["noise_refiner.0.attention.qkv.weight"].build()
        assert torch.equal(w, torch.cat([t[f"noise_refiner.0.attention.to_{x}.weight"] for x in "qkv"]))
        fused = ckpt.layers["layers.0.attention.qkv"]
        assert (fused.granularity, fused.group_size) == ("group", 32)
        ref = torch.cat([t[f"layers.0.attention.to_{x}.weight"].double()
                         * sc[x].double().repeat_interleave(64 // sc[x].shape[1], dim=1) for x in "qkv"])
        assert torch.equal(_deq(fused), ref)


def test_zimage_missing_v_refused(tmp_path):
    gen = torch.Generator().manual_seed(42)
    t = {f"layers.3.attention.to_{x}.weight": torch.randn(8, 16, generator=gen) for x in "qk"}
    with pytest.raises(CheckpointError, match=r"layers\.3\.attention\.to_v"):
        open_checkpoint(_save(tmp_path, t))


# -- damaged files ------------------------------------------------------------------------------------------

def test_truncated_file_names_the_file(tmp_path):
    gen = torch.Generator().manual_seed(50)
    path = _save(tmp_path, {"x.weight": _codes(64, 64, gen), "x.scale_weight": torch.tensor(0.1)}, "cut.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        open_checkpoint(path)


def test_hadamard_quip_marked_comfy_native_goes_through_quip_conversion(tmp_path):
    """convert_to_quant_QuIP_INT8 --comfy_quant marks transformed-domain layers int8_tensorwise: they must
    still be read as two-sided QuIP, not as plain row-scaled codes."""
    from wan_int8.formats.base import encode_json_tensor
    gen = torch.Generator().manual_seed(5)
    t, _, rec = _quip_file(48, 200, gen, extra={"blk.norm.weight": torch.ones(200)})
    t["blk.lin.comfy_quant"] = encode_json_tensor({"format": "int8_tensorwise"})
    path = _save(tmp_path, t)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "comfy-native"
        layer = ckpt.layers["blk.lin"]
        assert (layer.out_features, layer.in_features) == (48, 200) and not layer.lossless
        weight = layer.load()
        ok, worst = _row_bound_ok(dequantize(weight, torch.float64), rec, weight)
        assert ok, worst
        assert not any(k.startswith("blk.lin.") and k != "blk.lin.bias" for k in ckpt.tensors)
