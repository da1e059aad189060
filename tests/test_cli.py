"""The command line end to end on the tiny Wan: inspect, quantize, run, demo, and user-facing errors."""
import json
import os

import pytest
import torch

from wan_int8.cli import main
from wan_int8.formats.safetensors_io import save_tensors
from wan_int8.models.tiny_wan import build_tiny_wan_state_dict
from wan_int8.quant import cosine, quantize_weight, rel_error


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    sd = build_tiny_wan_state_dict(seed=1)
    float_path = str(d / "tiny_bf16.safetensors")
    save_tensors(float_path, sd)
    lx = {}
    for k, v in sd.items():  # a lightx2v-style file: int8 block linears + fp32 [N,1] scales, fp32 others
        name = k[: -len(".weight")]
        if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2 and "norm" not in k:
            q = quantize_weight(v)
            lx[k], lx[name + ".weight_scale"] = q.qdata, q.scale[:, None]
        else:
            lx[k] = v.float()
    lx_path = str(d / "tiny_lightx2v.safetensors")
    save_tensors(lx_path, lx)
    return d, float_path, lx_path


def test_inspect_text_and_json(tiny_files, capsys):
    d, float_path, lx_path = tiny_files
    assert main(["inspect", lx_path]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("lightx2v | Wan 2.1/2.2") and "20 from file" in first and "row 20" in first
    assert "problems: none found" in out
    assert main(["inspect", float_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "float" and info["family_id"] == "wan" and info["quantized_at_load"] == 20
    assert info["layers"]["blocks.0.ffn.0"]["kind"] == "float->int8 at load"
    assert info["layers"]["text_embedding.0"]["kind"] == "float"


def test_quantize_then_run_matches_float(tiny_files, capsys):
    d, float_path, lx_path = tiny_files
    out_path = str(d / "tiny_int8.safetensors")
    assert main(["quantize", float_path, out_path, "--rotate"]) == 0
    text = capsys.readouterr().out
    assert "20 quantized at load" in text and "regular-hadamard-256 20" in text and "weight error" in text
    assert main(["inspect", out_path]) == 0
    assert "stock ComfyUI" in capsys.readouterr().out
    conv = str(d / "lx_native.safetensors")
    assert main(["quantize", lx_path, conv]) == 0
    assert "20 INT8 layers of the lightx2v file kept their codes and scales (lossless)" in capsys.readouterr().out
    lat = {}
    for name, path, extra in (("float", float_path, ["--no-quantize"]), ("int8", out_path, []), ("lx", conv, [])):
        target = str(d / f"lat_{name}.safetensors")
        assert main(["run", path, "--steps", "2", "--seed", "3", "--device", "cpu", "--dtype", "fp32",
                     "--out", target] + extra) == 0
        from safetensors.torch import load_file
        lat[name] = load_file(target)["latents"]
    assert lat["float"].shape == (1, 16, 2, 8, 8)
    assert rel_error(lat["int8"], lat["float"]) < 0.03 and cosine(lat["int8"], lat["float"]) > 0.999
    assert rel_error(lat["lx"], lat["float"]) < 0.05
    assert not torch.equal(lat["int8"], lat["float"])  # it really ran INT8


def test_demo_runs_within_tolerance(capsys):
    assert main(["demo", "--device", "cpu", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    row = [l for l in out.splitlines() if l.startswith("| int8 |")][0]
    rel, mean_rel, cos = float(row.split("|")[2]), float(row.split("|")[3]), float(row.split("|")[5])
    assert 0 < mean_rel < 0.03
    assert 0 < rel < 0.03 and cos > 0.999
    assert "INT8 kernels that ran: reference" in out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "damaged" in err
    assert main(["run", str(tmp_path / "missing.safetensors")]) == 2
    flux = tmp_path / "flux.safetensors"
    save_tensors(str(flux), {"double_stream_modulation_img.lin.weight": torch.zeros(32, 16),
                             "double_blocks.0.img_attn.qkv.weight": torch.zeros(48, 16)})
    assert main(["run", str(flux)]) == 2
    assert "Flux 2" in capsys.readouterr().err


def test_conversion_streams_one_layer_at_a_time(tiny_files, tmp_path):
    """iter_prepared builds item i+1 only after item i was handed over (nothing is read ahead)."""
    from wan_int8.formats import open_checkpoint
    from wan_int8.loader import LoadConfig, iter_prepared, plan_load
    _, float_path, _ = tiny_files
    events = []
    with open_checkpoint(float_path) as ckpt:
        for key, src in ckpt.tensors.items():
            def build(key=key, inner=src.build):
                events.append(("build", key))
                return inner()
            src.build = build
        report, _ = plan_load(ckpt, LoadConfig())
        for name, item in iter_prepared(ckpt, report):
            events.append(("got", name))
    builds = [i for i, e in enumerate(events) if e[0] == "build"]
    gots = [i for i, e in enumerate(events) if e[0] == "got"]
    assert len(builds) == len(gots) == len(events) // 2
    assert all(b == g - 1 for b, g in zip(builds, gots))  # build, hand over, build, hand over ...


def test_inspect_reports_bad_scales_and_nonfinite_tensors(tmp_path, capsys, monkeypatch):
    import wan_int8.cli as cli
    sd = build_tiny_wan_state_dict(seed=1)
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks.0.") and k.endswith(".weight") and v.dim() == 2 and "norm" not in k:
            q = quantize_weight(v)
            out[k], out[k[:-len("weight")] + "weight_scale"] = q.qdata, q.scale[:, None].clone()
        else:
            out[k] = v.float()
    out["blocks.0.ffn.0.weight_scale"][3] = 0.0
    out["blocks.0.self_attn.q.weight_scale"][5] = float("nan")
    out["blocks.1.norm3.weight"][0] = float("inf")                 # a small float tensor: always scanned
    out["blocks.1.ffn.2.weight"][0, 0] = float("nan")              # a weight: scanned when small or with --deep
    path = str(tmp_path / "bad.safetensors")
    save_tensors(path, out)
    monkeypatch.setattr(cli, "SMALL_TENSOR", 1000)                  # so the test's weights count as "big"
    assert main(["inspect", path, "--json"]) == 0
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any("blocks.0.ffn.0: 1 zero weight scale" in p for p in problems)
    assert any("blocks.0.self_attn.q" in p and "NaN" in p for p in problems)
    assert any("blocks.1.norm3.weight" in p for p in problems)
    assert not any("blocks.1.ffn.2.weight" in p for p in problems)
    assert main(["inspect", path, "--json", "--deep"]) == 0
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any("blocks.1.ffn.2.weight: contains NaN/Inf" in p for p in problems)


def test_demo_speed_options(capsys):
    """--int8-attention and --fused-blocks reach the INT8 model; the row says what ran (on this CPU the fused
    kernels cannot run, and the row says so rather than claiming them)."""
    assert main(["demo", "--device", "cpu", "--steps", "2", "--int8-attention", "fp16", "--fused-blocks"]) == 0
    out = capsys.readouterr().out
    row = [l for l in out.splitlines() if l.startswith("| int8 (")][0]
    # fused kernels: not run on a plain CPU, run on the interpreter when another test module set TRITON_INTERPRET
    ran = "TRITON_INTERPRET" in os.environ and os.environ["TRITON_INTERPRET"] not in ("", "0")
    assert "INT8 attention fp16" in row
    assert ("fused blocks)" in row) if ran else ("fused blocks not run" in row), row
    rel, cos = float(row.split("|")[2]), float(row.split("|")[5])
    assert 0 < rel < 0.03 and cos > 0.999
