"""INT8 attention (SageAttention-style) for Wan's self- and cross-attention: the oracle, the dispatch and the op.

Numerics contract (what `int8_attention_reference` computes and the Triton kernel must match within tolerance):
- K smoothing: k' = k - mean over keys of k, per (batch, head, channel), in fp32.  q·mean is the same for every
  key of a query row, so softmax(q·k'ᵀ) = softmax(q·kᵀ) exactly in real arithmetic; it removes the large shared
  offset real keys carry, which would otherwise eat INT8's range.
- Q per token, K' per block of 128 keys: symmetric INT8 (absmax / 127, round half to even); Q·K'ᵀ in exact
  integers, scaled back by s_q[i]·s_k[block(j)]·softmax_scale.  (A per-block key scale makes a score tile's
  scale a per-row vector, folded into the one FMA before exp2: per-key scales cost an extra multiply per score.)
- Softmax in fp32.  P·V: with fp8 (Hopper, Ada): V per channel as e4m3 with scale amax/448, P scaled to
  [0, 448] and rounded to e4m3, the product accumulated in fp32 and divided by the fp32 row sum of unrounded P;
  without fp8 (Ampere, Turing): P rounded to V's 16-bit dtype, V as given.
- The kernel runs an online softmax (running row max, block by block), so its P values are rounded relative to
  a running maximum rather than the final one: the same arithmetic up to the rounding of P, covered by the tests'
  tolerances (see tests/test_attention.py).

Layout: q [B, Lq, H, D], k/v [B, Lk, H, D], any strides (the views ComfyUI's [B, L, H·D] tensors give for free);
output [B, Lq, H, D] in q's dtype.  No mask, not causal: what Wan needs.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .logs import log_once as _log_once

log = logging.getLogger("wan_int8.attention")

PV_CHOICES = ("auto", "fp8", "fp16")
BACKEND_CHOICES = ("auto", "gluon", "triton", "reference")
FP8_MAX = 448.0
MIN_CAPABILITY = (8, 0)   # Triton lowers an int8 tl.dot from Ampere on


class AttentionUnavailable(RuntimeError):
    """The fast INT8 attention cannot run for this call; the message says why (callers log it and fall back)."""


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How INT8 attention runs.  pv: P·V precision ("auto": fp8 where the GPU has fp8 tensor cores, else the
    inputs' 16-bit dtype); smooth_k: subtract the key mean first; backend: "auto" (on Hopper with fp8 P·V and at
    least 2048 keys the warp-specialised Gluon kernel when it can run, else the Triton kernel; refusing without a
    GPU), "gluon", "triton" or "reference" (the torch oracle: slow, materialises the score matrix)."""
    pv: str = "auto"
    smooth_k: bool = True
    backend: str = "auto"

    def __post_init__(self):
        if self.pv not in PV_CHOICES:
            raise ValueError(f"AttentionConfig.pv must be one of {PV_CHOICES}, got {self.pv!r}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"AttentionConfig.backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")


# -- the oracle -----------------------------------------------------------------------------------------------------

KEY_BLOCK = 128


def quantize_tokens_reference(x: torch.Tensor, smooth: bool, block: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (int8-valued fp32 codes [B, H, L, D], fp32 scales [B, H, L]); `smooth` subtracts the mean
    over L first (fp32); `block` > 0: one scale per `block` consecutive tokens."""
    xf = x.float().transpose(1, 2)
    if smooth:
        xf = xf - xf.mean(dim=2, keepdim=True)
    amax = xf.abs().amax(dim=-1)
    if block:
        n = amax.shape[-1]
        pad = (-n) % block
        blocks = F.pad(amax, (0, pad)).unflatten(-1, (-1, block)).amax(dim=-1)
        amax = blocks.repeat_interleave(block, dim=-1)[..., :n]
    scale = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round((xf * inv[..., None]).clamp(-127.0, 127.0))
    return codes, scale


def quantize_v_fp8_reference(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """v [B, L, H, D] -> (e4m3 values as fp32 [B, H, L, D], per-channel scales [B, H, 1, D] = amax/448)."""
    vf = v.float().transpose(1, 2)
    scale = vf.abs().amax(dim=2, keepdim=True) / FP8_MAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (vf * inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float(), scale


def int8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                             pv_fp8: bool = True, smooth_k: bool = True) -> torch.Tensor:
    """The contract above in torch (scores materialised: small sizes only)."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    q8, qs = quantize_tokens_reference(q, False)
    k8, ks = quantize_tokens_reference(k, smooth_k, KEY_BLOCK)
    s = torch.matmul(q8.double(), k8.double().transpose(-1, -2)).float()     # exact integers
    s = s * (qs[..., :, None] * ks[..., None, :]) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    denom = p.sum(dim=-1, keepdim=True)
    if pv_fp8:
        v8, vs = quantize_v_fp8_reference(v)
        p8 = (p * FP8_MAX).to(torch.float8_e4m3fn).float()
        out = torch.matmul(p8, v8) * vs / (FP8_MAX * denom)
    else:
        vt = v.transpose(1, 2)
        vt = vt if vt.dtype in (torch.float16, torch.bfloat16) else vt.to(torch.bfloat16)
        out = torch.matmul(p.to(vt.dtype).float(), vt.float()) / denom
    return out.transpose(1, 2).to(q.dtype)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Plain attention in the same [B, L, H, D] layout (the float baseline)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


# -- dispatch ---------------------------------------------------------------------------------------------------------

def log_once(key: str, level: int, msg: str, *args) -> None:
    """`logs.log_once` on this module's logger."""
    _log_once(key, level, msg, *args, logger=log.name)


def unavailable_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why the Triton INT8 attention cannot take these tensors (None when it can)."""
    from .kernels.triton_backend import triton_available
    from .kernels.triton_launch import interpreting
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expects [B, L, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not form one attention call"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} is above 256"
    if q.shape[1] == 0 or k.shape[1] == 0:
        return "empty sequence"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not a float type"
    ok, why = triton_available(q.device)
    if not ok:
        return why
    if not interpreting():
        if q.device.type != "cuda":
            return f"tensors are on {q.device}, not a CUDA device"
        cap = torch.cuda.get_device_capability(q.device)
        if cap < MIN_CAPABILITY:
            return f"compute capability {cap[0]}.{cap[1]} has no int8 tensor-core path in Triton (needs 8.0)"
    return None


def resolve_pv(config: AttentionConfig, device: torch.device) -> bool:
    """True when P·V runs in fp8 for this config on this device."""
    if config.pv == "fp16":
        return False
    from .kernels.triton_attention import fp8_pv_supported
    supported = fp8_pv_supported(device) if config.backend != "reference" else True
    if config.pv == "fp8" and not supported:
        raise AttentionUnavailable(f"P·V in fp8 needs fp8 tensor cores (Ada sm_89 or Hopper); {device} has none: "
                                   "use pv='auto' or 'fp16'")
    return supported


def _int8_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pv_fp8: bool,
                         smooth_k: bool, backend: str) -> torch.Tensor:
    if backend == "reference":
        return int8_attention_reference(q, k, v, scale, pv_fp8, smooth_k)
    from .kernels.triton_attention import int8_attention as triton_attention
    return triton_attention(q, k, v, scale, pv_fp8, smooth_k, kernel=backend)


def resolve_kernel(backend: str, q: torch.Tensor, k: torch.Tensor, pv_fp8: bool) -> str:
    """"gluon" or "triton" for a call that can run on the GPU kernels (see AttentionConfig.backend)."""
    from .kernels import gluon_attention
    if backend == "triton":
        return "triton"
    if backend == "auto" and k.shape[1] < gluon_attention.MIN_KEYS:
        return "triton"    # short key sequences (text cross-attention): the Triton kernel measured faster
    why = gluon_attention.unavailable(q.device, q.shape[-1], forced=backend == "gluon")
    if why is None and not pv_fp8:
        why = "P·V in 16 bits (the Gluon kernel does fp8 P·V)"
    if why is None:
        return "gluon"
    if backend == "gluon":
        raise AttentionUnavailable(f"the Gluon INT8 attention cannot run: {why}")
    if (q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] == 9
            and not torch.compiler.is_compiling()):   # (logged by the eager calls; a lock would break the graph)
        log_once(f"gluon:{why}", logging.INFO, "INT8 attention: the Triton kernel runs, not the warp-specialised "
                 "Gluon one (%s)", why)
    return "triton"


_int8_attention_op = torch.library.custom_op("wan_int8::int8_attention", mutates_args=())(_int8_attention_impl)


@_int8_attention_op.register_fake
def _(q, k, v, scale, pv_fp8, smooth_k, backend):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


def plan_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: AttentionConfig) -> Tuple[bool, str]:
    """(P·V in fp8, implementation: "gluon", "triton" or "reference") for this call; raises `AttentionUnavailable`
    (with the reason) when no GPU kernel can run it and the config did not ask for the reference."""
    backend = config.backend
    if backend != "reference":
        why = unavailable_reason(q, k, v)
        if why is not None:
            raise AttentionUnavailable(f"INT8 attention cannot run: {why}")
    pv_fp8 = resolve_pv(config, q.device)
    if backend != "reference":
        backend = resolve_kernel(backend, q, k, pv_fp8)
    return pv_fp8, backend


def run_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float], pv_fp8: bool,
                smooth_k: bool, backend: str) -> torch.Tensor:
    """`int8_attention` with the decisions of `plan_call` already made (callers that also log them)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return torch.ops.wan_int8.int8_attention(q, k, v, scale, pv_fp8, smooth_k, backend)
    return _int8_attention_impl(q, k, v, scale, pv_fp8, smooth_k, backend)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                   config: AttentionConfig = AttentionConfig()) -> torch.Tensor:
    """INT8 attention of q [B, Lq, H, D] over k, v [B, Lk, H, D] -> [B, Lq, H, D] (q's dtype).

    Raises `AttentionUnavailable` (with the reason) when the Triton kernel cannot run and the config did not ask
    for the reference: callers decide the fallback and say so (the ComfyUI glue runs the original attention)."""
    pv_fp8, backend = plan_call(q, k, v, config)
    return run_planned(q, k, v, scale, pv_fp8, config.smooth_k, backend)


def heads_attention(config: AttentionConfig = AttentionConfig()):
    """`fn(q, k, v, heads)` on [B, L, H*D] tensors (the Wan model's and ComfyUI's layout) running INT8 attention."""
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        split = [t.unflatten(-1, (heads, -1)) for t in (q, k, v)]
        return int8_attention(*split, config=config).flatten(-2)
    return fn
