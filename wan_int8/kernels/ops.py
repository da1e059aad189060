"""The one INT8 linear op: `torch.ops.wan_int8.int8_linear`, a custom op with a fake implementation.

Being a custom op keeps torch.compile from tracing into the backend choice (no graph breaks in the hot
path); the real implementation picks a backend per call shape, runs it and records it in the statistics.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..config import get_settings
from .registry import REGISTRY, ROT_KINDS, LinearCall

log = logging.getLogger("wan_int8.kernels")


def _int8_linear_impl(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                      input_scale: Optional[torch.Tensor], signs: Optional[torch.Tensor], rot_kind: int,
                      rot_group: int, name: str, lora_t: Optional[torch.Tensor] = None,
                      lora_b: Optional[torch.Tensor] = None, sx: Optional[torch.Tensor] = None,
                      out_dtype: Optional[torch.dtype] = None, act: int = 0, residual: Optional[torch.Tensor] = None,
                      gate: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0) -> torch.Tensor:
    k = qdata.shape[1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    out_dtype = out_dtype or x.dtype
    if lora_t is not None:
        lora_t = lora_t.reshape(-1, lora_t.shape[-1])
        if lora_b is None or lora_t.shape[0] != x2.shape[0] or tuple(lora_b.shape) != (qdata.shape[0], lora_t.shape[1]):
            raise ValueError(f"INT8 layer {name or '?'}: LoRA operands t {tuple(lora_t.shape)} and b "
                             f"{None if lora_b is None else tuple(lora_b.shape)} do not fit M={x2.shape[0]}, "
                             f"N={qdata.shape[0]} (expected t [M, R], b [N, R])")
    if residual is not None:
        residual = residual.reshape(-1, qdata.shape[0])
    call = LinearCall(x2, qdata, scale, bias, input_scale, signs, rot_kind, rot_group, out_dtype, name, lora_t, lora_b,
                      None if sx is None else sx.reshape(-1), act, residual, gate, seq, per)
    settings = get_settings()
    backend = REGISTRY.dispatch(call, settings)
    if settings.log_kernel:
        log.info("INT8 %s M=%d K=%d N=%d %s%s%s%s -> %s", name or "linear", call.m, k, call.n, call.granularity,
                 f" +lora{call.lora_rank}" if lora_t is not None else "", " pre-quantized" if sx is not None else "",
                 " act%d res%d" % call.epilogue if call.epilogue != (0, 0) else "", backend.name)
    out = backend.run(call)
    if settings.cuda_sync and out.is_cuda:
        torch.cuda.synchronize(out.device)
    if settings.debug and not bool(torch.isfinite(out).all()):
        log.error("INT8 layer %s produced NaN/Inf (backend %s, M=%d K=%d N=%d)", name or "?", backend.name,
                  call.m, k, call.n)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


_int8_linear_op = torch.library.custom_op("wan_int8::int8_linear", mutates_args=())(_int8_linear_impl)


@_int8_linear_op.register_fake
def _(x, qdata, scale, bias, input_scale, signs, rot_kind, rot_group, name, lora_t=None, lora_b=None, sx=None,
      out_dtype=None, act=0, residual=None, gate=None, seq=0, per=0):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]), dtype=out_dtype or x.dtype)


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                input_scale: Optional[torch.Tensor] = None, rotation_kind: str = "none", rotation_group: int = 0,
                signs: Optional[torch.Tensor] = None, name: str = "", lora_t: Optional[torch.Tensor] = None,
                lora_b: Optional[torch.Tensor] = None, sx: Optional[torch.Tensor] = None,
                out_dtype: Optional[torch.dtype] = None, act: int = 0, residual: Optional[torch.Tensor] = None,
                gate: Optional[torch.Tensor] = None, seq: int = 0, per: int = 0) -> torch.Tensor:
    """`x [..., K]` through an INT8 weight `qdata [N, K]` with fp32 `scale` -> `[..., N]` in x.dtype.

    `lora_t [..., R]` (x's leading dims, or flattened `[M, R]`) and `lora_b [N, R]`: a low-rank term
    `lora_t · lora_bᵀ` added to the output by the backend (the Triton GEMM fuses it into its epilogue, in fp32
    before the one cast; see `wan_int8.lora.runtime.LayerLora.fused_parts`).

    Pre-quantized input: `x` the int8 codes `[..., K]` (rotated already when the layer is) and `sx` their fp32
    per-token scales; `out_dtype` the output dtype (default x.dtype for float inputs).  Block epilogue: `act` 1
    applies GELU (tanh) to the output; `residual [..., N]` adds `y * gate[row]` to it (`gate [B, G, N]`, token m
    of `seq` per batch, `per` tokens per gate row) or `y` when gate is None (see
    `quant.int8.block_epilogue_reference`)."""
    if sx is not None and (x.dtype != torch.int8 or out_dtype is None):
        raise ValueError(f"INT8 layer {name or '?'}: pre-quantized input needs int8 codes and an out_dtype")
    if x.shape[-1] != qdata.shape[1]:
        raise ValueError(f"INT8 layer {name or '?'}: input has {x.shape[-1]} features, weight expects {qdata.shape[1]}")
    rot = ROT_KINDS.index(rotation_kind)
    if torch.compiler.is_compiling():
        # an opaque custom op for the compiler (fake shapes, no graph break); eager calls skip its Python layers
        return torch.ops.wan_int8.int8_linear(x, qdata, scale, bias, input_scale, signs, rot, rotation_group, name,
                                              lora_t, lora_b, sx, out_dtype, act, residual, gate, seq, per)
    return _int8_linear_impl(x, qdata, scale, bias, input_scale, signs, rot, rotation_group, name, lora_t, lora_b,
                             sx, out_dtype, act, residual, gate, seq, per)
