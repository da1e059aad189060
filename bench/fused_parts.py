"""Each fused pass of the Wan block against the unfused operations it replaces, at Wan 14B sizes (issue 7).

    python bench/fused_parts.py              # M = 32760 tokens, dim 5120, ffn 13824 (H100: ~1 min)
    python bench/fused_parts.py --cpu-smoke  # no GPU: tiny sizes on the Triton interpreter, exits 0

Rows: (a) LayerNorm + modulation + the q/k/v activation quantization (unfused: LayerNorm, addcmul, three
quantizer passes; fused: one pass); (b) RMSNorm + RoPE on q (unfused: F.rms_norm + comfy-kitchen's Triton RoPE
when importable, else the torch RoPE); (c) the o linear with the gated residual (GEMM, then addcmul vs the
epilogue); (d) ffn.0 with GELU; (e) ffn.2 with the gated residual.  Median ms of `triton.testing.do_bench`.
"""
from __future__ import annotations

import argparse
import os
import sys

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import bench_ms, comfy_kitchen_rope, log, print_table  # noqa: E402
from wan_int8.kernels.triton_fused import norm_modulate_triton, rms_norm_rope_triton  # noqa: E402
from wan_int8.kernels.triton_gemm import int8_gemm  # noqa: E402
from wan_int8.kernels.triton_quant import quantize_activation_triton  # noqa: E402
from wan_int8.models.wan import apply_rope, rope_freqs  # noqa: E402
from wan_int8.quant.int8 import quantize_weight  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    dev = torch.device("cuda" if cuda else "cpu")
    grid, d, f, heads = ((21, 30, 52), 5120, 13824, 40) if cuda else ((1, 2, 4), 256, 512, 2)
    m = grid[0] * grid[1] * grid[2]
    hd = d // heads
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(m, d, generator=g).to(dev, bf)
    e = (0.1 * torch.randn(1, 1, 6, d, generator=g)).to(dev, bf).unbind(2)
    freqs = rope_freqs(grid, hd, device=dev)
    w_o = quantize_weight((0.02 * torch.randn(d, d, generator=g)).to(dev))
    w_up = quantize_weight((0.02 * torch.randn(f, d, generator=g)).to(dev))
    w_down = quantize_weight((0.02 * torch.randn(d, f, generator=g)).to(dev))
    norm_w = (1 + 0.1 * torch.randn(d, generator=g)).to(dev, bf)
    xq, sx = quantize_activation_triton(x)
    hq, hs = quantize_activation_triton(torch.randn(m, f, generator=g).to(dev, bf))
    rope_name, rope = comfy_kitchen_rope()
    rope = rope or apply_rope
    q4 = x.view(1, m, heads, hd)
    rows = []

    def pair(name, unfused, fused):
        a, b = bench_ms(unfused, cuda), bench_ms(fused, cuda)
        rows.append((name, a, b))
        log(f"{name}: unfused {a:.3f} ms, fused {b:.3f} ms")

    def ln_unfused():
        h = torch.addcmul(e[0][0], F.layer_norm(x, (d,), eps=1e-6), 1 + e[1][0])
        for _ in range(3):
            quantize_activation_triton(h)
    pair("(a) LayerNorm + modulation + q/k/v quantization", ln_unfused,
         lambda: norm_modulate_triton(x, 1e-6, None, None, e[0], e[1], m, m, store_y=False, quantize=True))
    pair("(a') the same, also writing the modulated bf16 (LoRA on q/k/v)", ln_unfused,
         lambda: norm_modulate_triton(x, 1e-6, None, None, e[0], e[1], m, m, store_y=True, quantize=True))
    pair(f"(b) RMSNorm + RoPE on q (unfused RoPE: {rope_name})",
         lambda: rope(F.rms_norm(x, (d,), norm_w, 1e-6).view(1, m, heads, hd), freqs),
         lambda: rms_norm_rope_triton(x, norm_w, 1e-6, freqs.reshape(m, hd // 2, 2, 2), hd, m))
    del q4
    gate = e[2]
    pair("(c) o (5120x5120) + gated residual",
         lambda: torch.addcmul(x, int8_gemm(xq, w_o.qdata, sx, w_o.scale, None, bf), gate[0]),
         lambda: int8_gemm(xq, w_o.qdata, sx, w_o.scale, None, bf, residual=x, gate=gate, seq=m, per=m))
    pair("(d) ffn.0 (5120->13824) + GELU",
         lambda: F.gelu(int8_gemm(xq, w_up.qdata, sx, w_up.scale, None, bf), approximate="tanh"),
         lambda: int8_gemm(xq, w_up.qdata, sx, w_up.scale, None, bf, act=1))
    pair("(e) ffn.2 (13824->5120) + gated residual",
         lambda: torch.addcmul(x, int8_gemm(hq, w_down.qdata, hs, w_down.scale, None, bf), gate[0]),
         lambda: int8_gemm(hq, w_down.qdata, hs, w_down.scale, None, bf, residual=x, gate=gate, seq=m, per=m))
    pair("(c0) o GEMM alone vs + plain residual",
         lambda: int8_gemm(xq, w_o.qdata, sx, w_o.scale, None, bf),
         lambda: int8_gemm(xq, w_o.qdata, sx, w_o.scale, None, bf, residual=x))
    print_table(f"M={m}, dim {d}, ffn {f}", ("pass", "unfused ms", "fused ms", "saved ms"), rows,
                ("", ".3f", ".3f", lambda r: f"{r[1] - r[2]:+.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
