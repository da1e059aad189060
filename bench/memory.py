"""Peak GPU memory of one INT8 linear call: plain vs rotated (and bf16 for reference), Wan 14B shapes.

Issue 6's target: rotation needs no extra VRAM beyond the activation buffers a plain INT8 linear already
needs. Measured as torch.cuda.max_memory_allocated() during one call, minus what was allocated before it
(input, weight, scales). Usage: python bench/memory.py [--m 32760] ; prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wan_int8.kernels.ops import int8_linear  # noqa: E402
from wan_int8.quant import Rotation, quantize_weight  # noqa: E402


def peak_extra(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32760)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    rows = []
    for k, n in ((5120, 5120), (5120, 13824), (13824, 5120)):
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda") * 0.02
        plain = quantize_weight(w)
        rot = quantize_weight(w, rotation=Rotation("regular", 256))
        wb = w.to(torch.bfloat16)
        del w
        for fn in (lambda: int8_linear(x, plain.qdata, plain.scale),
                   lambda: int8_linear(x, rot.qdata, rot.scale, rotation_kind="regular", rotation_group=256)):
            fn()  # compile / tune / measure dispatch first
        out_bytes = args.m * n * 2
        r = {"shape": f"{args.m}x{k}x{n}", "bf16": peak_extra(lambda: torch.nn.functional.linear(x, wb)),
             "plain": peak_extra(lambda: int8_linear(x, plain.qdata, plain.scale)),
             "rotated": peak_extra(lambda: int8_linear(x, rot.qdata, rot.scale, rotation_kind="regular",
                                                       rotation_group=256)),
             "output": out_bytes}
        rows.append(r)
        del x, wb, plain, rot
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}: peak extra memory of one call")
    print("| shape | output itself | bf16 F.linear | INT8 plain | INT8 rotated (Hadamard 256) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {mib(r['output'])} | {mib(r['bf16'])} | {mib(r['plain'])} | {mib(r['rotated'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
