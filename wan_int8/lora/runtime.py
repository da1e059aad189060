"""LoRAs at run time on INT8 (and float) models: matched exactly, stacked into one GEMM pair per layer.

Per layer, every adapter of every applied LoRA is stacked once into `A_cat [R, K]` and `B_cat [N, R]`
(R = sum of ranks; a q/k/v adapter of a fused qkv layer fills only its row slice of B_cat) and a per-rank
scale vector `s [R]` (strength · alpha / r).  The forward adds, into the INT8 output, in place:

    y += ((x · A_catᵀ) · diag(s)) · B_catᵀ          (torch.mm, mul_, addmm_: no extra [M, N] tensor)

so N LoRAs cost one skinny GEMM pair, and a strength change rebuilds only `s` (no file read, no requant,
the int8 weight is never touched).  Removing the LoRAs uninstalls the slot: outputs are bit-exact again.

Fused path (INT8 layers: `Int8Linear` and the ComfyUI Linear's INT8 forward): `fused_parts(x)` computes
`t = (x · A_catᵀ) · diag(s)` ([M, R], model dtype, as above) and hands `(t, B_cat)` to the INT8 op, whose Triton
GEMM adds `t · B_catᵀ` in its epilogue: y is written once instead of being re-read and re-written by `addmm_`.
The sum is then formed in fp32 before the single cast to the model dtype (the unfused path adds the rounded
INT8 output and the LoRA term in the model dtype), so the fused result is the unfused one to the model dtype's
rounding, and slightly more accurate.  `finish(x, y, state)` then adds what cannot be fused: the dense delta
D.  Layers with an output-axis DoRA row factor c (which scales the base output but not the LoRA term) stay on
the unfused path entirely.  `WAN_INT8_LORA_FUSE=0` (or `runtime.FUSE = False`) turns fusion off.

DoRA (ComfyUI's `weight_decompose`, exactly):
- `dora_scale [N, 1]` (output axis): W' = W + s·(g⊙(W + Δ) − W) with g = m / ‖W‖_row (ComfyUI normalizes by
  the *base* row norm on this axis).  Per output row: y' = c⊙(Wx) + b + s·g⊙(Δx), c = 1 + s(g − 1).  g is
  folded into B_cat's rows once (from the dequantized weight), c is a [N] vector rebuilt with the strengths.
- `dora_scale [1, K]` (input axis, LyCORIS' default): the column norm of W + Δ mixes every row, so the exact
  change W' − W = (W + Δ)·diag(h) − W is built once as a dense [N, K] delta from the dequantized weight.
Several DoRA adapters on one layer are each taken relative to the base weight (order independent; ComfyUI
applies them one after the other, which differs only when two DoRAs hit the same layer).

Dense deltas (`diff` on a linear weight, large LoKr, input-axis DoRA) are summed with their strengths into one
[N, K] matrix added as `y += x · D_sumᵀ`.  Norm/modulation `diff`, bias `diff_b` and `diff_m` patches replace
the float parameter by original + Σ strength·delta (the original tensor is kept and put back on removal).

Rotated INT8 layers: the rotation lives inside the activation quantizer and the stored codes; the LoRA runs
on the unrotated input x against the unrotated A, so it is consistent by construction.

Offload (`offload_to_cpu=True`): A_cat/B_cat stay in (pinned) CPU memory; each layer's forward waits for its
own copy and starts the copy of the next layer on a side CUDA stream (event-synchronised), so transfers
overlap compute and one or two layers' adapters are on the GPU at a time.  On a CPU-only machine the same
path runs with plain copies.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..layers import float_weight, has_lora_slot
from .keys import ModelTargets, Target, harmless_reason, param_target, resolve
from .parse import Dense, LoraCache, LoraError, LoraFile, LowRank, load_lora

log = logging.getLogger("wan_int8.lora")
# Hand the low-rank part to the INT8 op (fused into the GEMM epilogue) instead of adding it afterwards.
FUSE = os.environ.get("WAN_INT8_LORA_FUSE", "1") != "0"
# Stacks wider than this run as the separate addmm pass: on an H200 (Triton 3.6, M=32760) the fused epilogue
# added 7% for rank 64 but 37-53% for rank 256 (four stacked rank-64 LoRAs), where the separate pass added 13-17%.
FUSE_MAX_RANK = int(os.environ.get("WAN_INT8_LORA_FUSE_MAX_RANK", "64"))

STATE_ATTR = "_wan_int8_loras"
DORA_EPS = torch.finfo(torch.float32).eps


# -- matching ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FileReport:
    """How one LoRA file maps onto one model."""

    path: str
    strength: float
    styles: List[str]
    layers: Dict[str, str] = dataclasses.field(default_factory=dict)        # target -> adapter kind (+slice)
    params: Dict[str, str] = dataclasses.field(default_factory=dict)        # param key -> patch kind
    unmatched: List[Tuple[str, str]] = dataclasses.field(default_factory=list)   # (key, why): real misses
    harmless: List[Tuple[str, str]] = dataclasses.field(default_factory=list)    # (key, why): expected misses
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)     # unsupported kinds
    seconds: float = 0.0

    @property
    def matched(self) -> int:
        return len(self.layers) + len(self.params)

    def summary(self) -> str:
        name = os.path.basename(self.path)
        text = (f"{name} @ {self.strength:g}: applied to {len(self.layers)} layers"
                + (f" + {len(self.params)} norm/bias/modulation patches" if self.params else "")
                + (f" [{', '.join(self.styles)}]" if self.styles else ""))
        if self.unmatched:
            text += f"; {len(self.unmatched)} keys NOT matched (first: {self.unmatched[0][0]})"
        groups: Dict[str, int] = {}
        for _, why in self.harmless:
            groups[why] = groups.get(why, 0) + 1
        for why, n in groups.items():
            text += f"; {n} keys skipped: {why}"
        if self.skipped:
            text += f"; {len(self.skipped)} unsupported (first: {self.skipped[0][0]}: {self.skipped[0][1]})"
        return text

    def as_dict(self) -> dict:
        return {"path": self.path, "strength": self.strength, "styles": self.styles,
                "matched_layers": len(self.layers), "matched_params": len(self.params), "layers": self.layers,
                "params": self.params, "unmatched": [list(u) for u in self.unmatched],
                "harmless": [list(u) for u in self.harmless], "unsupported": [list(u) for u in self.skipped]}


@dataclasses.dataclass
class LoraReport:
    files: List[FileReport]
    offload_to_cpu: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        return "\n".join(f.summary() for f in self.files)

    def as_dict(self) -> dict:
        return {"files": [f.as_dict() for f in self.files], "offload_to_cpu": self.offload_to_cpu,
                "seconds": self.seconds}


@dataclasses.dataclass
class Match:
    """A LoRA file mapped onto a model: adapters per linear target, patches per parameter."""

    report: FileReport
    adapters: List[Tuple[Target, object]]                  # (target, LowRank | Dense)
    patches: List[Tuple[str, str, torch.Tensor]]           # (param key, role, delta)


def match_lora(lora: LoraFile, targets: ModelTargets, strength: float = 1.0) -> Match:
    """Map a parsed LoRA onto a model's names. Raises LoraError on a shape mismatch (naming the layer)."""
    report = FileReport(lora.path, strength, list(lora.styles), skipped=list(lora.skipped))
    adapters: List[Tuple[Target, object]] = []
    patches: List[Tuple[str, str, torch.Tensor]] = []
    seen: Dict[str, str] = {}

    def miss(key: str) -> None:
        why = harmless_reason(key, targets)
        (report.harmless if why else report.unmatched).append((key, why or "no layer of this name in the model"))

    for base, adapter in lora.adapters.items():
        target = resolve(base, targets, "linear")
        if target is None:
            miss(base)
            continue
        n, k = targets.linears[target.name]
        rows = n // target.parts
        if target.part is not None and n % target.parts:
            raise LoraError(f"{lora.path}: {base} -> {target.name}: fused layer has {n} rows, not divisible by 3")
        if adapter.shape != (rows, k):
            where = target.name + (f" (rows {target.part * rows}:{(target.part + 1) * rows} of [{n}, {k}])"
                                   if target.part is not None else "")
            raise LoraError(f"{lora.path}: LoRA {base} does not fit layer {where}: LoRA delta is "
                            f"{list(adapter.shape)}, the layer weight is {[rows, k]} (a LoRA for another model "
                            f"size or family?)")
        slot = f"{target.name}[{target.part}]" if target.part is not None else target.name
        if slot in seen:
            report.unmatched.append((base, f"duplicate: {seen[slot]} already targets {slot}"))
            continue
        seen[slot] = base
        adapters.append((target, adapter))
        label = adapter.kind + (f" rank {adapter.rank}" if isinstance(adapter, LowRank) else " dense")
        label += " +dora" if adapter.dora_scale is not None else ""
        report.layers[slot] = label

    for (base, role), delta in lora.patches.items():
        if role == "diff":     # a full weight delta on a linear runs as a dense adapter
            target = resolve(base, targets, "linear")
            if target is not None and target.part is None and delta.dim() == 2:
                n, k = targets.linears[target.name]
                if tuple(delta.shape) != (n, k):
                    raise LoraError(f"{lora.path}: {base}.diff does not fit layer {target.name}: "
                                    f"{list(delta.shape)} vs {[n, k]}")
                if target.name in seen:
                    report.unmatched.append((base + ".diff", f"duplicate: {target.name} already has an adapter"))
                    continue
                seen[target.name] = base
                adapters.append((target, Dense(delta, kind="diff")))
                report.layers[target.name] = "diff dense"
                continue
        target = param_target(base, role, targets)
        if target is None:
            miss(f"{base}.{role}")
            continue
        shape = targets.params[target.name]
        if delta.numel() != _numel(shape):
            raise LoraError(f"{lora.path}: {base}.{role} does not fit {target.name}: {list(delta.shape)} vs "
                            f"{list(shape)}")
        patches.append((target.name, role, delta.reshape(shape)))
        report.params[target.name] = role
    return Match(report, adapters, patches)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- one layer's stack ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Part:
    entry: int
    up: torch.Tensor              # [rows, r] (DoRA g folded in), CPU
    down: torch.Tensor            # [r, K]
    base_scale: float
    row0: int
    rows: int
    dora_g: Optional[torch.Tensor] = None   # [rows], output-axis DoRA


@dataclasses.dataclass
class _DensePart:
    entry: int
    delta: torch.Tensor           # [N, K] float64 (strength not applied), CPU


class LayerLora:
    """All adapters of one linear layer, stacked.  Installed as `Int8Linear.lora` (or via a forward hook on a
    float nn.Linear); `apply(x, y)` adds the stacked low-rank term into y in place and returns y."""

    def __init__(self, name: str, module: nn.Module, owner: "LoraSet"):
        self.name = name
        self.module = module
        self.owner = owner
        self.n, self.k = module.out_features, module.in_features
        self.parts: List[_Part] = []
        self.dense: List[_DensePart] = []
        self.entries: set = set()
        self._store: Dict[str, Optional[torch.Tensor]] = {}
        self._cast: Dict[tuple, tuple] = {}
        self._hook = None

    # building ------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The float weight this layer computes with (dequantized, unrotated for INT8), float64."""
        return float_weight(self.module)

    def add(self, entry: int, target: Target, adapter) -> None:
        rows = self.n // target.parts
        row0 = (target.part or 0) * rows
        self.entries.add(entry)
        if isinstance(adapter, Dense):
            d = adapter.delta_weight.double()
            full = d if rows == self.n else torch.zeros(self.n, self.k, dtype=torch.float64).index_copy_(
                0, torch.arange(row0, row0 + rows), d)
            self.dense.append(_DensePart(entry, full))
            return
        up, down = adapter.up.float(), adapter.down.float()
        dora = adapter.dora_scale
        if dora is None:
            self.parts.append(_Part(entry, up, down, adapter.scale, row0, rows))
            return
        w = self.base_weight()[row0:row0 + rows]
        m = dora.double()
        if m.numel() == rows and (m.dim() == 1 or m.shape[0] == rows):       # output axis: row scaling
            g = m.reshape(-1) / (w.norm(dim=1) + DORA_EPS)
            self.parts.append(_Part(entry, up.double() * g[:, None], down, adapter.scale, row0, rows, g))
        elif m.numel() == self.k:                                              # input axis: exact dense delta
            wc = w.double() + adapter.delta(torch.float64)
            h = m.reshape(-1).double() / (wc.norm(dim=0) + DORA_EPS)
            d = wc * h[None, :] - w
            full = torch.zeros(self.n, self.k, dtype=torch.float64)
            full[row0:row0 + rows] = d
            self.dense.append(_DensePart(entry, full))
        else:
            raise LoraError(f"layer {self.name}: dora_scale has shape {list(m.shape)}; expected [{rows}, 1] or "
                            f"[1, {self.k}]")

    def build(self, device, dtype, pin: bool) -> None:
        """Stack the parts into A_cat / B_cat on `device` (the storage device) in `dtype`."""
        store: Dict[str, Optional[torch.Tensor]] = {"A": None, "B": None}
        if self.parts:
            r_total = sum(p.down.shape[0] for p in self.parts)
            a = torch.cat([p.down.to(torch.float64) for p in self.parts], 0)
            b = torch.zeros(self.n, r_total, dtype=torch.float64)
            col = 0
            for p in self.parts:
                r = p.down.shape[0]
                b[p.row0:p.row0 + p.rows, col:col + r] = p.up
                col += r
            store["A"], store["B"] = a.to(dtype), b.to(dtype)
        self._store = {k: self._place(v, device, pin) for k, v in store.items()}
        self._device, self._dtype, self._pin = device, dtype, pin
        self.refresh()

    def _place(self, t, device, pin):
        if t is None:
            return None
        t = t.to(device).contiguous()
        return t.pin_memory() if pin and t.device.type == "cpu" else t

    def refresh(self) -> None:
        """Rebuild what depends on the strengths: the per-rank scale, DoRA row factors, the dense sum."""
        strengths = self.owner.strengths
        store = dict(self._store)
        if self.parts:
            store["s"] = torch.cat([torch.full((p.down.shape[0],), strengths[p.entry] * p.base_scale,
                                               dtype=torch.float64)
                                    for p in self.parts]).to(self._dtype)
        else:
            store["s"] = None
        rowc = None
        for p in self.parts:
            if p.dora_g is not None:
                rowc = torch.ones(self.n, dtype=torch.float64) if rowc is None else rowc
                rowc[p.row0:p.row0 + p.rows] += strengths[p.entry] * (p.dora_g - 1)
        store["c"] = None if rowc is None else rowc.to(self._dtype)
        dense = None
        for d in self.dense:
            dense = d.delta * strengths[d.entry] if dense is None else dense.add_(d.delta, alpha=strengths[d.entry])
        store["D"] = None if dense is None else dense.to(self._dtype)
        for key in ("s", "c", "D"):
            store[key] = self._place(store[key], self._device, self._pin)
        self._store = store
        self._cast.clear()

    def host_tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        return tuple(self._store.get(k) for k in ("A", "B", "s", "c", "D"))

    # running -------------------------------------------------------------------
    def _tensors(self, x: torch.Tensor):
        if self.owner.offload:
            ts = self.owner.prefetcher.get(self, x.device)
        else:
            ts = self.host_tensors()
        if ts[0] is not None and ts[0].dtype == x.dtype and ts[0].device == x.device:
            return ts
        key = (x.device, x.dtype)
        if key not in self._cast or self.owner.offload:
            cast = tuple(None if t is None else t.to(device=x.device, dtype=x.dtype) for t in ts)
            if self.owner.offload:
                return cast
            self._cast[key] = cast
        return self._cast[key]

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._add(x, y, self._tensors(x), low_rank=True)

    def fused_parts(self, x: torch.Tensor):
        """`(t, B, state)` for an op that adds `t · Bᵀ` itself (the INT8 GEMM epilogue): t = (x·A_catᵀ)·diag(s)
        `[M, R]` (strengths folded in through s) and B = B_cat `[N, R]`, both in x's dtype; `(None, None, state)`
        when nothing can be fused (no low-rank part, an output-axis DoRA row factor, fusion off).  Call
        `finish(x, y, state)` on the op's output for the rest.  Offload: takes this layer's prefetched tensors
        once; `finish` uses the same ones."""
        ts = self._tensors(x)
        a, b, s, c, _ = ts
        if a is None or c is not None or not FUSE or a.shape[0] > FUSE_MAX_RANK:
            return None, None, (ts, False)
        t = torch.mm(x.reshape(-1, self.k), a.t())
        t.mul_(s)
        return t, b, (ts, True)

    def finish(self, x: torch.Tensor, y: torch.Tensor, state) -> torch.Tensor:
        """After `fused_parts`: add what the op did not (everything when nothing was fused, else the dense D)."""
        ts, fused = state
        return self._add(x, y, ts, low_rank=not fused)

    @staticmethod
    def fully_fused(state) -> bool:
        """True when the op that received `fused_parts`' (t, B) did everything: `finish` would add nothing, so
        the op may also apply what comes after the LoRA (the block epilogue: GELU, gated residual)."""
        ts, fused = state
        return fused and ts[4] is None

    def _add(self, x: torch.Tensor, y: torch.Tensor, ts, low_rank: bool) -> torch.Tensor:
        a, b, s, c, d = ts
        if not low_rank and d is None:
            return y
        x2 = x.reshape(-1, self.k)
        if not y.is_contiguous():
            y = y.contiguous()
        y2 = y.view(-1, self.n)
        if c is not None:
            y2.mul_(c)
            bias = getattr(self.module, "bias", None)
            if bias is not None:
                y2.add_(bias.to(y.dtype) * (1 - c))
        if a is not None and low_rank:
            t = torch.mm(x2, a.t())
            t.mul_(s)
            y2.addmm_(t, b.t())
        if d is not None:
            y2.addmm_(x2, d.t())
        return y

    # install / uninstall --------------------------------------------------------
    def install(self) -> None:
        if has_lora_slot(self.module):
            self.module.lora = self
        else:
            self._hook = self.module.register_forward_hook(lambda mod, args, out: self.apply(args[0], out))

    def uninstall(self) -> None:
        if has_lora_slot(self.module):
            if self.module.__dict__.get("lora") is self:
                del self.module.lora          # back to the class default (None)
        elif self._hook is not None:
            self._hook.remove()
            self._hook = None


# -- offload --------------------------------------------------------------------------------------------------
class Prefetcher:
    """Copies each layer's adapters to the compute device one layer ahead, on a side stream (CUDA)."""

    def __init__(self, order: Sequence[LayerLora]):
        self.order = list(order)
        self.next = {id(l): self.order[(i + 1) % len(self.order)] for i, l in enumerate(self.order)} if order else {}
        self.pending: Dict[int, tuple] = {}
        self.streams: Dict[torch.device, object] = {}
        self.copies = 0

    def clear(self) -> None:
        self.pending.clear()

    def _copy(self, layer: LayerLora, device: torch.device):
        self.copies += 1
        src = layer.host_tensors()
        if device.type == "cuda":
            stream = self.streams.get(device)
            if stream is None:
                stream = self.streams[device] = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                out = tuple(None if t is None else t.to(device, non_blocking=True) for t in src)
                event = torch.cuda.Event()
                event.record(stream)
            return out, event
        return tuple(None if t is None else t.to(device, copy=True) for t in src), None

    def get(self, layer: LayerLora, device: torch.device):
        entry = self.pending.pop(id(layer), None)
        if entry is None:
            entry = self._copy(layer, device)
        tensors, event = entry
        if event is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            for t in tensors:
                if t is not None:
                    t.record_stream(current)   # allocated on the side stream, used (and freed) on this one
        nxt = self.next.get(id(layer))
        if nxt is not None and nxt is not layer and id(nxt) not in self.pending:
            self.pending[id(nxt)] = self._copy(nxt, device)
        return tensors


# -- the set of LoRAs applied to one model -------------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    path: str
    lora: LoraFile
    strength: float
    report: FileReport


class LoraSet:
    """The LoRAs applied to one model (kept on the model object; see `apply_loras`)."""

    def __init__(self, model: nn.Module, offload: bool = False, dtype: Optional[torch.dtype] = None):
        self.model = model
        self.offload = offload
        self.dtype = dtype
        self.entries: List[_Entry] = []
        self.layers: Dict[str, LayerLora] = {}
        self.params: Dict[str, Tuple[nn.Parameter, torch.Tensor]] = {}    # key -> (param, original data)
        self.param_deltas: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
        self.prefetcher: Optional[Prefetcher] = None

    @property
    def strengths(self) -> List[float]:
        return [e.strength for e in self.entries]

    def _add(self, path: str, lora: LoraFile, strength: float, targets: ModelTargets) -> FileReport:
        start = time.perf_counter()
        match = match_lora(lora, targets, strength)
        if match.report.matched == 0:
            raise LoraError(f"{path}: no key of this LoRA matches the model ({len(lora.adapters)} adapters, "
                            f"{len(lora.patches)} patches, {lora.num_keys} tensors; first: "
                            f"{next(iter(lora.adapters), next(iter(lora.patches), ('?',))[0])}): is it for "
                            f"another model family?\n{match.report.summary()}")
        index = len(self.entries)
        self.entries.append(_Entry(path, lora, strength, match.report))
        modules = dict(self.model.named_modules())
        for target, adapter in match.adapters:
            layer = self.layers.get(target.name)
            if layer is None:
                layer = self.layers[target.name] = LayerLora(target.name, modules[target.name], self)
            layer.add(index, target, adapter)
        params = dict(self.model.named_parameters())
        for key, _, delta in match.patches:
            if key not in self.params:
                p = params[key]
                self.params[key] = (p, p.data)
            self.param_deltas.setdefault(key, []).append((index, delta))
        match.report.seconds = time.perf_counter() - start
        return match.report

    def _storage(self, layer: LayerLora):
        ref = next((t for t in (getattr(layer.module, "weight", None),) if t is not None), None)
        device = torch.device("cpu") if self.offload else (ref.device if ref is not None else torch.device("cpu"))
        dtype = self.dtype or _model_dtype(self.model)
        return device, dtype, self.offload and torch.cuda.is_available()

    def install(self) -> None:
        for layer in self.layers.values():
            layer.build(*self._storage(layer))
            layer.install()
        if self.offload:
            self.prefetcher = Prefetcher(list(self.layers.values()))
        self._patch_params()

    def _patch_params(self) -> None:
        strengths = self.strengths
        for key, (param, original) in self.params.items():
            total = original.to(torch.float32 if original.dtype != torch.float64 else torch.float64)
            total = total.clone()
            for i, delta in self.param_deltas[key]:
                total.add_(delta.to(device=total.device, dtype=total.dtype), alpha=strengths[i])
            param.data = total.to(original.dtype)

    def set_strength(self, which: Union[int, str], strength: float) -> None:
        """Change one LoRA's strength: rebuilds only the small per-layer scale vectors (no file read)."""
        index = self._index(which)
        self.entries[index].strength = float(strength)
        self.entries[index].report.strength = float(strength)
        for layer in self.layers.values():
            if index in layer.entries:
                layer.refresh()
        if self.prefetcher is not None:
            self.prefetcher.clear()
        self._patch_params()

    def _index(self, which: Union[int, str]) -> int:
        if isinstance(which, int):
            if not 0 <= which < len(self.entries):
                raise IndexError(f"LoRA index {which} out of range ({len(self.entries)} applied)")
            return which
        real = os.path.realpath(which)
        for i, e in enumerate(self.entries):
            if os.path.realpath(e.path) == real or os.path.basename(e.path) == which:
                return i
        raise KeyError(f"no applied LoRA is {which!r}")

    def remove(self) -> None:
        for layer in self.layers.values():
            layer.uninstall()
        for key, (param, original) in self.params.items():
            param.data = original
        self.layers.clear()
        self.params.clear()
        self.param_deltas.clear()
        self.prefetcher = None

    def report(self) -> LoraReport:
        return LoraReport([e.report for e in self.entries], self.offload)


def _model_dtype(model: nn.Module) -> torch.dtype:
    d = getattr(model, "dtype", None)
    if isinstance(d, torch.dtype) and d.is_floating_point:
        return d
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            return p.dtype
    return torch.float32


# -- public API ------------------------------------------------------------------------------------------------
LoraSpec = Union[str, Tuple[str, float], Tuple[LoraFile, float]]


def parse_lora_spec(spec: str) -> Tuple[str, float]:
    """`"path.safetensors:0.8"` -> ("path.safetensors", 0.8); no `:strength` means 1.0 (Windows drives are fine)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path and "/" not in tail and "\\" not in tail:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def apply_loras(model: nn.Module, loras: Sequence[LoraSpec], offload_to_cpu: bool = False, append: bool = False,
                cache: Optional[LoraCache] = None, dtype: Optional[torch.dtype] = None) -> LoraReport:
    """Apply LoRAs to a model with INT8 (and/or float) linears, at run time, stacked.

    `loras`: [(path, strength), ...] (or "path:strength" strings, or (LoraFile, strength)).  Replaces what was
    applied before (unless `append`: then they stack with it).  Files come from the parsed-LoRA cache.
    Raises LoraError when a file matches nothing or an adapter's shape does not fit its layer.  Returns the
    match report (`.summary()` is the human text).  The state lives on the model: see `set_lora_strength`,
    `remove_loras`, `lora_state`.
    """
    start = time.perf_counter()
    previous: Optional[LoraSet] = getattr(model, STATE_ATTR, None)
    keep: List[Tuple[str, LoraFile, float]] = []
    if previous is not None:
        if append:
            keep = [(e.path, e.lora, e.strength) for e in previous.entries]
            offload_to_cpu = offload_to_cpu or previous.offload
        previous.remove()
        object.__setattr__(model, STATE_ATTR, None)
    items = list(keep)
    for spec in loras:
        if isinstance(spec, str):
            spec = parse_lora_spec(spec)
        src, strength = spec
        if isinstance(src, LoraFile):
            items.append((src.path, src, float(strength)))
        else:
            items.append((os.fspath(src), load_lora(os.fspath(src), cache), float(strength)))
    state = LoraSet(model, offload_to_cpu, dtype)
    targets = ModelTargets.from_model(model)
    try:
        with torch.no_grad():
            for path, lora, strength in items:
                state._add(path, lora, strength, targets)
            state.install()
    except BaseException:
        state.remove()
        raise
    object.__setattr__(model, STATE_ATTR, state)
    report = state.report()
    report.seconds = time.perf_counter() - start
    for f in report.files:
        log.info("LoRA %s", f.summary())
    return report


def lora_state(model: nn.Module) -> Optional[LoraSet]:
    return getattr(model, STATE_ATTR, None)


def set_lora_strength(model: nn.Module, which: Union[int, str], strength: float) -> None:
    state = lora_state(model)
    if state is None:
        raise LoraError("no LoRA is applied to this model")
    with torch.no_grad():
        state.set_strength(which, strength)


def remove_loras(model: nn.Module) -> None:
    """Uninstall every LoRA: the model computes bit-exactly what it did before."""
    state = lora_state(model)
    if state is not None:
        state.remove()
        object.__setattr__(model, STATE_ATTR, None)
