"""The non-Triton-GEMM backends: cuBLASLt through `torch._int_mm`, and comfy-kitchen's `int8_linear`.

- "cublaslt": our activation quantizer (Triton when it can run, else torch), `torch._int_mm` (cuBLASLt IMMA,
  int32 out), then the fp32 dequant epilogue.  One more pass over the output than the fused Triton GEMM, but
  cuBLAS is sometimes the faster GEMM (it is measured, not assumed).
- "comfy_kitchen": ComfyUI's own INT8 kernel (CUTLASS), when the package is importable; it runs tensor/row
  scales, optionally with ComfyUI's convrot rotation, dynamic activations only.
Both compute the function of `quant.int8_linear_reference` (comfy-kitchen rotates the activation in its own
dtype rather than fp32, a rounding-level difference).  A call's LoRA term (`lora_t · lora_bᵀ`) and block
epilogue (GELU, gated residual) are applied after their GEMM: in fp32 before the cast where the epilogue is ours
in torch, else from the output rounded to its dtype.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from ..quant.int8 import block_epilogue_reference
from .registry import ROT_KINDS, Backend, LinearCall, finish_output, quantized_input

log = logging.getLogger("wan_int8.kernels")


def _quantize(call: LinearCall):
    from .triton_backend import triton_available
    if not call.prequantized and call.x.is_cuda and triton_available(call.x.device)[0]:
        from .triton_quant import quantize_activation_triton
        rot = ROT_KINDS[call.rot_kind] if call.rot_kind else "none"
        return quantize_activation_triton(call.x, rot, call.rot_group, call.signs, call.input_scale)
    return quantized_input(call)


def _cublaslt_check(call: LinearCall) -> Optional[str]:
    if not call.x.is_cuda:
        return "not a CUDA tensor"
    if call.k % 8 or call.n % 8:
        return f"torch._int_mm needs K and N multiples of 8 (K={call.k}, N={call.n})"
    if call.scale.dim() == 2:
        return "group scales need a per-group epilogue (cuBLASLt has none)"
    if call.rot_kind and call.rot_kind != ROT_KINDS.index("regular") and call.rot_kind != ROT_KINDS.index("sylvester"):
        return "unknown rotation"
    return None


def _cublaslt_run(call: LinearCall) -> torch.Tensor:
    xq, sx = _quantize(call)
    m = xq.shape[0]
    if m <= 16:  # cuBLASLt int8 needs M > 16: pad with zero rows (tiny)
        padded = torch.zeros((32, call.k), dtype=torch.int8, device=xq.device)
        padded[:m] = xq
        acc = torch._int_mm(padded, call.qdata.t())[:m]
    else:
        acc = torch._int_mm(xq, call.qdata.t())
    return _dequant(acc, sx, call.scale, call.bias, call.out_dtype, call)


def _dequant(acc, sx, sw, bias, out_dtype, call: Optional[LinearCall] = None):
    from .triton_backend import triton_available
    if acc.is_cuda and triton_available(acc.device)[0]:
        from .triton_dequant import dequant_epilogue
        y = dequant_epilogue(acc, sx, sw, bias, out_dtype)
        return y if call is None else finish_output(call, y)
    y = acc.to(torch.float32) * (sw if sw.dim() == 0 else sw[None, :])
    y = y * sx[:, None]
    if bias is not None:
        y = y + bias.to(torch.float32)
    if call is not None and call.lora_t is not None:
        y = y.to(torch.promote_types(y.dtype, out_dtype))
        y.addmm_(call.lora_t.to(y.dtype), call.lora_b.to(y.dtype).t())
    if call is not None and (call.act or call.residual is not None):
        y = block_epilogue_reference(y, call.act, call.residual, call.gate, call.seq, call.per)
    return y.to(out_dtype)


CUBLASLT = Backend("cublaslt", _cublaslt_check, _cublaslt_run, priority=5)


@functools.lru_cache(maxsize=1)
def _comfy_kitchen():
    try:
        import comfy_kitchen as ck  # noqa: F401
    except Exception as exc:
        return None, f"comfy_kitchen is not importable ({type(exc).__name__}: {exc})"
    fn = getattr(ck, "int8_linear", None)
    if fn is None:
        return None, "this comfy_kitchen has no int8_linear"
    return fn, f"comfy_kitchen {getattr(ck, '__version__', '?')}"


def _ck_check(call: LinearCall) -> Optional[str]:
    fn, why = _comfy_kitchen()
    if fn is None:
        return why
    if call.scale.dim() == 2:
        return "comfy-kitchen runs tensor and row scales only"
    if call.input_scale is not None:
        return "comfy-kitchen has no static input_scale"
    if call.prequantized:
        return "comfy-kitchen quantizes its own input (this call has pre-quantized codes)"
    if call.rot_kind:
        if ROT_KINDS[call.rot_kind] != "regular" or call.signs is not None:
            return "comfy-kitchen's convrot is the regular Hadamard without signs"
    return None


def _ck_run(call: LinearCall) -> torch.Tensor:
    fn, _ = _comfy_kitchen()
    scale = call.scale.reshape(-1, 1) if call.scale.dim() == 1 else call.scale
    convrot = bool(call.rot_kind)
    y = fn(call.x, call.qdata, scale, call.bias, call.out_dtype, convrot, call.rot_group or 256)
    if call.lora_t is not None and not y.is_contiguous():
        y = y.contiguous()
    return finish_output(call, y)


COMFY_KITCHEN = Backend("comfy_kitchen", _ck_check, _ck_run, priority=1)


def register_torch_backends(registry) -> None:
    registry.register(CUBLASLT)
    registry.register(COMFY_KITCHEN)
