"""Safetensors I/O, ComfyUI-native and lightx2v reading, the native writer and lossless round trips."""
import json
import os
import struct

import pytest
import torch

from wan_int8.formats import CheckpointError, open_checkpoint
from wan_int8.formats.base import encode_json_tensor
from wan_int8.formats.safetensors_io import OutEntry, StreamingWriter, read_header, save_tensors
from wan_int8.loader import LoadConfig, plan_load, write_native
from wan_int8.quant import Rotation, dequantize, hadamard_matrix, quantize_weight, rel_error


def wan_like(n=64, k=256, blocks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"head.modulation": torch.randn(1, 2, k, generator=g), "patch_embedding.weight": torch.randn(k, 16, 1, 2, 2, generator=g),
          "text_embedding.0.weight": torch.randn(k, 64, generator=g).bfloat16()}
    for b in range(blocks):
        for lin in ("self_attn.q", "self_attn.k", "cross_attn.k_img", "ffn.0"):
            sd[f"blocks.{b}.{lin}.weight"] = (torch.randn(n if lin != "ffn.0" else 2 * n, k, generator=g) * 0.02).bfloat16()
            sd[f"blocks.{b}.{lin}.bias"] = torch.randn(n if lin != "ffn.0" else 2 * n, generator=g).float()
    return sd


def test_header_reader_rejects_damaged_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_tensors(str(good), {"a": torch.arange(10, dtype=torch.float32)}, {"k": "v"})
    h = read_header(str(good))
    assert h.tensors["a"].shape == (10,) and h.metadata == {"k": "v"}
    raw = good.read_bytes()
    cases = {"short": raw[:5], "truncated": raw[:-8], "bad_json": raw[:8] + b"{" * (len(raw) - 8),
             "huge_header": struct.pack("<Q", 10**12) + raw[8:]}
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            read_header(str(p))
    with pytest.raises(CheckpointError, match="missing"):
        read_header(str(tmp_path / "missing.safetensors"))


def test_streaming_writer_is_atomic(tmp_path):
    path = tmp_path / "out.safetensors"
    entries = [OutEntry("a", torch.float32, (3,)), OutEntry("b", torch.int8, (2, 2))]
    with pytest.raises(ValueError):
        with StreamingWriter(str(path), entries) as w:
            w.write("a", torch.ones(3))
            w.write("b", torch.ones(3))  # wrong shape: the whole write is abandoned
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="not written"):
        with StreamingWriter(str(path), entries) as w:
            w.write("a", torch.ones(3))
    assert not path.exists()
    with StreamingWriter(str(path), entries) as w:
        w.write("a", torch.ones(3))
        w.write("b", torch.ones(2, 2, dtype=torch.int8))
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(path))["b"], torch.ones(2, 2, dtype=torch.int8))


def native_file(tmp_path, rotated=False, header_markers=False, prefix=""):
    g = torch.Generator().manual_seed(3)
    sd, layers = {}, {}
    ws = {}
    for name, shape in (("blocks.0.self_attn.q", (64, 256)), ("blocks.0.ffn.2", (32, 256))):
        w = torch.randn(*shape, generator=g) * 0.02
        ws[name] = w
        q = quantize_weight(w, "row", rotation=Rotation("regular", 256) if rotated else None)
        sd[f"{prefix}{name}.weight"] = q.qdata
        sd[f"{prefix}{name}.weight_scale"] = q.scale[:, None]
        conf = {"format": "int8_tensorwise"}
        if rotated:
            conf.update({"convrot": True, "convrot_groupsize": 256})
        if header_markers:
            layers[f"{prefix}{name}"] = conf
        else:
            sd[f"{prefix}{name}.comfy_quant"] = encode_json_tensor(conf)
        sd[f"{prefix}{name}.bias"] = torch.randn(shape[0], generator=g).bfloat16()
    sd[f"{prefix}head.modulation"] = torch.randn(1, 2, 256, generator=g)
    sd[f"{prefix}blocks.0.self_attn.q.input_scale"] = torch.tensor(1.0)  # a placeholder
    meta = {"_quantization_metadata": json.dumps({"layers": layers})} if header_markers else None
    path = tmp_path / f"native_{rotated}_{header_markers}.safetensors"
    save_tensors(str(path), sd, meta)
    return str(path), ws


@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("header", [False, True])
def test_native_reader(tmp_path, rotated, header, caplog):
    path, ws = native_file(tmp_path, rotated, header, prefix="model.diffusion_model.")
    with caplog.at_level("WARNING"), open_checkpoint(path) as ckpt:
        assert ckpt.format == "comfy-native"
        assert set(ckpt.layers) == {"blocks.0.self_attn.q", "blocks.0.ffn.2"}
        assert "blocks.0.self_attn.q.bias" in ckpt.tensors and "head.modulation" in ckpt.tensors
        q = ckpt.layers["blocks.0.self_attn.q"].load()
        assert q.scale.shape == (64,) and q.input_scale is None  # placeholder ignored
        assert (q.rotation is not None) == rotated
        assert rel_error(dequantize(q), ws["blocks.0.self_attn.q"]) < 0.01
    assert sum("placeholder" in r.getMessage() for r in caplog.records) == 1


def test_convrot_matches_comfyui_math_written_here(tmp_path):
    """ComfyUI convrot: stored W·Hᵀ per 256-group (regular H), activation x·H; check our linear against it."""
    path, ws = native_file(tmp_path, rotated=True)
    from wan_int8.layers import Int8Linear
    with open_checkpoint(path) as ckpt:
        q = ckpt.layers["blocks.0.ffn.2"].load()
    h = torch.kron(torch.kron(torch.kron(*[torch.tensor([[1., 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])] * 2),
                              torch.tensor([[1., 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])),
                   torch.tensor([[1., 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])).double() / 16
    assert torch.equal(h, hadamard_matrix("regular", 256, torch.float64))
    # fixed inputs: a per-token code can flip at an exact fp32-vs-float64 rounding tie, which would swamp 1e-5
    x = torch.randn(5, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xr = x @ h
    s = xr.abs().amax(1, keepdim=True) / 127
    xq = torch.round(xr / s).clamp(-127, 127) * s
    expected = xq @ (q.qdata.double() * q.scale.double()[:, None]).t()
    y = Int8Linear.from_int8_weight(q)(x.float())
    assert rel_error(y, expected) < 1e-5
    assert rel_error(y, x @ ws["blocks.0.ffn.2"].double().t()) < 0.03


def test_lightx2v_reader_and_unknown_layout(tmp_path):
    sd = wan_like()
    lx = {}
    for k, v in sd.items():
        if k.endswith(".weight") and k.startswith("blocks."):
            q = quantize_weight(v)
            lx[k], lx[k[:-len("weight")] + "weight_scale"] = q.qdata, q.scale[:, None].float()
        else:
            lx[k] = v.float()
    path = tmp_path / "lx.safetensors"
    save_tensors(str(path), lx)
    with open_checkpoint(str(path)) as ckpt:
        assert ckpt.format == "lightx2v" and len(ckpt.layers) == 8
        report, fam = plan_load(ckpt)
        assert fam.name == "wan" and report.count("file") == 8 and report.count("quantize") == 0
        assert "lightx2v" in report.verdict() and "Wan" in report.verdict()
    bad = tmp_path / "bad.safetensors"
    save_tensors(str(bad), {"x": torch.zeros(3, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        open_checkpoint(str(bad))


def test_float_to_native_round_trip_is_exact(tmp_path):
    src = tmp_path / "float.safetensors"
    save_tensors(str(src), wan_like(), {"config": "{}"})
    out1, out2 = tmp_path / "q1.safetensors", tmp_path / "q2.safetensors"
    report = write_native(str(src), str(out1), LoadConfig(rotate=True))
    assert report.count("quantize") == 8 and set(report.errors) == set(report.layers) - {"text_embedding.0"} - {
        n for n, p in report.layers.items() if p.action == "float"}
    assert all(e < 0.02 for e in report.errors.values())
    with open_checkpoint(str(out1)) as a:
        assert a.format == "comfy-native" and len(a.layers) == 8
        assert a.metadata["config"] == "{}" and "wan_int8" in a.metadata
        assert a.tensors["text_embedding.0.weight"].dtype == torch.bfloat16  # kept float
        first = {n: l.load() for n, l in a.layers.items()}
        assert all(w.rotation is not None and w.rotation.group_size == 256 for w in first.values())
    write_native(str(out1), str(out2))  # read -> write -> read: the same bytes for every layer
    with open_checkpoint(str(out2)) as b:
        for n, l in b.layers.items():
            w = l.load()
            assert torch.equal(w.qdata, first[n].qdata) and torch.equal(w.scale, first[n].scale)
            assert w.rotation == first[n].rotation
        for key in b.tensors:
            with open_checkpoint(str(out1)) as a:
                assert torch.equal(b.tensors[key].build(), a.tensors[key].build())


def test_group_scale_output_is_marked_ours_only(tmp_path):
    src = tmp_path / "float.safetensors"
    save_tensors(str(src), wan_like())
    out = tmp_path / "g.safetensors"
    write_native(str(src), str(out), LoadConfig(granularity="group", group_size=64))
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        conf = json.loads(bytes(f.get_tensor("blocks.0.ffn.0.comfy_quant").tolist()))
        assert conf == {"format": "int8_groupwise", "group_size": 64}
        assert f.get_tensor("blocks.0.ffn.0.weight_scale").shape == (128, 4)
    with open_checkpoint(str(out)) as c:
        assert c.layers["blocks.0.ffn.0"].granularity == "group" and c.layers["blocks.0.ffn.0"].group_size == 64


def test_int8_layer_with_nan_scale_is_an_error(tmp_path):
    path, _ = native_file(tmp_path)
    from safetensors.torch import load_file
    sd = load_file(path)
    sd["blocks.0.ffn.2.weight_scale"][3] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_tensors(str(bad), sd)
    with open_checkpoint(str(bad)) as ckpt:
        with pytest.raises(ValueError, match="blocks.0.ffn.2.weight_scale.*NaN"):
            ckpt.layers["blocks.0.ffn.2"].load()
    out = tmp_path / "never.safetensors"
    with pytest.raises(ValueError):
        write_native(str(bad), str(out))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
