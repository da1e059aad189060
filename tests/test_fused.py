"""The fused Wan block passes: kernels against their torch references, references against a second
implementation, the GEMM's block epilogue and pre-quantized input through every CPU-testable backend, and the
fused block against the unfused one (ours and, in test_comfyui_pack, ComfyUI's).

Kernels run on the CPU interpreter (TRITON_INTERPRET=1) at small sizes; with WAN_INT8_TEST_DEVICE=cuda the same
tests run on a GPU.  Tolerances:
- norm + modulation: the kernel sums mean and variance in another order than torch, so fp32 outputs agree to a
  few ulps (rtol 2e-5 of the row), bf16/fp16 outputs to one ulp of the output type; INT8 codes equal the
  reference's codes of its fp32 values except a ±1 where a value sits within those ulps of a rounding boundary;
- RMSNorm + RoPE: the same;
- GEMM epilogue: fp32 math on the exact int32 accumulator, one rounding: fp32 outputs rtol 1e-5, 16-bit outputs
  one ulp of the output type;
- fused vs unfused block: both against a float64 evaluation of the same INT8 block; the fused one rounds less
  (fp32 between passes where the unfused block rounds to the model dtype), so its error is no larger than the
  unfused block's (+10%, and the outputs agree to bf16 rounding).
"""
import os

DEVICE = os.environ.get("WAN_INT8_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

triton = pytest.importorskip("triton")

from wan_int8.config import get_settings, set_settings, update_settings  # noqa: E402
from wan_int8.fused import (fused_block_forward, fused_block_unavailable, modulation_per,  # noqa: E402
                            norm_modulate_reference, rms_norm_rope_reference)
from wan_int8.kernels.ops import int8_linear  # noqa: E402
from wan_int8.kernels.triton_fused import norm_modulate_triton, rms_norm_rope_triton  # noqa: E402
from wan_int8.layers import QuantizeConfig, quantize_model  # noqa: E402
from wan_int8.models.wan import apply_rope, rope_freqs  # noqa: E402
from wan_int8.quant.int8 import (_gemm_dequant, block_epilogue_reference, gated_rows,  # noqa: E402
                                 quantize_activation, quantize_weight)
from wan_int8.quant.metrics import rel_error  # noqa: E402

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2e-5}


@pytest.fixture(autouse=True, scope="module")
def _tiny_configs():
    from wan_int8.kernels import triton_gemm
    triton_gemm.set_config_override([dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)])
    yield
    triton_gemm.set_config_override(None)


@pytest.fixture
def force_kernel():
    old = get_settings()

    def force(name):
        update_settings(force_kernel=name)
    yield force
    set_settings(old)


def close_to_ulp(out, ref, dtype):
    """|out - ref| within one ulp of dtype (relative to each value, with a floor at the row's scale)."""
    ref = ref.double()
    floor = ref.abs().amax(dim=-1, keepdim=True) * 1e-3
    err = (out.double() - ref).abs() / torch.maximum(ref.abs(), floor)
    assert float(err.max()) <= 1.01 * ULP[dtype], float(err.max())


def codes_close(q, qr):
    diff = (q.int() - qr.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 5e-3


# -- norm + modulation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,groups,affine,dtype", [(96, 1, False, torch.bfloat16), (200, 3, False, torch.float32),
                                                   (64, 1, True, torch.float16), (160, 2, True, torch.bfloat16)])
def test_norm_modulate_kernel_matches_reference(k, groups, affine, dtype):
    g = torch.Generator().manual_seed(k + groups)
    b, seq = 2, 7
    x = (3 * torch.randn(b * seq, k, generator=g) + 1.5)
    x[:, 5] *= 20                                                  # an outlier channel
    x = x.to(DEVICE, dtype)
    w = (1 + 0.2 * torch.randn(k, generator=g)).to(DEVICE, dtype) if affine else None
    bias = (0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype) if affine else None
    shift = (0.3 * torch.randn(b, groups, k, generator=g)).to(DEVICE, dtype)
    scale = (0.3 * torch.randn(b, groups, k, generator=g)).to(DEVICE, dtype)
    per = modulation_per(seq, groups)
    y, q, s = norm_modulate_triton(x, 1e-6, w, bias, shift, scale, seq, per, store_y=True, quantize=True)
    ref = norm_modulate_reference(x.double(), 1e-6, w, bias, shift, scale, seq, per)
    close_to_ulp(y, ref.to(dtype), dtype) if dtype != torch.float32 else \
        torch.testing.assert_close(y.double(), ref, rtol=2e-5, atol=2e-5 * float(ref.abs().max()))
    qr, sr = quantize_activation(ref.float())
    codes_close(q, qr)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    # codes only (no float output), and the float output only
    y2, q2, s2 = norm_modulate_triton(x, 1e-6, w, bias, shift, scale, seq, per, store_y=False, quantize=True)
    assert y2 is None and torch.equal(q2, q) and torch.equal(s2, s)
    y3, q3, _ = norm_modulate_triton(x, 1e-6, w, bias, shift, scale, seq, per, store_y=True, quantize=False)
    assert q3 is None and torch.equal(y3, y)


def test_norm_modulate_reference_is_layernorm_then_addcmul():
    """The reference against torch's LayerNorm and ComfyUI's addcmul with repeat_e (float64)."""
    g = torch.Generator().manual_seed(3)
    b, seq, k, groups = 2, 10, 32, 4
    x = torch.randn(b, seq, k, generator=g, dtype=torch.float64)
    shift, scale = torch.randn(2, b, groups, k, generator=g, dtype=torch.float64)
    per = modulation_per(seq, groups)                              # 10 = 4 groups of 3 (ComfyUI: repeat 3, cut)
    rep = lambda e: torch.repeat_interleave(e, per, dim=1)[:, :seq]  # noqa: E731  (ComfyUI's repeat_e)
    want = torch.addcmul(rep(shift), nn.functional.layer_norm(x, (k,), eps=1e-6), 1 + rep(scale))
    got = norm_modulate_reference(x.reshape(-1, k), 1e-6, None, None, shift, scale, seq, per)
    torch.testing.assert_close(got.reshape(b, seq, k), want)


def test_norm_modulate_rejects_bad_modulation():
    x = torch.randn(6, 32, device=DEVICE)
    with pytest.raises(ValueError, match="modulation"):
        norm_modulate_triton(x, 1e-6, shift=x.new_zeros(2, 1, 16), scale=x.new_zeros(2, 1, 16), seq=3)
    with pytest.raises(ValueError, match="batches"):
        norm_modulate_triton(x, 1e-6, shift=x.new_zeros(4, 1, 32), scale=x.new_zeros(4, 1, 32), seq=3)


# -- RMSNorm + RoPE --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,head_dim,dtype", [(256, 128, torch.bfloat16), (384, 64, torch.float32)])
def test_rms_norm_rope_kernel_matches_reference(d, head_dim, dtype):
    g = torch.Generator().manual_seed(d)
    grid = (2, 2, 3)
    seq, b = 12, 2
    x = (2 * torch.randn(b * seq, d, generator=g)).to(DEVICE, dtype)
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(DEVICE, dtype)
    freqs = rope_freqs(grid, head_dim, device=DEVICE).reshape(seq, head_dim // 2, 2, 2)
    y = rms_norm_rope_triton(x, w, 1e-6, freqs, head_dim, seq)
    ref = rms_norm_rope_reference(x.double(), w, 1e-6, freqs, head_dim, seq)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=2e-5, atol=2e-5 * float(ref.abs().max()))
    else:
        close_to_ulp(y, ref.to(dtype), dtype)
    y0 = rms_norm_rope_triton(x, w, 1e-6, None, head_dim, seq)     # no RoPE: RMSNorm only
    close_to_ulp(y0, rms_norm_rope_reference(x.double(), w, 1e-6, None, head_dim, seq).to(dtype), dtype) \
        if dtype != torch.float32 else None


def test_rms_norm_rope_reference_is_rmsnorm_then_wan_rope():
    """The reference against nn.RMSNorm + the model's apply_rope (a second implementation), float64."""
    g = torch.Generator().manual_seed(5)
    grid, d, hd, b = (2, 2, 2), 256, 128, 2
    seq = 8
    x = torch.randn(b, seq, d, generator=g, dtype=torch.float64)
    norm = nn.RMSNorm(d, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64))
    freqs = rope_freqs(grid, hd)
    want = apply_rope(norm(x).view(b, seq, d // hd, hd), freqs.double()).reshape(b * seq, d)
    got = rms_norm_rope_reference(x.reshape(-1, d), norm.weight, 1e-6, freqs, hd, seq)
    torch.testing.assert_close(got, want)


# -- the GEMM's block epilogue and pre-quantized input ------------------------------------------------------------
def _linear_case(m=17, k=64, n=48, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = quantize_weight(0.05 * torch.randn(n, k, generator=g).to(DEVICE))
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    bias = (0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    res = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    gate = torch.randn(1, 2, n, generator=g).to(DEVICE, dtype)
    return w, x, bias, res, gate


@pytest.mark.parametrize("act,with_res,with_gate,dtype,variant", [
    (1, False, False, torch.bfloat16, None), (0, True, True, torch.float32, None),
    (0, True, False, torch.float16, "persistent"), (1, True, True, torch.bfloat16, "persistent")])
def test_gemm_block_epilogue(act, with_res, with_gate, dtype, variant):
    from wan_int8.kernels.triton_gemm import int8_gemm
    w, x, bias, res, gate = _linear_case(dtype=dtype)
    m = x.shape[0]
    xq, sx = quantize_activation(x)
    epi = dict(act=act, residual=res if with_res else None, gate=gate if with_gate else None, seq=m, per=9)
    out = int8_gemm(xq, w.qdata, sx, w.scale, bias, dtype, variant=variant, **epi)
    ref = block_epilogue_reference(_gemm_dequant(xq, sx, w, bias).double(), **epi)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    else:
        close_to_ulp(out, ref.to(dtype), dtype)


def test_gated_rows_follow_repeat_e():
    gate = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    rows = gated_rows(gate, 14, 7, modulation_per(7, 3))
    want = torch.repeat_interleave(gate, 3, dim=1)[:, :7].reshape(14, 1)
    assert torch.equal(rows, want)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_op_prequantized_input_and_epilogue(backend, force_kernel):
    """`int8_linear(codes, sx=...)` equals the op on the float input; the epilogue equals torch after the op."""
    force_kernel(backend)
    w, x, bias, res, gate = _linear_case(m=20, seed=4)
    x3 = x.reshape(2, 10, -1)
    xq, sx = quantize_activation(x)
    plain = int8_linear(x3, w.qdata, w.scale, bias, name="pre")
    pre = int8_linear(xq.reshape(2, 10, -1), w.qdata, w.scale, bias, name="pre", sx=sx, out_dtype=torch.bfloat16)
    assert pre.shape == plain.shape and pre.dtype == torch.bfloat16
    assert torch.equal(pre, plain)
    epi = int8_linear(x3, w.qdata, w.scale, bias, name="pre", act=1, residual=res, gate=gate.expand(2, 2, -1),
                      seq=10, per=5)
    want = block_epilogue_reference(int8_linear(x3, w.qdata, w.scale, bias, out_dtype=torch.float32).reshape(20, -1)
                                    .double(), act=1, residual=res, gate=gate.expand(2, 2, -1), seq=10, per=5)
    close_to_ulp(epi.reshape(20, -1), want.to(torch.bfloat16), torch.bfloat16)
    with pytest.raises(ValueError, match="pre-quantized"):
        int8_linear(x3, w.qdata, w.scale, sx=sx)


# -- the fused block -------------------------------------------------------------------------------------------
def _block_case(rotate=False, groups=1, seed=0, dtype=torch.bfloat16):
    from wan_int8.models.tiny_wan import build_tiny_wan
    torch.manual_seed(seed)
    model = build_tiny_wan(layers=1, dtype=dtype, seed=seed).to(DEVICE)
    quantize_model(model, QuantizeConfig(include=(r"blocks\.",), rotate=rotate))
    block = model.blocks[0]
    with torch.no_grad():
        block.modulation.copy_(0.1 * torch.randn(block.modulation.shape).to(DEVICE))
    g = torch.Generator().manual_seed(seed + 1)
    grid = (3, 2, 2)
    seq = 12
    x = torch.randn(2, seq, 256, generator=g).to(DEVICE, dtype)
    e = (0.1 * torch.randn(2, groups, 6, 256, generator=g)).to(DEVICE, dtype)
    ctx = torch.randn(2, 5, 256, generator=g).to(DEVICE, dtype)
    return model, block, x, e, rope_freqs(grid, 128, device=DEVICE), ctx


def _exact_block(block, x, e, freqs, ctx):
    """The same INT8 block evaluated in float64 (dequantized weights, float64 activations): the reference both the
    fused and the unfused bf16 runs are measured against."""
    from wan_int8.layers import float_weight
    import copy
    ref = copy.deepcopy(block)
    for name, mod in list(ref.named_modules()):
        if hasattr(mod, "int8_weight"):
            lin = nn.Linear(mod.in_features, mod.out_features, dtype=torch.float64, device=mod.weight.device)
            with torch.no_grad():
                lin.weight.copy_(float_weight(mod))
                lin.bias.copy_(mod.bias.double())
            parent, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(parent), leaf, lin)
    ref = ref.double()
    with torch.no_grad():
        return ref(x.double(), e.double(), freqs.double(), ctx.double())


@pytest.mark.parametrize("rotate,groups,kernel,dtype", [(False, 1, "triton", torch.float32),
                                                        (True, 3, "triton", torch.float32),
                                                        (False, 3, "reference", torch.bfloat16),
                                                        (True, 1, "reference", torch.bfloat16)])
def test_fused_block_matches_unfused(rotate, groups, kernel, dtype, force_kernel):
    """bf16 runs use the reference GEMM on the CPU: the interpreter casts fp32 to bf16 by truncation (GPUs round to
    nearest), a bias that the residual stream accumulates; on a GPU every case runs the Triton GEMM."""
    force_kernel("triton" if DEVICE != "cpu" else kernel)
    model, block, x, e, freqs, ctx = _block_case(rotate, groups, dtype=dtype)
    assert fused_block_unavailable(block, x) is None
    with torch.no_grad():
        unfused = block(x, e, freqs, ctx)
        fused = fused_block_forward(block, x, e, freqs, ctx)
    exact = _exact_block(block, x, e, freqs, ctx)
    e_unf, e_fus = rel_error(unfused, exact), rel_error(fused, exact)
    assert e_fus <= 1.1 * e_unf + 1e-4, (e_fus, e_unf)
    # fp32, unrotated: the same codes, so the same output to fp32 rounding.  Rotated: the shared codes come from
    # the Triton rotated quantizer (another summation order: a rare ±1 code, which attention spreads over the
    # batch's tokens); bf16: the unfused block's extra roundings
    limit = 1e-5 if dtype == torch.float32 and not rotate else 1e-2
    assert rel_error(fused, unfused) < limit


@pytest.mark.parametrize("rank", [8, 80])
def test_fused_model_with_lora(rank, force_kernel):
    """A LoRA stack on every block linear: fused into the GEMM epilogue with the rest (rank 8), or the separate
    low-rank pass with the epilogue in torch after it (rank 80, above the fusion limit); same outputs as unfused."""
    from wan_int8.lora import apply_loras, parse_tensors, remove_loras
    force_kernel("triton")
    model, block, x, e, freqs, ctx = _block_case(seed=2, dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    t = {}
    for name, (n, k) in {"self_attn.q": (256, 256), "self_attn.o": (256, 256), "ffn.0": (512, 256),
                         "ffn.2": (256, 512), "cross_attn.o": (256, 256)}.items():
        base = f"diffusion_model.blocks.0.{name}"
        t[f"{base}.lora_down.weight"] = 0.1 * torch.randn(rank, k, generator=g)   # moved to the model's device
        t[f"{base}.lora_up.weight"] = 0.1 * torch.randn(n, rank, generator=g)
    with torch.no_grad():
        y0 = fused_block_forward(block, x, e, freqs, ctx)
        apply_loras(model, [(parse_tensors(t), 0.7)])
        unfused = block(x, e, freqs, ctx)
        block.fused = True
        fused = block(x, e, freqs, ctx)
        block.fused = False
        remove_loras(model)
        y1 = fused_block_forward(block, x, e, freqs, ctx)
    assert rel_error(fused, unfused) < 1e-5
    assert rel_error(fused, y0) > 5e-2                        # the LoRA changed the output ...
    assert torch.equal(y1, y0)                                # ... and removing it restores it exactly


def test_fused_block_says_why_not():
    model, block, x, e, freqs, ctx = _block_case()
    block.ffn[1] = nn.GELU()
    assert "GELU" in fused_block_unavailable(block, x)


@pytest.mark.skipif(DEVICE == "cpu", reason="the TMA persistent GEMM is Hopper-only")
@pytest.mark.parametrize("variant", ["tma", None])
def test_gemm_block_epilogue_big_m_gpu(variant):
    """M > 1024 on Hopper: the persistent TMA kernel (and the default choice) with GELU and the gated residual."""
    from wan_int8.kernels.triton_gemm import int8_gemm, tma_supported
    if variant == "tma" and tma_supported(torch.device(DEVICE)) is not None:
        pytest.skip("no TMA on this GPU")
    w, x, bias, res, gate = _linear_case(m=2100, k=256, n=384, seed=7)
    xq, sx = quantize_activation(x)
    for epi in (dict(act=1), dict(residual=res, gate=gate, seq=2100, per=1050), dict(residual=res)):
        out = int8_gemm(xq, w.qdata, sx, w.scale, bias, torch.bfloat16, variant=variant, **epi)
        ref = block_epilogue_reference(_gemm_dequant(xq, sx, w, bias).double(), **epi)
        close_to_ulp(out, ref.to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("halves", [False, True])
def test_gemm_block_epilogue_tma_halves(halves, monkeypatch):
    """The persistent TMA kernel with the half-tile stores (EPI=1): the block epilogue on the whole tile, or per
    stored half (POST_HALVES); ragged N so the second half is partly outside."""
    from wan_int8.kernels import triton_gemm
    if triton_gemm.tma_supported(torch.device(DEVICE)) is not None:
        pytest.skip("no TMA here")
    monkeypatch.setattr(triton_gemm, "POST_HALVES", halves)
    monkeypatch.setattr(triton_gemm, "_PLANS", {})   # plans are per process: decide again with this setting
    w, x, bias, res, gate = _linear_case(m=40, k=64, n=56, seed=8)
    xq, sx = quantize_activation(x)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1, EPI=1)
    for epi in (dict(act=1), dict(residual=res, gate=gate, seq=40, per=20)):
        out = triton_gemm.int8_gemm(xq, w.qdata, sx, w.scale, bias, torch.bfloat16, variant="tma", config=cfg, **epi)
        ref = block_epilogue_reference(_gemm_dequant(xq, sx, w, bias).double(), **epi)
        close_to_ulp(out, ref.to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("seq,per,groups", [(300, 300, 1), (600, 300, 2), (520, 260, 2)])
def test_gemm_gated_residual_two_row_gate(seq, per, groups, monkeypatch):
    """The TMA half-tile epilogue with the residual through a descriptor and the gate as two row vectors
    (GATE_TWO: runs of >= 256 rows per gate row), across batch and gate-row boundaries inside tiles."""
    from wan_int8.kernels import triton_gemm
    if triton_gemm.tma_supported(torch.device(DEVICE)) is not None:
        pytest.skip("no TMA here")
    monkeypatch.setattr(triton_gemm, "POST_HALVES", True)
    monkeypatch.setattr(triton_gemm, "_PLANS", {})
    g = torch.Generator().manual_seed(seq)
    b, k, n = 2, 32, 64
    m = b * seq
    w = quantize_weight(0.05 * torch.randn(n, k, generator=g).to(DEVICE))
    xq, sx = quantize_activation(torch.randn(m, k, generator=g).to(DEVICE))
    res = torch.randn(m, n, generator=g).to(DEVICE, torch.bfloat16)
    gate = torch.randn(b, groups, n, generator=g).to(DEVICE, torch.bfloat16)
    cfg = dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1, EPI=1)
    out = triton_gemm.int8_gemm(xq, w.qdata, sx, w.scale, None, torch.bfloat16, variant="tma", config=cfg,
                                residual=res, gate=gate, seq=seq, per=per)
    ref = block_epilogue_reference(_gemm_dequant(xq, sx, w, None).double(), residual=res, gate=gate, seq=seq, per=per)
    close_to_ulp(out, ref.to(torch.bfloat16), torch.bfloat16)


def test_fused_block_compiles_without_graph_breaks(force_kernel):
    """torch.compile(fullgraph=True) traces the fused block: its passes and the INT8 linears are custom ops."""
    force_kernel("reference")
    model, block, x, e, freqs, ctx = _block_case(dtype=torch.float32)

    def f(x):
        return fused_block_forward(block, x * 1.0, e, freqs, ctx)

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-5)


def test_shared_quantization_key_compares_sign_vectors():
    """Layers share one quantization only with the same rotation: kind, group and sign vector (by value)."""
    from wan_int8.fused import _same_key
    s1 = torch.tensor([1.0, -1.0, 1.0, 1.0])
    assert _same_key(("regular", 4, s1), ("regular", 4, s1.clone()))
    assert not _same_key(("regular", 4, s1), ("regular", 4, -s1))
    assert not _same_key(("regular", 4, s1), ("regular", 4, None))
    assert not _same_key(("regular", 4, None), ("regular", 8, None))
    assert _same_key(("none", 0, None), ("none", 0, None))


@pytest.mark.parametrize("groups,act", [(1, 0), (3, 1)])
def test_torch_epilogue_matches_the_kernel_contract(groups, act):
    """`epilogue_torch` (ComfyUI's math: GELU, addcmul with repeat_e, in the model dtype; where the GEMM does not
    apply the epilogue) against the fp32 contract `block_epilogue_reference`, to bf16 rounding."""
    from wan_int8.fused import epilogue_torch
    g = torch.Generator().manual_seed(groups)
    b, seq, n = 2, 10, 48
    y = torch.randn(b * seq, n, generator=g).to(DEVICE, torch.bfloat16)
    res = torch.randn(b * seq, n, generator=g).to(DEVICE, torch.bfloat16)
    gate = torch.randn(b, groups, n, generator=g).to(DEVICE, torch.bfloat16)
    per = modulation_per(seq, groups)
    got = epilogue_torch(y, act, res, gate, seq, per)
    want = block_epilogue_reference(y.double(), act, res, gate, seq, per)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    assert torch.equal(epilogue_torch(y, 0, res), res + y)
