"""The seed's crash cases run end to end: blockwise scales on excluded layers, fp32 biases, M <= 16 tokens,
2-D group and tile scales, and bad tensors named in the error."""
import pytest
import torch

from wan_int8.formats import open_checkpoint
from wan_int8.formats.safetensors_io import CheckpointError, save_tensors
from wan_int8.loader import build_wan_model
from wan_int8.models.tiny_wan import build_tiny_wan_state_dict
from wan_int8.models.wan import WanConfig, WanModel, seeded_inputs
from wan_int8.quant import QuantFormatError, quantize_weight, rel_error


def seed_blockwise_file(path, layout="3d", g=64):
    """Every 2-D linear weight as int8 with per-group scales (the seed's converter), excluded layers too;
    biases and everything else fp32, scales spelled `scale_weight`."""
    sd = build_tiny_wan_state_dict(seed=2)
    out = {}
    for k, v in sd.items():
        name = k[: -len(".weight")]
        if k.endswith(".weight") and v.dim() == 2 and v.shape[1] % g == 0 and v.shape[0] % g == 0:
            q = quantize_weight(v, "group", group_size=g)
            out[k] = q.qdata
            if layout == "3d":
                out[name + ".scale_weight"] = q.scale[:, :, None]
            elif layout == "2d":
                out[name + ".scale_weight"] = q.scale
            else:  # g x g tiles: one scale per tile (max over the tile's row groups)
                n = v.shape[0]
                tiles = q.scale.reshape(n // g, g, -1).amax(dim=1)
                q2 = torch.round(v.float() / tiles.repeat_interleave(g, 0).repeat_interleave(g, 1)).clamp(-127, 127)
                out[k] = q2.to(torch.int8)
                out[name + ".scale_weight"] = tiles
        else:
            out[k] = v.float()
    save_tensors(str(path), out)
    return sd


@pytest.mark.parametrize("layout", ["3d", "2d", "tile"])
def test_blockwise_everywhere_with_fp32_bias_and_tiny_m(tmp_path, layout):
    path = tmp_path / "seed.safetensors"
    sd = seed_blockwise_file(path, layout)
    with open_checkpoint(str(path)) as ckpt:
        assert ckpt.format == "seed"
        assert "text_embedding.2" in ckpt.layers  # an excluded layer stored blockwise: runs as INT8
        assert ckpt.layers["blocks.0.ffn.0"].granularity == "group"
    model, report = build_wan_model(str(path), device="cpu", dtype=torch.float32)
    ref = WanModel(WanConfig.from_state_dict_shapes(sd), dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    for frames, h, w in ((1, 16, 16), (1, 32, 64), (5, 32, 32)):  # 1, 8 and 16 tokens
        inp = seeded_inputs(model.config, 0, frames, h, w, text_len=16)
        t = torch.tensor([500.0])
        with torch.inference_mode():
            a, b = model(inp.noise, t, inp.context), ref(inp.noise, t, inp.context)
        assert torch.isfinite(a).all() and rel_error(a, b) < 0.05


def test_bad_tensors_are_named(tmp_path):
    sd = build_tiny_wan_state_dict(seed=2)
    q = quantize_weight(sd["blocks.0.ffn.0.weight"])
    base = {k: v for k, v in sd.items()}
    base["blocks.0.ffn.0.weight"] = q.qdata
    cases = {
        "int_scale": {"blocks.0.ffn.0.weight_scale": torch.ones(512, 1, dtype=torch.int32)},
        "short_scale": {"blocks.0.ffn.0.weight_scale": torch.ones(100)},
    }
    for name, extra in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_tensors(str(path), {**base, **extra})
        with pytest.raises((CheckpointError, QuantFormatError), match="blocks.0.ffn.0.weight_scale"):
            with open_checkpoint(str(path)) as ckpt:
                ckpt.layers["blocks.0.ffn.0"].load()
    # a bias of the wrong length, and a layer of the wrong shape for the model: named, no model returned
    good = {**base, "blocks.0.ffn.0.weight_scale": q.scale[:, None]}
    for key, value in (("blocks.0.ffn.0.bias", torch.zeros(511)),):
        path = tmp_path / "bias.safetensors"
        save_tensors(str(path), {**good, key: value})
        with pytest.raises(QuantFormatError, match="blocks.0.ffn.0"):
            build_wan_model(str(path))
    wrong = dict(good)
    q2 = quantize_weight(torch.randn(256, 256))
    wrong["blocks.1.self_attn.o.weight"], wrong["blocks.1.self_attn.o.weight_scale"] = q2.qdata[:, :128], q2.scale[:, None]
    path = tmp_path / "shape.safetensors"
    save_tensors(str(path), wrong)
    with pytest.raises(QuantFormatError, match="blocks.1.self_attn.o"):
        build_wan_model(str(path))
