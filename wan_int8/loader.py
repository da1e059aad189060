"""From a checkpoint file to INT8 layers: the one loading path the CLI, the demo and the ComfyUI nodes share.

`plan_load` decides, from the header alone, what every linear becomes (INT8 from the file, quantized now,
or kept in float) and produces a `LoadReport` (the one-line verdict users see).  `iter_prepared` then streams
the canonical items one layer at a time, quantizing float weights on the fly, so peak extra memory is about
one layer.  `build_wan_model` fills our torch Wan with them; `write_native` writes them in ComfyUI's format.
"""
from __future__ import annotations

import collections
import json
import dataclasses
import logging
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from .config import Settings, get_settings
from .formats import Checkpoint, open_checkpoint
from .formats.comfy_native import layer_tensors, native_loaders
from .formats.safetensors_io import OutEntry, StreamingWriter
from .models.families import Family, detect_family, get_family, wan_variant
from .quant.hadamard import default_group_size
from .quant.int8 import dequantize, quantize_weight
from .quant.metrics import rel_error
from .quant.types import Int8Weight, QuantFormatError, Rotation

log = logging.getLogger("wan_int8")

Item = Union[Int8Weight, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """How to load: what to do with float linears, and the dtype of float tensors."""

    quantize_float: bool = True             # the seed's auto_convert_to_int8
    granularity: str = "row"                # for on-the-fly quantization: row | tensor | group
    group_size: int = 128
    rotate: Optional[bool] = None           # None: follow INT8_HADAMARD_QUIP / set_hadamard_quip_enabled
    rotation_group: int = 256
    family: Optional[str] = None            # None: detect from keys
    float_dtype: Optional[torch.dtype] = None  # cast float tensors (None: keep the file's dtype)

    def rotation_wanted(self, settings: Settings) -> bool:
        if settings.disable_hadamard_quip:
            return False
        return settings.hadamard_quip if self.rotate is None else self.rotate


@dataclasses.dataclass
class LayerPlan:
    action: str          # "file" (INT8 in the file), "quantize" (float, quantized at load), "float" (kept)
    granularity: str
    group_size: int
    rotation: str
    note: str = ""
    lossless: bool = True  # False when a file's layer was requantized to become canonical (fp8, two-sided QuIP)


@dataclasses.dataclass
class LoadReport:
    path: str
    format: str
    format_detail: str
    family: str
    layers: Dict[str, LayerPlan]
    warnings: List[str]
    renamed_from: str = ""
    kernel: str = ""
    seconds: float = 0.0
    weight_bytes: int = 0
    errors: Dict[str, float] = dataclasses.field(default_factory=dict)   # per-layer weight rel error (quantized now)

    def int8_layers(self) -> List[LayerPlan]:
        """The layers that run as INT8 (from the file or quantized at load)."""
        return [p for p in self.layers.values() if p.action != "float"]

    def count(self, action: str) -> int:
        return sum(p.action == action for p in self.layers.values())

    def scale_kinds(self) -> Dict[str, int]:
        return dict(collections.Counter(p.granularity if p.granularity != "group" else f"group{p.group_size}"
                                        for p in self.int8_layers()))

    def rotations(self) -> Dict[str, int]:
        return dict(collections.Counter(p.rotation for p in self.int8_layers() if p.rotation))

    def verdict(self) -> str:
        scales = ", ".join(f"{k} {v}" for k, v in sorted(self.scale_kinds().items())) or "none"
        rot = ", ".join(f"{k} {v}" for k, v in sorted(self.rotations().items())) or "none"
        text = (f"{self.format}{' (' + self.renamed_from + ' names)' if self.renamed_from else ''} | {self.family} | "
                f"int8 layers: {self.count('file')} from file + {self.count('quantize')} quantized at load, "
                f"{self.count('float')} linears kept float | scales: {scales} | rotation: {rot}")
        if self.kernel:
            text += f" | kernel: {self.kernel}"
        return text

    def as_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "format_detail": self.format_detail, "family": self.family,
                "renamed_from": self.renamed_from, "int8_from_file": self.count("file"),
                "quantized_at_load": self.count("quantize"), "kept_float": self.count("float"),
                "scales": self.scale_kinds(), "rotations": self.rotations(), "warnings": self.warnings,
                "layers": {n: dataclasses.asdict(p) for n, p in self.layers.items()}}


def resolve_family(ckpt: Checkpoint, name: Optional[str]) -> Tuple[Optional[Family], str]:
    keys = list(ckpt.shapes())
    if name and name != "auto":
        fam = get_family(name)
        detected = detect_family(keys)
        if detected is not None and detected.name != fam.name:
            log.warning("%s: model family %s was requested but the keys look like %s", ckpt.path, fam.label,
                        detected.label)
        return fam, fam.label
    fam = detect_family(keys)
    if fam is None:
        return None, "unknown family"
    label = fam.label
    if fam.name == "wan":
        label += " " + wan_variant(ckpt.shapes())
    return fam, label


def plan_load(ckpt: Checkpoint, config: LoadConfig = LoadConfig(), settings: Optional[Settings] = None
              ) -> Tuple[LoadReport, Optional[Family]]:
    """Decide, from the header, what each linear becomes; no tensor data is read."""
    settings = settings or get_settings()
    family, label = resolve_family(ckpt, config.family)
    rotate = config.rotation_wanted(settings)
    plans: Dict[str, LayerPlan] = {}
    for name, layer in ckpt.layers.items():
        plans[name] = LayerPlan("file", layer.granularity, layer.group_size, layer.rotation, layer.note, layer.lossless)
    warnings = list(ckpt.warnings)
    for key, t in ckpt.tensors.items():
        if not key.endswith(".weight") or len(t.shape) != 2 or not t.dtype.is_floating_point:
            continue
        name = key[: -len(".weight")]
        if config.quantize_float and family is not None and family.wants_int8(name):
            g = default_group_size(t.shape[1], config.rotation_group) if rotate else None
            if rotate and g is None:
                warnings.append(f"layer {name}: K={t.shape[1]} has no power-of-4 group dividing it; not rotated")
            gs = config.group_size if config.granularity == "group" else t.shape[1]
            plans[name] = LayerPlan("quantize", config.granularity, gs, f"regular-hadamard-{g}" if g else "")
        else:
            plans[name] = LayerPlan("float", "", 0, "")
    if family is None and config.quantize_float and any(p.action == "float" for p in plans.values()):
        warnings.append("model family not recognised: float linears are kept in float (choose the family "
                        "explicitly to quantize them)")
    report = LoadReport(ckpt.path, ckpt.format, ckpt.format_detail, label, plans, warnings, ckpt.renamed_from)
    return report, family


def iter_prepared(ckpt: Checkpoint, report: LoadReport, config: LoadConfig = LoadConfig(),
                  progress: Optional[Callable[[str], None]] = None, measure_error: bool = False
                  ) -> Iterator[Tuple[str, Item]]:
    """Stream (layer name, Int8Weight) and (tensor key, tensor) items, quantizing planned float layers."""
    for name, layer in ckpt.layers.items():
        yield name, layer.load()
        if progress:
            progress(name)
    for key, src in ckpt.tensors.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        plan = report.layers.get(name) if name else None
        t = src.build()
        if plan is not None and plan.action == "quantize":
            rotation = None
            if plan.rotation:
                rotation = Rotation("regular", int(plan.rotation.rsplit("-", 1)[1]))
            try:
                w = quantize_weight(t, plan.granularity, plan.group_size, rotation)
            except QuantFormatError as exc:
                raise QuantFormatError(f"{ckpt.path}: layer {name}: {exc}") from None
            if measure_error:
                report.errors[name] = rel_error(dequantize(w), t)
            del t
            yield name, w
            if progress:
                progress(name)
            continue
        if config.float_dtype is not None and t.is_floating_point():
            t = t.to(config.float_dtype)
        yield key, t


# -- our torch Wan ------------------------------------------------------------------------------

def build_wan_model(source: Union[str, Checkpoint], config: LoadConfig = LoadConfig(), device="cpu",
                    dtype: torch.dtype = torch.bfloat16, progress: Optional[Callable[[str], None]] = None):
    """Load any supported Wan checkpoint into the library's torch Wan with INT8 layers. Returns (model, report)."""
    from .layers import Int8Linear
    from .models.wan import WanConfig, WanModel

    start = time.perf_counter()
    ckpt = open_checkpoint(source) if isinstance(source, str) else source
    try:
        report, family = plan_load(ckpt, config)
        if family is None or family.name != "wan":
            raise QuantFormatError(f"{ckpt.path}: this is a {report.family} checkpoint; `run`/`demo` run Wan only "
                                   f"(other families run inside ComfyUI)")
        wcfg = WanConfig.from_state_dict_shapes(ckpt.shapes())
        with torch.device("meta"):
            model = WanModel(wcfg, dtype=dtype)
        loaded = set()
        for name, item in iter_prepared(ckpt, report, config, progress):
            if isinstance(item, Int8Weight):
                bias_key = f"{name}.bias"
                bias = ckpt.tensors[bias_key].build().to(device=device, dtype=dtype) if bias_key in ckpt.tensors else None
                w = Int8Weight(item.qdata.to(device), item.scale.to(device),
                               _rotation_to(item.rotation, device), _maybe_to(item.input_scale, device))
                _replace(model, name, Int8Linear.from_int8_weight(w, bias, name=name))
                loaded |= {f"{name}.weight", bias_key}
                report.weight_bytes += w.nbytes()
            else:
                if name in loaded:
                    continue
                _assign(model, name, item, device, dtype)
                loaded.add(name)
        missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if missing:
            raise QuantFormatError(f"{ckpt.path}: checkpoint lacks {len(missing)} tensors the Wan model needs "
                                   f"(first: {', '.join(missing[:5])})")
    finally:
        if isinstance(source, str):
            ckpt.close()
    model.eval()
    report.seconds = time.perf_counter() - start
    return model, report


def _rotation_to(r: Optional[Rotation], device) -> Optional[Rotation]:
    if r is None or r.signs is None:
        return r
    return Rotation(r.kind, r.group_size, r.signs.to(device))


def _maybe_to(t, device):
    return None if t is None else t.to(device)


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    try:
        owner = model.get_submodule(parent) if parent else model
        current = getattr(owner, child)
    except AttributeError:
        raise QuantFormatError(f"checkpoint layer {name!r} does not exist in the Wan model") from None
    expected = tuple(getattr(current, "weight").shape)
    got = (module.out_features, module.in_features)
    if expected != got:
        raise QuantFormatError(f"checkpoint layer {name!r} has weight shape {list(got)}, the model expects "
                               f"{list(expected)}")
    setattr(owner, child, module)


def _assign(model: torch.nn.Module, key: str, tensor: torch.Tensor, device, dtype) -> None:
    parent, _, leaf = key.rpartition(".")
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError:
        raise QuantFormatError(f"checkpoint tensor {key!r} does not belong to the Wan model") from None
    current = owner._parameters.get(leaf, owner._buffers.get(leaf)) if hasattr(owner, "_parameters") else None
    if current is None:
        raise QuantFormatError(f"checkpoint tensor {key!r} does not belong to the Wan model")
    if tuple(current.shape) != tuple(tensor.shape):
        raise QuantFormatError(f"checkpoint tensor {key!r} has shape {list(tensor.shape)}, the model expects "
                               f"{list(current.shape)}")
    target_dtype = current.dtype if current.dtype == torch.float32 else dtype
    value = tensor.to(device=device, dtype=target_dtype if tensor.is_floating_point() else tensor.dtype)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


# -- writing ComfyUI-native ------------------------------------------------------------------------

def native_entries(ckpt: Checkpoint, report: LoadReport, config: LoadConfig) -> List[OutEntry]:
    """Every output tensor's key, dtype and shape, from the plan before any data is read, in the order
    `iter_prepared` produces them (so the writer streams without buffering)."""
    shapes = ckpt.shapes()

    def layer_entries(name: str) -> List[OutEntry]:
        plan = report.layers[name]
        n, k = shapes[f"{name}.weight"]
        scale = {"row": (n, 1), "tensor": ()}.get(plan.granularity, (n, k // max(plan.group_size, 1)))
        out = [OutEntry(f"{name}.weight", torch.int8, (n, k)), OutEntry(f"{name}.weight_scale", torch.float32, scale),
               OutEntry(f"{name}.comfy_quant", torch.uint8, (0,))]  # marker length is filled in by the writer
        if name in ckpt.layers and ckpt.layers[name].has_input_scale:
            out.append(OutEntry(f"{name}.input_scale", torch.float32, ()))
        return out

    entries: List[OutEntry] = []
    for name in ckpt.layers:
        entries += layer_entries(name)
    for key, t in ckpt.tensors.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if name in report.layers and report.layers[name].action == "quantize":
            entries += layer_entries(name)
            continue
        dtype = config.float_dtype if config.float_dtype is not None and t.dtype.is_floating_point else t.dtype
        entries.append(OutEntry(key, dtype, tuple(t.shape)))
    return entries

def write_native(source: Union[str, Checkpoint], out_path: str, config: LoadConfig = LoadConfig(),
                 progress: Optional[Callable[[str], None]] = None, measure_error: bool = True) -> LoadReport:
    """Convert any supported checkpoint to ComfyUI-native INT8, streaming, atomically (`<out>.tmp`, then rename).

    INT8 layers of the file keep their codes and scales (lossless) where the native format can express them;
    float linears the family selects are quantized now.  Returns the load report (with per-layer weight errors).
    """
    from .formats.base import encode_json_tensor
    from .formats.comfy_native import layer_marker

    ckpt = open_checkpoint(source) if isinstance(source, str) else source
    try:
        report, _ = plan_load(ckpt, config)
        entries = native_entries(ckpt, report, config)
        markers = {}
        for name, plan in report.layers.items():
            if plan.action == "float":
                continue
            rot = Rotation("regular", int(plan.rotation.rsplit("-", 1)[1])) if plan.rotation.startswith("regular") else None
            if plan.rotation and rot is None:
                raise QuantFormatError(f"layer {name}: rotation {plan.rotation} cannot be written in ComfyUI format")
            markers[name] = encode_json_tensor(layer_marker(plan.granularity, plan.group_size, rot))
        entries = [OutEntry(e.key, e.dtype, (markers[e.key[: -len(".comfy_quant")]].numel(),))
                   if e.key.endswith(".comfy_quant") else e for e in entries]
        metadata = {k: v for k, v in ckpt.metadata.items() if k != "_quantization_metadata"}
        metadata["wan_int8"] = json.dumps({"version": _version(), "source_format": ckpt.format,
                                           "loaders": native_loaders(report.int8_layers())})
        order = {e.key: i for i, e in enumerate(entries)}
        pending: Dict[str, torch.Tensor] = {}  # holds at most one layer: entries follow iter_prepared's order
        with StreamingWriter(out_path, entries, metadata) as writer:
            next_index = 0

            def flush():
                nonlocal next_index
                while next_index < len(entries) and entries[next_index].key in pending:
                    key = entries[next_index].key
                    writer.write(key, pending.pop(key))
                    next_index += 1

            for name, item in iter_prepared(ckpt, report, config, progress, measure_error):
                if isinstance(item, Int8Weight):
                    tensors = layer_tensors(name, item)
                    tensors[f"{name}.comfy_quant"] = markers[name]
                else:
                    tensors = {name: item if config.float_dtype is None or not item.is_floating_point()
                               else item.to(config.float_dtype)}
                for key, t in tensors.items():
                    if key not in order:
                        raise QuantFormatError(f"internal: tensor {key} was not planned")
                    pending[key] = t
                flush()
            if pending or next_index != len(entries):
                raise QuantFormatError("internal: not every planned tensor was produced")
    finally:
        if isinstance(source, str):
            ckpt.close()
    return report


def _version() -> str:
    from . import __version__
    return __version__
