"""Settings parsing, Int8Linear behaviour, quantize_model rules, dispatch logging and kernel statistics."""
import logging

import pytest
import torch
from torch import nn

import wan_int8
from conftest import outlier_input
from wan_int8 import Int8Linear, QuantizeConfig, Settings, quantize_model
from wan_int8.config import SettingsError, set_settings
from wan_int8.kernels.registry import REGISTRY, print_kernel_summary, reset_kernel_stats
from wan_int8.quant import Rotation, int8_linear_reference, rel_error


@pytest.fixture
def settings_guard():
    previous = set_settings(Settings())
    yield
    set_settings(previous)


def test_settings_from_env_parses_and_validates():
    s = Settings.from_env({"INT8_DEBUG_MODE": "1", "INT8_LORA_CACHE_SIZE": "4", "INT8_FORCE_KERNEL": "Fallback",
                           "INT8_CLEAR_CACHE": "never", "INT8_HADAMARD_QUIP": "yes", "HADAMARD_CHUNK_SIZE": "0"})
    assert s.debug and s.lora_cache_size == 4 and s.force_kernel == "fallback" and s.clear_cache == "never"
    assert s.rotation_enabled and s.hadamard_chunk_size == 0
    assert not Settings.from_env({"INT8_HADAMARD_QUIP": "1", "INT8_DISABLE_HADAMARD_QUIP": "1"}).rotation_enabled
    assert Settings.from_env({}).lora_cache_size == 32
    for bad in ({"INT8_DEBUG_MODE": "maybe"}, {"INT8_LORA_CACHE_SIZE": "-1"}, {"INT8_LORA_CACHE_SIZE": "x"},
                {"INT8_FORCE_KERNEL": "cuda9"}, {"INT8_CLEAR_CACHE": "sometimes"}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            Settings.from_env(bad)


def test_runtime_switches(settings_guard):
    assert not wan_int8.is_hadamard_quip_enabled()
    wan_int8.set_hadamard_quip_enabled(True)
    assert wan_int8.is_hadamard_quip_enabled() and wan_int8.get_settings().hadamard_quip
    wan_int8.set_hadamard_quip_enabled(False)
    assert not wan_int8.is_hadamard_quip_enabled()


def test_int8_linear_module(settings_guard, fresh_seed):
    torch.manual_seed(fresh_seed)
    lin = nn.Linear(256, 96)
    q = Int8Linear.from_linear(lin, "row", rotation=Rotation("regular", 64), name="blocks.0.ffn.0")
    x = outlier_input(2, 256, fresh_seed).reshape(1, 2, 256)
    y = q(x)
    assert y.shape == (1, 2, 96) and y.dtype == torch.float32
    assert torch.equal(y.reshape(2, 96), int8_linear_reference(x.reshape(2, 256), q.int8_weight(), q.bias))
    assert rel_error(y, lin(x)) < 0.05
    q_bf16 = q.to(torch.bfloat16)
    assert q_bf16.weight.dtype == torch.int8 and q_bf16.weight_scale.dtype == torch.float32
    assert q_bf16.bias.dtype == torch.bfloat16 and q_bf16(x.bfloat16()).dtype == torch.bfloat16
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["weight_scale"].shape == (96,) and "input_scale" not in sd
    ptr = q.weight.data_ptr()
    q(x)
    assert q.weight.data_ptr() == ptr  # no per-forward copies of the weight


def test_quantize_model_rules_and_report(settings_guard):
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(32, 64))
    blocks = nn.Module()
    blocks.q = nn.Linear(64, 64)
    blocks.k_img = nn.Linear(64, 64)
    blocks.tiny = nn.Linear(64, 8)
    model.add_module("blocks", blocks)
    cfg = QuantizeConfig(include=(r"^blocks\.",), exclude=(r"\.k_img$",))
    report = quantize_model(model, cfg)
    assert isinstance(model.blocks.q, Int8Linear) and type(model.embed) is nn.Linear
    assert type(model.blocks.k_img) is nn.Linear and type(model.blocks.tiny) is nn.Linear  # excluded / too small
    assert report["blocks.q"].startswith("int8") and report["embed"] == "kept"


def test_forced_backend_unavailable_is_logged_once(settings_guard, caplog):
    set_settings(Settings(force_kernel="cublaslt"))
    q = Int8Linear.from_linear(nn.Linear(64, 32), name="blocks.7.self_attn.q")
    reset_kernel_stats()
    with caplog.at_level(logging.WARNING, logger="wan_int8.kernels"):
        q(torch.randn(3, 64))
        q(torch.randn(5, 64))
    msgs = [r.getMessage() for r in caplog.records if "cublaslt" in r.getMessage()]
    assert len(msgs) == 1 and "blocks.7.self_attn.q" in msgs[0] and "torch reference" in msgs[0]
    stats = REGISTRY.stats()
    assert stats[("reference", "K=64 N=32 row")] == 2
    text = print_kernel_summary()
    assert "reference" in text and "K=64 N=32 row" in text
    reset_kernel_stats()
    assert "no INT8 linear has run" in print_kernel_summary()


def test_static_input_scale_is_used(settings_guard):
    from wan_int8.quant import Int8Weight, quantize_weight
    w = quantize_weight(torch.randn(16, 32))
    layer = Int8Linear.from_int8_weight(Int8Weight(w.qdata, w.scale, None, torch.tensor(0.02)))
    x = torch.randn(4, 32)
    y = layer(x)
    xq = torch.round(x / 0.02).clamp(-127, 127)
    expected = (xq.double() * 0.02) @ (w.qdata.double() * w.scale.double()[:, None]).t()
    assert rel_error(y, expected) < 1e-5
    assert "input_scale" in layer.state_dict()


def test_torch_compile_no_graph_break(settings_guard):
    q = Int8Linear.from_linear(nn.Linear(64, 32))
    model = nn.Sequential(q, nn.GELU())
    x = torch.randn(4, 64)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), model(x))


def test_measured_dispatch_keeps_the_fastest_and_persists(tmp_path, settings_guard, monkeypatch):
    import types
    from wan_int8.kernels import registry
    from wan_int8.kernels.registry import REFERENCE, Backend, KernelRegistry, LinearCall, dispatch_key
    runs = []
    clock = [0.0]   # the registry's timer: each backend run advances it by its delay (a loaded CPU cannot flip it)
    monkeypatch.setattr(registry, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def make(name, delay):
        def run(call):
            runs.append(name)
            clock[0] += delay
            return REFERENCE.run(call)
        return Backend(name, lambda call: None, run, priority=1, auto_on_cpu=True)

    cache = tmp_path / "choices.json"
    reg = KernelRegistry(cache_path=str(cache))
    reg.register(make("slow", 0.02))
    reg.register(make("fast", 0.0))
    reg.register(Backend("never", lambda call: "cannot", make("never", 0).run, priority=9, auto_on_cpu=True))
    from wan_int8.quant import quantize_weight
    w = quantize_weight(torch.randn(32, 64))
    call = LinearCall(torch.randn(40, 64), w.qdata, w.scale, None, None, None, 0, 0, torch.float32, "l")
    assert reg.choose(call, Settings()).name == "fast"
    assert "never" not in runs and runs.count("slow") == 8 and runs.count("fast") == 53  # 3 untimed + 5 rounds
    import json
    assert json.loads(cache.read_text()) == {dispatch_key(call): "fast"}
    runs.clear()
    call2 = LinearCall(torch.randn(60, 64), w.qdata, w.scale, None, None, None, 0, 0, torch.float32, "l")
    assert dispatch_key(call2) == dispatch_key(call)  # same M bucket (64)
    # a slower-or-equal lower-priority backend never displaces the preferred one
    tie = KernelRegistry(cache_path=str(tmp_path / "tie.json"))
    tie.register(Backend("preferred", lambda call: None, make("preferred", 0.01).run, priority=5, auto_on_cpu=True))
    tie.register(Backend("other", lambda call: None, make("other", 0.01).run, priority=1, auto_on_cpu=True))
    assert tie.choose(call, Settings()).name == "preferred"
    runs.clear()
    fresh = KernelRegistry(cache_path=str(cache))  # a second process: no measuring
    fresh.register(make("slow", 0.02))
    fresh.register(make("fast", 0.0))
    assert fresh.choose(call2, Settings()).name == "fast" and runs == []


def test_comfy_kitchen_backend_matches_reference_on_cpu(settings_guard):
    ck = pytest.importorskip("comfy_kitchen")
    from wan_int8.kernels.registry import REGISTRY, LinearCall
    from wan_int8.quant import quantize_weight
    backend = REGISTRY.get("comfy_kitchen")
    for rot in (None, Rotation("regular", 64)):
        w = quantize_weight(torch.randn(48, 128) * 0.05, rotation=rot)
        x = outlier_input(19, 128, 3)
        call = LinearCall(x, w.qdata, w.scale, torch.randn(48), None, None, 1 if rot else 0, 64 if rot else 0,
                          torch.float32, "l")
        assert backend.check(call) is None
        assert rel_error(backend.run(call), REGISTRY.get("reference").run(call)) < 1e-5
