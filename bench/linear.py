"""One INT8 linear layer against its peers, in one process, on the same inputs (protocol: shared/BENCH.md).

    python bench/linear.py --quick                      # 4 shapes, every method (a few minutes on an H100)
    python bench/linear.py --shapes 32760x5120x5120,512x5120x5120 --methods bf16,raw_row --json out.json
    python bench/linear.py --cpu-smoke                  # no GPU: tiny sizes, Triton interpreter, exits 0

Shapes are MxKxN.  Input bf16 [M, K] with 8 outlier channels (x20), weight [N, K] ~ N(0, 0.02).  For every
method: correctness first (rel err = |y - y_fp32| / |y_fp32|, the fp32 reference computed in row chunks; a
method with rel err > 0.1 is not timed), then the median of triton.testing.do_bench, TOPS (2MNK / t) and
the ratio to bf16 F.linear from the same run.  Each method runs in try/except: a failure is recorded in the
table, never fatal.  Progress goes to stderr; the markdown tables are printed last on stdout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES_14B = [(m, k, n) for m in (32760, 75600) for k, n in ((5120, 5120), (5120, 13824), (13824, 5120))]
SHAPES_5B = [(27280, k, n) for k, n in ((3072, 3072), (3072, 14336), (14336, 3072))]
SHAPES_13B = [(32760, k, n) for k, n in ((1536, 1536), (1536, 8960), (8960, 1536))]
SHAPES_SMALL = [(m, 5120, 5120) for m in (1, 16, 257, 512)]
ALL_SHAPES = SHAPES_14B + SHAPES_5B + SHAPES_13B + SHAPES_SMALL
QUICK_SHAPES = [(32760, 5120, 5120), (32760, 5120, 13824), (32760, 13824, 5120), (512, 5120, 5120)]
SMOKE_SHAPES = [(33, 256, 96), (1, 512, 64)]

METHODS = [
    "bf16",            # F.linear, cuBLAS
    "fp8_rowwise",     # torch.compile(per-token fp8 quant + torch._scaled_mm rowwise)
    "w8a8_torchao",    # torch.compile(per-token int8 quant + torch._int_mm + dequant): torchao's recipe
    "int_mm_gemm",     # torch._int_mm only (pre-quantized A): the cuBLASLt GEMM ceiling
    "ck_int8",         # comfy_kitchen.int8_linear (tensor-wise weight scale), if installed
    "ck_convrot",      # comfy_kitchen.int8_linear(convrot=True, 256)
    "op_row",          # ours through torch.ops.wan_int8.int8_linear (backend forced to triton)
    "op_rot256",
    "op_group128",
    "raw_row",         # ours, triton functions called directly (quantizer + GEMM; on Hopper the Gluon GEMM)
    "raw_rot256",
    "raw_group128",
    "tri_row",         # as raw_, the GEMM pinned to the Triton kernel (persistent TMA; group: pointer kernel)
    "tri_rot256",
    "tri_group128",
    "gluon_row",       # quantizer + the warp-specialised Gluon GEMM called directly (Hopper, Triton 3.6)
    "gluon_group128",
    "gluongemm_row",   # that GEMM alone (pre-quantized A)
    "gluongemm_group128",   # gluon methods take :s<stages> :g<GROUP_M> :c<consumers> suffixes (gluongemm_row:s3:g16)
    "gemm_row",        # ours, GEMM + epilogue only (pre-quantized A)
    "quant_row",       # ours, quantizer only (ratio = its time / bf16 linear time)
    "quant_rot256",
]
NO_RELERR = {"quant_row", "quant_rot256"}
MAX_REL_ERR = 0.1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# timing

def bench_ms(fn, warmup: int, rep: int, cuda: bool) -> float:
    if not cuda:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    import triton.testing
    try:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # older Triton without return_mode
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])


def rel_err(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, chunk: int = 4096) -> float:
    """|y - x·wᵀ| / |x·wᵀ| with the reference in fp32 (TF32 off), one row chunk at a time."""
    num = den = 0.0
    wf = w.float()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for s in range(0, x.shape[0], chunk):
            ref = x[s:s + chunk].float() @ wf.t()
            num += float((y[s:s + chunk].float() - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return math.sqrt(num / max(den, 1e-30))


# ------------------------------------------------------------------------------------------------------------
# methods: each builder returns a zero-argument callable producing y (weights prepared outside the timing)

_COMPILED = {}


def _compile(name, fn, cuda):
    if not cuda:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def _fp8_linear(x, wq, sw):
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    sx = amax / 448.0
    xq = (x.float() / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)


def _w8a8_linear(x, wq, sw):
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-5)
    sx = amax / 127.0
    xq = torch.round(x.float() / sx).clamp(-127, 127).to(torch.int8)
    return (torch._int_mm(xq, wq.t()).float() * sx * sw).to(torch.bfloat16)


class Prepared:
    """Per-shape weights in every layout the methods need (made lazily, once)."""

    def __init__(self, w):
        self.w = w
        self._cache = {}

    def get(self, key):
        if key not in self._cache:
            self._cache[key] = self._make(key)
        return self._cache[key]

    def _make(self, key):
        from wan_int8.quant.int8 import quantize_weight
        from wan_int8.quant.types import Rotation
        w = self.w
        if key == "row":
            return quantize_weight(w, "row")
        if key == "tensor":
            return quantize_weight(w, "tensor")
        if key == "rot256":
            return quantize_weight(w, "row", rotation=Rotation("regular", 256))
        if key == "tensor_rot256":
            return quantize_weight(w, "tensor", rotation=Rotation("regular", 256))
        if key == "group128":
            return quantize_weight(w, "group", group_size=128)
        if key == "fp8":
            sw = w.float().abs().amax(dim=1).clamp(min=1e-12) / 448.0
            wq = (w.float() / sw[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
            return wq, sw[None, :].contiguous()
        raise KeyError(key)


def _force_triton():
    from wan_int8.config import get_settings, update_settings
    from wan_int8.kernels.registry import REGISTRY
    from wan_int8.kernels.triton_backend import register_triton_backends
    if REGISTRY.get("triton") is None:
        register_triton_backends(REGISTRY)
    if get_settings().force_kernel != "triton":
        update_settings(force_kernel="triton")
    return REGISTRY


def build(method, x, prep, cuda):
    m, k = x.shape
    if method == "bf16":
        w = prep.w
        return lambda: F.linear(x, w)
    if method == "fp8_rowwise":
        if not cuda or torch.cuda.get_device_capability() < (8, 9) or not hasattr(torch, "float8_e4m3fn"):
            raise RuntimeError("needs CUDA sm_89+ and torch fp8")
        wq, sw = prep.get("fp8")
        fn = _compile("fp8", _fp8_linear, cuda)
        return lambda: fn(x, wq, sw)
    if method == "w8a8_torchao":
        wt = prep.get("row")
        wq, sw = wt.qdata, wt.scale[None, :]
        fn = _compile("w8a8", _w8a8_linear, cuda)
        return lambda: fn(x, wq, sw)
    if method == "int_mm_gemm":
        from wan_int8.quant.int8 import quantize_activation
        wt = prep.get("row")
        xq, sx = quantize_activation(x)
        fn = lambda: torch._int_mm(xq, wt.qdata.t())  # noqa: E731
        fn.post = lambda y: y.float() * sx[:, None] * wt.scale[None, :]   # for the correctness check only
        return fn
    if method.startswith("ck_"):
        import comfy_kitchen as ck  # noqa: F401
        fn = getattr(ck, "int8_linear", None)
        if fn is None:
            raise RuntimeError("comfy_kitchen has no int8_linear")
        rot = method == "ck_convrot"
        wt = prep.get("tensor_rot256" if rot else "tensor")
        if rot:
            return lambda: fn(x, wt.qdata, wt.scale, None, torch.bfloat16, convrot=True, convrot_groupsize=256)
        return lambda: fn(x, wt.qdata, wt.scale, None, torch.bfloat16)
    layout = method.split(":")[0].split("_", 1)[1]
    if method.startswith("op_"):
        from wan_int8.kernels.ops import int8_linear
        _force_triton()
        wt = prep.get(layout)
        r = wt.rotation
        kind, group = (r.kind, r.group_size) if r else ("none", 0)
        return lambda: int8_linear(x, wt.qdata, wt.scale, None, None, kind, group, None, "bench")
    from wan_int8.kernels.triton_gemm import int8_gemm
    from wan_int8.kernels.triton_quant import quantize_activation_triton
    wt = prep.get(layout)
    r = wt.rotation
    kind, group = (r.kind, r.group_size) if r else ("none", 0)
    if method.startswith("raw_"):
        def raw():
            xq, sx = quantize_activation_triton(x, kind, group)
            return int8_gemm(xq, wt.qdata, sx, wt.scale, None, torch.bfloat16)
        return raw
    if method.startswith("tri_"):
        variant = "ptr" if wt.scale.dim() == 2 else "tma"

        def tri():
            xq, sx = quantize_activation_triton(x, kind, group)
            return int8_gemm(xq, wt.qdata, sx, wt.scale, None, torch.bfloat16, variant=variant)
        return tri
    if method.startswith("gemm_"):
        xq, sx = quantize_activation_triton(x, kind, group)
        return lambda: int8_gemm(xq, wt.qdata, sx, wt.scale, None, torch.bfloat16)
    if method.startswith("quant_"):
        return lambda: quantize_activation_triton(x, kind, group)
    if method.startswith("gluon"):
        from wan_int8.kernels.gluon_gemm import ws_gemm
        opts = gluon_options(method)
        if method.startswith("gluongemm_"):
            xq, sx = quantize_activation_triton(x, kind, group)
            return lambda: ws_gemm(xq, wt.qdata, sx, wt.scale, **opts)

        def gluon_whole():
            xq, sx = quantize_activation_triton(x, kind, group)
            return ws_gemm(xq, wt.qdata, sx, wt.scale, **opts)
        return gluon_whole
    raise ValueError(f"unknown method {method!r}")


def gluon_options(method):
    """`gluongemm_group128:s4:g16:c3` -> dict(stages=4, group_m=16, consumers=3): the Gluon GEMM's knobs."""
    names = {"s": "stages", "g": "group_m", "c": "consumers"}
    opts = {}
    for part in method.split(":")[1:]:
        if part[:1] not in names or not part[1:].isdigit():
            raise ValueError(f"{method!r}: suffixes are :s<stages>, :g<GROUP_M> and :c<consumers>")
        opts[names[part[0]]] = int(part[1:])
    return opts


def check_quant(method, x, out):
    """Quantizer-only methods: codes against the torch oracle on the first rows."""
    from wan_int8.quant.int8 import quantize_activation
    from wan_int8.quant.types import Rotation
    q, s = out
    rows = min(x.shape[0], 2048)
    rot = Rotation("regular", 256) if method.endswith("rot256") else None
    qr, sr = quantize_activation(x[:rows], rot)
    diff = (q[:rows].to(torch.int16) - qr.to(torch.int16)).abs()
    frac = float((diff > 0).float().mean())
    if int(diff.max()) > 1 or frac > 1e-3:
        raise RuntimeError(f"codes differ from the torch oracle: max |diff| {int(diff.max())}, fraction {frac:.2e}")
    return frac


# ------------------------------------------------------------------------------------------------------------

def run_shape(shape, methods, args, cuda, device, results):
    m, k, n = shape
    label = f"{m}x{k}x{n}"
    gen = torch.Generator(device="cpu").manual_seed(1234)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    cols = torch.randperm(k, generator=gen)[:8].to(device)
    x[:, cols] *= 20.0
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=torch.bfloat16)
    prep = Prepared(w)
    flops = 2.0 * m * n * k
    base_ms = None
    for method in methods:
        rec = dict(shape=label, m=m, k=k, n=n, method=method, ms=None, tops=None, ratio=None, rel_err=None, error=None)
        t0 = time.time()
        try:
            fn = build(method, x, prep, cuda)
            if method.startswith("op_"):
                from wan_int8.kernels.registry import REGISTRY
                before = REGISTRY.stats()
            y = fn()
            if hasattr(fn, "post"):
                y = fn.post(y)
            if cuda:
                torch.cuda.synchronize()
            if method.startswith("op_"):
                after = REGISTRY.stats()
                ran = {b for (b, _), c in after.items() if c != before.get((b, _), 0)}
                if "triton" not in ran:
                    raise RuntimeError(f"op did not run the triton backend (ran: {sorted(ran)})")
            if method in NO_RELERR:
                rec["rel_err"] = check_quant(method, x, y)   # here: fraction of ±1 code differences
            else:
                if not bool(torch.isfinite(y).all()):
                    raise RuntimeError("output has NaN/Inf")
                err = rel_err(y, x, w)
                rec["rel_err"] = err
                if err > MAX_REL_ERR:
                    raise RuntimeError(f"rel err {err:.3g} > {MAX_REL_ERR}: not timed")
            del y
            ms = bench_ms(fn, args.warmup, args.rep, cuda)
            rec["ms"] = ms
            rec["tops"] = flops / (ms * 1e-3) / 1e12
            if method == "bf16":
                base_ms = ms
            if base_ms:
                rec["ratio"] = base_ms / ms
        except Exception as exc:  # record, never crash
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
            if args.verbose:
                traceback.print_exc()
        finally:
            if cuda:
                torch.cuda.synchronize()
        results.append(rec)
        if rec["error"]:
            log(f"  {label:>20} {method:<14} ERROR {rec['error']}  ({time.time() - t0:.1f}s)")
        else:
            log(f"  {label:>20} {method:<14} {rec['ms']:.4f} ms  {rec['tops']:.1f} TOPS  "
                f"{(rec['ratio'] or 0):.2f}x  err {rec['rel_err']:.2e}  ({time.time() - t0:.1f}s)")
    del x, w, prep
    if cuda:
        torch.cuda.empty_cache()


def env_info(cuda):
    import importlib
    info = dict(date=datetime.date.today().isoformat(), torch=torch.__version__)
    try:
        info["triton"] = importlib.import_module("triton").__version__
    except Exception as exc:
        info["triton"] = f"unavailable ({exc})"
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    else:
        info.update(device="cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu")
    return info


def print_tables(results, shapes, methods, info):
    labels = [f"{m}x{k}x{n}" for m, k, n in shapes]
    labels = [lab for lab in labels if any(r["shape"] == lab for r in results)]
    by = {(r["shape"], r["method"]): r for r in results}
    out = [f"\n### {info.get('device')} (sm {info.get('capability', '-')}), torch {info['torch']}, "
           f"Triton {info['triton']}, {info['date']}",
           "Cells: ratio to bf16 F.linear in the same run (higher is faster); bf16 row in ms. MxKxN.", ""]
    out.append("| method | " + " | ".join(labels) + " | geomean | max rel err |")
    out.append("|---" * (len(labels) + 3) + "|")
    errors = []
    for meth in methods:
        cells, ratios, errs = [], [], []
        for lab in labels:
            r = by.get((lab, meth))
            if r is None:
                cells.append("")
            elif r["error"]:
                cells.append("err")
                errors.append(f"- {meth} @ {lab}: {r['error']}")
            elif meth == "bf16":
                cells.append(f"{r['ms']:.3f} ms")
            else:
                cells.append(f"{r['ratio']:.2f}x" if r["ratio"] else f"{r['ms']:.3f} ms")
                if r["ratio"]:
                    ratios.append(r["ratio"])
            if r is not None and r["rel_err"] is not None and meth not in NO_RELERR:
                errs.append(r["rel_err"])
        gm = f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x" if ratios else "-"
        out.append(f"| {meth} | " + " | ".join(cells) + f" | {gm} | {max(errs):.1e} |" if errs else
                   f"| {meth} | " + " | ".join(cells) + f" | {gm} | - |")
    first = labels[0] if labels else None
    if first:
        tops = [f"{meth} {by[(first, meth)]['tops']:.0f}" for meth in methods
                if (first, meth) in by and by[(first, meth)]["tops"] and meth not in NO_RELERR]
        out.append(f"\nTOPS at {first}: " + ", ".join(tops))
    if errors:
        out.append("\nErrors (first line each):")
        seen = set()
        for e in errors:
            key = e.split(" @ ")[0] + e.split(": ", 1)[-1]
            if key in seen:
                continue
            seen.add(key)
            out.append(e)
    print("\n".join(out), flush=True)


def parse_shapes(text):
    shapes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part in ("14b", "5b", "1.3b", "small", "all", "quick"):
            shapes += {"14b": SHAPES_14B, "5b": SHAPES_5B, "1.3b": SHAPES_13B, "small": SHAPES_SMALL,
                       "all": ALL_SHAPES, "quick": QUICK_SHAPES}[part]
            continue
        m, k, n = (int(v) for v in part.lower().split("x"))
        shapes.append((m, k, n))
    return shapes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 shapes: 14B at M=32760 and M=512")
    ap.add_argument("--shapes", default="", help="MxKxN list, or groups 14b,5b,1.3b,small,quick,all")
    ap.add_argument("--methods", default="", help="comma list of: " + ",".join(METHODS))
    ap.add_argument("--json", default="", help="write every record (and the environment) to this file")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (Triton interpreter)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    ap.add_argument("--time-budget", type=float, default=540.0, help="start no new shape after this many seconds")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        log("no CUDA device: running the CPU smoke test (tiny sizes) instead")
        args.cpu_smoke = True
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.cpu_smoke:
        shapes = parse_shapes(args.shapes) if args.shapes else SMOKE_SHAPES
        default_methods = ["bf16", "w8a8_torchao", "int_mm_gemm", "op_row", "raw_row", "raw_rot256",
                           "raw_group128", "gemm_row", "quant_row"]
        if any(k % 256 for _, k, _ in shapes):
            default_methods.remove("raw_rot256")
    else:
        shapes = parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick else ALL_SHAPES)
        default_methods = METHODS
    methods = [s.strip() for s in args.methods.split(",") if s.strip()] or default_methods
    unknown = [m for m in methods if m.split(":")[0] not in METHODS or (":" in m and not m.startswith("gluon"))]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {METHODS}")
    if "bf16" not in methods:
        methods = ["bf16"] + methods   # ratios need the baseline from the same run
    if cuda:
        import torch._dynamo as dynamo
        for attr in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, attr):
                setattr(dynamo.config, attr, 256)
    device = torch.device("cuda" if cuda else "cpu")
    info = env_info(cuda)
    log(f"bench/linear.py: {info}")
    start = time.time()
    results = []
    done = []
    for shape in shapes:
        if time.time() - start > args.time_budget:
            log(f"time budget {args.time_budget:.0f}s spent: skipping {shape} and later shapes")
            continue
        log(f"shape {shape[0]}x{shape[1]}x{shape[2]} (MxKxN)")
        run_shape(shape, methods, args, cuda, device, results)
        done.append(shape)
    try:
        from wan_int8.kernels.triton_gemm import best_configs
        info["gemm_configs"] = best_configs()
        for key, cfg in info["gemm_configs"].items():
            log(f"  autotune {key}: {cfg}")
    except Exception as exc:
        info["gemm_configs"] = f"unavailable: {exc}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=info, results=results), f, indent=1, default=str)
        log(f"wrote {args.json}")
    log(f"total {time.time() - start:.1f}s")
    print_tables(results, done, methods, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
