"""The numerics contract (DESIGN.md §3) against independent float64 math written here."""
import pytest
import torch

from conftest import outlier_input
from wan_int8.quant import (Int8Weight, QuantFormatError, Rotation, dequantize, hadamard_matrix, int8_linear_reference,
                            int_matmul, quantize_activation, quantize_weight, rel_error, rotate, unrotate)


def ref_codes(x64, scale64):
    """Round half to even of x/scale, clamped to ±127, in float64 (independent of the library)."""
    q = x64 / scale64
    fl = torch.floor(q)
    frac = q - fl
    up = (frac > 0.5) | ((frac == 0.5) & (torch.remainder(fl, 2) == 1))
    return torch.clamp(fl + up.to(q.dtype), -127, 127)


def assert_codes_match(codes, x64, scale64):
    """Codes equal round-half-even(x/scale) except where x/scale lies within fp32 rounding of a .5 tie
    (the library divides in fp32, as the kernels do); those may differ by exactly one."""
    ref = ref_codes(x64, scale64)
    diff = (codes.to(torch.float64) - ref).abs()
    assert diff.max().item() <= 1
    quotient = x64 / scale64
    near_tie = ((quotient - torch.floor(quotient)) - 0.5).abs() <= quotient.abs() * 2 ** -23
    assert bool((near_tie | (diff == 0)).all())


def ref_linear(x, w64, bias=None):
    y = x.to(torch.float64) @ w64.t()
    return y if bias is None else y + bias.to(torch.float64)


def test_hadamard_regular_matches_definition():
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    h16 = torch.kron(h4, h4) / 4
    assert torch.equal(hadamard_matrix("regular", 16, torch.float64), h16)
    for size in (4, 16, 64, 256):
        h = hadamard_matrix("regular", size, torch.float64)
        assert torch.allclose(h @ h.t(), torch.eye(size, dtype=torch.float64), atol=1e-12)
        assert torch.equal(h, h.t())
        assert torch.allclose(h.sum(dim=1), torch.ones(size, dtype=torch.float64), atol=1e-12)  # rows sum to +1
    with pytest.raises(ValueError):
        hadamard_matrix("regular", 32)


def test_rotation_orthonormal_inverse_and_linear_invariance(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    for kind, group in (("regular", 64), ("regular", 256), ("sylvester", 128)):
        k = 512
        signs = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(torch.float64)
        x = torch.randn(7, k, generator=g, dtype=torch.float64)
        w = torch.randn(5, k, generator=g, dtype=torch.float64)
        for s in (None, signs):
            xr, wr = rotate(x, kind, group, s), rotate(w, kind, group, s)
            assert torch.allclose(xr @ wr.t(), x @ w.t(), atol=1e-10)
            assert torch.allclose(unrotate(xr, kind, group, s), x, atol=1e-12)
            assert torch.allclose(xr.norm(dim=1), x.norm(dim=1), atol=1e-10)
    with pytest.raises(ValueError):
        rotate(torch.randn(2, 100), "regular", 64)


@pytest.mark.parametrize("granularity", ["tensor", "row", "group"])
def test_weight_quantizer_codes_and_scales(granularity, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    w = torch.randn(48, 256, generator=g) * 0.02
    w[3, 17] = 0.9  # an outlier weight
    w[5] = 0.0      # an all-zero row
    q = quantize_weight(w.to(torch.bfloat16), granularity, group_size=64)
    w64 = w.to(torch.bfloat16).to(torch.float64)
    if granularity == "tensor":
        s = torch.full((48, 256), w64.abs().max().item() / 127, dtype=torch.float64)
        assert q.scale.shape == ()
    elif granularity == "row":
        s = (w64.abs().amax(1).clamp_min(1e-30) / 127)[:, None].expand(48, 256)
        assert q.scale.shape == (48,)
    else:
        s = (w64.reshape(48, 4, 64).abs().amax(2).clamp_min(1e-30) / 127).repeat_interleave(64, 1)
        assert q.scale.shape == (48, 4)
    s32 = s.to(torch.float32).to(torch.float64)  # the scale is stored in fp32
    assert_codes_match(q.qdata, w64, s32)
    assert int(q.qdata.abs().max()) <= 127
    assert torch.equal(q.qdata[5], torch.zeros(256, dtype=torch.int8))
    err = (dequantize(q, torch.float64) - w64).abs()
    assert bool((err <= s32 / 2 * (1 + 1e-4)).all())  # round to nearest: at most half a step (+ fp32 tie slack)


def test_activation_quantizer_per_token(fresh_seed):
    x = outlier_input(33, 128, fresh_seed)
    x[4] = 0.0
    q, s = quantize_activation(x)
    x64 = x.to(torch.float64)
    s_ref = (x.abs().amax(1).clamp_min(1e-30) / 127)  # fp32 division, as documented
    assert torch.equal(s, s_ref)
    assert_codes_match(q, x64, s.to(torch.float64)[:, None])
    assert torch.equal(q[4], torch.zeros(128, dtype=torch.int8))
    # static scale
    q2, s2 = quantize_activation(x, input_scale=torch.tensor(0.05))
    assert torch.equal(s2, torch.full((33,), 0.05))
    assert_codes_match(q2, x64, torch.tensor(0.05).double())


@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (17, 64, 24), (3, 1000, 9)])
def test_int_matmul_exact(m, k, n, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    exact = (a.to(torch.int64) @ b.to(torch.int64).t())
    assert torch.equal(int_matmul(a, b).to(torch.int64), exact)


@pytest.mark.parametrize("m", [1, 2, 15, 16, 17, 513])
@pytest.mark.parametrize("granularity", ["row", "tensor", "group"])
@pytest.mark.parametrize("rotated", [False, True])
def test_reference_linear_matches_float64_dequantized_math(m, granularity, rotated, fresh_seed):
    k, n = 256, 40
    g = torch.Generator().manual_seed(fresh_seed)
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    x = outlier_input(m, k, fresh_seed, dtype=torch.bfloat16)
    rot = Rotation("regular", 64) if rotated else None
    qw = quantize_weight(w, granularity, group_size=64, rotation=rot)
    y = int8_linear_reference(x, qw, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    # independent: rotate in float64, quantize per token (same rule), multiply dequantized codes in float64
    x64 = x.to(torch.float64)
    if rotated:
        h = hadamard_matrix("regular", 64, torch.float64)
        x64 = (x64.reshape(m, -1, 64) @ h).reshape(m, k)
    s = x64.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    xq = ref_codes(x64, s) * s
    wq = dequantize(qw, torch.float64, rotated=True)
    expected = xq @ wq.t() + bias.to(torch.float64)
    # fp32 epilogue + bf16 output: within bf16 rounding of the exact value (codes may differ at fp32 ties)
    assert rel_error(y, expected) < 4e-3
    # and the W8A8 result is close to the float linear (the quantization error itself)
    assert rel_error(y, ref_linear(x, w.double(), bias)) < (0.06 if not rotated else 0.03)


def test_rotation_reduces_error_on_outliers(fresh_seed):
    k, n, m = 512, 64, 64
    g = torch.Generator().manual_seed(fresh_seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = outlier_input(m, k, fresh_seed)
    exact = ref_linear(x, w.double())
    plain = rel_error(int8_linear_reference(x, quantize_weight(w)), exact)
    rot = rel_error(int8_linear_reference(x, quantize_weight(w, rotation=Rotation("regular", 256))), exact)
    assert rot < plain / 2


def test_validation_errors_name_the_layer():
    q = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(QuantFormatError, match="blocks.0.q"):
        Int8Weight(q, torch.ones(7)).validate("blocks.0.q")
    with pytest.raises(QuantFormatError, match="NaN"):
        Int8Weight(q, torch.tensor([float("nan")] * 8)).validate("l")
    with pytest.raises(QuantFormatError):
        quantize_weight(torch.tensor([[float("inf"), 1.0]] * 16))
    with pytest.raises(QuantFormatError):
        quantize_weight(torch.randn(8, 100), "group", group_size=64)
