"""INT8 attention against bf16 SDPA, in one process, on the same inputs (protocol: shared/BENCH.md).

    python bench/attention.py                 # Wan 14B self-attention L=32760 and 75600, cross-attention, H100: ~2 min
    python bench/attention.py --sweep         # also every Triton kernel configuration on its own
    python bench/attention.py --gluon-sweep   # also the Gluon kernel's consumer/stage variants (Hopper)
    python bench/attention.py --cpu-smoke     # no GPU: tiny sizes on the Triton interpreter, exits 0

Inputs: B=1, 40 heads x 128, bf16, q/k/v ~ N(0, 1) with a shared per-channel offset on k (real Wan keys carry
one after RMSNorm + RoPE; it is what K smoothing removes).  Accuracy: cosine and relative L2 error of each
output against SDPA's bf16 output.  Times: median of triton.testing.do_bench; TFLOP/s counts 4·B·H·Lq·Lk·D.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common import bench_ms, log, print_table  # noqa: E402  (bench/common.py)
from wan_int8.quant.metrics import cosine, rel_error  # noqa: E402

from wan_int8.attention import AttentionConfig, int8_attention, sdpa  # noqa: E402

SHAPES = [("self 480p", 32760, 32760), ("self 720p", 75600, 75600), ("cross text", 32760, 512),
          ("cross image", 32760, 257)]
SMOKE_SHAPES = [("self", 130, 130), ("cross", 70, 33)]


def inputs(lq, lk, heads, dim, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, lq, heads, dim, generator=g).to(device, torch.bfloat16)
    k = torch.randn(1, lk, heads, dim, generator=g)
    k = (k + 2.0 * torch.randn(1, 1, heads, dim, generator=g)).to(device, torch.bfloat16)
    v = torch.randn(1, lk, heads, dim, generator=g).to(device, torch.bfloat16)
    return q, k, v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time every Triton kernel configuration separately")
    ap.add_argument("--gluon-sweep", action="store_true", help="time the Gluon kernel's consumer/stage variants")
    ap.add_argument("--shapes", default="", help="comma list of names to run (default: all)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    heads, dim = (40, 128) if cuda else (2, 64)
    shapes = SHAPES if cuda else SMOKE_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[0] in args.shapes.split(",")]
    from wan_int8.kernels import triton_attention as ta
    from wan_int8.kernels import gluon_attention as ga
    methods = [("int8 fp8-PV (auto)", AttentionConfig(pv="fp8")),
               ("int8 fp8-PV, Triton kernel", AttentionConfig(pv="fp8", backend="triton")),
               ("int8 fp8-PV, Triton, fp16x2 exp2", AttentionConfig(pv="fp8", backend="triton")),
               ("int8 fp16-PV", AttentionConfig(pv="fp16"))]
    gluon_sweep = [dict(NUM_CONSUMERS=c, STAGES=st, TWO_LEVEL=tl)
                   for c, st, tl in ((3, 3, 0), (3, 2, 0), (3, 4, 0), (3, 3, 1), (2, 3, 1), (2, 3, 0))]
    rows = []
    for name, lq, lk in shapes:
        q, k, v = inputs(lq, lk, heads, dim, device)
        flops = 4.0 * heads * lq * lk * dim
        ref = sdpa(q, k, v)
        base = bench_ms(lambda: sdpa(q, k, v), cuda)
        rows.append((name, "sdpa bf16", base, 1.0, flops / base / 1e9, 1.0, 0.0, ""))
        log(f"{name}: sdpa {base:.3f} ms")
        for mname, cfg in methods:
            ta.EXP_F16_DEFAULT = "fp16x2 exp2" in mname
            try:
                out = int8_attention(q, k, v, config=cfg)
                cos, rel = cosine(out, ref), rel_error(out, ref)
                ms = bench_ms(lambda: int8_attention(q, k, v, config=cfg), cuda)
                rows.append((name, mname, ms, base / ms, flops / ms / 1e9, cos, rel, ""))
                log(f"{name}: {mname} {ms:.3f} ms cos {cos:.6f}")
            except Exception as exc:  # a failing method is recorded, never fatal
                traceback.print_exc()
                rows.append((name, mname, float("nan"), 0, 0, 0, 0, f"{type(exc).__name__}: {exc}"[:80]))
        ta.EXP_F16_DEFAULT = False
        # the quantization passes alone (q, k smoothed, v to fp8)
        try:
            mean = k.mean(dim=1, dtype=torch.float32)
            prep = bench_ms(lambda: (ta.quantize_tokens(q, None, 1.0), ta.quantize_tokens(k, mean, 1.0),
                                     ta.quantize_v_fp8(v)), cuda)
            rows.append((name, "prep only (q, k, v)", prep, base / prep, 0, 0, 0, ""))
        except Exception as exc:
            rows.append((name, "prep only", float("nan"), 0, 0, 0, 0, f"{type(exc).__name__}: {exc}"[:80]))
        sweep = [(c, tma) for c in ta._CONFIGS[ta.arch_of(device)] for tma in (True, False)] if args.sweep else []
        for c, tma in (sweep if cuda else []):
            ta.set_config_override([c])
            ta.TMA_DEFAULT = tma
            label = "cfg BM{BLOCK_M} BN{BLOCK_N} w{num_warps} s{num_stages} ws{WARP_SPEC:d} pipe{PIPELINE:d}".format(**c)
            label += f" maxnreg{c['maxnreg']}" if c.get("maxnreg") else ""
            label += " tma" if tma else " ptr"
            try:
                out = int8_attention(q, k, v, config=methods[0][1])
                cos, rel = cosine(out, ref), rel_error(out, ref)
                ms = bench_ms(lambda: int8_attention(q, k, v, config=methods[0][1]), cuda)
                rows.append((name, label, ms, base / ms, flops / ms / 1e9, cos, rel, ""))
            except Exception as exc:
                rows.append((name, label, float("nan"), 0, 0, 0, 0, f"{type(exc).__name__}: {exc}"[:80]))
        ta.set_config_override(None)
        ta.TMA_DEFAULT = True
        for c in (gluon_sweep if cuda and args.gluon_sweep else []):
            ga.set_config_override(c)
            label = "gluon {NUM_CONSUMERS} consumers, {STAGES} stages, two-level {TWO_LEVEL}".format(**c)
            try:
                cfg = AttentionConfig(pv="fp8", backend="gluon")
                out = int8_attention(q, k, v, config=cfg)
                cos, rel = cosine(out, ref), rel_error(out, ref)
                ms = bench_ms(lambda: int8_attention(q, k, v, config=cfg), cuda)
                rows.append((name, label, ms, base / ms, flops / ms / 1e9, cos, rel, ""))
                log(f"{name}: {label} {ms:.3f} ms cos {cos:.6f}")
            except Exception as exc:
                traceback.print_exc()
                rows.append((name, label, float("nan"), 0, 0, 0, 0, f"{type(exc).__name__}: {exc}"[:80]))
        ga.set_config_override(None)
        if cuda:
            torch.cuda.empty_cache()
    print_table(f"B=1, heads {heads} x {dim}", ("shape", "method", "ms", "x SDPA", "TFLOP/s", "cosine", "rel err", "note"),
                rows, ("", "", ".3f", ".2f", ".0f", ".6f", ".2e", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
