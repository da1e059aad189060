"""Cheap repeated launches of a `@triton.jit` kernel whose configuration is already decided.

`fn[grid](*args, **meta)` costs tens of microseconds of Python per call (argument binding and specialization,
a cache key built from `str(options)`, and, through `triton.autotune`/`triton.heuristics`, per-call dicts and a
tuning key from every argument's dtype).  At small M that is most of an INT8 linear.  A `Launcher` holds one
kernel with fixed constexprs and launch options; its first call per argument specialization goes through
`fn[grid]` (compiles, launches, returns the `CompiledKernel`), later calls hand the arguments straight to the
compiled kernel's launcher -- the same call `JITFunction.run` ends with (Triton 3.3-3.9:
`kernel.run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)`,
all parameters in signature order, constexprs included).

Correctness of the shortcut rests on the key: Triton specializes a compiled kernel on each integer argument
(== 1, divisible by 16, fits int32) and each tensor's dtype and 16-byte alignment; `_spec` computes exactly
those, so an argument tuple that Triton would compile differently never reuses a kernel.  Floats are not
specialized.  WAN_INT8_DIRECT_LAUNCH=0 turns the shortcut off (every call through `fn[grid]`); so does the
interpreter (there is no compiled kernel), and any failure of the shortcut's API (a Triton version that moved
it) switches it off for the process with one log line.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import torch

log = logging.getLogger("wan_int8.kernels")

_Tensor = torch.Tensor
_STATE = {"direct": None}   # None: not decided yet


def interpreting() -> bool:
    """Whether Triton runs kernels on its CPU interpreter (TRITON_INTERPRET set).  Read on each call: tests set
    it at run time.  The one place the kernel modules ask (this module imports no Triton, so all of them can)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def direct_enabled() -> bool:
    d = _STATE["direct"]
    if d is None:
        d = os.environ.get("WAN_INT8_DIRECT_LAUNCH", "1") != "0" and not interpreting()
        if d:
            try:
                from triton import knobs   # 3.4+: where the launch hooks live
                _STATE["knobs"] = knobs.runtime
                from triton.runtime.driver import driver
                active = driver.active
                _STATE["get_device"] = active.get_current_device
                _STATE["get_stream"] = active.get_current_stream
            except Exception as exc:   # older/newer Triton: the plain path only
                log.info("direct Triton launches disabled: %s: %s", type(exc).__name__, exc)
                d = False
        _STATE["direct"] = d
    return d


def set_direct(enabled: Optional[bool]) -> None:
    """Force the shortcut on/off (benchmarks); None re-reads WAN_INT8_DIRECT_LAUNCH on the next call."""
    _STATE["direct"] = None
    if enabled is not None:
        saved = os.environ.get("WAN_INT8_DIRECT_LAUNCH")
        os.environ["WAN_INT8_DIRECT_LAUNCH"] = "1" if enabled else "0"
        try:
            direct_enabled()
        finally:
            if saved is None:
                os.environ.pop("WAN_INT8_DIRECT_LAUNCH", None)
            else:
                os.environ["WAN_INT8_DIRECT_LAUNCH"] = saved


def _spec(args) -> tuple:
    """What Triton specializes a compiled kernel on, per argument (see module docstring)."""
    out = []
    for a in args:
        t = type(a)
        if t is int:
            out.append((a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF))
        elif isinstance(a, _Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif t is float:
            out.append(0)
        else:   # bools, None, anything else: Triton treats them as values to specialize on
            out.append((t, a))
    return tuple(out)


class Launcher:
    """`fn` with fixed `constexprs` and launch `options` (num_warps, num_stages, ...); call as
    `launcher(grid, *runtime_args)` with the non-constexpr arguments in signature order."""

    def __init__(self, fn, constexprs: dict, options: dict):
        self.fn = fn
        self.constexprs = dict(constexprs)
        self.options = dict(options)
        self.meta = {**self.constexprs, **self.options}
        self._compiled: Dict[tuple, object] = {}
        params = getattr(fn, "params", None)
        names = getattr(fn, "arg_names", None)
        self._tail: Optional[Tuple] = None
        if params is not None and names is not None:
            flags = [p.is_constexpr for p in params]
            n_rt = flags.index(True) if True in flags else len(flags)
            if all(flags[n_rt:]):   # runtime args first, then only constexprs: full args = runtime + tail
                try:
                    self._tail = tuple(self._constexpr_value(p) for p in params[n_rt:])
                    self._n_rt = n_rt
                except KeyError:
                    self._tail = None

    def _constexpr_value(self, p):
        if p.name in self.constexprs:
            return self.constexprs[p.name]
        default = p.default
        import inspect
        if default is inspect.Parameter.empty:
            raise KeyError(p.name)
        return default

    def __call__(self, grid, *args):
        return self.keyed(None, grid, args)

    def keyed(self, spec, grid, args):
        """Launch with `spec` standing in for `_spec(args)`: the caller vouches that it determines Triton's
        specialization of `args` given what is fixed for this launcher (the per-signature plan that owns it
        fixes dtypes, strides, N, K; `spec` then covers M and the pointers' alignment).  None: compute it."""
        if self._tail is None or not direct_enabled():
            return self.fn[grid](*args, **self.meta)
        if len(args) != self._n_rt:
            raise TypeError(f"{self.fn}: expected {self._n_rt} runtime arguments, got {len(args)}")
        dev = _STATE["get_device"]()
        key = (dev, _spec(args) if spec is None else spec)
        kernel = self._compiled.get(key)
        if kernel is None:   # compile (or find) through the normal path, launching this call
            kernel = self.fn[grid](*args, **self.meta)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            if hasattr(kernel, "run") and hasattr(kernel, "packed_metadata"):
                self._compiled[key] = kernel
            return kernel
        try:
            rk = _STATE["knobs"]
            enter, exit_ = rk.launch_enter_hook, rk.launch_exit_hook
            stream = _STATE["get_stream"](dev)
            full = args + self._tail
            meta = kernel.launch_metadata(grid, stream, *full) if enter is not None else None
            run = kernel.run
        except AttributeError as exc:   # Triton API moved: plain launches from now on
            log.warning("direct Triton launch unavailable (%s: %s); using fn[grid] launches", type(exc).__name__, exc)
            _STATE["direct"] = False
            return self.fn[grid](*args, **self.meta)
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
            kernel.function, kernel.packed_metadata, meta, enter, exit_, *full)
        return kernel
