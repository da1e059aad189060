"""INT8 attention: the torch oracle against float64 attention, the Triton kernels against the oracle.

Runs the kernels on the CPU interpreter (TRITON_INTERPRET=1) at small sizes; with WAN_INT8_TEST_DEVICE=cuda the
same tests run on a GPU (the real fp8/int8 tensor-core paths).  Tolerances:
- quantizers: int8 codes equal the oracle's but for a code differing by 1 where a value sits within an ulp of a
  rounding boundary (the kernel multiplies by a reciprocal; the key mean is summed in another order); scales
  equal; fp8 V values equal bit for bit;
- attention: the kernel rounds P relative to a running row maximum (online softmax) where the oracle uses the
  final one, so outputs agree to the rounding of P: rel err 3e-2 (fp8 P: 3 mantissa bits) / 1e-2 (16-bit P);
  and the kernel is never much less accurate than the oracle against exact attention.
"""
import os

import pytest
import torch

DEVICE = os.environ.get("WAN_INT8_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from wan_int8.attention import (AttentionConfig, AttentionUnavailable, int8_attention,  # noqa: E402
                                int8_attention_reference, quantize_tokens_reference, quantize_v_fp8_reference, sdpa)
from wan_int8.kernels import triton_attention as ta  # noqa: E402
from wan_int8.quant.metrics import cosine, rel_error  # noqa: E402


def make_qkv(b, lq, lk, h, d, seed, dtype=torch.bfloat16, k_offset=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g)
    k = torch.randn(b, lk, h, d, generator=g) + k_offset * torch.randn(b, 1, h, d, generator=g)
    v = torch.randn(b, lk, h, d, generator=g)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def exact(q, k, v):
    return sdpa(q.double(), k.double(), v.double())


def test_config_validates_its_fields():
    with pytest.raises(ValueError, match="pv"):
        AttentionConfig(pv="int4")
    with pytest.raises(ValueError, match="backend"):
        AttentionConfig(backend="sage")


@pytest.mark.parametrize("pv_fp8,max_rel", [(True, 0.05), (False, 0.012)])
def test_reference_is_close_to_exact_attention(pv_fp8, max_rel):
    q, k, v = make_qkv(2, 64, 96, 3, 64, seed=1)
    out = int8_attention_reference(q, k, v, pv_fp8=pv_fp8)
    ref = exact(q, k, v)
    assert rel_error(out, ref) < max_rel and cosine(out, ref) > 0.999


def test_key_smoothing_removes_the_shared_offset():
    """A large shared key offset eats INT8's range unless the mean is subtracted (softmax is unchanged by it)."""
    q, k, v = make_qkv(1, 48, 64, 2, 64, seed=2, k_offset=20.0)
    ref = exact(q, k, v)
    rel_smooth = rel_error(int8_attention_reference(q, k, v, pv_fp8=False, smooth_k=True), ref)
    rel_plain = rel_error(int8_attention_reference(q, k, v, pv_fp8=False, smooth_k=False), ref)
    assert rel_smooth * 3 < rel_plain


@pytest.mark.parametrize("d", [64, 80, 128])
def test_token_quantizer_matches_the_oracle(d):
    q, k, _ = make_qkv(2, 130, 70, 2, d, seed=3, dtype=torch.float16)
    codes, scales = ta.quantize_tokens(q, None, 1.0)
    ref_codes, ref_scales = quantize_tokens_reference(q, False)
    b, l, h, _ = q.shape
    got = codes.view(b, h, -1, codes.shape[-1])
    diff = (got[:, :, :l, :d].float().cpu() - ref_codes.cpu()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert torch.equal(scales.view(b, h, -1)[:, :, :l].cpu(), ref_scales.cpu())
    assert not got[:, :, l:].any() and not got[..., d:].any(), "padding must be zero codes"
    # K: smoothed by the key mean
    mean = k.mean(dim=1, dtype=torch.float32).contiguous()
    codes, _ = ta.quantize_tokens(k, mean, 1.0, per_block=True)
    ref_codes, _ = quantize_tokens_reference(k, True, block=128)
    diff = (codes.view(b, h, -1, codes.shape[-1])[:, :, :70, :d].float().cpu() - ref_codes.cpu()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_v_fp8_quantizer_matches_the_oracle_bit_for_bit():
    _, _, v = make_qkv(1, 8, 150, 2, 64, seed=4, dtype=torch.float32)
    v = v.clone()
    v[0, :10, 0, 0] = torch.tensor([1e-6, -3e-5, 7.87, -7.87, 0.0, 447.0, 1e3, 2.0**-9, 2.0**-10, 3 * 2.0**-10])
    v[:, :, 1, 5] = 0.0                                         # an all-zero channel: scale 0, codes 0
    vt, vs = ta.quantize_v_fp8(v)
    ref, ref_s = quantize_v_fp8_reference(v)
    b, l, h, d = v.shape
    got = vt.view(b, h, vt.shape[1], -1)[:, :, :d, :l].float().transpose(-1, -2)
    assert torch.equal(got.cpu(), ref.cpu())
    assert torch.equal(vs.view(b, h, -1)[..., :d].cpu(), ref_s[:, :, 0].cpu())


CASES = [  # b, lq, lk, h, d, dtype
    (1, 1, 1, 1, 64, torch.bfloat16),
    (2, 17, 15, 2, 64, torch.bfloat16),
    (1, 130, 257, 2, 128, torch.bfloat16),
    (2, 33, 40, 1, 80, torch.float16),
    (1, 16, 129, 2, 64, torch.float32),
]


# (these key lengths are below gluon_attention.MIN_KEYS: "auto" runs the Triton kernel; the Gluon kernel has its
# own tests at the end, against this one and against exact attention)
TRITON_FP8 = AttentionConfig(pv="fp8", backend="triton")


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(str(x) for x in c[:5]) + f"-{c[5]}".replace("torch.", ""))
def test_kernel_matches_the_oracle(case, pv):
    b, lq, lk, h, d, dtype = case
    q, k, v = make_qkv(b, lq, lk, h, d, seed=lq * 7 + lk, dtype=dtype)
    out = int8_attention(q, k, v, config=AttentionConfig(pv=pv))
    assert out.shape == q.shape and out.dtype == dtype
    ref = int8_attention_reference(q, k, v, pv_fp8=pv == "fp8")
    rel = rel_error(out, ref)
    assert rel < (3e-2 if pv == "fp8" else 1e-2)
    rel_k = rel_error(out, exact(q, k, v))
    rel_o = rel_error(ref, exact(q, k, v))
    assert rel_k < 1.3 * rel_o + 2e-3


def test_kernel_takes_strided_views_and_batches_independently():
    """ComfyUI hands [B, L, H*D] tensors (views to [B, L, H, D]) or [B, H, L, D] (skip_reshape): no copies."""
    b, l, h, d = 2, 40, 2, 64
    q, k, v = make_qkv(b, l, l, h, d, seed=5)
    bhld = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]   # same values, other strides
    out = int8_attention(q, k, v)
    assert torch.equal(int8_attention(*bhld), out)
    for i in range(b):
        one = int8_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1])
        assert torch.equal(one, out[i:i + 1])


def test_cross_attention_shapes():
    q, _, _ = make_qkv(1, 50, 1, 2, 64, seed=6)
    _, k, v = make_qkv(1, 1, 23, 2, 64, seed=7)
    out = int8_attention(q, k, v)
    rel = rel_error(out, exact(q, k, v))
    assert out.shape == q.shape and rel < 0.06


def test_unavailable_is_an_error_with_the_reason(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU-only check")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 4, 4, 1, 64, seed=8)
    with pytest.raises(AttentionUnavailable, match="no CUDA device"):
        int8_attention(q, k, v)
    with pytest.raises(AttentionUnavailable, match="do not form"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        int8_attention(q, k[:, :, :, :32], v)
    # the reference backend needs no GPU
    out = int8_attention(q, k, v, config=AttentionConfig(backend="reference"))
    assert torch.equal(out, int8_attention_reference(q, k, v))


def test_compiles_without_graph_breaks():
    q, k, v = make_qkv(1, 20, 20, 2, 64, seed=9)
    cfg = AttentionConfig(backend="reference")

    def f(q, k, v):
        return int8_attention(q * 1.0, k, v, config=cfg) + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v), f(q, k, v))


@pytest.mark.parametrize("case", CASES[1:3], ids=["ragged", "d128"])
def test_pointer_and_tensor_descriptor_loads_agree(case, monkeypatch):
    """The fp8 path loads K and Vᵀ through tensor descriptors (TMA on Hopper) or plain pointers: same result."""
    b, lq, lk, h, d, dtype = case
    q, k, v = make_qkv(b, lq, lk, h, d, seed=11, dtype=dtype)
    monkeypatch.setattr(ta, "TMA_DEFAULT", True)
    tma = int8_attention(q, k, v, config=TRITON_FP8)
    monkeypatch.setattr(ta, "TMA_DEFAULT", False)
    ptr = int8_attention(q, k, v, config=TRITON_FP8)
    assert torch.equal(tma, ptr)


def test_pipelined_loop_gives_the_same_result():
    """The loop that issues the next block's Q·Kᵀ before this block's softmax computes exactly the same."""
    q, k, v = make_qkv(2, 40, 70, 2, 64, seed=12)
    try:
        outs = []
        for pipe in (True, False):   # (a GPU's fp8 dot needs K >= 32)
            ta.set_config_override([ta._cfg(32, 16, 4, 1, pipe=pipe) if DEVICE == "cpu" else ta._cfg(64, 64, 4, 2, pipe=pipe)])
            outs.append(int8_attention(q, k, v, config=AttentionConfig(backend="triton")))
    finally:
        ta.set_config_override(None)
    assert torch.equal(outs[0], outs[1])


def test_fp16_exponentials_match_fp32_ones_to_the_fp8_rounding():
    """GPU only: exp2 on fp16 pairs (fp8 P·V) against fp32 exp2: the same output up to P's fp8 rounding."""
    if DEVICE == "cpu":
        pytest.skip("inline PTX: GPU only")
    q, k, v = make_qkv(1, 300, 700, 2, 128, seed=13)
    outs = []
    for flag in (True, False):
        ta.EXP_F16_DEFAULT = flag
        outs.append(int8_attention(q, k, v, config=TRITON_FP8))
    ta.EXP_F16_DEFAULT = False
    rel = rel_error(outs[0], outs[1])
    rel16 = rel_error(outs[0], exact(q, k, v))
    rel32 = rel_error(outs[1], exact(q, k, v))
    assert rel < 2e-2 and rel16 < 1.1 * rel32 + 1e-3


def test_configs_keep_one_k_scale_per_step():
    """A step of BLOCK_N keys reads one K scale: configurations whose steps span two 128-key scale blocks are
    refused (BLOCK_N = 256 gave cosine 0.983 on an H100)."""
    with pytest.raises(ValueError, match="BLOCK_N"):
        ta.set_config_override([dict(BLOCK_M=64, BLOCK_N=256, num_warps=4, num_stages=2, WARP_SPEC=False,
                                     PIPELINE=False)])
    for arch, cfgs in ta._CONFIGS.items():
        for c in cfgs:
            ta._check_config(dict(c))


def test_gluon_kernel_is_chosen_only_where_it_can_run(monkeypatch):
    """"auto" takes the warp-specialised Gluon kernel only on Hopper with fp8 P·V; asking for it by name where
    it cannot run is an error that says why (here: the interpreter, or no Hopper GPU)."""
    from wan_int8 import attention as attn
    from wan_int8.kernels import gluon_attention as ga, gluon_common
    q, k, v = make_qkv(1, 4, 4, 1, 64, seed=14)
    _, long_k, _ = make_qkv(1, 1, ga.MIN_KEYS, 1, 64, seed=15)
    assert attn.resolve_kernel("auto", q, k, True) == "triton"        # short keys: the Triton kernel everywhere
    if DEVICE == "cpu":
        assert attn.resolve_kernel("auto", q, long_k, True) == "triton"
        with pytest.raises(AttentionUnavailable, match="interpreter"):
            int8_attention(q, k, v, config=AttentionConfig(pv="fp8", backend="gluon"))
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "Hopper" in ga.unavailable(torch.device("cpu"), 128)
    else:
        hopper = torch.cuda.get_device_capability()[0] == 9
        usable = hopper and triton.__version__.startswith(gluon_common.TESTED_TRITON)
        assert (ga.unavailable(q.device, 64) is None) == usable
        assert attn.resolve_kernel("auto", q, long_k, True) == ("gluon" if usable else "triton")
    assert "head_dim 80" in ga.unavailable(q.device, 80)
    assert attn.resolve_kernel("triton", q, long_k, True) == "triton"
    with pytest.raises(AttentionUnavailable):
        attn.resolve_kernel("gluon", q, long_k, False)       # 16-bit P·V: the Gluon kernel has none
    with pytest.raises(ValueError, match="NUM_CONSUMERS"):
        ga.set_config_override(dict(NUM_CONSUMERS=5))
        try:
            ga.attention(*([None] * 7), 1, 1, 1) if DEVICE == "cpu" else int8_attention(
                q, k, v, config=AttentionConfig(pv="fp8", backend="gluon"))
        finally:
            ga.set_config_override(None)


@pytest.mark.parametrize("consumers,stages,two_level", [(3, 3, 1), (3, 2, 0), (2, 3, 1)])
def test_gluon_kernel_matches_the_triton_kernel(consumers, stages, two_level):
    """GPU (Hopper) only: both kernels take the same quantized inputs and do the same per-block arithmetic, so
    they agree to accumulation order; ragged lengths, CFG batch, both head sizes, bf16/fp16/fp32 in and out."""
    from wan_int8.kernels import gluon_attention as ga, gluon_common
    if DEVICE == "cpu" or ga.unavailable(torch.device(DEVICE), 128) is not None:
        pytest.skip("Gluon kernel: Hopper GPU with Triton " + "/".join(gluon_common.TESTED_TRITON))
    ga.set_config_override(dict(NUM_CONSUMERS=consumers, STAGES=stages, TWO_LEVEL=two_level))
    try:
        for b, lq, lk, h, d, dtype in [(2, 300, 700, 3, 128, torch.bfloat16), (1, 129, 1000, 2, 64, torch.bfloat16),
                                       (1, 5, 77, 1, 128, torch.float16), (1, 70, 300, 2, 64, torch.float32),
                                       (1, 200, 2100, 2, 128, torch.bfloat16)]:
            q, k, v = make_qkv(b, lq, lk, h, d, seed=lq + lk, dtype=dtype)
            g = int8_attention(q, k, v, config=AttentionConfig(pv="fp8", backend="gluon"))
            assert g.dtype == dtype
            if lk >= ga.MIN_KEYS:   # "auto" runs this very kernel here
                assert torch.equal(int8_attention(q, k, v, config=AttentionConfig(pv="fp8")), g)
            t = int8_attention(q, k, v, config=TRITON_FP8)
            # (single-level: the tensor cores accumulate P·V across blocks in fp8-MMA precision)
            assert rel_error(g, t) < (2e-3 if two_level else 1e-2), (b, lq, lk, h, d)
            assert rel_error(g, exact(q, k, v)) < 1.05 * rel_error(t, exact(q, k, v)) + 1e-4
    finally:
        ga.set_config_override(None)
