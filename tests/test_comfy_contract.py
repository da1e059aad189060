"""The ComfyUI glue against small stand-ins of the ComfyUI interfaces it uses (no ComfyUI needed).

Stand-ins: `folder_paths` (file lists), `comfy.ops` (`mixed_precision_ops` Linear + `cast_bias_weight` /
`uncast_bias_weight` hooks that record how they were called), `comfy.quant_ops` (comfy-kitchen's real
QuantizedTensor, which is on PyPI) and a ModelPatcher-like object that clones and runs injections the way
ComfyUI 0.29 does (including its copying of `is_injected` into clones).
"""
import json
import sys
import types

import pytest
import torch

# -- stand-ins --------------------------------------------------------------------------------------


class FakeFolderPaths(types.ModuleType):
    def __init__(self, root):
        super().__init__("folder_paths")
        self.root = root

    def get_filename_list(self, kind):
        return ["a.safetensors", "b.safetensors"]

    def get_full_path_or_raise(self, kind, name):
        return str(self.root / name)


@pytest.fixture
def fake_folder_paths(tmp_path, monkeypatch):
    fp = FakeFolderPaths(tmp_path)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.delitem(sys.modules, "wan_int8.comfy.nodes", raising=False)
    return fp


def make_fake_comfy():
    ck = pytest.importorskip("comfy_kitchen.tensor")
    calls = []

    def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None, offloadable=False,
                         compute_dtype=None, want_requant=False):
        calls.append(("cast", offloadable))
        w = s.weight.to(device)
        b = s.bias.to(device=device, dtype=bias_dtype) if s.bias is not None else None
        if s.weight_function:
            w = w.dequantize() if isinstance(w, ck.QuantizedTensor) else w
            for f in s.weight_function:
                w = f(w)
        return (w, b, ("stream", w)) if offloadable else (w, b)

    def uncast_bias_weight(s, w, b, stream):
        calls.append(("uncast", stream is not None))

    def mixed_precision_ops(quant_config, compute_dtype):
        class Ops:
            class Linear(torch.nn.Module):
                weight_function = []
                bias_function = []

                def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                    super().__init__()
                    self.factory_kwargs = {"device": device, "dtype": compute_dtype}
                    self._full_precision_mm = False
                    self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=compute_dtype)) if bias else None

                def _load_from_state_dict(self, sd, prefix, *rest):
                    w = sd.pop(prefix + "weight")
                    conf = sd.pop(prefix + "comfy_quant", None)
                    if conf is None:
                        self.weight = torch.nn.Parameter(w.to(compute_dtype), requires_grad=False)
                    else:
                        conf = json.loads(conf.numpy().tobytes())
                        scale = sd.pop(prefix + "weight_scale")
                        params = ck.TensorWiseINT8Layout.Params(
                            scale=scale, orig_dtype=compute_dtype, orig_shape=tuple(w.shape),
                            convrot=bool(conf.get("convrot")), convrot_groupsize=conf.get("convrot_groupsize", 256))
                        self.quant_format, self.layout_type = conf["format"], "TensorWiseINT8Layout"
                        self.weight = torch.nn.Parameter(ck.QuantizedTensor(w, "TensorWiseINT8Layout", params),
                                                         requires_grad=False)
                    torch.nn.Module._load_from_state_dict(self, sd, prefix, *rest)

                def state_dict(self, *a, destination=None, prefix="", **k):
                    sd = destination if destination is not None else {}
                    sd[prefix + "weight"] = self.weight
                    return sd

                def forward(self, x):
                    calls.append(("comfy-path",))
                    w, b, stream = cast_bias_weight(self, x, offloadable=True)
                    w = w.dequantize() if isinstance(w, ck.QuantizedTensor) else w
                    uncast_bias_weight(self, w, b, stream)
                    return torch.nn.functional.linear(x, w.to(x.dtype), b)
        return Ops

    ops = types.SimpleNamespace(mixed_precision_ops=mixed_precision_ops, cast_bias_weight=cast_bias_weight,
                                uncast_bias_weight=uncast_bias_weight, run_every_op=lambda: None)
    quant_ops = types.SimpleNamespace(QuantizedTensor=ck.QuantizedTensor, QuantizedLayout=ck.QuantizedLayout,
                                      register_layout_class=ck.register_layout_class,
                                      get_layout_class=ck.get_layout_class)
    return types.SimpleNamespace(ops=ops, quant_ops=quant_ops, model_management=None), calls


class FakePatcher:
    """ModelPatcher's clone/injection behaviour at ComfyUI 0.29 (model_patcher.py clone, inject/eject)."""

    def __init__(self, model):
        self.model = model
        self.injections = {}
        self.is_injected = False

    def clone(self):
        n = FakePatcher(self.model)
        n.injections = {k: list(v) for k, v in self.injections.items()}
        n.is_injected = self.is_injected          # ComfyUI copies this flag too
        return n

    def set_injections(self, key, injections):
        self.injections[key] = injections

    def get_injections(self, key):
        return self.injections.get(key)

    def inject_model(self):
        if self.is_injected:
            return
        for injections in self.injections.values():
            for inj in injections:
                inj.inject(self)
                self.is_injected = True

    def eject_model(self):
        if not self.is_injected:
            return
        for injections in self.injections.values():
            for inj in injections:
                inj.eject(self)
        self.is_injected = False

    def load(self, loaded):
        """load_models_gpu: detach the loaded clone of the same model, then partially_load this one."""
        if loaded and loaded[0] is not self:
            loaded[0].eject_model()
        self.eject_model()          # partially_load runs inside use_ejected
        self.inject_model()
        loaded[:] = [self]


# -- ops -----------------------------------------------------------------------------------------------

def _linear_sd(seed, n=64, k=256, gran="row", rotate=False):
    from wan_int8.comfy.load import native_layer_tensors
    from wan_int8.quant.int8 import quantize_weight
    from wan_int8.quant.types import Rotation
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q = quantize_weight(w, gran, 64, Rotation("regular", 64) if rotate else None)
    sd = native_layer_tensors("l", q)
    sd["l.bias"] = torch.randn(n, generator=g)
    return {k[2:]: v for k, v in sd.items()}, q


@pytest.mark.parametrize("gran,rotate", [("row", False), ("tensor", False), ("row", True), ("group", False)])
def test_int8_layers_run_our_op_through_comfy_cast_hooks(gran, rotate):
    from wan_int8.comfy.ops import make_int8_ops
    from wan_int8.quant.int8 import int8_linear_reference
    comfy, calls = make_fake_comfy()
    ops = make_int8_ops(torch.float32, comfy)
    layer = ops.Linear(256, 64)
    sd, q = _linear_sd(1, gran=gran, rotate=rotate)
    layer.load_state_dict(sd, strict=False)
    assert isinstance(layer.weight, comfy.quant_ops.QuantizedTensor)
    x = torch.randn(3, 5, 256)
    with torch.inference_mode():
        y = layer(x)
    assert ("cast", True) in calls and ("uncast", True) in calls and ("comfy-path",) not in calls
    ref = int8_linear_reference(x.reshape(-1, 256), q, layer.bias.detach()).reshape(3, 5, 64)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_weight_function_patches_take_comfys_path():
    from wan_int8.comfy.ops import make_int8_ops
    comfy, calls = make_fake_comfy()
    layer = make_int8_ops(torch.float32, comfy).Linear(256, 64)
    layer.load_state_dict(_linear_sd(2)[0], strict=False)
    layer.weight_function = [lambda w: w * 0]       # e.g. ComfyUI's LowVramPatch (stock LoRA in lowvram)
    y = layer(torch.randn(2, 256))
    assert ("comfy-path",) in calls
    torch.testing.assert_close(y, layer.bias.detach().expand(2, -1))


def test_group_layout_round_trips_and_requantizes():
    from wan_int8.comfy.ops import GROUP_LAYOUT, make_int8_ops
    from wan_int8.quant.int8 import dequantize
    comfy, _ = make_fake_comfy()
    layer = make_int8_ops(torch.float32, comfy).Linear(256, 64)
    sd, q = _linear_sd(3, gran="group")
    layer.load_state_dict(sd, strict=False)
    w = layer.weight
    assert layer.layout_type == GROUP_LAYOUT and w._params.group_size == 64
    torch.testing.assert_close(w.dequantize(), dequantize(q))
    again = w.requantize_from_float(w.dequantize())          # what ComfyUI does after merging a LoRA
    assert again._params.scale.shape == (64, 4) and torch.equal(again._qdata, w._qdata)
    out = layer.state_dict(prefix="l.")
    assert json.loads(out["l.comfy_quant"].numpy().tobytes()) == {"format": "int8_groupwise", "group_size": 64}


def test_lora_slot_adds_to_output():
    from wan_int8.comfy.ops import make_int8_ops
    comfy, _ = make_fake_comfy()
    layer = make_int8_ops(torch.float32, comfy).Linear(256, 64)
    layer.load_state_dict(_linear_sd(4)[0], strict=False)
    x = torch.randn(2, 256)
    y0 = layer(x)
    layer.lora = types.SimpleNamespace(apply=lambda x, y: y + 1)
    torch.testing.assert_close(layer(x), y0 + 1)


# -- LoRA injections -------------------------------------------------------------------------------------

class RecordingBackend:
    def __init__(self):
        self.loads = []
        self.installed = []

    def load(self, path):
        self.loads.append(path)
        return path

    def install(self, model, stack, offload=False):
        entry = tuple(stack)
        self.installed.append(entry)
        self.offload = offload
        model.current = entry

        def remove():
            self.installed.remove(entry)
            del model.current
        return remove

    def bake(self, name, weight, stack):
        return weight


def _patcher():
    model = types.SimpleNamespace(diffusion_model=torch.nn.Module())
    return FakePatcher(model)


def test_lora_state_is_per_clone_and_follows_load_unload(tmp_path):
    from wan_int8.comfy.lora import LoraSpec, ParsedCache, add_loras
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    backend, cache = RecordingBackend(), ParsedCache()
    base = _patcher()
    one = add_loras(base, [LoraSpec(str(a), 1.0)], backend, cache)
    half = add_loras(base, [LoraSpec(str(a), 0.5)], backend, cache)
    two = add_loras(one, [LoraSpec(str(b), 0.8)], backend, cache)
    assert base.get_injections("wan_int8_lora") is None
    assert backend.loads == [str(a), str(b)]                      # re-used across strengths and clones
    dm = base.model.diffusion_model
    loaded = []
    one.load(loaded)
    assert dm.current == ((str(a), 1.0),)
    half.load(loaded)
    assert dm.current == ((str(a), 0.5),) and len(backend.installed) == 1
    two.load(loaded)
    assert dm.current == ((str(a), 1.0), (str(b), 0.8))             # stacking keeps both
    base.load(loaded)
    assert not hasattr(dm, "current") and backend.installed == []
    # a clone of a loaded, injected patcher inherits is_injected=True: loading it must still install its stack
    two.load(loaded)
    three = add_loras(two, [LoraSpec(str(a), -1.0)], backend, cache)
    assert three.is_injected
    three.load(loaded)
    assert dm.current == ((str(a), 1.0), (str(b), 0.8), (str(a), -1.0)) and len(backend.installed) == 1


def test_zero_strength_entries_install_nothing(tmp_path):
    from wan_int8.comfy.lora import LoraSpec, ParsedCache, add_loras
    p = tmp_path / "a.safetensors"
    p.write_bytes(b"x")
    backend = RecordingBackend()
    clone = add_loras(_patcher(), [LoraSpec(str(p), 0.0)], backend, ParsedCache())
    clone.load([])
    assert backend.installed == []


# -- nodes ----------------------------------------------------------------------------------------------------

def test_seed_node_ids_inputs_and_values(fake_folder_paths):
    from wan_int8.comfy import nodes
    m = nodes.NODE_CLASS_MAPPINGS
    loader = m["WanVideoINT8Loader"].INPUT_TYPES()["required"]
    assert list(loader)[:6] == ["unet_name", "model_type", "quantization_mode", "offload_to_cpu",
                                "auto_convert_to_int8", "debug_mode"]
    assert {"wan", "flux2", "z-image", "chroma", "ltx2", "qwen", "anima", "auto"} <= set(loader["model_type"][0])
    assert {"auto", "tensorwise", "blockwise", "rowwise"} <= set(loader["quantization_mode"][0])
    assert loader["offload_to_cpu"][0] == loader["auto_convert_to_int8"][0] == ["enable", "disable"]
    assert loader["debug_mode"][0] == "BOOLEAN"
    assert m["WanVideoINT8Loader"].FUNCTION == "load_unet"
    lora = m["WanLoRALoaderINT8"].INPUT_TYPES()
    assert list(lora["required"]) == ["model", "lora_name", "strength", "offload_to_cpu"]
    assert lora["required"]["strength"][1]["min"] == -10 and lora["required"]["strength"][1]["max"] == 10
    assert lora["required"]["strength"][1]["step"] == 0.01 and "debug" in lora["optional"]
    clip = m["WanLoRALoaderWithCLIPINT8"].INPUT_TYPES()
    assert list(clip["required"]) == ["model", "lora_name", "strength_model", "strength_clip", "offload_to_cpu",
                                      "clip_type"]
    assert set(clip["optional"]) == {"clip", "debug"}
    assert m["WanLoRALoaderWithCLIPINT8"].RETURN_TYPES == ("MODEL", "CLIP")


def test_loader_widgets_map_to_load_config(fake_folder_paths):
    from wan_int8.comfy.nodes import load_config
    c = load_config("wan", "blockwise", "enable", "on")
    assert (c.family, c.granularity, c.group_size, c.rotate, c.quantize_float) == ("wan", "group", 128, True, True)
    c = load_config("auto", "auto", "disable", "off")
    assert (c.family, c.granularity, c.rotate, c.quantize_float) == (None, "row", False, False)
    assert load_config("qwen", "tensorwise", "enable", "off").granularity == "tensor"


def test_lora_nodes_plumbing(fake_folder_paths, tmp_path):
    from wan_int8.comfy.nodes import WanLoRALoaderINT8, WanLoRAStackINT8
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "b.safetensors").write_bytes(b"y")
    backend, base = RecordingBackend(), _patcher()
    assert WanLoRALoaderINT8().load_lora(base, "a.safetensors", 0.0, "disable", backend=backend)[0] is base
    m = WanLoRAStackINT8().apply(base, backend=backend, lora_1="a.safetensors", strength_1=0.7,
                                 lora_2="b.safetensors", strength_2=0.3, enabled_2=False,
                                 lora_3="None", strength_3=1.0)[0]
    loaded = []
    m.load(loaded)
    assert base.model.diffusion_model.current == ((str(tmp_path / "a.safetensors"), 0.7),)
    assert backend.offload is False
    off = WanLoRALoaderINT8().load_lora(base, "b.safetensors", 1.0, "enable", backend=backend)[0]
    off.load(loaded)
    assert backend.offload is True      # the node's offload_to_cpu reaches the LoRA runtime


def test_state_dict_is_native_and_streamed(tmp_path):
    from wan_int8.comfy.load import build_native_state_dict
    from wan_int8.formats.safetensors_io import save_tensors
    from wan_int8.loader import LoadConfig
    from wan_int8.models.tiny_wan import build_tiny_wan_state_dict
    src = tmp_path / "t.safetensors"
    save_tensors(str(src), build_tiny_wan_state_dict(seed=1, dtype=torch.bfloat16))
    steps = []
    built = build_native_state_dict(str(src), LoadConfig(), progress=lambda d, t: steps.append((d, t)), inspect=True)
    sd = built.sd
    assert sd["blocks.0.self_attn.q.weight"].dtype == torch.int8
    assert sd["blocks.0.self_attn.q.weight_scale"].shape == (256, 1)
    assert json.loads(sd["blocks.0.ffn.0.comfy_quant"].numpy().tobytes()) == {"format": "int8_tensorwise"}
    assert sd["text_embedding.0.weight"].dtype == torch.bfloat16          # kept float by the Wan rules
    assert steps[-1][0] == steps[-1][1] and len(steps) > 10
    assert built.inspection.nonfinite == [] and built.report.count("quantize") == 20


def test_pack_import_without_comfyui_exposes_no_nodes():
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.modules.pop("wan_int8.comfy.nodes", None)
    saved = sys.modules.pop("folder_paths", None)
    try:
        spec = importlib.util.spec_from_file_location("wan_int8_pack_ci", os.path.join(root, "__init__.py"))
        pack = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pack)
    finally:
        if saved is not None:
            sys.modules["folder_paths"] = saved
    if importlib.util.find_spec("folder_paths") is None:
        assert pack.NODE_CLASS_MAPPINGS == {}
    assert not torch.cuda.is_initialized()


def test_old_comfyui_is_refused_naming_the_minimum_version():
    import types

    import pytest

    from wan_int8.comfy.ops import MIN_COMFYUI, check_comfy_interfaces

    def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None):   # pre-offloadable signature
        return None

    ops = types.ModuleType("comfy.ops")
    ops.mixed_precision_ops, ops.cast_bias_weight, ops.uncast_bias_weight = object(), cast_bias_weight, object()
    quant_ops = types.ModuleType("comfy.quant_ops")     # no QuantizedTensor & co.: ComfyUI before native int8
    with pytest.raises(RuntimeError, match=f">= {MIN_COMFYUI}") as err:
        check_comfy_interfaces(types.SimpleNamespace(ops=ops, quant_ops=quant_ops, model_patcher=None))
    text = str(err.value)
    assert "comfy.quant_ops.QuantizedTensor" in text and "offloadable" in text


def test_fused_block_replacement_falls_back_and_chains():
    """The block replacement hands calls it cannot serve to the original block (the reason logged once), and a
    replacement another node set first keeps running, with ours standing in for its original block."""
    from torch import nn
    from wan_int8.comfy.fused import FusedBlockReplace

    class Block(nn.Module):
        def __init__(self, i2v):
            super().__init__()
            self.cross_attn = nn.Module()
            if i2v:
                self.cross_attn.k_img = nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self, i2v):
            super().__init__()
            self.blocks = nn.ModuleList([Block(i2v), Block(i2v)])

    args = {"img": torch.zeros(1, 3, 4), "transformer_options": {}}
    original = lambda a: {"img": "original"}  # noqa: E731
    model = Model(i2v=True)
    rep = FusedBlockReplace(model, 1)
    assert rep(args, {"original_block": original}) == {"img": "original"}
    seen = []

    def previous(a, extra):   # e.g. a caching node: it decides, then calls what it was given as the block
        seen.append("previous")
        return extra["original_block"](a)
    chained = FusedBlockReplace(model, 1, previous)
    assert chained(args, {"original_block": original}) == {"img": "original"} and seen == ["previous"]
    patched = {"img": torch.zeros(1, 3, 4), "transformer_options": {"patches": {"attn1_patch": [lambda d: d]}}}
    assert "attn1_patch" in FusedBlockReplace(Model(i2v=False), 0)._why_not(Model(i2v=False).blocks[0], patched)
    del model, chained   # the replacement holds the model weakly: once it is gone, the original block runs
    import gc
    gc.collect()
    assert rep.model() is None and rep(args, {"original_block": original}) == {"img": "original"}
