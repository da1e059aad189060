"""Backends for the INT8 linear, the choice between them, and what ran (kernel statistics).

Every backend computes the same function as `quant.int8_linear_reference` (the oracle) and says, before it
runs, whether it can run a given call.  The dispatcher never falls back silently: when the wanted backend
cannot run a call, the log says which layer, which backend and why, once per (layer shape, reason).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..config import Settings, get_settings
from ..quant.int8 import _gemm_dequant, block_epilogue_reference, quantize_activation
from ..quant.types import Int8Weight, Rotation

log = logging.getLogger("wan_int8.kernels")

ROT_KINDS = ("none", "regular", "sylvester")


@dataclasses.dataclass(slots=True)
class LinearCall:
    """One INT8 linear call, 2-D: `x [M, K]` against `qdata [N, K]`.

    Pre-quantized activation: `sx` (fp32 `[M]`) set and `x` the int8 codes `[M, K]` themselves (already rotated,
    e.g. one quantization shared by the q, k and v linears); `out_dtype` then says the output dtype.
    Block epilogue (after bias and LoRA, see `quant.int8.block_epilogue_reference`): `act` 1 = GELU (tanh);
    `residual [M, N]` plus `y * gate[row]` (`gate [B, G, N]`, rows by `seq`/`per`) or plus `y`."""

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
    # a LoRA's fusable low-rank part, added to the output by the backend: `lora_t [M, R] · lora_b [N, R]ᵀ`
    # (t = (x·A_catᵀ)·diag(s) in the model dtype).  Triton adds it in its GEMM epilogue (fp32, one store);
    # the others after their GEMM.  None: no LoRA.
    lora_t: Optional[torch.Tensor] = None
    lora_b: Optional[torch.Tensor] = None
    sx: Optional[torch.Tensor] = None
    act: int = 0
    residual: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None
    seq: int = 0
    per: int = 0

    @property
    def prequantized(self) -> bool:
        return self.sx is not None

    @property
    def epilogue(self) -> Tuple[int, int]:
        """(act, residual mode: 0 none, 1 gated, 2 plain) -- part of the dispatch signature."""
        return self.act, 0 if self.residual is None else 1 if self.gate is not None else 2

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_t is None else int(self.lora_t.shape[1])

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


def quantized_input(call: LinearCall):
    """(codes, scales) of the call's activation: the given ones, else the torch quantizer's."""
    if call.prequantized:
        return call.x, call.sx
    return quantize_activation(call.x, call.rotation, call.input_scale, get_settings().hadamard_chunk_size)


def _reference_run(call: LinearCall) -> torch.Tensor:
    xq, sx = quantized_input(call)
    w = call.weight()
    y = _gemm_dequant(xq, sx, w, call.bias)
    acc = torch.promote_types(y.dtype, call.out_dtype)   # fp32 (fp64 for fp64 outputs) before the one cast
    if call.lora_t is not None:
        y = y.to(acc).addmm_(call.lora_t.to(acc), call.lora_b.to(acc).t())
    if call.act or call.residual is not None:
        y = block_epilogue_reference(y.to(acc), call.act, call.residual, call.gate, call.seq, call.per)
    return y.to(call.out_dtype)


def finish_output(call: LinearCall, y: torch.Tensor) -> torch.Tensor:
    """`y += lora_t · lora_bᵀ` in y's dtype, in place (backends whose GEMM output is already cast), then the
    block epilogue (from the rounded output: one rounding more than the fused Triton epilogue)."""
    if call.lora_t is not None:
        y.addmm_(call.lora_t.to(y.dtype), call.lora_b.to(y.dtype).t())
    if call.act or call.residual is not None:
        y = block_epilogue_reference(y.float(), call.act, call.residual, call.gate, call.seq,
                                     call.per).to(call.out_dtype)
    return y


REFERENCE = Backend("reference", lambda call: None, _reference_run, priority=-100, auto_on_cpu=True)


class KernelRegistry:
    """Backends by name; the choice per call; statistics of what ran."""

    def __init__(self, cache_path: Optional[str] = None):
        self._backends: Dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._stats: Dict[Tuple[str, str], int] = collections.Counter()
        self._warned: set = set()
        self._cache_path = cache_path          # None: the settings' cache folder, resolved on first use
        self._choices: Optional[Dict[str, str]] = None
        self._fast: Dict[tuple, Backend] = {}   # in-memory: cheap call signature -> backend (no per-call checks)
        self._fast_owner: Optional[Settings] = None
        self.register(REFERENCE)

    def register(self, backend: Backend) -> None:
        self._backends[backend.name] = backend
        self._fast.clear()

    def backends(self) -> List[Backend]:
        return sorted(self._backends.values(), key=lambda b: -b.priority)

    def get(self, name: str) -> Optional[Backend]:
        return self._backends.get(name)

    # -- choosing -------------------------------------------------------------------------------
    def choose(self, call: LinearCall, settings: Settings) -> Backend:
        """The backend for `call`: the forced one, else the fastest measured for this shape bucket.

        Decisions are remembered per call signature (device, M bucket, shapes, dtypes, options, settings), so the
        per-call cost after the first is one dict lookup."""
        return self.dispatch(call, settings, count=False)

    def dispatch(self, call: LinearCall, settings: Settings, count: bool = True) -> Backend:
        """`choose`, and (count) the call in the statistics -- one dictionary lookup on the hot path, which is
        most of an INT8 linear's host time at small M (the H100 machine's CPU: ~20 µs per op call)."""
        x, s, q = call.x, call.scale, call.qdata
        if settings is not self._fast_owner:   # settings are replaced, never mutated: a new object, new choices
            self._fast.clear()
            self._fast_owner = settings
        # m_bucket(M) inlined, and the weight properties backends check that the shapes do not capture
        sig = (x.device, min(1 << max(0, (x.shape[0] - 1).bit_length()), 1 << 17), q.shape, x.dtype, call.out_dtype,
               s.shape, call.rot_kind, call.rot_group, call.signs is None, call.bias is None, call.input_scale is None,
               q.device == x.device and q.dtype == torch.int8 and q.is_contiguous() and s.device == q.device,
               None if call.lora_t is None else call.lora_t.shape[1], call.sx is None, call.act,
               call.residual is None, call.gate is None)
        entry = self._fast.get(sig)
        if entry is None:
            backend = self._choose(call, settings)
            # the statistics key, formatted only when read (`stats`)
            entry = self._fast[sig] = (backend, (backend.name, call.k, call.n, s.dim(), call.rot_kind != 0))
        if count:
            with self._lock:
                self._stats[entry[1]] += 1
        return entry[0]

    def _choose(self, call: LinearCall, settings: Settings) -> Backend:
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
        on_cpu = call.x.device.type == "cpu"
        candidates, first_refusal = [], None
        for backend in self.backends():
            if backend is REFERENCE or (on_cpu and not backend.auto_on_cpu):
                continue
            reason = backend.check(call)
            if reason is None:
                candidates.append(backend)
            elif first_refusal is None:
                first_refusal = (backend.name, reason)
        if not candidates:
            if first_refusal is not None and not on_cpu:
                self._warn_once(call, *first_refusal)
            return REFERENCE
        if len(candidates) == 1:
            return candidates[0]
        key = dispatch_key(call)
        choices = self._load_choices(settings)
        name = choices.get(key)
        if name is not None and any(b.name == name for b in candidates):
            return self._backends[name]
        if call.x.is_cuda and torch.cuda.is_current_stream_capturing():
            return candidates[0]  # no timing inside CUDA-graph capture: highest priority now, measure later
        best = self._measure(candidates, call, key)
        with self._lock:
            choices[key] = best.name
        self._save_choices(settings)
        return best

    def _measure(self, candidates: List[Backend], call: LinearCall, key: str, rounds: int = 5) -> Backend:
        """Run each candidate twice untimed (compilation, autotuning, allocator warm-up), then time `rounds`
        rounds of back-to-back runs (10 per round for calls under a millisecond, so launch latency and the
        synchronisation do not decide small shapes); keep the lowest median.  A lower-priority backend must be
        clearly (>5%) faster to win: single noisy timings handed shapes to the slower backend on an H100/H200."""
        times = {}
        for backend in candidates:
            try:
                for _ in range(2):
                    backend.run(call)
                _sync(call.x)
                start = time.perf_counter()
                backend.run(call)
                _sync(call.x)
                inner = 10 if time.perf_counter() - start < 1e-3 else 1
                samples = []
                for _ in range(rounds):
                    _sync(call.x)
                    start = time.perf_counter()
                    for _ in range(inner):
                        backend.run(call)
                    _sync(call.x)
                    samples.append((time.perf_counter() - start) / inner)
                times[backend.name] = sorted(samples)[len(samples) // 2]
            except Exception as exc:  # a candidate that cannot run this shape is not chosen; say why, once
                self._warn_once(call, backend.name, f"failed while being measured: {type(exc).__name__}: {exc}"[:300])
        if not times:
            return REFERENCE
        best = None
        for backend in candidates:   # priority order: keep the preferred one unless another is clearly faster
            t = times.get(backend.name)
            if t is not None and (best is None or t < times[best] * 0.95):
                best = backend.name
        log.info("INT8 dispatch %s: %s -> %s", key,
                 ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in sorted(times.items(), key=lambda kv: kv[1])), best)
        return self._backends[best]

    # -- persisted choices ------------------------------------------------------------------------
    def cache_file(self, settings: Settings) -> str:
        return self._cache_path or os.path.join(settings.cache_dir, "dispatch-v1.json")

    def _load_choices(self, settings: Settings) -> Dict[str, str]:
        if self._choices is None:
            with self._lock:
                if self._choices is None:
                    self._choices = _read_json(self.cache_file(settings))
        return self._choices

    def _save_choices(self, settings: Settings) -> None:
        path = self.cache_file(settings)
        with self._lock:
            data = dict(self._choices or {})
        try:
            merged = {**_read_json(path), **data}
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            self._warn_once_text(f"cannot save kernel choices to {path}: {exc}; they will be measured again next run")

    def forget_choices(self) -> None:
        with self._lock:
            self._choices = {}
            self._fast.clear()

    def _warn_once_text(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            log.warning("%s", text)

    def _warn_once(self, call: LinearCall, backend: str, reason: str) -> None:
        key = (backend, reason, call.k, call.n)
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning("INT8 layer %s [K=%d, N=%d, %s]: backend %r cannot run it (%s); using the torch reference",
                    call.name or "?", call.k, call.n, call.granularity, backend, reason)

    # -- statistics ---------------------------------------------------------------------------
    def stats(self) -> Dict[Tuple[str, str], int]:
        """{(backend, "K=.. N=.. <scale kind>[ rot]"): calls}"""
        with self._lock:
            raw = dict(self._stats)
        out: Dict[Tuple[str, str], int] = collections.Counter()
        for (backend, k, n, dim, rot), count in raw.items():
            gran = {0: "tensor", 1: "row", 2: "group"}[dim]
            out[(backend, f"K={k} N={n} {gran}" + (" rot" if rot else ""))] += count
        return dict(out)

    def reset(self) -> None:
        with self._lock:
            self._stats.clear()


def m_bucket(m: int) -> int:
    """Token counts bucketed to the next power of two (capped): videos of other lengths reuse a choice."""
    return min(1 << max(0, (m - 1).bit_length()), 1 << 17)


def dispatch_key(call: LinearCall) -> str:
    dev = call.x.device
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        where = f"{torch.cuda.get_device_name(dev)} sm{cap[0]}{cap[1]}"
    else:
        where = dev.type
    group = f"group{call.k // call.scale.shape[1]}" if call.scale.dim() == 2 else call.granularity
    rot = f"{ROT_KINDS[call.rot_kind]}{call.rot_group}" if call.rot_kind else "norot"
    return (f"{where}|M{m_bucket(call.m)}|K{call.k}|N{call.n}|{group}|{rot}|{str(call.x.dtype)[6:]}"
            f"|{'bias' if call.bias is not None else 'nobias'}|{'static' if call.input_scale is not None else 'dyn'}"
            + (f"|lora{call.lora_rank}" if call.lora_t is not None else "")
            + (f"|act{call.act}res{call.epilogue[1]}" if call.epilogue != (0, 0) else ""))


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _read_json(path: str) -> Dict[str, str]:
    try:
        with open(path) as f:
            data = json.load(f)
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# The seed's INT8_FORCE_KERNEL values map onto ours: its "ampere"/"fixed" kernels are our Triton GEMM, its
# "fallback" was the torch path.
_FORCE_ALIASES = {"ampere": "triton", "fixed": "triton", "fallback": "reference", "int_mm": "cublaslt"}

REGISTRY = KernelRegistry()


def _register_builtin_backends(registry: KernelRegistry) -> None:
    from .backends import register_torch_backends
    from .triton_backend import register_triton_backends  # imports no Triton until a kernel runs
    register_triton_backends(registry)
    register_torch_backends(registry)


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


