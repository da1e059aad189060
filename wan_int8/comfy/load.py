"""Any checkpoint -> a ComfyUI-native INT8 state dict -> a ComfyUI ModelPatcher with our ops.

The state dict is built one layer at a time from `wan_int8.loader` (open_checkpoint -> plan_load ->
iter_prepared): every INT8 layer is written in ComfyUI's native spelling (`<layer>.weight` int8,
`weight_scale` fp32 0-d or [N, 1], `comfy_quant` JSON), so ComfyUI's own loader builds `QuantizedTensor`
weights; group-scaled layers get `{"format": "int8_groupwise"}`, which only our ops read.  It is then handed
to `comfy.sd.load_diffusion_model_state_dict` with our ops as `custom_operations`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Dict, Optional

import torch

from ..formats import open_checkpoint
from ..formats.base import encode_json_tensor
from ..formats.comfy_native import layer_tensors
from ..loader import LoadConfig, LoadReport, iter_prepared, plan_load
from ..quant.types import Int8Weight, QuantFormatError
from .ops import GROUP_FORMAT

log = logging.getLogger("wan_int8.comfy")


def native_layer_tensors(name: str, w: Int8Weight) -> Dict[str, torch.Tensor]:
    """One canonical layer in the form our ops load (ComfyUI-native where a native spelling exists)."""
    if w.granularity != "group":
        return layer_tensors(name, w)
    r = w.rotation
    if r is not None and (r.kind != "regular" or r.signs is not None):
        raise QuantFormatError(f"layer {name}: rotation {r.describe()} with group scales cannot run in ComfyUI")
    conf = {"format": GROUP_FORMAT, "group_size": w.group_size}
    if r is not None:
        conf.update({"convrot": True, "convrot_groupsize": r.group_size})
    out = {f"{name}.weight": w.qdata, f"{name}.weight_scale": w.scale, f"{name}.comfy_quant": encode_json_tensor(conf)}
    if w.input_scale is not None:
        out[f"{name}.input_scale"] = w.input_scale.reshape(()).to(torch.float32)
    return out


@dataclasses.dataclass
class Inspection:
    """What debug mode found in the weights."""

    nonfinite: list = dataclasses.field(default_factory=list)     # tensors with NaN/Inf
    zero_scales: list = dataclasses.field(default_factory=list)   # INT8 layers with a scale of exactly 0
    zero_rows: int = 0                                            # int8 rows that are all zero

    def lines(self):
        out = [f"debug: {len(self.nonfinite)} tensors with NaN/Inf"
               + (f" (first: {', '.join(self.nonfinite[:5])})" if self.nonfinite else ""),
               f"debug: {len(self.zero_scales)} INT8 layers with zero scales"
               + (f" (first: {', '.join(self.zero_scales[:5])})" if self.zero_scales else ""),
               f"debug: {self.zero_rows} all-zero int8 weight rows"]
        return out


def _inspect(name: str, item, found: Inspection) -> None:
    if isinstance(item, Int8Weight):
        if not bool(torch.isfinite(item.scale).all()):
            found.nonfinite.append(name)
        if bool((item.scale == 0).any()):
            found.zero_scales.append(name)
        found.zero_rows += int((item.qdata == 0).all(dim=1).sum())
    elif item.is_floating_point() and not bool(torch.isfinite(item).all()):
        found.nonfinite.append(name)


@dataclasses.dataclass
class NativeStateDict:
    sd: Dict[str, torch.Tensor]          # ComfyUI-native INT8 form, prefix-free ComfyUI names
    report: LoadReport
    inspection: Optional[Inspection]     # debug mode only
    metadata: Dict[str, str]             # the file's header metadata (ComfyUI reads "config" overrides from it)


def build_native_state_dict(path: str, config: LoadConfig = LoadConfig(),
                            progress: Optional[Callable[[int, int], None]] = None,
                            inspect: bool = False) -> NativeStateDict:
    """The checkpoint as a state dict in ComfyUI's native INT8 form, streamed layer by layer."""
    start = time.perf_counter()
    ckpt = open_checkpoint(path)
    try:
        metadata = {k: v for k, v in ckpt.metadata.items() if k != "_quantization_metadata"}
        report, _ = plan_load(ckpt, config)
        total = len(ckpt.layers) + len(ckpt.tensors)
        done = 0
        found = Inspection() if inspect else None
        sd: Dict[str, torch.Tensor] = {}
        for name, item in iter_prepared(ckpt, report, config):
            if found is not None:
                _inspect(name, item, found)
            if isinstance(item, Int8Weight):
                sd.update(native_layer_tensors(name, item))
                report.weight_bytes += item.nbytes()
                done += 1    # the layer's float weight (when quantized now) counted as one step
            else:
                sd[name] = item
                done += 1
            if progress is not None:
                progress(min(done, total), total)
    finally:
        ckpt.close()
    report.seconds = time.perf_counter() - start
    return NativeStateDict(sd, report, found, metadata)


def inference_dtype(sd: Dict[str, torch.Tensor], load_device, comfy) -> torch.dtype:
    """The compute dtype ComfyUI would pick for this quantized model (so our ops build matching bias/orig dtypes)."""
    try:
        cfg = comfy.model_detection.model_config_from_unet(sd, "")
    except Exception as exc:  # detection is ComfyUI's; it reports its own failure below
        log.debug("model detection failed while choosing the compute dtype: %s", exc)
        cfg = None
    if cfg is None:
        return torch.bfloat16
    dtype = comfy.model_management.unet_manual_cast(None, load_device, cfg.supported_inference_dtypes)
    return dtype or torch.bfloat16


def load_int8_model(path: str, config: LoadConfig = LoadConfig(), progress=None, inspect: bool = False,
                    model_options: Optional[dict] = None, disable_dynamic: bool = False):
    """Load any supported checkpoint as a ComfyUI ModelPatcher whose Linears run wan-int8 kernels.

    Returns (patcher, report, inspection).  The patcher carries a `cached_patcher_init` factory, as ComfyUI's
    own loaders set it, so ComfyUI can rebuild it (e.g. the non-dynamic delegate TorchCompileModel asks for
    under dynamic VRAM).
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.sd
    from .ops import make_int8_ops, name_layers
    comfy_ns = type("C", (), {"model_detection": comfy.model_detection, "model_management": comfy.model_management})

    built = build_native_state_dict(path, config, progress, inspect)
    sd, report = built.sd, built.report
    options = dict(model_options or {})
    load_device = options.get("load_device", comfy.model_management.get_torch_device())
    options["custom_operations"] = make_int8_ops(inference_dtype(sd, load_device, comfy_ns))
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, metadata=built.metadata,
                                                       disable_dynamic=disable_dynamic)
    if patcher is None:
        raise QuantFormatError(f"{path}: ComfyUI does not recognise this model ({report.family}); "
                               f"it cannot be loaded as a diffusion model")
    name_layers(patcher.model.diffusion_model)
    patcher.cached_patcher_init = (_reload, (path, config, model_options))
    return patcher, report, built.inspection


def _reload(path: str, config: LoadConfig, model_options: Optional[dict], disable_dynamic: bool = False):
    """ComfyUI's `cached_patcher_init` factory: the same load again, returning only the patcher."""
    return load_int8_model(path, config, model_options=model_options, disable_dynamic=disable_dynamic)[0]
