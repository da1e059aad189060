"""Our pure-torch WanModel against ComfyUI's own, on the tiny Wan weights (CPU, fp32).

Skipped unless COMFYUI_PATH points at a ComfyUI checkout (it is not on PyPI and must not be vendored).
"""
import os
import sys

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout")


@pytest.fixture(scope="module")
def comfy():
    sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True            # before comfy.model_management probes the device
    import comfy.model_management  # noqa: F401
    import comfy.ops
    import comfy.model_sampling
    import comfy.ldm.wan.model as wan_model
    return comfy, wan_model


def _comfy_wan(comfy, wan_model, cfg, sd):
    model = wan_model.WanModel(model_type=cfg.model_type, in_dim=cfg.in_dim, dim=cfg.dim, ffn_dim=cfg.ffn_dim,
                               freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim,
                               num_heads=cfg.num_heads, num_layers=cfg.num_layers, qk_norm=True,
                               cross_attn_norm=True, eps=cfg.eps, device="cpu", dtype=torch.float32,
                               operations=comfy.ops.disable_weight_init)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.mark.parametrize("model_type,size", [("t2v", (5, 64, 80)), ("i2v", (1, 72, 56)), ("t2v", (9, 40, 56))])
def test_forward_matches_comfyui(comfy, model_type, size):
    from wan_int8.models.tiny_wan import build_tiny_wan_state_dict
    from wan_int8.models.wan import WanConfig, WanModel, seeded_inputs
    comfy_mod, wan_model = comfy
    sd = build_tiny_wan_state_dict(seed=3, layers=2, model_type=model_type, dtype=torch.float32)
    ours = WanModel(WanConfig.from_state_dict_shapes(sd), dtype=torch.float32)
    ours.load_state_dict(sd, strict=True)
    theirs = _comfy_wan(comfy_mod, wan_model, ours.config, sd)
    inp = seeded_inputs(ours.config, 11, *size, batch=2, text_len=64)
    x = inp.noise if inp.cond is None else torch.cat([inp.noise, inp.cond], 1)
    t = torch.tensor([937.5, 120.0])
    with torch.inference_mode():
        a = ours(x, t, inp.context, clip_fea=inp.clip_fea)
        b = theirs(x, t, inp.context, clip_fea=inp.clip_fea, transformer_options={})
    assert a.shape == b.shape == inp.noise.shape
    err = (a - b).abs().max().item()
    print(f"{model_type} {size}: max abs err {err:.3g}, max |out| {b.abs().max().item():.3g}")
    assert err < 1e-4 * b.abs().max().item(), err


def test_schedule_matches_comfyui(comfy):
    from wan_int8.models.wan import flow_sigmas
    comfy_mod, _ = comfy
    try:   # comfy.samplers needs torchvision and torchsde; fall back to its sigma table
        from comfy.samplers import simple_scheduler
    except ImportError:
        def simple_scheduler(ms, steps):   # "simple": every (1000/steps)-th entry from the top, then 0
            stride = len(ms.sigmas) / steps
            return torch.tensor([float(ms.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])
    ms = comfy_mod.model_sampling.ModelSamplingDiscreteFlow()
    for shift, steps in [(8.0, 4), (5.0, 30), (1.0, 7), (12.0, 50)]:
        ms.set_parameters(shift=shift)
        torch.testing.assert_close(flow_sigmas(steps, shift), simple_scheduler(ms, steps), rtol=0, atol=0)


def test_bf16_forward_close_to_comfyui(comfy):
    """In bf16 both run the same op sequence; allow bf16-level differences only."""
    from wan_int8.models.tiny_wan import build_tiny_wan_state_dict
    from wan_int8.models.wan import WanConfig, WanModel, seeded_inputs
    comfy_mod, wan_model = comfy
    sd = build_tiny_wan_state_dict(seed=5, layers=2)
    ours = WanModel(WanConfig.from_state_dict_shapes(sd), dtype=torch.bfloat16)
    ours.load_state_dict(sd, strict=True)
    theirs = _comfy_wan(comfy_mod, wan_model, ours.config, sd).to(torch.bfloat16)
    theirs.patch_embedding.float()
    inp = seeded_inputs(ours.config, 2, 5, 48, 64, text_len=64, dtype=torch.bfloat16)
    t = torch.tensor([500.0])
    with torch.inference_mode():
        a = ours(inp.noise, t, inp.context).float()
        b = theirs(inp.noise, t, inp.context, transformer_options={}).float()
    err = (a - b).abs().max().item()
    print(f"bf16: max abs err {err:.3g}, max |out| {b.abs().max().item():.3g}")
    assert err < 0.01 * b.abs().max().item()
