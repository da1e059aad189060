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
                      rot_group: int, name: str) -> torch.Tensor:
    k = qdata.shape[1]
    x2 = x.reshape(-1, k)
    call = LinearCall(x2, qdata, scale, bias, input_scale, signs, rot_kind, rot_group, x.dtype, name)
    settings = get_settings()
    backend = REGISTRY.choose(call, settings)
    if settings.log_kernel:
        log.info("INT8 %s M=%d K=%d N=%d %s -> %s", name or "linear", call.m, k, call.n, call.granularity,
                 backend.name)
    out = backend.run(call)
    REGISTRY.record(backend.name, call)
    if settings.cuda_sync and out.is_cuda:
        torch.cuda.synchronize(out.device)
    if settings.debug and not bool(torch.isfinite(out).all()):
        log.error("INT8 layer %s produced NaN/Inf (backend %s, M=%d K=%d N=%d)", name or "?", backend.name,
                  call.m, k, call.n)
    return out.reshape(*x.shape[:-1], call.n)


_int8_linear_op = torch.library.custom_op("wan_int8::int8_linear", mutates_args=())(_int8_linear_impl)


@_int8_linear_op.register_fake
def _(x, qdata, scale, bias, input_scale, signs, rot_kind, rot_group, name):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                input_scale: Optional[torch.Tensor] = None, rotation_kind: str = "none", rotation_group: int = 0,
                signs: Optional[torch.Tensor] = None, name: str = "") -> torch.Tensor:
    """`x [..., K]` through an INT8 weight `qdata [N, K]` with fp32 `scale` -> `[..., N]` in x.dtype."""
    if x.shape[-1] != qdata.shape[1]:
        raise ValueError(f"INT8 layer {name or '?'}: input has {x.shape[-1]} features, weight expects {qdata.shape[1]}")
    rot = ROT_KINDS.index(rotation_kind)
    if torch.compiler.is_compiling():
        # an opaque custom op for the compiler (fake shapes, no graph break); eager calls skip its Python layers
        return torch.ops.wan_int8.int8_linear(x, qdata, scale, bias, input_scale, signs, rot, rotation_group, name)
    return _int8_linear_impl(x, qdata, scale, bias, input_scale, signs, rot, rotation_group, name)
