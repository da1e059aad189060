"""Helpers shared by the attention and block benchmarks."""
from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    """Progress goes to stderr; the tables are printed last on stdout."""
    print(msg, file=sys.stderr, flush=True)


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
