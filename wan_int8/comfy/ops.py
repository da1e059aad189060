"""ComfyUI operations whose Linear keeps ComfyUI's quantized weights but runs our INT8 kernels.

`make_int8_ops(compute_dtype)` subclasses the classes of `comfy.ops.mixed_precision_ops`: the weights stay
ComfyUI `QuantizedTensor`s, so its memory manager (dynamic VRAM, lowvram partial loads, pinned offload),
`module_size`, LoRA requantization and `state_dict()` all work unchanged.  Only the INT8 forward differs:
after `cast_bias_weight(..., offloadable=True)` has put the weight where the input is, the layer runs
`wan_int8.kernels.ops.int8_linear` on the tensor's int8 codes and scale (Triton / cuBLASLt / comfy-kitchen /
reference, measured per shape), then gives the weight back with `uncast_bias_weight`.  When ComfyUI attached
`weight_function` / `bias_function` patches (its own LoRA in lowvram mode), the layer defers to ComfyUI's
path (dequantize, patch, float matmul): correctness first.

Group-scaled layers (`[N, K/g]` scales, the seed's "blockwise" files) have no native ComfyUI format.  They
load as `QuantizedTensor`s of our own layout `WanInt8GroupwiseLayout`, registered once under that new name
(nothing of ComfyUI's is replaced); the layout dequantizes, requantizes and serialises like ComfyUI's own, so
the memory manager and stock LoRA handle these layers too.

A wan-int8 LoRA stack is an object in the `lora` slot (`apply(x, y) -> y`), installed and removed by the
ModelPatcher injection in `wan_int8.comfy.lora`; it adds its low-rank term to whatever path produced `y`.  On
the INT8 path, a stack with `fused_parts`/`finish` (wan_int8.lora's LayerLora) hands its low-rank term to
`int8_linear` (fused into the Triton GEMM epilogue) and `finish` adds the rest; ComfyUI's float paths use `apply`.

Nothing here imports ComfyUI at module import: `comfy_modules` is resolved when ops are built (tests pass
stand-ins).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import types
from typing import Optional

import torch

from ..kernels.ops import int8_linear
from ..quant.int8 import block_epilogue_reference, dequantize, quantize_weight
from ..quant.types import Int8Weight, Rotation

log = logging.getLogger("wan_int8.comfy")

NATIVE_LAYOUT = "TensorWiseINT8Layout"
GROUP_LAYOUT = "WanInt8GroupwiseLayout"
GROUP_FORMAT = "int8_groupwise"   # the comfy_quant name our state dicts (and `wan-int8 quantize`) use


MIN_COMFYUI = "0.29.0"


def comfy_modules() -> types.SimpleNamespace:
    """The few ComfyUI modules the ops use (imported lazily, on first load), checked for what we rely on."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.quant_ops
    found = types.SimpleNamespace(ops=comfy.ops, quant_ops=comfy.quant_ops, model_management=comfy.model_management,
                                  model_patcher=comfy.model_patcher)
    check_comfy_interfaces(found)
    return found


def check_comfy_interfaces(comfy) -> None:
    """Fail at load, naming the minimum version, when this ComfyUI lacks an interface the pack uses."""
    import inspect
    missing = []
    for owner, attr in ((comfy.ops, "mixed_precision_ops"), (comfy.ops, "cast_bias_weight"),
                        (comfy.ops, "uncast_bias_weight"), (comfy.quant_ops, "QuantizedTensor"),
                        (comfy.quant_ops, "QuantizedLayout"), (comfy.quant_ops, "register_layout_class")):
        if not hasattr(owner, attr):
            missing.append(f"{owner.__name__}.{attr}")
    cast = getattr(comfy.ops, "cast_bias_weight", None)
    if cast is not None and "offloadable" not in inspect.signature(cast).parameters:
        missing.append("comfy.ops.cast_bias_weight(offloadable=...)")
    patcher = getattr(getattr(comfy, "model_patcher", None), "ModelPatcher", None)
    if patcher is not None and not hasattr(patcher, "set_injections"):
        missing.append("comfy.model_patcher.ModelPatcher.set_injections")
    if missing:
        raise RuntimeError(f"wan-int8 needs ComfyUI >= {MIN_COMFYUI} (with comfy-kitchen); this ComfyUI lacks "
                           f"{', '.join(missing)}. Update ComfyUI, or run the checkpoint with stock loaders.")


# -- our layout for group scales -------------------------------------------------------------------

_group_layout_cache = {}


def group_layout(quant_ops):
    """`WanInt8GroupwiseLayout` for this ComfyUI (built and registered once per quant_ops module)."""
    key = id(quant_ops)
    if key in _group_layout_cache:
        return _group_layout_cache[key]
    BaseLayoutParams = getattr(quant_ops, "BaseLayoutParams", None)
    if BaseLayoutParams is None:
        from comfy_kitchen.tensor.base import BaseLayoutParams

    class WanInt8GroupwiseLayout(quant_ops.QuantizedLayout):
        """int8 `[N, K]` codes, fp32 scales `[N, K/g]`, optional regular Hadamard rotation per K-group."""

        @dataclasses.dataclass(frozen=True)
        class Params(BaseLayoutParams):
            group_size: int = 128
            rotation_group: int = 0          # 0: not rotated; else regular Hadamard of this size (ComfyUI convrot)

        @classmethod
        def _weight(cls, qdata, params) -> Int8Weight:
            rot = Rotation("regular", params.rotation_group) if params.rotation_group else None
            return Int8Weight(qdata, params.scale, rot)

        @classmethod
        def quantize(cls, tensor, scale=None, stochastic_rounding=0, inplace_ops=False, group_size=128,
                     rotation_group=0, **kwargs):
            rot = Rotation("regular", rotation_group) if rotation_group else None
            w = quantize_weight(tensor, "group", group_size, rot)   # round-half-even; stochastic rounding unused
            return w.qdata, cls.Params(scale=w.scale, orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape),
                                       group_size=group_size, rotation_group=rotation_group)

        @classmethod
        def dequantize(cls, qdata, params):
            return dequantize(cls._weight(qdata, params), torch.float32).to(params.orig_dtype)

        @classmethod
        def get_plain_tensors(cls, qtensor):
            return qtensor._qdata, qtensor._params.scale

        @classmethod
        def state_dict_tensors(cls, qdata, params):
            return {"": qdata, "_scale": params.scale}

        @classmethod
        def requantize_kwargs(cls, qtensor):
            p = qtensor._params
            return {"group_size": p.group_size, "rotation_group": p.rotation_group}

    try:
        existing = quant_ops.get_layout_class(GROUP_LAYOUT)
    except KeyError:
        existing = None
    if existing is not None and existing.__name__ == GROUP_LAYOUT:
        WanInt8GroupwiseLayout = existing      # registered by an earlier build: reuse, never replace
    else:
        quant_ops.register_layout_class(GROUP_LAYOUT, WanInt8GroupwiseLayout)
    _group_layout_cache[key] = WanInt8GroupwiseLayout
    return WanInt8GroupwiseLayout


# -- the ops class -----------------------------------------------------------------------------------

def _peek_conf(state_dict, prefix) -> Optional[dict]:
    t = state_dict.get(f"{prefix}comfy_quant")
    if t is None:
        return None
    return json.loads(bytes(t.cpu().numpy().tobytes()).decode("utf-8"))


def make_int8_ops(compute_dtype: torch.dtype = torch.bfloat16, comfy=None):
    """A ComfyUI operations class (pass as `model_options["custom_operations"]`)."""
    comfy = comfy or comfy_modules()
    cops, qops = comfy.ops, comfy.quant_ops
    Base = cops.mixed_precision_ops({"mixed_ops": True}, compute_dtype)
    QuantizedTensor = qops.QuantizedTensor
    GroupLayout = group_layout(qops)

    class WanInt8Ops(Base):
        class Linear(Base.Linear):
            lora = None                 # wan-int8 LoRA stack (apply(x, y) -> y); set per patcher by injection
            wan_int8_name = ""          # module name, for kernel logs and statistics

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                input_scale = state_dict.pop(f"{prefix}input_scale", None)
                conf = _peek_conf(state_dict, prefix)
                if conf is not None and conf.get("format") == GROUP_FORMAT:
                    self._load_group(state_dict, prefix, conf)
                    # the plain module loader for the bias; the weight was taken above
                    torch.nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                                          missing_keys, unexpected_keys, error_msgs)
                    if f"{prefix}weight" in missing_keys:
                        missing_keys.remove(f"{prefix}weight")
                else:
                    super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                  unexpected_keys, error_msgs)
                if input_scale is not None:
                    # a real static activation scale (our loader drops placeholders); ComfyUI ignores it for int8
                    self.register_buffer("wan_input_scale", input_scale.reshape(()).to(torch.float32))

            def _load_group(self, state_dict, prefix, conf):
                """Our layout for group scales (ComfyUI's loader raises on formats it does not know)."""
                device = self.factory_kwargs["device"]
                weight = state_dict.pop(f"{prefix}weight")
                scale = state_dict.pop(f"{prefix}weight_scale").to(device=device, dtype=torch.float32)
                state_dict.pop(f"{prefix}comfy_quant")
                n, k = weight.shape
                params = GroupLayout.Params(scale=scale, orig_dtype=self.factory_kwargs["dtype"], orig_shape=(n, k),
                                            group_size=k // scale.shape[1],
                                            rotation_group=int(conf.get("convrot_groupsize", 0)) if conf.get("convrot") else 0)
                self.quant_format = GROUP_FORMAT
                self.layout_type = GROUP_LAYOUT
                self.weight = torch.nn.Parameter(QuantizedTensor(weight.to(device=device, dtype=torch.int8),
                                                                 GROUP_LAYOUT, params), requires_grad=False)

            def state_dict(self, *args, destination=None, prefix="", **kwargs):
                sd = super().state_dict(*args, destination=destination, prefix=prefix, **kwargs)
                if getattr(self, "layout_type", None) == GROUP_LAYOUT and isinstance(self.weight, QuantizedTensor):
                    p = self.weight._params
                    conf = {"format": GROUP_FORMAT, "group_size": int(p.group_size)}
                    if p.rotation_group:
                        conf.update({"convrot": True, "convrot_groupsize": int(p.rotation_group)})
                    sd[f"{prefix}comfy_quant"] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
                if getattr(self, "wan_input_scale", None) is not None:
                    sd[f"{prefix}input_scale"] = self.wan_input_scale
                return sd

            def _apply(self, fn, recurse=True):
                # Inside inference mode (ComfyUI's executor) comfy-kitchen's QuantizedTensor cannot be re-wrapped
                # as a Parameter ("Cannot set version_counter for inference tensor"; stock ComfyUI 0.29 hits this
                # on CPU too).  A move to where the weight already is changes nothing, so leave the weight alone.
                w = self._parameters.get("weight")
                if isinstance(w, QuantizedTensor) and torch.is_inference_mode_enabled():
                    probe = fn(w)
                    if probe.device == w.device and probe.dtype == w.dtype:
                        del self._parameters["weight"]
                        try:
                            return super()._apply(fn, recurse)
                        finally:
                            self._parameters["weight"] = w
                return super()._apply(fn, recurse)

            def _runs_int8(self, x) -> bool:
                return (getattr(self, "layout_type", None) in (NATIVE_LAYOUT, GROUP_LAYOUT)
                        and isinstance(self.weight, QuantizedTensor) and not isinstance(x, QuantizedTensor)
                        and not self._full_precision_mm and not getattr(self, "comfy_force_cast_weights", False)
                        and len(self.weight_function) == 0 and len(self.bias_function) == 0)

            def forward(self, input, *args, **kwargs):
                lora = self.lora
                if self._runs_int8(input):
                    cops.run_every_op()
                    fused = getattr(lora, "fused_parts", None) if lora is not None else None
                    if fused is not None:
                        t, b, state = fused(input)
                        return lora.finish(input, self._forward_int8(input, t, b), state)
                    y = self._forward_int8(input)
                else:
                    y = super().forward(input, *args, **kwargs)
                if lora is not None:
                    y = lora.apply(input, y)
                return y

            # The fused Wan block (wan_int8.fused) talks to INT8 layers through these two methods.
            def int8_activation(self, x):
                """(rotation kind, group, signs) of the per-token activation the INT8 path quantizes x with, when
                it can take pre-quantized codes; None when it cannot (not running INT8 now, static input scale,
                a transposed weight)."""
                if not self._runs_int8(x) or getattr(self, "wan_input_scale", None) is not None:
                    return None
                p = self.weight._params
                if getattr(p, "transposed", False):
                    return None
                rot = int(p.convrot_groupsize) if self.layout_type == NATIVE_LAYOUT and p.convrot else \
                    int(getattr(p, "rotation_group", 0) or 0)
                return ("regular" if rot else "none", rot, None)

            def int8_call(self, x, sx=None, out_dtype=None, lora_t=None, lora_b=None, **epilogue):
                """The INT8 op (see `Int8Linear.int8_call`); call only when `int8_activation(x)` said it runs."""
                return self._forward_int8(x, lora_t, lora_b, sx=sx, out_dtype=out_dtype, **epilogue)

            def _forward_int8(self, x, lora_t=None, lora_b=None, sx=None, out_dtype=None, **epilogue):
                dtype = out_dtype or x.dtype
                weight, bias, offload_stream = cops.cast_bias_weight(
                    self, input=None, dtype=self.weight.dtype, device=x.device, bias_dtype=dtype,
                    offloadable=True, compute_dtype=dtype, want_requant=True)
                try:
                    qdata, p = (weight._qdata, weight._params) if isinstance(weight, QuantizedTensor) else (None, None)
                    if qdata is None or getattr(p, "transposed", False):
                        # ComfyUI handed back a float weight (its CPU path for dynamic-VRAM modules), or a layout
                        # our kernels do not read: the float matmul, then whatever the op would have added
                        if sx is not None:
                            raise RuntimeError(f"INT8 layer {self.wan_int8_name or '?'}: ComfyUI gave a float weight "
                                               "to a call with pre-quantized input")
                        w = weight.to(x.dtype) if qdata is None else weight.dequantize().t().to(x.dtype)
                        y = _plus_lora(torch.nn.functional.linear(x, w, bias), lora_t, lora_b)
                        if epilogue:
                            y = block_epilogue_reference(y.reshape(-1, y.shape[-1]).float(), **epilogue).to(
                                y.dtype).reshape(y.shape)
                        return y
                    scale = p.scale
                    if self.layout_type == NATIVE_LAYOUT:
                        scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1)
                        rot_group = int(p.convrot_groupsize) if p.convrot else 0
                    else:
                        rot_group = int(p.rotation_group)
                    input_scale = getattr(self, "wan_input_scale", None)
                    if input_scale is not None and input_scale.device != x.device:
                        input_scale = input_scale.to(x.device)
                    return int8_linear(x, qdata, scale, bias, input_scale, "regular" if rot_group else "none",
                                       rot_group, None, self.wan_int8_name, lora_t=lora_t, lora_b=lora_b, sx=sx,
                                       out_dtype=out_dtype, **epilogue)
                finally:
                    cops.uncast_bias_weight(self, weight, bias, offload_stream)

    WanInt8Ops.__name__ = WanInt8Ops.__qualname__ = "WanInt8Ops"
    WanInt8Ops.compute_dtype = compute_dtype
    return WanInt8Ops


def _plus_lora(y: torch.Tensor, lora_t: Optional[torch.Tensor], lora_b: Optional[torch.Tensor]) -> torch.Tensor:
    """`y + lora_t · lora_bᵀ` in y's dtype (the float fallbacks of the INT8 forward, which cannot fuse it)."""
    if lora_t is None:
        return y
    if not y.is_contiguous():
        y = y.contiguous()
    y.view(-1, y.shape[-1]).addmm_(lora_t.reshape(-1, lora_t.shape[-1]).to(y.dtype), lora_b.to(y.dtype).t())
    return y


def name_layers(model: torch.nn.Module) -> int:
    """Give each of our Linears its module name (kernel logs); returns how many INT8 layers there are."""
    count = 0
    for name, m in model.named_modules():
        if hasattr(m, "wan_int8_name") and hasattr(m, "_runs_int8"):
            m.wan_int8_name = name
            count += getattr(m, "layout_type", None) in (NATIVE_LAYOUT, GROUP_LAYOUT)
    return count
