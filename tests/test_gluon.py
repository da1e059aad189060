"""Gluon kernels other than attention (tests/test_attention.py has that one): the warp-specialised GEMMs.

Gluon has no CPU interpreter: on a CPU only the checks that say where a kernel can run are tested; with
WAN_INT8_TEST_DEVICE=cuda on a Hopper GPU (Triton 3.6) the kernels run against float64 references.
"""
import os

DEVICE = os.environ.get("WAN_INT8_TEST_DEVICE", "cpu")
if DEVICE == "cpu":   # as the other kernel test files: the Triton kernels imported with us run interpreted
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from wan_int8.kernels import gluon_gemm  # noqa: E402


def _operands(m, n, k, seed, device="cpu", grouped=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    sx = torch.rand(m, generator=g) * 1e-2 + 1e-3
    sw = torch.rand(n, k // 128, generator=g) * 1e-2 + 1e-3
    if not grouped:
        sw = sw[:, 0].contiguous()
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    return [t.to(device) for t in (a, b, sx, sw, bias)]


def _reference(a, b, sx, sw, bias):
    """float64: per 128-wide K-group, the exact integer dot times that group's scale, summed; then sx and bias
    (row scales: one group spanning K)."""
    m, k = a.shape
    if sw.dim() == 1:
        y = (a.double() @ b.double().t()) * sw.double()[None, :] * sx.double()[:, None]
        return y if bias is None else y + bias.double()[None, :]
    parts = torch.einsum("mgk,ngk->mng", a.double().view(m, -1, 128), b.double().view(b.shape[0], -1, 128))
    y = (parts * sw.double()[None]).sum(-1) * sx.double()[:, None]
    return y if bias is None else y + bias.double()[None, :]


def test_ws_gemm_says_where_it_cannot_run():
    a, b, sx, sw, _ = _operands(8, 16, 256, seed=0)
    assert "groups of 128" in gluon_gemm.unavailable(a, b, torch.ones(16, 4))          # groups of 64
    assert "row [N] or group" in gluon_gemm.unavailable(a, b, torch.ones(15))
    assert "multiple of 128" in gluon_gemm.unavailable(a[:, :200], b[:, :200], torch.ones(16))
    assert "K-contiguous" in gluon_gemm.unavailable(a.t().contiguous().t(), b, sw)
    if DEVICE == "cpu":
        assert gluon_gemm.unavailable(a, b, sw) is not None                              # no Hopper GPU here
        with pytest.raises(RuntimeError, match="Gluon GEMM"):
            gluon_gemm.ws_gemm(a, b, sx, sw)


@pytest.mark.parametrize("grouped", [True, False], ids=["group128", "row"])
@pytest.mark.parametrize("m,n,k,with_bias,group_m", [(300, 200, 512, True, 8), (128, 128, 128, False, 8),
                                                     (1000, 384, 1280, True, 8), (1000, 1024, 384, False, 3)])
def test_ws_gemm_matches_float64(m, n, k, with_bias, group_m, grouped):
    """GPU (Hopper) only: fp32 output within one rounding per K-group of the float64 result (rtol 1e-5 of the
    row's magnitude, as for the Triton GEMMs); ragged M and N; bf16 output within bf16 rounding.  GROUP_M=3 over
    8 row tiles leaves a short last group (tile order must still cover every tile once)."""
    a, b, sx, sw, bias = _operands(m, n, k, seed=m + n + k, device=DEVICE, grouped=grouped)
    if gluon_gemm.unavailable(a, b, sw) is not None:
        pytest.skip(gluon_gemm.unavailable(a, b, sw))
    bias = bias if with_bias else None
    ref = _reference(a, b, sx, sw, bias)
    out = gluon_gemm.ws_gemm(a, b, sx, sw, bias, torch.float32, group_m=group_m)
    scale = ref.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    assert ((out.double() - ref).abs() / scale).max() < 1e-5
    out16 = gluon_gemm.ws_gemm(a, b, sx, sw, bias, torch.bfloat16)
    assert ((out16.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6 * scale).all()
    if grouped:   # the three-consumer variant (192-row tiles, three 64-row A loads per stage)
        out3 = gluon_gemm.ws_gemm(a, b, sx, sw, bias, torch.float32, group_m=group_m, consumers=3)
        assert ((out3.double() - ref).abs() / scale).max() < 1e-5


def test_int8_gemm_takes_the_gluon_kernel_only_where_it_should():
    """The Triton GEMM's dispatcher: on a CPU (interpreter) a forced "gluon" variant is refused with the reason;
    on a Hopper GPU (Triton 3.6) a large-M row-scale call runs the Gluon plan and matches float64, a small-M
    call and a call with an fp32 LoRA keep the Triton kernel."""
    from wan_int8.kernels import triton_gemm
    m = 1040 if DEVICE == "cuda" else 32
    a, b, sx, sw, bias = _operands(m, 256, 256, seed=5, device=DEVICE, grouped=False)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="Gluon GEMM cannot run"):
            triton_gemm.int8_gemm(a, b, sx, sw, None, torch.float32, variant="gluon")
        return
    if gluon_gemm.unavailable(a, b, sw) is not None:
        pytest.skip(gluon_gemm.unavailable(a, b, sw))
    triton_gemm._PLANS.clear()
    out = triton_gemm.int8_gemm(a, b, sx, sw, bias, torch.float32)
    kinds = [type(p[0]).__name__ for p in triton_gemm._PLANS.values()]
    assert kinds == ["_GluonPlan"]
    ref = _reference(a, b, sx, sw, bias)
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert ((out.double() - ref).abs() / scale).max() < 1e-5
    triton_gemm.int8_gemm(a[:512], b, sx[:512], sw, bias, torch.float32)
    lt = torch.randn(m, 16, device=DEVICE)
    triton_gemm.int8_gemm(a, b, sx, sw, bias, torch.float32, lora_t=lt, lora_b=torch.randn(256, 16, device=DEVICE))
    kinds = [type(p[0]).__name__ for p in triton_gemm._PLANS.values()]
    assert kinds.count("_GluonPlan") == 1 and len(kinds) == 3


@pytest.mark.parametrize("grouped", [True, False], ids=["group128", "row"])
@pytest.mark.parametrize("act,res", [(1, 0), (0, 2), (0, 1), (1, 1)], ids=["gelu", "residual", "gated", "gelu-gated"])
def test_ws_gemm_block_epilogue_matches_float64(act, res, grouped):
    """GPU (Hopper) only: GELU (tanh) and the (gated) residual in the epilogue against float64 (the gate's rows
    change inside a 64-row consumer tile: batches of 500 tokens, gate rows of 256 tokens)."""
    from wan_int8.quant.int8 import gated_rows
    m, n, k, seq, per = 1000, 384, 512, 500, 256
    a, b, sx, sw, bias = _operands(m, n, k, seed=11 + act + res, device=DEVICE, grouped=grouped)
    if gluon_gemm.unavailable(a, b, sw) is not None:
        pytest.skip(gluon_gemm.unavailable(a, b, sw))
    g = torch.Generator().manual_seed(3)
    y = _reference(a, b, sx, sw, bias)
    if act:
        y = 0.5 * y * (1 + torch.tanh(0.7978845608028654 * (y + 0.044715 * y ** 3)))
    for out_dtype in (torch.float32, torch.bfloat16):
        residual = gate = None
        ref = y
        if res:
            residual = torch.randn(m, n, generator=g).to(DEVICE, out_dtype)
            gate = torch.randn(2, 2, n, generator=g).to(DEVICE) if res == 1 else None
            ref = residual.double() + (y * gated_rows(gate.double(), m, seq, per) if res == 1 else y)
        out = gluon_gemm.ws_gemm(a, b, sx, sw, bias, out_dtype, act=act, residual=residual, gate=gate,
                                 seq=seq, per=per)
        scale = ref.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        if out_dtype == torch.float32:
            assert ((out.double() - ref).abs() / scale).max() < 1e-5
        else:
            assert ((out.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-5 * scale).all()


def test_int8_gemm_sends_block_epilogues_to_the_gluon_kernel():
    """GPU (Hopper) only: a GELU call and a gated-residual call through `int8_gemm` run Gluon plans and match the
    torch epilogue reference; a gate whose rows are shared by runs shorter than 256 tokens keeps the Triton
    kernel."""
    from wan_int8.kernels import triton_gemm
    from wan_int8.quant.int8 import block_epilogue_reference
    m, n, k = 2048, 256, 256
    a, b, sx, sw, bias = _operands(m, n, k, seed=21, device=DEVICE, grouped=False)
    if gluon_gemm.unavailable(a, b, sw) is not None:
        pytest.skip(gluon_gemm.unavailable(a, b, sw))
    g = torch.Generator().manual_seed(4)
    residual = torch.randn(m, n, generator=g).to(DEVICE, torch.float32)
    gate = torch.randn(2, 1, n, generator=g).to(DEVICE)
    y = _reference(a, b, sx, sw, bias)
    triton_gemm._PLANS.clear()
    out = triton_gemm.int8_gemm(a, b, sx, sw, bias, torch.float32, act=1, residual=residual, gate=gate, seq=1024)
    ref = block_epilogue_reference(y, 1, residual.double(), gate.double(), 1024, 1024)
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert ((out.double() - ref).abs() / scale).max() < 1e-5
    assert [type(p[0]).__name__ for p in triton_gemm._PLANS.values()] == ["_GluonPlan"]
    short = torch.randn(2, 8, n, generator=g).to(DEVICE)          # gate rows of 128 tokens
    out = triton_gemm.int8_gemm(a, b, sx, sw, bias, torch.float32, residual=residual, gate=short, seq=1024, per=128)
    ref = block_epilogue_reference(y, 0, residual.double(), short.double(), 1024, 128)
    assert ((out.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)).max() < 1e-5
    assert [type(p[0]).__name__ for p in triton_gemm._PLANS.values()].count("_GluonPlan") == 1


@pytest.mark.parametrize("grouped", [True, False], ids=["group128", "row"])
@pytest.mark.parametrize("rank,act,res", [(16, 0, 0), (96, 0, 0), (64, 1, 1)], ids=["r16", "r96", "r64-gelu-gated"])
def test_ws_gemm_lora_epilogue_matches_float64(rank, act, res, grouped):
    """GPU (Hopper) only: `y += t · Bᵀ` (bf16 operands; 96 ranks = two 64-rank chunks, the second zero-filled past
    R) after the bias and before GELU and the gated residual, against float64."""
    from wan_int8.quant.int8 import gated_rows
    m, n, k, seq = 1000, 384, 512, 500
    a, b, sx, sw, bias = _operands(m, n, k, seed=31 + rank, device=DEVICE, grouped=grouped)
    if gluon_gemm.unavailable(a, b, sw) is not None:
        pytest.skip(gluon_gemm.unavailable(a, b, sw))
    g = torch.Generator().manual_seed(rank)
    lt = (torch.randn(m, rank, generator=g) * 1e-1).to(DEVICE, torch.bfloat16)
    lb = (torch.randn(n, rank, generator=g) * 1e-1).to(DEVICE, torch.bfloat16)
    y = _reference(a, b, sx, sw, bias) + lt.double() @ lb.double().t()
    residual = gate = None
    if act:
        y = 0.5 * y * (1 + torch.tanh(0.7978845608028654 * (y + 0.044715 * y ** 3)))
    if res:
        residual = torch.randn(m, n, generator=g).to(DEVICE)
        gate = torch.randn(2, 1, n, generator=g).to(DEVICE)
        y = residual.double() + y * gated_rows(gate.double(), m, seq, seq)
    out = gluon_gemm.ws_gemm(a, b, sx, sw, bias, torch.float32, act=act, residual=residual, gate=gate, seq=seq,
                             lora_t=lt, lora_b=lb)
    scale = y.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    assert ((out.double() - y).abs() / scale).max() < 1e-5


def test_int8_gemm_sends_bf16_loras_to_the_gluon_kernel():
    """GPU (Hopper) only: a bf16 rank-32 LoRA through `int8_gemm` runs a Gluon plan; a stacked rank of 192 (over
    the Gluon epilogue's 128) keeps the Triton kernel; both match float64.  On a CPU: the reasons."""
    from wan_int8.kernels import triton_gemm
    if DEVICE == "cpu":
        t = torch.zeros(4, 192, dtype=torch.bfloat16)
        assert "at most 128" in gluon_gemm.lora_unsupported(t, torch.zeros(8, 192, dtype=torch.bfloat16))
        assert "bf16 or fp16" in gluon_gemm.lora_unsupported(t.float(), torch.zeros(8, 192))
        assert "TMA-loadable" in gluon_gemm.lora_unsupported(t[:, 1:25], torch.zeros(8, 24, dtype=torch.bfloat16))
        return
    m, n, k = 2048, 256, 256
    a, b, sx, sw, bias = _operands(m, n, k, seed=41, device=DEVICE, grouped=False)
    if gluon_gemm.unavailable(a, b, sw) is not None:
        pytest.skip(gluon_gemm.unavailable(a, b, sw))
    g = torch.Generator().manual_seed(5)
    triton_gemm._PLANS.clear()
    for rank in (32, 192):
        lt = (torch.randn(m, rank, generator=g) * 1e-1).to(DEVICE, torch.bfloat16)
        lb = (torch.randn(n, rank, generator=g) * 1e-1).to(DEVICE, torch.bfloat16)
        out = triton_gemm.int8_gemm(a, b, sx, sw, bias, torch.float32, lora_t=lt, lora_b=lb)
        ref = _reference(a, b, sx, sw, bias) + lt.double() @ lb.double().t()
        assert ((out.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)).max() < 1e-5
    assert [type(p[0]).__name__ for p in triton_gemm._PLANS.values()] == ["_GluonPlan", "Launcher"]


@pytest.fixture
def fake_hopper(monkeypatch):
    """CPU (interpreter) only: the GEMM dispatcher takes the device for a Hopper GPU, the log-once registry starts
    empty, and the Triton GEMM uses one small configuration.  Yields the `triton_gemm` module."""
    from wan_int8 import logs
    from wan_int8.kernels import triton_gemm
    if DEVICE != "cpu":
        pytest.skip("a CPU check of the dispatcher")
    monkeypatch.setattr(triton_gemm, "_arch_cached", lambda device: "hopper")
    monkeypatch.setattr(logs, "_LOGGED", set())
    triton_gemm.set_config_override([dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4,
                                          num_stages=1)])
    yield triton_gemm
    triton_gemm.set_config_override(None)


def _gluon_notes(caplog):
    return [r for r in caplog.records if "Gluon" in r.getMessage()]


def test_dispatcher_logs_once_why_a_hopper_call_keeps_the_triton_gemm(fake_hopper, monkeypatch, caplog):
    """A call the Gluon GEMM would take but cannot run (here: its own check refuses) runs the Triton kernel,
    correct against float64, and the log says why once for the two calls; a call it is not meant for
    (M <= 1024) logs nothing."""
    import logging
    monkeypatch.setattr(gluon_gemm, "unavailable", lambda a, b, sw: "Triton 9.9: the Gluon GEMM is tested with 3.6")
    a, b, sx, sw, bias = _operands(1040, 32, 128, seed=7, grouped=False)
    with caplog.at_level(logging.INFO, logger="wan_int8.kernels"):
        out = fake_hopper.int8_gemm(a, b, sx, sw, bias, torch.float32)
        fake_hopper.int8_gemm(a, b[:16], sx, sw[:16], None, torch.float32)
        fake_hopper.int8_gemm(a[:64], b, sx[:64], sw, None, torch.float32)
    ref = _reference(a, b, sx, sw, bias)
    assert ((out.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)).max() < 1e-5
    notes = [r.getMessage() for r in _gluon_notes(caplog)]
    assert len(notes) == 1 and "Triton 9.9" in notes[0] and "the Triton kernel runs" in notes[0]


def test_a_gluon_build_failure_falls_back_to_the_triton_gemm_with_a_warning(fake_hopper, monkeypatch, caplog):
    """With a device that accepts the call: when the Gluon kernel fails to build (a compiler error, e.g. an
    untested Triton), the call runs the Triton kernel, matches float64, and the log warns once with the error;
    an error that is not a build failure propagates."""
    import logging

    class CompilationError(Exception):   # the name the backend's build-failure check looks for
        pass

    def broken(*args, **kwargs):
        raise CompilationError("at 12:3: unsupported layout")

    monkeypatch.setattr(gluon_gemm, "unavailable", lambda a, b, sw: None)
    monkeypatch.setattr(gluon_gemm, "launch", broken)
    a, b, sx, sw, bias = _operands(1040, 32, 128, seed=9, grouped=False)
    with caplog.at_level(logging.INFO, logger="wan_int8.kernels"):
        out = fake_hopper.int8_gemm(a, b, sx, sw, bias, torch.float32)
    monkeypatch.setattr(gluon_gemm, "launch", lambda *x, **y: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fake_hopper.int8_gemm(a, b[:16], sx, sw[:16], None, torch.float32)
    ref = _reference(a, b, sx, sw, bias)
    assert ((out.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)).max() < 1e-5
    warned = _gluon_notes(caplog)
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING and "unsupported layout" in warned[0].getMessage()
