"""Helpers shared by the attention and block benchmarks."""
from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    """Progress goes to stderr; the tables are printed last on stdout."""
    print(msg, file=sys.stderr, flush=True)


def bench_ms(fn, cuda: bool, warmup: int = 5, rep: int = 40) -> float:
    """Median milliseconds: triton.testing.do_bench on a GPU; on the CPU one warm call then one timed call."""
    if not cuda:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
