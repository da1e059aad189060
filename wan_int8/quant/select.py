"""Per-layer choice between plain INT8, rotated INT8 and keeping the layer in bf16.

Rotation (block Hadamard along K) cures outlier *input channels*, but it costs an extra pass over the
activation and does nothing for layers without outliers; a few layers are hurt so much by INT8 that they
are best left in bf16.  This module measures, per layer, on real inputs when there are some:

1. `capture_inputs` records each Linear's input during a short run (forward hooks, rows capped);
2. `measure_layer_errors` computes the layer's output error ‖y − y_ref‖/‖y_ref‖ for plain row-wise INT8,
   rotated INT8 (regular Hadamard, group = the largest power of 4 <= 256 dividing K) and bf16, with
   `y_ref` the layer in fp32 on the same input;
3. `choose` rotates a layer when rotation lowers its error by more than `threshold` (relative), then keeps
   in bf16 the layers whose best INT8 error is worst, as many as the `Budget` allows;
4. `apply_plan` swaps the layers with `Int8Linear.from_linear` (bf16 layers are left as they are).

Without inputs, `weight_statistics` scores layers from the weights alone: the weight error of both INT8
variants (exact, data-free) and the outlier statistics of the weight columns (excess kurtosis and
max-to-rms of the column norms).  It cannot see activation outliers, so prefer calibration inputs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .hadamard import default_group_size, rotate
from .int8 import dequantize, int8_linear_reference, quantize_weight
from .metrics import rel_error
from .types import Rotation

log = logging.getLogger("wan_int8")

CHOICES = ("int8", "int8-rot", "bf16")
DEFAULT_THRESHOLD = 0.10      # rotate when it lowers the error by more than 10 %
DEFAULT_MAX_ROWS = 4096       # captured activation rows per layer
COLUMN_OUTLIER_RATIO = 5.0    # weight-only mode: a column norm this many times the rms marks an outlier channel


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much may stay in bf16.  Every limit given must hold; none given: nothing stays in bf16."""

    max_layers: Optional[int] = None
    max_fraction: Optional[float] = None     # of the candidate layers, 0..1
    max_extra_bytes: Optional[int] = None    # bf16 bytes minus INT8 bytes, summed over the kept layers

    def allows(self, layers: int, extra_bytes: int, total_layers: int) -> bool:
        if self.max_layers is None and self.max_fraction is None and self.max_extra_bytes is None:
            return False
        if self.max_layers is not None and layers > self.max_layers:
            return False
        if self.max_fraction is not None and layers > math.floor(self.max_fraction * total_layers + 1e-9):
            return False
        if self.max_extra_bytes is not None and extra_bytes > self.max_extra_bytes:
            return False
        return True


@dataclasses.dataclass
class LayerErrors:
    """One layer's measured (or, in weight-only mode, estimated) errors under each choice."""

    name: str
    out_features: int
    in_features: int
    int8: float                      # output rel error (calibrated) or weight rel error (weights mode)
    int8_rot: Optional[float]        # None when no power-of-4 group divides K
    bf16: float
    rotation_group: Optional[int]
    weight_int8: float = 0.0         # ‖W8 − W‖/‖W‖, plain
    weight_int8_rot: Optional[float] = None
    column_kurtosis: Optional[float] = None      # excess kurtosis of the weight entries, per column, max
    column_max_to_rms: Optional[float] = None    # max column norm / rms of the column norms
    act_col_max_to_rms: Optional[float] = None   # calibrated: max |x| of any column / rms(x)
    act_col_max_to_rms_rot: Optional[float] = None

    def error(self, choice: str) -> float:
        return {"int8": self.int8, "int8-rot": self.int8_rot if self.int8_rot is not None else self.int8,
                "bf16": self.bf16}[choice]

    @property
    def extra_bytes(self) -> int:
        """bf16 weight bytes minus INT8 (codes + fp32 row scales) bytes."""
        n, k = self.out_features, self.in_features
        return 2 * n * k - (n * k + 4 * n)


@dataclasses.dataclass
class SelectionPlan:
    choices: Dict[str, str]                  # layer -> "int8" | "int8-rot" | "bf16"
    errors: Dict[str, LayerErrors]
    mode: str                                # "calibrated" | "weights"
    threshold: float
    budget: Budget
    extra_bytes: int = 0

    def counts(self) -> Dict[str, int]:
        return {c: sum(v == c for v in self.choices.values()) for c in CHOICES}

    def as_dict(self) -> dict:
        return {"mode": self.mode, "threshold": self.threshold, "budget": dataclasses.asdict(self.budget),
                "counts": self.counts(), "extra_bytes": self.extra_bytes, "choices": dict(self.choices),
                "errors": {n: dataclasses.asdict(e) for n, e in self.errors.items()}}


# -- calibration -------------------------------------------------------------------------------------------

def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def candidate_layers(model: nn.Module, config=None) -> List[str]:
    """Names of the `nn.Linear` layers `config` (a QuantizeConfig; default: all) would quantize."""
    return [n for n, m in model.named_modules() if _is_linear(m) and (config is None or config.wants(n, m))]


class InputCapture:
    """Forward pre-hooks that keep each named layer's input (flattened to `[M, K]`, at most `max_rows` rows).

    Only the first `calls` calls of each layer are kept (a denoising run calls every layer once per step).
    Rows beyond `max_rows` are subsampled evenly (deterministic).  Use as a context manager.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], max_rows: int = DEFAULT_MAX_ROWS, calls: int = 1,
                 device="cpu"):
        self.model, self.names = model, list(names)
        self.max_rows, self.calls, self.device = max_rows, calls, device
        self.inputs: Dict[str, torch.Tensor] = {}
        self._seen: Dict[str, int] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def pre(module, args):
            if self._seen.get(name, 0) >= self.calls or not args:
                return
            self._seen[name] = self._seen.get(name, 0) + 1
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if self.max_rows and x.shape[0] > self.max_rows:
                idx = torch.linspace(0, x.shape[0] - 1, self.max_rows, device=x.device).round().long()
                x = x[idx]
            x = x.to(self.device, copy=True)
            prev = self.inputs.get(name)
            self.inputs[name] = x if prev is None else torch.cat([prev, x])[-self.max_rows:]
        return pre

    def __enter__(self) -> "InputCapture":
        modules = dict(self.model.named_modules())
        for name in self.names:
            self._handles.append(modules[name].register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def capture_inputs(model: nn.Module, run: Callable[[], object], names: Optional[Sequence[str]] = None,
                   max_rows: int = DEFAULT_MAX_ROWS, calls: int = 1) -> Dict[str, torch.Tensor]:
    """Run `run()` (e.g. a short sampling run of `model`) and return {layer: its input `[M, K]` on the CPU}."""
    names = list(names) if names is not None else candidate_layers(model)
    with InputCapture(model, names, max_rows, calls) as cap, torch.no_grad():
        run()
    return cap.inputs


def rotation_for(k: int, preferred: int = 256) -> Optional[Rotation]:
    """The regular (convrot) Hadamard whose group is the largest power of 4 <= `preferred` dividing K."""
    g = default_group_size(k, preferred)
    return Rotation("regular", g) if g else None


def column_max_to_rms(x: torch.Tensor) -> float:
    """max |x| over any column / rms of all of x: ~3-5 for Gaussian data, ≫ with outlier channels."""
    xf = x.detach().to(torch.float64)
    rms = xf.pow(2).mean().sqrt().item()
    return xf.abs().max().item() / rms if rms > 0 else 0.0


def outlier_stats(x: torch.Tensor, rotation: Optional[Rotation]) -> Dict[str, float]:
    """Outlier statistics of an activation `[M, K]` before and after `rotation` (HADAMARD_DIAGNOSTICS).

    col_max_to_rms: max over columns of the column absmax / rms(x); top_col_rms_ratio: largest column rms
    over the median column rms.
    """
    def stats(t: torch.Tensor):
        t = t.to(torch.float64)
        col_rms = t.pow(2).mean(dim=0).sqrt()
        med = col_rms.median().item()
        return column_max_to_rms(t), (col_rms.max().item() / med if med > 0 else 0.0)

    before = stats(x)
    out = {"col_max_to_rms": before[0], "top_col_rms_ratio": before[1]}
    if rotation is not None:
        after = stats(rotate(x.to(torch.float32), rotation.kind, rotation.group_size, rotation.signs))
        out.update(col_max_to_rms_rot=after[0], top_col_rms_ratio_rot=after[1])
    return out


def measure_layer_errors(model: nn.Module, inputs: Dict[str, torch.Tensor], rotation_group: int = 256
                         ) -> Dict[str, LayerErrors]:
    """Output error of each layer in `inputs` under plain INT8, rotated INT8 and bf16 (reference: fp32)."""
    modules = dict(model.named_modules())
    result: Dict[str, LayerErrors] = {}
    for name, x in inputs.items():
        lin = modules[name]
        w = lin.weight.detach().to(torch.float32)
        b = lin.bias.detach().to(torch.float32) if lin.bias is not None else None
        xf = x.to(device=w.device, dtype=torch.float32)
        ref = nn.functional.linear(xf, w, b)
        q = quantize_weight(w)
        e_int8 = rel_error(int8_linear_reference(xf, q, b), ref)
        rot = rotation_for(w.shape[1], rotation_group)
        e_rot = w_rot = None
        if rot is not None:
            qr = quantize_weight(w, rotation=rot)
            e_rot = rel_error(int8_linear_reference(xf, qr, b), ref)
            w_rot = rel_error(dequantize(qr), w)
        y16 = nn.functional.linear(xf.to(torch.bfloat16).float(), w.to(torch.bfloat16).float(),
                                   None if b is None else b.to(torch.bfloat16).float())
        stats = outlier_stats(xf, rot)
        result[name] = LayerErrors(name, w.shape[0], w.shape[1], e_int8, e_rot, rel_error(y16, ref),
                                   rot.group_size if rot else None, rel_error(dequantize(q), w), w_rot,
                                   act_col_max_to_rms=stats["col_max_to_rms"],
                                   act_col_max_to_rms_rot=stats.get("col_max_to_rms_rot"))
    return result


def _column_stats(w: torch.Tensor):
    wf = w.detach().to(torch.float64)
    norms = wf.norm(dim=0)
    rms = norms.pow(2).mean().sqrt().item()
    max_to_rms = norms.max().item() / rms if rms > 0 else 0.0
    centered = wf - wf.mean(dim=0, keepdim=True)
    var = centered.pow(2).mean(dim=0)
    kurt = (centered.pow(4).mean(dim=0) / var.pow(2).clamp_min(1e-300) - 3.0)
    return float(kurt.max().item()), max_to_rms


def weight_statistics(model: nn.Module, names: Optional[Sequence[str]] = None, rotation_group: int = 256
                      ) -> Dict[str, LayerErrors]:
    """Data-free scores: weight error plain vs rotated (as `int8` / `int8_rot`) and column outlier statistics."""
    modules = dict(model.named_modules())
    names = list(names) if names is not None else candidate_layers(model)
    result: Dict[str, LayerErrors] = {}
    for name in names:
        w = modules[name].weight.detach().to(torch.float32)
        q = quantize_weight(w)
        e_int8 = rel_error(dequantize(q), w)
        rot = rotation_for(w.shape[1], rotation_group)
        e_rot = rel_error(dequantize(quantize_weight(w, rotation=rot)), w) if rot else None
        kurt, ratio = _column_stats(w)
        result[name] = LayerErrors(name, w.shape[0], w.shape[1], e_int8, e_rot,
                                   rel_error(w.to(torch.bfloat16), w), rot.group_size if rot else None,
                                   e_int8, e_rot, column_kurtosis=kurt, column_max_to_rms=ratio)
    return result


# -- the choice --------------------------------------------------------------------------------------------

def choose(errors: Dict[str, LayerErrors], threshold: float = DEFAULT_THRESHOLD, budget: Budget = Budget(),
           mode: str = "calibrated", column_outlier_ratio: float = COLUMN_OUTLIER_RATIO) -> SelectionPlan:
    """Pick a choice per layer from measured errors.

    Rotate when `int8_rot < int8 · (1 − threshold)` (weights mode also when a weight column's norm is
    `column_outlier_ratio` times the rms: an outlier input channel).  Then, worst best-INT8 error first,
    keep layers in bf16 while `budget` still allows it.
    """
    choices: Dict[str, str] = {}
    for name, e in errors.items():
        rot = e.int8_rot is not None and e.int8_rot < e.int8 * (1.0 - threshold)
        if mode == "weights" and e.int8_rot is not None and (e.column_max_to_rms or 0) >= column_outlier_ratio:
            rot = True
        choices[name] = "int8-rot" if rot else "int8"
    total = len(errors)
    kept, extra = 0, 0
    for name in sorted(errors, key=lambda n: -errors[n].error(choices[n])):
        e = errors[name]
        if e.bf16 >= e.error(choices[name]):
            continue
        if not budget.allows(kept + 1, extra + e.extra_bytes, total):
            continue   # a smaller layer further down may still fit a byte budget
        choices[name] = "bf16"
        kept, extra = kept + 1, extra + e.extra_bytes
    return SelectionPlan(choices, errors, mode, threshold, budget, extra)


def select_layers(model: nn.Module, inputs: Optional[Dict[str, torch.Tensor]] = None,
                  names: Optional[Sequence[str]] = None, budget: Budget = Budget(),
                  threshold: float = DEFAULT_THRESHOLD, rotation_group: int = 256) -> SelectionPlan:
    """Measure (with `inputs`: captured activations) or estimate (without: weights only) and choose."""
    if inputs:
        if names is not None:
            inputs = {n: inputs[n] for n in names if n in inputs}
        return choose(measure_layer_errors(model, inputs, rotation_group), threshold, budget, "calibrated")
    return choose(weight_statistics(model, names, rotation_group), threshold, budget, "weights")


def apply_plan(model: nn.Module, plan: SelectionPlan | Dict[str, str], rotation_group: int = 256,
               granularity: str = "row") -> Dict[str, str]:
    """Swap the planned layers in place: "int8" / "int8-rot" -> `Int8Linear.from_linear`; "bf16" stays."""
    from ..layers import Int8Linear, _set_submodule

    choices = plan.choices if isinstance(plan, SelectionPlan) else plan
    modules = dict(model.named_modules())
    report: Dict[str, str] = {}
    for name, choice in choices.items():
        if choice not in CHOICES:
            raise ValueError(f"layer {name}: unknown choice {choice!r} (expected one of {', '.join(CHOICES)})")
        lin = modules[name]
        if choice == "bf16":
            report[name] = "bf16"
            continue
        rot = rotation_for(lin.in_features, rotation_group) if choice == "int8-rot" else None
        _set_submodule(model, name, Int8Linear.from_linear(lin, granularity, rotation=rot, name=name))
        report[name] = choice if (rot is not None or choice == "int8") else "int8"
    return report
