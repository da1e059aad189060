"""Helpers shared by the attention and block benchmarks."""
from __future__ import annotations

import os
import sys
import time


def log(msg: str) -> None:
    """Progress goes to stderr; the tables are printed last on stdout."""
    print(msg, file=sys.stderr, flush=True)


def comfy_kitchen_rope():
    """(description, comfy-kitchen's Triton `apply_rope1` or None): the RoPE ComfyUI runs, when importable (its
    Python files on PYTHONPATH suffice, e.g. the ignored `.ck/` folder)."""
    try:
        from comfy_kitchen.backends.triton.rope import apply_rope1
    except Exception as exc:   # not installed
        return f"torch (comfy-kitchen not importable: {type(exc).__name__})", None
    return "comfy-kitchen Triton apply_rope1", apply_rope1


def print_table(context: str, headers, rows, formats) -> None:
    """The run's context line (device, versions, ...) with the device name and torch/Triton versions prepended,
    then a markdown table; `formats` are format specs per column ("" for as is) or callables of the row."""
    import torch
    import triton
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        dev = torch.cuda.get_device_name()
    else:
        dev = "CPU (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "CPU"
    print(f"\n{dev}, torch {torch.__version__}, Triton {triton.__version__}, {context}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        cells = [f(r) if callable(f) else format(v, f) for f, v in zip(formats, list(r) + [None] * len(formats))]
        print("| " + " | ".join(cells) + " |")


def bench_ms(fn, cuda: bool, min_reps: int = 10, min_ms: float = 200.0) -> float:
    """Median milliseconds of at least `min_reps` timed calls (and at least `min_ms` of them) after a warm-up:
    triton.testing.do_bench on a GPU, whose warmup/rep arguments are milliseconds, not counts (passing small counts
    there timed a single call of a 70 ms block, in runs 16-20); on the CPU one warm call then one timed call."""
    if not cuda:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import torch
    import triton.testing
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t) * 1e3
    return float(triton.testing.do_bench(fn, warmup=max(25.0, 2 * est), rep=max(min_ms, min_reps * est),
                                         return_mode="median"))
