"""Backends for the INT8 linear, the choice between them, and what ran (kernel statistics).

Every backend computes the same function as `quant.int8_linear_reference` (the oracle) and says, before it
runs, whether it can run a given call.  The dispatcher never falls back silently: when the wanted backend
cannot run a call, the log says which layer, which backend and why, once per (layer shape, reason).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..config import Settings, get_settings
from ..quant.int8 import _gemm_dequant, quantize_activation
from ..quant.types import Int8Weight, Rotation

log = logging.getLogger("wan_int8.kernels")

ROT_KINDS = ("none", "regular", "sylvester")


@dataclasses.dataclass
class LinearCall:
    """One INT8 linear call, 2-D: `x [M, K]` against `qdata [N, K]`."""

    x: torch.Tensor
    qdata: torch.Tensor
    scale: torch.Tensor
    bias: Optional[torch.Tensor]
    input_scale: Optional[torch.Tensor]
    signs: Optional[torch.Tensor]
    rot_kind: int          # index into ROT_KINDS
    rot_group: int
    out_dtype: torch.dtype
    name: str = ""

    @property
    def m(self) -> int:
        return int(self.x.shape[0])

    @property
    def k(self) -> int:
        return int(self.qdata.shape[1])

    @property
    def n(self) -> int:
        return int(self.qdata.shape[0])

    @property
    def granularity(self) -> str:
        return {0: "tensor", 1: "row", 2: "group"}[self.scale.dim()]

    @property
    def rotation(self) -> Optional[Rotation]:
        if self.rot_kind == 0:
            return None
        return Rotation(ROT_KINDS[self.rot_kind], self.rot_group, self.signs)

    def weight(self) -> Int8Weight:
        return Int8Weight(self.qdata, self.scale, self.rotation, self.input_scale)


@dataclasses.dataclass
class Backend:
    """A way to run `LinearCall`s. `check` returns None when it can run the call, else the reason it cannot."""

    name: str
    check: Callable[[LinearCall], Optional[str]]
    run: Callable[[LinearCall], torch.Tensor]
    priority: int = 0      # higher is tried first when nothing was measured
    auto_on_cpu: bool = False  # chosen automatically for CPU tensors (the Triton interpreter is for tests only)


def _reference_run(call: LinearCall) -> torch.Tensor:
    xq, sx = quantize_activation(call.x, call.rotation, call.input_scale)
    w = call.weight()
    return _gemm_dequant(xq, sx, w, call.bias).to(call.out_dtype)


REFERENCE = Backend("reference", lambda call: None, _reference_run, priority=-100, auto_on_cpu=True)


class KernelRegistry:
    """Backends by name; the choice per call; statistics of what ran."""

    def __init__(self):
        self._backends: Dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._stats: Dict[Tuple[str, str], int] = collections.Counter()
        self._warned: set = set()
        self.register(REFERENCE)

    def register(self, backend: Backend) -> None:
        self._backends[backend.name] = backend

    def backends(self) -> List[Backend]:
        return sorted(self._backends.values(), key=lambda b: -b.priority)

    def get(self, name: str) -> Optional[Backend]:
        return self._backends.get(name)

    # -- choosing -------------------------------------------------------------------------------
    def choose(self, call: LinearCall, settings: Settings) -> Backend:
        forced = settings.force_kernel
        if forced != "auto":
            backend = self._backends.get(_FORCE_ALIASES.get(forced, forced))
            if backend is None:
                self._warn_once(call, forced, "INT8_FORCE_KERNEL names a backend that is not available in this "
                                              "installation (is Triton installed? is this a CUDA device?)")
                return REFERENCE
            reason = backend.check(call)
            if reason is None:
                return backend
            self._warn_once(call, backend.name, reason)
            return REFERENCE
        best_reason = None
        on_cpu = call.x.device.type == "cpu"
        for backend in self.backends():
            if on_cpu and not backend.auto_on_cpu:
                continue
            reason = backend.check(call)
            if reason is None:
                if best_reason is not None and backend is REFERENCE and call.x.device.type == "cuda":
                    self._warn_once(call, best_reason[0], best_reason[1])
                return backend
            if best_reason is None:
                best_reason = (backend.name, reason)
        return REFERENCE

    def _warn_once(self, call: LinearCall, backend: str, reason: str) -> None:
        key = (backend, reason, call.k, call.n)
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning("INT8 layer %s [K=%d, N=%d, %s]: backend %r cannot run it (%s); using the torch reference",
                    call.name or "?", call.k, call.n, call.granularity, backend, reason)

    # -- statistics ---------------------------------------------------------------------------
    def record(self, backend: str, call: LinearCall) -> None:
        key = (backend, f"K={call.k} N={call.n} {call.granularity}" + (" rot" if call.rot_kind else ""))
        with self._lock:
            self._stats[key] += 1

    def stats(self) -> Dict[Tuple[str, str], int]:
        with self._lock:
            return dict(self._stats)

    def reset(self) -> None:
        with self._lock:
            self._stats.clear()


# The seed's INT8_FORCE_KERNEL values map onto ours: its "ampere"/"fixed" kernels are our Triton GEMM, its
# "fallback" was the torch path.
_FORCE_ALIASES = {"ampere": "triton", "fixed": "triton", "fallback": "reference", "int_mm": "cublaslt"}

REGISTRY = KernelRegistry()


def _register_builtin_backends(registry: KernelRegistry) -> None:
    from .triton_backend import register_triton_backends  # imports no Triton until a kernel runs
    register_triton_backends(registry)


_register_builtin_backends(REGISTRY)


def print_kernel_summary(registry: KernelRegistry = REGISTRY) -> str:
    """Log (and return) how many INT8 linear calls each backend ran, per layer shape."""
    stats = registry.stats()
    if not stats:
        text = "INT8 kernel summary: no INT8 linear has run yet"
    else:
        lines = ["INT8 kernel summary (calls per backend and layer shape):"]
        width = max(len(b) for b, _ in stats)
        for (backend, shape), count in sorted(stats.items()):
            lines.append(f"  {backend:<{width}}  {shape:<28} {count:>8}")
        total: Dict[str, int] = collections.Counter()
        for (backend, _), count in stats.items():
            total[backend] += count
        lines.append("  total: " + ", ".join(f"{b} {c}" for b, c in sorted(total.items())))
        text = "\n".join(lines)
    log.info("%s", text)
    return text


def reset_kernel_stats(registry: KernelRegistry = REGISTRY) -> None:
    registry.reset()


def current_settings() -> Settings:
    return get_settings()
