"""`wan-int8 accuracy`: how far an INT8 (plain, rotated, per-layer selected, LoRA'd) Wan is from its float original.

Two sources:
- default: the tiny Wan built in code (outlier channels included).  The reference is its bf16 weights run
  in fp32; the candidates are plain row-wise INT8, rotated INT8 (regular Hadamard, group 256 where it
  divides K), FP8-rowwise emulation and a per-layer selected plan (calibrated on the reference run);
- `--float FILE --int8 FILE`: a real checkpoint pair, both loaded with `build_wan_model` (the INT8 file's
  float layers are quantized at load as `run` does, rotation following INT8_HADAMARD_QUIP).

Every model samples `--steps` denoising steps from the same `seeded_inputs`.  Reported: per layer, the
weight error ‖W8 − W‖/‖W‖ and the output error of the layer on the inputs it saw in the reference run's
first denoising step (at most --max-rows rows);
end to end, the relative error and cosine similarity of the final latents.  NaN/Inf anywhere (a weight,
a layer output, the final latents) is named and makes the exit code 3.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import get_settings
from .quant.fp8 import Fp8Linear, family_rules, fp8_quantize_model
from .quant.int8 import dequantize
from .quant.metrics import cosine, max_rel_error, rel_error
from .quant.select import (DEFAULT_MAX_ROWS, DEFAULT_THRESHOLD, Budget, InputCapture, SelectionPlan, apply_plan,
                           outlier_stats, rotation_for, select_layers)

log = logging.getLogger("wan_int8")

EXIT_NONFINITE = 3
TINY_CANDIDATES = ("int8", "int8-rot", "fp8", "select")
# on request: rotated INT8 linears plus INT8 attention (P·V in fp8, or in 16 bits)
ATTENTION_CANDIDATES = {"int8-rot+attn": "fp8", "int8-rot+attn16": "fp16"}
# ... and the fused block (wan_int8.fused), without or with INT8 attention (P·V fp8)
FUSED_CANDIDATES = {"int8-rot+fused": None, "int8-rot+attn+fused": "fp8"}
ALL_CANDIDATES = TINY_CANDIDATES + tuple(ATTENTION_CANDIDATES) + tuple(FUSED_CANDIDATES)
FILE_CANDIDATE = "int8-file"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LoraUnavailable(RuntimeError):
    """--lora was given but wan_int8.lora.apply_loras cannot be imported."""


class LoraFailed(RuntimeError):
    """apply_loras refused a model (unreadable file, no matching key, a layer type it cannot carry)."""


# -- models -----------------------------------------------------------------------------------------------

def _block_index(name: str) -> Optional[int]:
    m = re.match(r"(?:vace_)?blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _is_linear_like(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(module, nn.Embedding)


def layer_kind(module: nn.Module) -> str:
    from .layers import Int8Linear
    if isinstance(module, Int8Linear):
        return "int8" + ("-rot" if module.rotation_kind != "none" else "")
    if isinstance(module, Fp8Linear):
        return "fp8"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(module.weight.dtype, "float")


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The float weight `[N, K]` a layer computes with (dequantized, un-rotated), fp32."""
    from .layers import Int8Linear
    if isinstance(module, Int8Linear):
        return dequantize(module.int8_weight(), torch.float32)
    if isinstance(module, Fp8Linear):
        return module.dequantized_weight(torch.float32)
    return module.weight.detach().to(torch.float32)


def quantized_copy(model: nn.Module, kind: str, family: str = "wan") -> nn.Module:
    """A deep copy of a float model with the family's layers as plain INT8, rotated INT8 or FP8 (emulated)."""
    from .layers import quantize_model
    m = copy.deepcopy(model)
    if kind == "fp8":
        fp8_quantize_model(m, family=family)
    elif kind in ("int8", "int8-rot"):
        quantize_model(m, family_rules(family, rotate=kind == "int8-rot", rotation_group=256))
    elif kind in ATTENTION_CANDIDATES or kind in FUSED_CANDIDATES:
        from .attention import heads_attention
        quantize_model(m, family_rules(family, rotate=True, rotation_group=256))
        pv = ATTENTION_CANDIDATES.get(kind) or FUSED_CANDIDATES.get(kind)
        if pv:
            m.set_attention(heads_attention(attention_config(pv, model)))
        if kind in FUSED_CANDIDATES:   # the fused passes, on their torch references where no kernel can run
            m.set_fused_blocks(True, require_kernels=False)
    else:
        raise ValueError(f"unknown candidate {kind!r}")
    return m


def attention_config(pv: str, model: nn.Module):
    """The GPU kernels where they can run (a GPU, or TRITON_INTERPRET=1; "auto" picks the Gluon or the Triton
    kernel as the ComfyUI node does), else the torch oracle (the CPU)."""
    from .attention import AttentionConfig, unavailable_reason
    p = next(model.parameters())
    probe = torch.zeros(1, 1, 1, 128, device=p.device, dtype=torch.bfloat16)
    why = unavailable_reason(probe, probe, probe)
    if why is not None:
        log.info("accuracy: INT8 attention runs as the torch reference (%s)", why)
    return AttentionConfig(pv=pv, backend="reference" if why else "auto")


def parse_lora(spec: str) -> Tuple[str, float]:
    """`PATH[:STRENGTH]` -> (path, strength); a trailing part that is not a number belongs to the path."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def lora_applier(loras: Sequence[Tuple[str, float]]) -> Optional[Callable[[nn.Module], object]]:
    """`model -> apply_loras(model, loras)`, or None without LoRAs; raises LoraUnavailable if it cannot."""
    if not loras:
        return None
    try:
        from .lora import apply_loras
    except ImportError as exc:
        raise LoraUnavailable(f"--lora needs wan_int8.lora.apply_loras, which this installation does not have "
                              f"({exc}); run without --lora") from None

    def apply(model: nn.Module):
        try:
            return apply_loras(model, list(loras))
        except (ValueError, TypeError, OSError, KeyError) as exc:
            raise LoraFailed(str(exc)) from exc
    return apply


# -- running ----------------------------------------------------------------------------------------------

class NonFiniteWatch:
    """Forward hooks on every linear: remember, in call order, the layers whose output has NaN/Inf."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: List[str] = []
        self._handles = []

    def __enter__(self):
        for name, mod in self.model.named_modules():
            if _is_linear_like(mod):
                self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def hook(module, args, out):
            if name not in self.layers and isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
                self.layers.append(name)
        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def nonfinite_tensors(model: nn.Module) -> List[str]:
    """Floating parameters/buffers of `model` holding NaN or Inf."""
    bad = []
    for key, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None and t.is_floating_point() and t.dtype not in (torch.float8_e4m3fn,) \
                and not bool(torch.isfinite(t).all()):
            bad.append(key)
    return bad


def _sample(model, inputs, steps):
    from .models.wan import sample
    with torch.no_grad():
        return sample(model, inputs.noise, inputs.context, steps=steps, clip_fea=inputs.clip_fea, cond=inputs.cond)


@dataclasses.dataclass
class Result:
    """Everything `accuracy` prints; `as_dict()` is the `--json` object."""

    header: Dict[str, object]
    layers: List[str]
    candidates: Dict[str, dict]
    nonfinite: List[dict]
    plan: Optional[SelectionPlan] = None
    diagnostics: Optional[Dict[str, dict]] = None

    def as_dict(self) -> dict:
        return {**self.header, "layers": self.layers, "candidates": self.candidates, "nonfinite": self.nonfinite,
                "plan": self.plan.as_dict() if self.plan else None, "diagnostics": self.diagnostics,
                "ok": not self.nonfinite}


def compare(reference: nn.Module, inputs, steps: int, static: Dict[str, nn.Module],
            names: Sequence[str], header: Dict[str, object], select: Optional[Callable] = None,
            lora: Optional[Callable[[nn.Module], object]] = None, max_rows: int = DEFAULT_MAX_ROWS,
            diagnostics: bool = False) -> Result:
    """Run the reference (capturing the inputs of `names`) and each candidate on the same inputs; measure.

    `static`: candidate models built already; `select(captures) -> (model, plan)` builds one from the
    reference run's activations.  `lora` (if any) is applied to the reference and every candidate.
    """
    nonfinite: List[dict] = []
    for label, model in [("reference", reference), *static.items()]:
        for key in nonfinite_tensors(model):
            nonfinite.append({"model": label, "layer": key.rsplit(".", 1)[0], "where": f"tensor {key}"})
    if nonfinite and any(n["model"] == "reference" for n in nonfinite):
        select = None   # quantizing NaN weights is refused; the reference is broken anyway
    pristine = copy.deepcopy(reference) if select is not None else None
    notes: List[str] = []
    if lora is not None:
        rep = lora(reference)     # a LoRA the reference cannot take is an error (LoraFailed)
        if hasattr(rep, "summary"):
            header = {**header, "lora_report": rep.summary()}
        for label in list(static):
            try:
                lora(static[label])
            except LoraFailed as exc:   # e.g. the FP8 emulation has no LoRA path: leave it out, say so
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                notes.append(f"{label}: left out, the LoRA cannot be applied to it ({why})")
                log.warning("accuracy: candidate %s left out: the LoRA cannot be applied to it (%s)", label, why)
                del static[label]

    with InputCapture(reference, names, max_rows) as cap, NonFiniteWatch(reference) as watch:
        ref_out = _sample(reference, inputs, steps).float()
    captures = cap.inputs
    _record(nonfinite, "reference", watch, ref_out)

    diag = None
    if diagnostics:
        diag = {}
        for name in names:
            if name in captures:
                st = outlier_stats(captures[name].float(), rotation_for(captures[name].shape[-1]))
                diag[name] = st
                log.info("hadamard diagnostics %s: column max/rms %.1f -> %.1f rotated; top column rms / median %.1f "
                         "-> %.1f", name, st["col_max_to_rms"], st.get("col_max_to_rms_rot", float("nan")),
                         st["top_col_rms_ratio"], st.get("top_col_rms_ratio_rot", float("nan")))

    candidates = dict(static)
    plan = None
    if select is not None:
        model, plan = select(pristine, captures)
        if lora is not None:
            lora(model)
        candidates["select"] = model
    del pristine

    ref_modules = dict(reference.named_modules())
    results: Dict[str, dict] = {}
    for label, model in candidates.items():
        with NonFiniteWatch(model) as watch:
            out = _sample(model, inputs, steps).float()
        _record(nonfinite, label, watch, out)
        modules = dict(model.named_modules())
        layers = {}
        for name in names:
            mod, ref_mod = modules.get(name), ref_modules.get(name)
            if mod is None or ref_mod is None or name not in captures:
                continue
            x = captures[name].to(getattr(inputs.noise, "device", "cpu"))
            with torch.no_grad():
                y_ref = ref_mod(x.to(_compute_dtype(ref_mod, x)))
                y = mod(x.to(_compute_dtype(mod, x)))
            w_err = rel_error(effective_weight(mod), effective_weight(ref_mod))
            kind = layer_kind(mod)
            if label == "select" and plan is not None and plan.choices.get(name) == "bf16":
                kind = "bf16"   # kept unquantized (the bf16 checkpoint weights, in the compute dtype)
            layers[name] = {"kind": kind, "shape": [mod.out_features, mod.in_features],
                            "weight_error": w_err, "output_error": rel_error(y, y_ref),
                            "finite": bool(torch.isfinite(y).all())}
        errs = [v["output_error"] for v in layers.values()]
        worst = max(layers, key=lambda n: layers[n]["output_error"]) if layers else None
        kinds: Dict[str, int] = {}
        for v in layers.values():
            kinds[v["kind"]] = kinds.get(v["kind"], 0) + 1
        results[label] = {
            "end_to_end": {"rel_error": rel_error(out, ref_out), "cosine": cosine(out, ref_out),
                           "max_rel_error": max_rel_error(out, ref_out), "finite": bool(torch.isfinite(out).all())},
            "summary": {"mean_output_error": sum(errs) / len(errs) if errs else None,
                        "max_output_error": max(errs) if errs else None, "worst_layer": worst,
                        "mean_weight_error": (sum(v["weight_error"] for v in layers.values()) / len(layers)
                                              if layers else None),
                        "kinds": kinds, "linear_weight_bytes": _weight_bytes(model, names)},
            "layers": layers,
        }
    ref_bytes = _weight_bytes(reference, names)
    header = {**header, "on_the_fly_rotation": get_settings().rotation_enabled,
              "reference_end_to_end_finite": bool(torch.isfinite(ref_out).all()),
              "reference_linear_weight_bytes": ref_bytes, "notes": notes}
    return Result(header, [n for n in names if n in captures], results, nonfinite, plan, diag)


def _compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return w.dtype
    return x.dtype


def _weight_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Weight bytes of the named linears as stored: INT8/FP8 codes + scales, float weights counted as bf16."""
    modules = dict(model.named_modules())
    total = 0
    for n in names:
        m = modules.get(n)
        if m is None:
            continue
        w = m.weight
        total += w.numel() * (2 if w.is_floating_point() and w.element_size() >= 2 else w.element_size())
        s = getattr(m, "weight_scale", None)
        if isinstance(s, torch.Tensor):
            total += s.numel() * s.element_size()
    return total


def _record(nonfinite: List[dict], label: str, watch: NonFiniteWatch, out: torch.Tensor) -> None:
    for name in watch.layers[:1]:   # the first layer that went non-finite is the one to look at
        nonfinite.append({"model": label, "layer": name, "where": "output"})
    if not bool(torch.isfinite(out).all()):
        nonfinite.append({"model": label, "layer": "final output", "where": "latents"})


# -- the two sources ----------------------------------------------------------------------------------------

def _selector(names, budget, threshold):
    """The "select" candidate: choose per layer on the reference run's captured inputs, then apply the plan."""
    def select(base, captures):
        plan = select_layers(base, captures, names, budget, threshold)
        apply_plan(base, plan)
        return base, plan
    return select


def tiny_accuracy(seed: int = 0, layers: int = 2, steps: int = 4, frames: int = 5, height: int = 64, width: int = 64,
                  dtype: torch.dtype = torch.float32, candidates: Sequence[str] = TINY_CANDIDATES,
                  budget: Budget = Budget(max_fraction=0.1), threshold: float = DEFAULT_THRESHOLD,
                  loras: Sequence[Tuple[str, float]] = (), max_rows: int = DEFAULT_MAX_ROWS,
                  diagnostics: Optional[bool] = None, model: Optional[nn.Module] = None, device: str = "cpu") -> Result:
    """The tiny Wan (or `model`, a float WanModel) against its INT8/FP8 variants."""
    from .models.tiny_wan import build_tiny_wan
    from .models.wan import seeded_inputs

    lora = lora_applier(loras)
    reference = model if model is not None else build_tiny_wan(seed, layers, dtype=dtype, device=device,
                                                                weight_dtype=torch.bfloat16)
    cfg = reference.config
    rules = family_rules("wan")
    names = [n for n, m in reference.named_modules() if type(m) is nn.Linear and rules.wants(n, m)]
    inputs = seeded_inputs(cfg, seed, frames, height, width, device=device, dtype=dtype)
    static = {}
    ref_broken = bool(nonfinite_tensors(reference))
    for kind in candidates:
        if kind != "select" and not ref_broken:
            static[kind] = quantized_copy(reference, kind)
    select = _selector(names, budget, threshold) if "select" in candidates else None
    header = {"source": "tiny", "model": f"tiny Wan (dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_layers} blocks, "
                                         f"outlier channels x20)",
              "reference": f"bf16 weights run in {_dtype_name(dtype)}", "seed": seed, "steps": steps,
              "frames": frames, "height": height, "width": width, "dtype": _dtype_name(dtype),
              "loras": [list(x) for x in loras]}
    diagnostics = get_settings().hadamard_diagnostics if diagnostics is None else diagnostics
    return compare(reference, inputs, steps, static, names, header, select, lora, max_rows, diagnostics)


def file_accuracy(float_path: str, int8_path: str, steps: int = 4, seed: int = 0, frames: int = 5, height: int = 64,
                  width: int = 64, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  extra: Sequence[str] = (), budget: Budget = Budget(max_fraction=0.1),
                  threshold: float = DEFAULT_THRESHOLD, loras: Sequence[Tuple[str, float]] = (),
                  max_rows: int = DEFAULT_MAX_ROWS, diagnostics: Optional[bool] = None) -> Result:
    """A float Wan checkpoint against an INT8 one (any supported format), plus optional candidates built
    from the float model (`extra`: int8, int8-rot, fp8, select)."""
    from .loader import LoadConfig, build_wan_model
    from .models.wan import seeded_inputs
    from .quant.types import QuantFormatError

    lora = lora_applier(loras)
    reference, ref_report = build_wan_model(float_path, LoadConfig(quantize_float=False), device=device, dtype=dtype)
    bad = nonfinite_tensors(reference)
    int8_model, report = build_wan_model(int8_path, LoadConfig(), device=device, dtype=dtype)
    if int8_model.config != reference.config:
        raise QuantFormatError(f"{int8_path} is not the same Wan as {float_path}: {int8_model.config} vs "
                               f"{reference.config}")
    rules = family_rules("wan")
    int8_names = {n for n, m in int8_model.named_modules() if _is_linear_like(m) and type(m) is not nn.Linear}
    names = [n for n, m in reference.named_modules()
             if type(m) is nn.Linear and (rules.wants(n, m) or n in int8_names)]
    static = {FILE_CANDIDATE: int8_model}
    for kind in extra:
        if kind != "select" and kind != FILE_CANDIDATE and not bad:
            static[kind] = quantized_copy(reference, kind)
    select = _selector(names, budget, threshold) if "select" in extra else None
    inputs = seeded_inputs(reference.config, seed, frames, height, width, device=device, dtype=dtype)
    header = {"source": "files", "model": f"{ref_report.family} ({float_path})", "int8_file": int8_path,
              "int8_verdict": report.verdict(), "reference": f"{float_path} in {_dtype_name(dtype)}",
              "seed": seed, "steps": steps, "frames": frames, "height": height, "width": width,
              "dtype": _dtype_name(dtype), "loras": [list(x) for x in loras]}
    diagnostics = get_settings().hadamard_diagnostics if diagnostics is None else diagnostics
    return compare(reference, inputs, steps, static, names, header, select, lora, max_rows, diagnostics)


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


# -- presenting ---------------------------------------------------------------------------------------------

def format_table(result: Result, top: int = 15) -> str:
    h = result.header
    cands = list(result.candidates)
    lines = [f"wan-int8 accuracy: {h['model']}; {h['frames']} frames {h['height']}x{h['width']}, {h['steps']} steps, "
             f"seed {h['seed']}; reference: {h['reference']}"]
    if h.get("int8_verdict"):
        lines.append(f"  {FILE_CANDIDATE}: {h['int8_verdict']}")
    if h.get("loras"):
        lines.append("  LoRAs (on the reference and every candidate): " +
                     ", ".join(f"{p} x{s:g}" for p, s in h["loras"]))
        if h.get("lora_report"):
            lines.append("  " + str(h["lora_report"]).replace("\n", "\n  "))
    for note in h.get("notes") or ():
        lines.append(f"  note: {note}")
    lines += ["", f"End to end after {h['steps']} steps (final latents vs the reference):",
              "| candidate | rel err | cosine | max rel err | linears | linear weights |", "|---|---|---|---|---|---|"]
    ref_bytes = h.get("reference_linear_weight_bytes") or 0
    for c in cands:
        e, s = result.candidates[c]["end_to_end"], result.candidates[c]["summary"]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items()))
        lines.append(f"| {c} | {e['rel_error']:.2e} | {e['cosine']:.6f} | {e['max_rel_error']:.2e} | {kinds} | "
                     f"{s['linear_weight_bytes'] / 2**20:.2f} MiB |")
    if ref_bytes:
        lines.append(f"(reference linear weights: {ref_bytes / 2**20:.2f} MiB; float weights counted as bf16)")
    if "int8" in result.candidates and "int8-rot" in result.candidates:
        a = result.candidates["int8"]["end_to_end"]["rel_error"]
        b = result.candidates["int8-rot"]["end_to_end"]["rel_error"]
        if b > 0:
            lines.append(f"rotation lowers the end-to-end error {a / b:.2f}x (int8 {a:.2e} -> int8-rot {b:.2e})")
    names = result.layers
    if names and cands:
        primary = cands[0]
        key = lambda n: -(result.candidates[primary]["layers"].get(n, {}).get("output_error") or 0.0)  # noqa: E731
        ordered = sorted(names, key=key)
        shown = ordered[:top]
        lines += ["", f"Per layer, worst first by {primary} output error (top {len(shown)} of {len(names)}): "
                      "weight error ‖W8−W‖/‖W‖ / output error on the reference run's step-1 inputs",
                  "| layer | N x K | " + " | ".join(cands) + " |", "|---|---|" + "---|" * len(cands)]
        for n in shown:
            cells = []
            for c in cands:
                v = result.candidates[c]["layers"].get(n)
                if v is None:
                    cells.append("-")
                    continue
                tag = f" ({v['kind']})" if c == "select" or c == FILE_CANDIDATE else ""
                cells.append(f"{v['weight_error']:.1e} / {v['output_error']:.2e}{tag}")
            shape = next((result.candidates[c]["layers"][n]["shape"] for c in cands
                          if n in result.candidates[c]["layers"]), None)
            nk = f"{shape[0]}x{shape[1]}" if shape else "?"
            lines.append(f"| {n} | {nk} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Summary (per-layer output error): " + "; ".join(
            f"{c} mean {result.candidates[c]['summary']['mean_output_error']:.2e} max "
            f"{result.candidates[c]['summary']['max_output_error']:.2e}" for c in cands))
    if result.plan is not None:
        cnt = result.plan.counts()
        b = result.plan.budget
        lines.append(f"select plan ({result.plan.mode}): int8 {cnt['int8']}, int8-rot {cnt['int8-rot']}, bf16 "
                     f"{cnt['bf16']} (rotate when it lowers the error by > {result.plan.threshold:.0%}; bf16 budget: "
                     f"{_budget_text(b)}; +{result.plan.extra_bytes / 2**20:.2f} MiB)")
    if result.diagnostics:
        worst = sorted(result.diagnostics.items(), key=lambda kv: -kv[1]["col_max_to_rms"])[:5]
        lines.append("Hadamard diagnostics (activation column max/rms, before -> after rotation): " + "; ".join(
            f"{n} {d['col_max_to_rms']:.1f} -> {d.get('col_max_to_rms_rot', float('nan')):.1f}" for n, d in worst))
    for bad in result.nonfinite:
        lines.append(f"NaN/Inf: {bad['model']}: layer {bad['layer']} ({bad['where']})")
    return "\n".join(lines)


def _budget_text(b: Budget) -> str:
    parts = []
    if b.max_layers is not None:
        parts.append(f"<= {b.max_layers} layers")
    if b.max_fraction is not None:
        parts.append(f"<= {b.max_fraction:.0%} of layers")
    if b.max_extra_bytes is not None:
        parts.append(f"<= {b.max_extra_bytes / 2**20:.2f} MiB extra")
    return ", ".join(parts) or "none"


def write_plot(result: Result, path: str) -> bool:
    """Per-layer output error by block (lines per candidate) and the per-block mean (bars); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = result.layers
    cands = list(result.candidates)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(names) + 2), 8))
    xs = list(range(len(names)))
    series = {c: [result.candidates[c]["layers"].get(n, {}).get("output_error", float("nan")) for n in names]
              for c in cands}
    positive = [v for ys in series.values() for v in ys if v == v and v > 0]
    floor = min(positive) / 3 if positive else 1e-8   # exact layers (kept float) drawn here, not lost to the log
    for c in cands:
        ys = [floor if v == 0 else v for v in series[c]]
        ax1.plot(xs, ys, marker="o", ms=3, label=c)
    blocks = [_block_index(n) for n in names]
    starts = [i for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)]
    for i in starts:
        ax1.axvline(i - 0.5, color="0.85", lw=0.8)
    ax1.set_xticks(starts)
    ax1.set_xticklabels([str(blocks[i]) for i in starts])
    ax1.set_yscale("log")
    ax1.set_xlabel("block index (one point per linear, in model order)")
    ax1.set_ylabel(f"layer output rel error (0 drawn at {floor:.0e})")
    ax1.set_title(f"{result.header['model']}: per-layer error")
    ax1.legend()
    uniq = sorted({b for b in blocks if b is not None})
    width = 0.8 / max(1, len(cands))
    for j, c in enumerate(cands):
        means = []
        for b in uniq:
            vals = [result.candidates[c]["layers"][n]["output_error"] for n, bb in zip(names, blocks)
                    if bb == b and n in result.candidates[c]["layers"]]
            means.append(max(floor, sum(vals) / len(vals)) if vals else float("nan"))
        ax2.bar([b + (j - (len(cands) - 1) / 2) * width for b in uniq], means, width, label=c)
    ax2.set_xticks(uniq)
    ax2.set_xlabel("block index")
    ax2.set_ylabel("mean layer output rel error")
    ax2.set_yscale("log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- command ------------------------------------------------------------------------------------------------

def cmd_accuracy(args) -> int:
    loras = [parse_lora(s) for s in args.lora or []]
    if loras:
        try:
            lora_applier(loras)
        except LoraUnavailable as exc:
            print(f"wan-int8 accuracy: error: {exc}", file=sys.stderr)
            return 2
    if bool(args.float) != bool(args.int8):
        print("wan-int8 accuracy: error: --float and --int8 go together (or give neither for the tiny Wan)",
              file=sys.stderr)
        return 2
    budget = Budget(args.keep_bf16, args.keep_bf16_fraction,
                    int(args.keep_bf16_mib * 2**20) if args.keep_bf16_mib is not None else None)
    if budget == Budget():
        budget = Budget(max_fraction=0.1)
    dtype = _DTYPES[args.dtype]
    device = args.device or "cpu"
    common = dict(steps=args.steps, seed=args.seed, frames=args.frames, height=args.height, width=args.width,
                  dtype=dtype, budget=budget, threshold=args.rotate_threshold, loras=loras, max_rows=args.max_rows)
    try:
        result = _run(args, device, common)
    except LoraFailed as exc:
        print(f"wan-int8 accuracy: error: --lora: {exc}", file=sys.stderr)
        return 2
    if result is None:
        return 2
    return _finish(args, result)


def _run(args, device: str, common: dict) -> Optional[Result]:
    if args.float:
        extra = [c for c in (args.candidates or "").split(",") if c]
        unknown = [c for c in extra if c not in ALL_CANDIDATES]
        if unknown:
            print(f"wan-int8 accuracy: error: unknown candidate(s) {', '.join(unknown)}; with --float/--int8 "
                  f"choose extra ones from {', '.join(ALL_CANDIDATES)}", file=sys.stderr)
            return None
        return file_accuracy(args.float, args.int8, device=device, extra=extra, **common)
    cands = [c for c in (args.candidates or ",".join(TINY_CANDIDATES)).split(",") if c]
    unknown = [c for c in cands if c not in ALL_CANDIDATES]
    if unknown:
        print(f"wan-int8 accuracy: error: unknown candidate(s) {', '.join(unknown)}; choose from "
              f"{', '.join(ALL_CANDIDATES)}", file=sys.stderr)
        return None
    return tiny_accuracy(layers=args.layers, candidates=cands, device=device, **common)


def _finish(args, result: Result) -> int:
    if args.plot:
        if write_plot(result, args.plot):
            result.header["plot"] = args.plot
        else:
            print("wan-int8 accuracy: matplotlib is not installed, so no plot was written "
                  "(pip install 'wan-int8[plot]' or pip install matplotlib)", file=sys.stderr)
    if args.json:
        print(json.dumps(_finite_json(result.as_dict()), indent=1))
    else:
        print(format_table(result, args.top))
        if result.header.get("plot"):
            print(f"plot: {args.plot}")
    if result.nonfinite:
        first = result.nonfinite[0]
        print(f"wan-int8 accuracy: NaN/Inf in {first['model']}: layer {first['layer']} ({first['where']})"
              + (f" and {len(result.nonfinite) - 1} more" if len(result.nonfinite) > 1 else ""), file=sys.stderr)
        return EXIT_NONFINITE
    return 0


def _finite_json(o):
    """NaN/Inf become null so the object is strict JSON (the `nonfinite` list says where they were)."""
    if isinstance(o, float):
        return o if o == o and o not in (float("inf"), float("-inf")) else None
    if isinstance(o, dict):
        return {k: _finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_json(v) for v in o]
    return o


def add_commands(subparsers) -> None:
    s = subparsers.add_parser("accuracy", help="INT8 (plain, rotated, selected, LoRA'd) vs the float model: "
                                               "per-layer and end-to-end error")
    s.add_argument("--float", default=None, metavar="FILE", help="float Wan checkpoint (the reference)")
    s.add_argument("--int8", default=None, metavar="FILE", help="INT8 Wan checkpoint compared with --float")
    s.add_argument("--candidates", default=None,
                   help=f"comma list; tiny Wan default: {','.join(TINY_CANDIDATES)}; also "
                        f"{','.join(ATTENTION_CANDIDATES)} (rotated INT8 linears + INT8 attention, P·V in fp8 / "
                        f"16 bits), {','.join(FUSED_CANDIDATES)} (the same with the fused block); with --float/--int8: extra candidates built from the float model (default none)")
    s.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layers", type=int, default=2, help="tiny Wan blocks (default 2)")
    s.add_argument("--frames", type=int, default=5)
    s.add_argument("--height", type=int, default=64)
    s.add_argument("--width", type=int, default=64)
    s.add_argument("--dtype", choices=tuple(_DTYPES), default="fp32", help="compute dtype (default fp32)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]",
                   help="apply a LoRA (repeatable) to the reference and every candidate")
    s.add_argument("--keep-bf16", type=int, default=None, metavar="N", help="select: at most N layers stay bf16")
    s.add_argument("--keep-bf16-fraction", type=float, default=None, metavar="F",
                   help="select: at most this fraction of layers stays bf16 (default 0.1 when no budget is given)")
    s.add_argument("--keep-bf16-mib", type=float, default=None, metavar="MIB",
                   help="select: at most this many extra MiB for bf16 layers")
    s.add_argument("--rotate-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="select: rotate a layer when that lowers its error by more than this fraction (default 0.1)")
    s.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="activation rows kept per layer")
    s.add_argument("--top", type=int, default=15, help="layers shown in the table (default 15)")
    s.add_argument("--plot", nargs="?", const="accuracy.png", default=None, metavar="FILE.png",
                   help="write a PNG of per-layer error (default accuracy.png); needs matplotlib")
    s.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    s.set_defaults(func=cmd_accuracy)
