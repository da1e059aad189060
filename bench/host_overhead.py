"""Host (Python) time per eager INT8 linear call, on the CPU, with the GPU launch itself stubbed out.

    python bench/host_overhead.py            # no GPU needed

What it times: our wrappers (`quantize_activation_triton` + `int8_gemm`, `triton_int8_linear`, and the
public op `ops.int8_linear` with dispatch), each call after the first taking the cached plan and the direct
launch path of `triton_launch.Launcher` -- up to the compiled kernel's launcher, which is replaced by a no-op
(so cuLaunchKernel and the launcher's argument packing, ~3-5 us per kernel on a real GPU, are NOT included).
The real eager numbers come from bench/kernel_sweep.py's `small` section ("host us/call").
"""
from __future__ import annotations

import os
import sys
import time
import types

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


class _FakeKernel:
    function = None
    packed_metadata = None

    def __init__(self):
        self.calls = 0

    def run(self, *args):
        self.calls += 1

    def launch_metadata(self, *args):
        return None


def main():
    import triton
    from triton.runtime.jit import JITFunction

    from wan_int8.kernels import triton_gemm, triton_launch
    from wan_int8.kernels.triton_backend import TRITON_BACKEND, triton_int8_linear
    from wan_int8.kernels.triton_gemm import int8_gemm
    from wan_int8.kernels.triton_quant import quantize_activation_triton
    from wan_int8.kernels.registry import ROT_KINDS, LinearCall
    from wan_int8.quant.int8 import quantize_weight
    from wan_int8.quant.types import Rotation

    fake = _FakeKernel()
    JITFunction.run = lambda self, *a, **k: fake              # no compile, no launch
    triton_launch._STATE.update(direct=True, get_device=lambda: 0, get_stream=lambda d: 0,
                                knobs=types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))
    triton_gemm.set_config_override([dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4,
                                          num_stages=4)])
    k = n = 5120
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    wt = quantize_weight(w, "row")
    wr = quantize_weight(w, "row", rotation=Rotation("regular", 256))
    x = torch.randn(16, k).to(torch.bfloat16)

    def timeit(fn, n_calls=2000):
        fn()
        fn()
        t = time.perf_counter()
        for _ in range(n_calls):
            fn()
        return (time.perf_counter() - t) / n_calls * 1e6

    rows = []

    def direct(wt=wt, rot="none", g=0, signs=None):
        xq, sx = quantize_activation_triton(x, rot, g, signs)
        return int8_gemm(xq, wt.qdata, sx, wt.scale, None, torch.bfloat16)
    rows.append(("quantize + int8_gemm (plain)", timeit(direct)))
    rows.append(("quantize + int8_gemm (rot256)", timeit(lambda: direct(wr, "regular", 256, wr.rotation.signs))))
    xq, sx = quantize_activation_triton(x)
    rows.append(("int8_gemm alone", timeit(lambda: int8_gemm(xq, wt.qdata, sx, wt.scale, None, torch.bfloat16))))
    rows.append(("quantize alone", timeit(lambda: quantize_activation_triton(x))))
    call = LinearCall(x, wt.qdata, wt.scale, None, None, None, 0, 0, x.dtype, "l")
    rows.append(("triton_int8_linear(call)", timeit(lambda: triton_int8_linear(call))))
    # the public op, dispatch forced to triton (its CPU refusal bypassed: the launches are stubbed)
    from wan_int8.config import update_settings
    from wan_int8.kernels.ops import int8_linear
    TRITON_BACKEND.check = lambda call: None
    update_settings(force_kernel="triton")
    rows.append(("ops.int8_linear (plain)", timeit(lambda: int8_linear(x, wt.qdata, wt.scale, name="l"))))
    rows.append(("ops.int8_linear (rot256)", timeit(lambda: int8_linear(
        x, wr.qdata, wr.scale, None, None, "regular", 256, wr.rotation.signs, "l"))))
    rows.append(("torch.empty x3 (reference)", timeit(lambda: (torch.empty((16, k), dtype=torch.int8),
                                                              torch.empty(16), torch.empty((16, n))))))
    assert fake.calls > 0, "the direct launch path was not taken"
    print(f"host time per call, CPU {triton.__version__}, launches stubbed ({fake.calls} direct launches):")
    for name, us in rows:
        print(f"  {name:<36} {us:7.1f} us")
    _ = ROT_KINDS
    return 0


if __name__ == "__main__":
    sys.exit(main())
