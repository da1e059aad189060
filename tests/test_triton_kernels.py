"""Triton kernels against the torch oracle (quant.int8), on the CPU interpreter (TRITON_INTERPRET=1).

Tolerances, and why (GPU compile of every kernel variant for sm_80/89/90 was also checked offline with
triton.compile(target=GPUTarget(...)); sm_75 cannot lower an int8 tl.dot, so the backend refuses Turing):
- Unrotated activation codes and scales: bit-exact (absmax is exact, division is IEEE `div_rn`, rounding is
  exact half-to-even).
- Rotated codes: the kernel sums the ±1 Hadamard products in a different order than torch's fp32 matmul, so
  the rotated value can differ by a few fp32 ulps; a code then differs by ±1 only where x/s is within those ulps
  of a .5 boundary.  We allow |diff| <= 1 on at most 0.2% of codes (observed: none at these sizes), and scales
  within 4 fp32 ulps.
- GEMM fp32 outputs: the int32 accumulator is exact and the epilogue follows the oracle's operation order, so
  they agree to a few fp32 ulps (an FMA contraction saves one rounding): rtol 1e-6 of the row's magnitude
  (group scales: 1e-5, one rounding per K-group).  bf16/fp16 outputs: within 1 ulp of the output type of
  the oracle's value (the interpreter casts fp32->bf16 by truncation; GPUs round to nearest even).
- Fused LoRA epilogue: the oracle's fp32 output plus the float64 t·Bᵀ, cast once: the same 1-ulp rule (fp32
  outputs: rtol 2e-6, the fp32 dot sums R terms).  The interpreter's bf16 tl.dot is wrong, so there the kernel
  upcasts the LoRA operands (LORA_F32=1); the bf16 wgmma path is checked by an offline sm_90 compile.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from wan_int8.kernels.registry import ROT_KINDS, KernelRegistry, LinearCall  # noqa: E402
from wan_int8.quant.int8 import _gemm_dequant, int8_linear_reference, quantize_activation, quantize_weight  # noqa: E402
from wan_int8.quant.types import Int8Weight, Rotation  # noqa: E402

M_VALUES = (1, 2, 15, 16, 17, 33)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture(autouse=True, scope="module")
def _tiny_configs():
    from wan_int8.kernels import triton_gemm
    triton_gemm.set_config_override([dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)])
    yield
    triton_gemm.set_config_override(None)


def _activation(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    cols = torch.randperm(k, generator=g)[: min(8, k)]
    x[:, cols] *= 20.0  # outlier channels
    return x.to(dtype)


def _signs(k, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(torch.float32)


def _check_codes(q, s, qr, sr, exact):
    assert q.dtype == torch.int8 and q.is_contiguous()
    assert not bool((q == -128).any()), "some codes were never written (poison value left)"
    assert bool(torch.isfinite(s).all()), "some scales were never written"
    diff = (q.to(torch.int16) - qr.to(torch.int16)).abs()
    if exact:
        assert torch.equal(q, qr), f"{int((diff > 0).sum())} codes differ"
        assert torch.equal(s, sr)
    else:
        assert int(diff.max()) <= 1
        assert float((diff > 0).float().mean()) <= 2e-3
        torch.testing.assert_close(s, sr, rtol=4 * 2.0 ** -23, atol=0)


ROTATIONS = [None, ("regular", 16, False), ("regular", 64, True), ("sylvester", 32, True), ("regular", 256, True)]


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("rot", ROTATIONS, ids=lambda r: "none" if r is None else f"{r[0]}{r[1]}{'s' if r[2] else ''}")
def test_quantizer_matches_reference(m, rot):
    from wan_int8.kernels.triton_quant import quantize_activation_triton
    seed = 1000 * m + (0 if rot is None else rot[1])
    dtype = DTYPES[(m + (0 if rot is None else rot[1])) % 3]
    k = {None: 96, 16: 96, 64: 320, 32: 96, 256: 512}[None if rot is None else rot[1]]
    if rot is not None and rot[1] == 256 and m not in (1, 17):
        pytest.skip("group 256 checked at two M values to keep the interpreter run short")
    x = _activation(m, k, dtype, seed)
    signs = _signs(k, seed) if rot is not None and rot[2] else None
    rotation = Rotation(rot[0], rot[1], signs) if rot else None
    q = torch.full((m, k), -128, dtype=torch.int8)
    s = torch.full((m,), float("nan"))
    quantize_activation_triton(x, rot[0] if rot else "none", rot[1] if rot else 0, signs, out=q, out_scale=s)
    qr, sr = quantize_activation(x, rotation)
    _check_codes(q, s, qr, sr, exact=rot is None)


@pytest.mark.parametrize("case", ["strided", "two_pass", "static", "static_rot", "zero_rows", "chunk_loop"])
def test_quantizer_paths(case):
    from wan_int8.kernels.triton_quant import quantize_activation_triton
    if case == "strided":   # a non-contiguous view: transposed storage
        x = _activation(40, 17, torch.bfloat16, 7).t()
        q, s = quantize_activation_triton(x)
        _check_codes(q, s, *quantize_activation(x), exact=True)
    elif case == "two_pass":  # K above the one-pass register limit, ragged against the 4096 chunk
        x = _activation(3, 16384 + 64, torch.float16, 8)
        q, s = quantize_activation_triton(x)
        _check_codes(q, s, *quantize_activation(x), exact=True)
    elif case == "static":
        x = _activation(5, 96, torch.bfloat16, 9)
        inp = torch.tensor(0.05)
        q, s = quantize_activation_triton(x, input_scale=inp)
        _check_codes(q, s, *quantize_activation(x, input_scale=inp), exact=True)
    elif case == "static_rot":
        x = _activation(17, 64, torch.float32, 10)
        inp = torch.tensor(0.03)
        q, s = quantize_activation_triton(x, "regular", 16, input_scale=inp)
        _check_codes(q, s, *quantize_activation(x, Rotation("regular", 16), input_scale=inp), exact=False)
    elif case == "chunk_loop":   # the small-shared-memory variant (RTX 30xx/40xx with G=256)
        x = _activation(17, 512, torch.bfloat16, 12)
        signs = _signs(512, 12)
        q, s = quantize_activation_triton(x, "regular", 256, signs, chunk_loop=True)
        _check_codes(q, s, *quantize_activation(x, Rotation("regular", 256, signs)), exact=False)
    else:
        x = torch.zeros(4, 48, dtype=torch.bfloat16)
        q, s = quantize_activation_triton(x)
        _check_codes(q, s, *quantize_activation(x), exact=True)


def _weight(n, k, granularity, group, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    return quantize_weight(w, granularity, group_size=group or 128)


def _assert_gemm_close(y, ref, out_dtype, group):
    assert bool(torch.isfinite(y).all()), "some outputs were never written (NaN poison left)"
    if out_dtype == torch.float32:
        rtol = 1e-5 if group else 1e-6
        scale = ref.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        assert float(((y - ref).abs() / scale).max()) <= rtol
    else:
        r = ref.to(out_dtype).float()
        ulp = torch.finfo(out_dtype).eps * torch.maximum(r.abs(), y.float().abs()).clamp_min(torch.finfo(out_dtype).tiny)
        assert bool(((y.float() - r).abs() <= ulp * 1.01).all())


GEMM_SHAPES = [(40, 96), (24, 320), (64, 384)]


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("mode", ["tensor", "row", "group"])
def test_gemm_matches_reference(m, mode):
    from wan_int8.kernels.triton_gemm import int8_gemm
    i = M_VALUES.index(m) + 3 * ["tensor", "row", "group"].index(mode)
    n, k = GEMM_SHAPES[i % 3]
    group = 0 if mode != "group" else next(g for g in (128, 64, 32) if k % g == 0)
    out_dtype = DTYPES[i % 3]
    w = _weight(n, k, mode, group, seed=i)
    x = _activation(m, k, torch.bfloat16, seed=50 + i)
    xq, sx = quantize_activation(x)
    bias = torch.randn(n) if i % 2 == 0 else None
    ref = _gemm_dequant(xq, sx, w, bias)
    out = torch.full((m, n), float("nan"), dtype=out_dtype)
    y = int8_gemm(xq, w.qdata, sx, w.scale, bias, out_dtype, out=out)
    assert y.data_ptr() == out.data_ptr()
    _assert_gemm_close(y, ref, out_dtype, group)


def test_gemm_strided_operands_and_k_tail():
    from wan_int8.kernels.triton_gemm import int8_gemm
    a = torch.randint(-127, 128, (33, 2 * 100), dtype=torch.int8)[:, ::2]   # K=100: ragged against BLOCK_K=32
    b = torch.randint(-127, 128, (100, 17), dtype=torch.int8).t()           # [17, 100], K-stride != 1
    sx, sw = torch.rand(33) * 0.01, torch.rand(17) * 0.01
    ref = _gemm_dequant(a, sx, Int8Weight(b, sw), None)
    y = int8_gemm(a, b, sx, sw, None, torch.float32, out=torch.full((33, 17), float("nan")))
    _assert_gemm_close(y, ref, torch.float32, 0)


def _call(x, w, bias=None):
    rot = w.rotation
    return LinearCall(x, w.qdata, w.scale, bias, w.input_scale, rot.signs if rot else None,
                      ROT_KINDS.index(rot.kind) if rot else 0, rot.group_size if rot else 0, x.dtype, "test")


@pytest.mark.parametrize("granularity,rot", [("row", None), ("row", ("regular", 64)), ("group", ("regular", 16)),
                                             ("tensor", ("sylvester", 32))])
def test_backend_end_to_end(granularity, rot):
    from wan_int8.kernels.triton_backend import check, register_triton_backends, triton_int8_linear
    k, n, m = 128, 48, 17
    rotation = Rotation(rot[0], rot[1], _signs(k, 3)) if rot else None
    g = torch.Generator().manual_seed(5)
    w = quantize_weight(torch.randn(n, k, generator=g) * 0.02, granularity, group_size=64, rotation=rotation)
    x = _activation(m, k, torch.bfloat16, 11)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    call = _call(x, w, bias)
    assert check(call) is None
    y = triton_int8_linear(call)
    ref = int8_linear_reference(x, w, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    # ±1 code differences (rotation, rounding ties) move an output by at most one code's worth of x·w.
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    registry = KernelRegistry()
    register_triton_backends(registry)
    assert registry.get("triton") is not None and registry.get("triton").priority == 10


def test_check_reasons(monkeypatch):
    from wan_int8.kernels.triton_backend import check
    w = _weight(32, 96, "row", 0, 1)
    x = _activation(4, 96, torch.bfloat16, 1)
    assert check(_call(x, w)) is None
    bad_rot = LinearCall(x, w.qdata, w.scale, None, None, None, ROT_KINDS.index("regular"), 32, x.dtype)
    assert "group" in check(bad_rot)
    assert "dtype" in check(_call(x.to(torch.float64), w))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CPU" in check(_call(x, w))


def test_rounding_ties_and_bounds():
    """Exact half-even rounding (the 1.5*2^23 add) on values placed exactly on .5 boundaries, and the clamp."""
    from wan_int8.kernels.triton_quant import quantize_activation_triton
    k = 64
    codes = torch.arange(-127, 128, dtype=torch.float32)
    vals = torch.cat([codes + 0.5, codes - 0.5, codes])[:k * 6].reshape(6, k)
    vals[:, 0] = 127.0   # absmax 127 -> scale exactly 1
    q, s = quantize_activation_triton(vals)
    _check_codes(q, s, *quantize_activation(vals), exact=True)


@pytest.mark.parametrize("m,dtype,signs", [(1, torch.float32, True), (9, torch.bfloat16, False), (17, torch.float16, True)])
@pytest.mark.parametrize("kind", ["regular", "sylvester"])
def test_kron_rotated_quantizer(m, dtype, signs, kind):
    """One-pass Kronecker (16x16 ⊗ 16x16) rotation for g=256, K not a power of two (padded columns)."""
    from wan_int8.kernels.triton_quant import quantize_activation_triton
    k = 768
    x = _activation(m, k, dtype, 300 + m)
    sg = _signs(k, m) if signs else None
    q = torch.full((m, k), -128, dtype=torch.int8)
    s = torch.full((m,), float("nan"))
    quantize_activation_triton(x, kind, 256, sg, out=q, out_scale=s, config=dict(method="kron", BLOCK_M=2, SPLIT=0))
    qr, sr = quantize_activation(x, Rotation(kind, 256, sg))
    # two 16-term sums instead of one 256-term sum: the rotated absmax can move by a few more fp32 ulps
    torch.testing.assert_close(s, sr, rtol=16 * 2.0 ** -23, atol=0)
    _check_codes(q, sr, qr, sr, exact=False)


KRON_VARIANTS = [dict(SPLIT=3), dict(SPLIT=2, F16=True), dict(SPLIT=3, PIECES=True),
                 dict(SPLIT=2, F16=True, PIECES=True), dict(SPLIT=2, F16=True, PIECES=True, BATCHED=False),
                 dict(SPLIT=3, BLOCK_M=2, PIECES=True), dict(SPLIT=2, F16=True, BLOCK_M=2, num_stages=1)]


@pytest.mark.parametrize("cfg", KRON_VARIANTS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("m,k,signs", [(5, 1280, True), (2, 768, False)])
def test_kron_split_variants(cfg, m, k, signs):
    """The sweep's Kronecker variants (16-bit split stage 2, fp16 pieces with the power-of-two row pre-scale,
    K in power-of-two pieces) within the rotated-code tolerance.  Under the interpreter the 16-bit dots run as
    exact fp32 dots of the same pieces (EMU), so this checks the split arithmetic, not the tensor cores."""
    from wan_int8.kernels.triton_quant import quantize_activation_triton
    x = _activation(m, k, torch.bfloat16, 900 + k + m)
    x[-1] *= 3e4   # a large row: the fp16 pieces must stay in range through the pre-scale
    sg = _signs(k, m) if signs else None
    q = torch.full((m, k), -128, dtype=torch.int8)
    s = torch.full((m,), float("nan"))
    quantize_activation_triton(x, "regular", 256, sg, out=q, out_scale=s, config=dict(method="kron", **cfg))
    qr, sr = quantize_activation(x, Rotation("regular", 256, sg))
    torch.testing.assert_close(s, sr, rtol=16 * 2.0 ** -23, atol=0)
    _check_codes(q, sr, qr, sr, exact=False)


@pytest.mark.parametrize("cfg,max_frac", [(dict(SPLIT=2), 2e-3), (dict(SPLIT=1), 0.2), (dict(SPLIT=1, F16=True), 0.05)])
def test_kron_low_precision_variants(cfg, max_frac):
    """Cheaper stage 2 (bf16 hi+lo, one bf16 or fp16 dot): still ±1 codes, only a larger mismatch fraction
    (the sweep measures it on the GPU; here bf16 casts truncate, so it is pessimistic)."""
    from wan_int8.kernels.triton_quant import quantize_activation_triton
    m, k = 8, 1280
    x = _activation(m, k, torch.bfloat16, 77)
    q, s = quantize_activation_triton(x, "regular", 256, config=dict(method="kron", **cfg))
    qr, sr = quantize_activation(x, Rotation("regular", 256))
    diff = (q.to(torch.int16) - qr.to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= max_frac
    torch.testing.assert_close(s, sr, rtol=1e-2, atol=0)


def test_kron_factorisation_matches_hadamard():
    from wan_int8.kernels.triton_quant import KRON_GROUPS, pm1_hadamard
    for kind in ("regular", "sylvester"):
        for g, g1 in KRON_GROUPS.items():
            h1 = pm1_hadamard(kind, g1, torch.float64, torch.device("cpu"))
            assert torch.equal(torch.kron(h1, h1), pm1_hadamard(kind, g, torch.float64, torch.device("cpu")))


@pytest.mark.parametrize("variant", ["persistent", "tma"])
@pytest.mark.parametrize("mode", ["tensor", "row", "group"])
def test_persistent_gemm(variant, mode):
    from wan_int8.kernels.triton_gemm import int8_gemm, tma_supported
    if variant == "tma" and tma_supported(torch.device("cpu")) is not None:
        pytest.skip(f"tensor descriptors unavailable: {tma_supported(torch.device('cpu'))}")
    m, n, k = 37, 80, 256
    w = _weight(n, k, mode, 64 if mode == "group" else 0, seed=7)
    x = _activation(m, k, torch.bfloat16, seed=8)
    xq, sx = quantize_activation(x)
    bias = torch.randn(n) if mode == "row" else None
    ref = _gemm_dequant(xq, sx, w, bias)
    out = torch.full((m, n), float("nan"), dtype=torch.float32)
    y = int8_gemm(xq, w.qdata, sx, w.scale, bias, torch.float32, out=out, variant=variant)
    _assert_gemm_close(y, ref, torch.float32, 64 if mode == "group" else 0)


def test_quantizer_plans_reused_across_m():
    """Second and later calls of a signature take the cached plan (direct launch path): still exact."""
    from wan_int8.kernels.triton_quant import quantize_activation_triton
    signs = _signs(512, 4)
    for m in (70, 93, 65):
        x = _activation(m, 96, torch.bfloat16, 600 + m)
        _check_codes(*quantize_activation_triton(x), *quantize_activation(x), exact=True)
        xr = _activation(m, 512, torch.float32, 700 + m)
        q, s = quantize_activation_triton(xr, "regular", 256, signs)
        _check_codes(q, s, *quantize_activation(xr, Rotation("regular", 256, signs)), exact=False)
        q, s = quantize_activation_triton(xr, "sylvester", 32)
        _check_codes(q, s, *quantize_activation(xr, Rotation("sylvester", 32)), exact=False)


@pytest.mark.parametrize("k", [96, 1000, 5120])
def test_quantizer_k_pieces(k):
    """The row as up to three power-of-two pieces (no masked-off registers for K=5120)."""
    from wan_int8.kernels.triton_quant import k_pieces, quantize_activation_triton
    b1, b2, b3 = k_pieces(k)
    assert b1 + b2 + b3 >= k and b1 + b2 < k + (b3 == 0) * b2 + 1 and b1 >= b2 >= b3
    x = _activation(3, k, torch.bfloat16, k)
    q, s = quantize_activation_triton(x, config=dict(PIECES=True, BLOCK_M=2, num_warps=4))
    _check_codes(q, s, *quantize_activation(x), exact=True)


def test_k_pieces_table():
    from wan_int8.kernels.triton_quant import k_pieces
    assert k_pieces(5120) == (4096, 1024, 0)
    assert k_pieces(13824) == (8192, 4096, 2048)
    assert k_pieces(4096) == (4096, 0, 0)
    assert k_pieces(96) == (64, 32, 0)


@pytest.mark.parametrize("fold,bk", [(0, 64), (1, 64), (2, 64), (1, 32)])
def test_group_fold_variants(fold, bk):
    """Group-scale fold: cvt (0), exact magic-number int->float (1), deferred by one K step (2)."""
    from wan_int8.kernels.triton_gemm import _c, int8_gemm
    m, n, k = 33, 48, 320
    w = _weight(n, k, "group", 64, seed=20 + fold)
    x = _activation(m, k, torch.bfloat16, seed=30 + fold)
    xq, sx = quantize_activation(x)
    ref = _gemm_dequant(xq, sx, w, None)
    out = torch.full((m, n), float("nan"), dtype=torch.float32)
    y = int8_gemm(xq, w.qdata, sx, w.scale, None, torch.float32, out=out,
                  config=_c(16, 32, bk, 4, 1, 2, FOLD=fold))
    _assert_gemm_close(y, ref, torch.float32, 64)
    # a second call of the same signature goes through the cached plan
    y2 = int8_gemm(xq, w.qdata, sx, w.scale, None, torch.float32, config=_c(16, 32, bk, 4, 1, 2, FOLD=fold))
    assert torch.equal(y, y2)


def test_i2f_exact_range():
    """The magic-number conversion is exact over the whole range a 256-group partial can take."""
    import triton.language as tl
    from wan_int8.kernels.triton_gemm import _i2f_exact

    @triton.jit
    def k_(x_ptr, y_ptr, B: tl.constexpr):
        o = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(y_ptr + o, _i2f_exact(tl.load(x_ptr + o)))
    k_.fn.__globals__["_i2f_exact"] = _i2f_exact
    lim = 256 * 128 * 127
    v = torch.cat([torch.arange(-lim, -lim + 512), torch.arange(-300, 300), torch.arange(lim - 512, lim),
                   torch.randint(-lim, lim, (1024 - 512 * 2 - 600 + 1024,))]).to(torch.int32)
    v = v[: (v.numel() // 256) * 256]
    y = torch.empty(v.numel(), dtype=torch.float32)
    k_[(v.numel() // 256,)](v, y, B=256)
    assert torch.equal(y, v.to(torch.float32))


@pytest.mark.parametrize("epi", [1, 2])
def test_tma_epilogue_variants(epi):
    from wan_int8.kernels.triton_gemm import _c, int8_gemm, tma_supported
    if tma_supported(torch.device("cpu")) is not None:
        pytest.skip(f"tensor descriptors unavailable: {tma_supported(torch.device('cpu'))}")
    m, n, k = 37, 80, 256
    w = _weight(n, k, "row", 0, seed=9)
    x = _activation(m, k, torch.bfloat16, seed=10)
    xq, sx = quantize_activation(x)
    bias = torch.randn(n)
    ref = _gemm_dequant(xq, sx, w, bias)
    out = torch.full((m, n), float("nan"), dtype=torch.float32)
    y = int8_gemm(xq, w.qdata, sx, w.scale, bias, torch.float32, out=out, variant="tma",
                  config=_c(16, 32, 32, 4, 1, 2, EPI=epi))
    _assert_gemm_close(y, ref, torch.float32, 0)


def test_launcher_spec_and_tail():
    """The direct-launch key covers what Triton specializes on; the constexpr tail follows the signature."""
    from wan_int8.kernels.triton_launch import Launcher, _spec
    from wan_int8.kernels.triton_quant import _quant_rows_kernel
    t = torch.zeros(8)
    assert _spec((t, 1, 16, 17, 2.0)) != _spec((t, 2, 16, 17, 2.0))
    assert _spec((t, 3, 32, 17, 2.0)) == _spec((t, 5, 48, 33, 3.0))
    assert _spec((t[1:], 3)) != _spec((t, 3))
    assert _spec((t, 1 << 31)) != _spec((t, 16))
    from triton.runtime.jit import JITFunction
    jf = JITFunction(_quant_rows_kernel.fn)   # the interpreter hands out InterpretedFunction (no params)
    ln = Launcher(jf, dict(BLOCK_M=2, BLOCK_K=64, ONE_PASS=True, STATIC=False, BK2=32),
                  dict(num_warps=4))
    assert ln._n_rt == 8
    assert ln._tail == (2, 64, True, False, False, 32, 0)


# -- LoRA up-projection fused into the GEMM epilogue ------------------------------------------------------------
def _lora_operands(m, n, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(m, r, generator=g) * 0.5).to(dtype)
    b = (torch.randn(n, r, generator=g) * 0.3).to(dtype)
    return t, b


LORA_CASES = [  # (variant, mode, m, n, k, r, out dtype): ragged M/N against 16x32 tiles, R not a multiple of 16
    ("ptr", "row", 37, 80, 128, 20, torch.float32),
    ("ptr", "tensor", 17, 48, 96, 40, torch.bfloat16),
    ("ptr", "group", 33, 72, 128, 64, torch.float16),
    ("ptr", "row", 1, 40, 64, 7, torch.bfloat16),
    ("persistent", "row", 37, 80, 128, 20, torch.float32),
    ("persistent", "group", 23, 56, 128, 36, torch.bfloat16),
    ("persistent", "tensor", 40, 64, 96, 64, torch.float16),
    ("tma", "row", 37, 80, 256, 24, torch.float32),     # LoRA tiles by TMA (zero fill past M and R)
    ("tma", "group", 29, 72, 128, 40, torch.bfloat16),  # TMA, R_PAD 64 > R
    ("tma", "tensor", 21, 48, 96, 6, torch.float32),    # 24-byte rows: not TMA-loadable, pointer loads
]


@pytest.mark.parametrize("variant,mode,m,n,k,r,out_dtype", LORA_CASES)
def test_gemm_lora_epilogue(variant, mode, m, n, k, r, out_dtype):
    """y = oracle + t·Bᵀ (float64 term), summed before the one cast: to the output dtype's rounding."""
    from wan_int8.kernels.triton_gemm import int8_gemm, tma_supported
    if variant == "tma" and tma_supported(torch.device("cpu")) is not None:
        pytest.skip(f"tensor descriptors unavailable: {tma_supported(torch.device('cpu'))}")
    group = 64 if mode == "group" else 0
    seed = m * 7 + r
    w = _weight(n, k, mode, group, seed=seed)
    x = _activation(m, k, torch.bfloat16, seed=seed + 1)
    xq, sx = quantize_activation(x)
    bias = torch.randn(n) if m % 2 else None
    t, b = _lora_operands(m, n, r, torch.float32 if out_dtype == torch.float32 else out_dtype, seed + 2)
    lora = t.double() @ b.double().t()
    ref = (_gemm_dequant(xq, sx, w, bias).double() + lora)
    out = torch.full((m, n), float("nan"), dtype=out_dtype)
    y = int8_gemm(xq, w.qdata, sx, w.scale, bias, out_dtype, out=out, variant=variant, lora_t=t, lora_b=b)
    assert lora.abs().max() > 0.1 * ref.abs().max()   # the LoRA term is not negligible here
    if out_dtype == torch.float32:
        assert bool(torch.isfinite(y).all())
        scale = ref.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        assert float(((y.double() - ref).abs() / scale).max()) <= 2e-6   # fp32 sums over K-groups and R
    else:
        _assert_gemm_close(y, ref, out_dtype, group)
    # the cached plan (second call) gives the same; without LoRA operands, the plain GEMM
    y2 = int8_gemm(xq, w.qdata, sx, w.scale, bias, out_dtype, variant=variant, lora_t=t, lora_b=b)
    assert torch.equal(y, y2)
    plain = int8_gemm(xq, w.qdata, sx, w.scale, bias, out_dtype, variant=variant)
    _assert_gemm_close(plain, _gemm_dequant(xq, sx, w, bias), out_dtype, group)


def test_gemm_lora_rejects_bad_operands():
    from wan_int8.kernels.triton_gemm import int8_gemm
    w = _weight(32, 64, "row", 0, 1)
    xq, sx = quantize_activation(_activation(5, 64, torch.bfloat16, 1))
    t, b = _lora_operands(5, 32, 8, torch.bfloat16, 2)
    with pytest.raises(ValueError):
        int8_gemm(xq, w.qdata, sx, w.scale, lora_t=t, lora_b=b[:16])
    with pytest.raises(ValueError):
        int8_gemm(xq, w.qdata, sx, w.scale, lora_t=t, lora_b=b.float())


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_int8_linear_lora_backends(backend):
    """`ops.int8_linear(lora_t=, lora_b=)`: every backend adds the term; 3-D x with a [M, R] or [..., R] t."""
    from wan_int8.config import get_settings, set_settings, update_settings
    from wan_int8.kernels.ops import int8_linear
    from wan_int8.kernels.registry import REGISTRY, dispatch_key
    k, n, r = 96, 48, 12
    w = _weight(n, k, "row", 0, 3)
    x = _activation(2 * 9, k, torch.bfloat16, 4).reshape(2, 9, k)
    t, b = _lora_operands(18, n, r, torch.bfloat16, 5)
    bias = torch.randn(n).to(torch.bfloat16)
    old = get_settings()
    try:
        update_settings(force_kernel=backend)
        y = int8_linear(x, w.qdata, w.scale, bias, name="lora-test", lora_t=t.reshape(2, 9, r), lora_b=b)
        y_flat_t = int8_linear(x, w.qdata, w.scale, bias, name="lora-test", lora_t=t, lora_b=b)
        y0 = int8_linear(x, w.qdata, w.scale, bias, name="lora-test")
    finally:
        set_settings(old)
    xq, sx = quantize_activation(x.reshape(-1, k))
    ref = (_gemm_dequant(xq, sx, w, bias).double() + t.double() @ b.double().t()).reshape(2, 9, n)
    assert y.shape == (2, 9, n) and torch.equal(y, y_flat_t)
    _assert_gemm_close(y.reshape(-1, n), ref.reshape(-1, n), torch.bfloat16, 0)
    # unfused (the old path): the INT8 output rounded to bf16, then addmm_ in bf16: equal to bf16 rounding
    unfused = y0.clone().reshape(-1, n).addmm_(t, b.t()).reshape(2, 9, n)
    assert float((y.float() - unfused.float()).abs().max()) <= 2 * torch.finfo(torch.bfloat16).eps * float(ref.abs().max())
    call = LinearCall(x.reshape(-1, k), w.qdata, w.scale, None, None, None, 0, 0, x.dtype, "l", t, b)
    assert dispatch_key(call).endswith("|lora12") and "lora" not in dispatch_key(_call(x.reshape(-1, k), w))
    assert REGISTRY is not None


def test_layer_lora_fused_matches_unfused():
    """An INT8 layer with a LoRA stack on the Triton backend: fused epilogue == unfused `apply` to bf16 rounding;
    dense deltas are added after the fused GEMM; removing the LoRA is bit-exact."""
    from torch import nn
    from wan_int8.config import get_settings, set_settings, update_settings
    from wan_int8.layers import Int8Linear
    from wan_int8.lora import apply_loras, parse_tensors, remove_loras
    from wan_int8.lora import runtime
    n, k = 80, 96
    g = torch.Generator().manual_seed(21)
    model = nn.Module()
    model.q = Int8Linear.from_linear(nn.Linear(k, n), name="q")
    model.q.bias.data = model.q.bias.data.to(torch.bfloat16)
    model.dtype = torch.bfloat16
    x = _activation(3 * 11, k, torch.bfloat16, 22).reshape(3, 11, k)
    t1 = {"diffusion_model.q.lora_down.weight": torch.randn(8, k, generator=g) * 0.2,
          "diffusion_model.q.lora_up.weight": torch.randn(n, 8, generator=g) * 0.2,
          "diffusion_model.q.alpha": torch.tensor(4.0)}
    t2 = {"diffusion_model.q.lora_down.weight": torch.randn(12, k, generator=g) * 0.2,
          "diffusion_model.q.lora_up.weight": torch.randn(n, 12, generator=g) * 0.2}
    t3 = {"diffusion_model.q.diff": torch.randn(n, k, generator=g) * 0.01}
    old = get_settings()
    try:
        update_settings(force_kernel="triton")
        y0 = model.q(x)
        for files in ([t1], [t1, t2], [t1, t2, t3]):
            apply_loras(model, [(parse_tensors(t, f"l{i}"), 0.8 - 0.5 * i) for i, t in enumerate(files)])
            fused = model.q(x)
            runtime.FUSE = False
            try:
                unfused = model.q(x)
            finally:
                runtime.FUSE = True
            ref = unfused.float()
            tol = 2 * torch.finfo(torch.bfloat16).eps * float(ref.abs().max())
            assert float((fused.float() - ref).abs().max()) <= tol
            assert float((fused.float() - y0.float()).abs().max()) > 10 * tol   # the LoRA is there
        remove_loras(model)
        assert torch.equal(model.q(x), y0)
    finally:
        set_settings(old)
    from wan_int8.kernels.registry import REGISTRY
    assert any(backend == "triton" and "K=96 N=80" in shape for backend, shape in REGISTRY.stats())
    assert any(backend == "triton" for backend, _ in REGISTRY.stats())


def test_lora_constexprs_and_flatten_prune():
    import triton as _triton
    from wan_int8.kernels.triton_gemm import _prune_configs, lora_constexprs
    assert lora_constexprs(None, True) == dict(HAS_LORA=False)
    c = lora_constexprs((torch.bfloat16, 64, 64, 64, True), True)
    assert c["LORA_TMA"] and c["R_PAD"] % c["R_CHUNK"] == 0 and c["R_PAD"] >= 64
    c = lora_constexprs((torch.bfloat16, 20, 20, 20, False), True)
    assert not c["LORA_TMA"] and c["R_PAD"] == 32 and not c["EVEN_R"]
    assert "LORA_TMA" not in lora_constexprs((torch.bfloat16, 64, 64, 64, True), False)
    cfgs = [_triton.Config(dict(BLOCK_M=16, FLATTEN=True)), _triton.Config(dict(BLOCK_M=16, FLATTEN=False))]
    assert len(_prune_configs(cfgs, {}, HAS_LORA=True, LORA_TMA=True, R_PAD=256)) == 1
    assert len(_prune_configs(cfgs, {}, HAS_LORA=True, LORA_TMA=True, R_PAD=64)) == 2
    assert len(_prune_configs(cfgs, {}, HAS_LORA=False)) == 2



_HOPPER_COMPILE = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wan_int8.kernels import triton_gemm as tg
out = []
for persistent, r, lora_tma in [(True, 64, True), (True, 20, False), (False, 40, False)]:
    jf = tg._int8_gemm_persistent_kernel if persistent else tg._int8_gemm_kernel
    consts = dict(SW_MODE=1, GROUP_K=0, HAS_BIAS=True, FOLD=0, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8,
                  stride_ak=1, stride_bk=1, stride_cn=1)
    consts.update(dict(NUM_SMS=132, USE_TMA=True, WARP_SPEC=False, FLATTEN=False, EPI=1) if persistent else
                  dict(EVEN_K=True))
    consts.update(tg.lora_constexprs((torch.bfloat16, r, r, r, lora_tma), persistent))
    types = dict(a_ptr="*i8", b_ptr="*i8", c_ptr="*bf16", sx_ptr="*fp32", sw_ptr="*fp32", bias_ptr="*bf16",
                 t_ptr="*bf16", lb_ptr="*bf16")
    sig, attrs = {}, {}
    for i, name in enumerate(jf.arg_names):
        const = jf.params[i].is_constexpr or name in consts
        sig[name] = "constexpr" if const else types.get(name, "i32")
        if not const and (name in types or name in ("K", "N", "stride_am", "stride_bn", "stride_cm", "stride_tm",
                                                    "stride_lbn")):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if jf.params[i].is_constexpr and name not in consts:
            consts[name] = jf.params[i].default
    k = triton.compile(ASTSource(jf, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=8, num_stages=3))
    out.append(dict(persistent=persistent, r=r, lora_tma=consts.get("LORA_TMA", False), shared=k.metadata.shared,
                    wgmma=k.asm["ptx"].count("wgmma.mma_async")))
print("RESULT " + json.dumps(out))
"""


def test_lora_epilogue_compiles_for_hopper():
    """The GPU-only LoRA paths (bf16 wgmma dots, TMA tile loads, masked pointer loads) lower for sm_90 at the
    Hopper default tiles and fit its shared memory.  An offline compile in a subprocess (no GPU needed, and
    outside the interpreter, which runs only the fp32-upcast path here)."""
    import json
    import subprocess
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"no offline compile API: {exc}")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "Unsupported .version" in proc.stderr:
        pytest.skip("offline ptxas too old for this Triton")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for row in rows:
        assert row["shared"] <= 232448, row               # H100: 227 KB per block
        assert row["wgmma"] > 8, row                       # the LoRA dots are tensor-core (wgmma) dots
    assert rows[0]["lora_tma"] and not rows[1]["lora_tma"]
