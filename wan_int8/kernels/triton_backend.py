"""The "triton" backend: fused activation quantizer (rotation included) + INT8 GEMM with dequant epilogue.

Nothing here imports Triton at module import time: `import wan_int8` must stay cheap and work without it.
`register_triton_backends(registry)` adds the backend; `check(call)` says why a call cannot run (never a silent
fallback); a kernel that fails to compile on a device (e.g. an old GPU the configs do not fit) is logged once,
marked unusable for that device and signature, and later calls are refused by `check` with that reason.
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, Optional, Tuple

import torch

from .registry import ROT_KINDS, Backend, LinearCall
from .triton_launch import interpreting

log = logging.getLogger("wan_int8.kernels")

BACKEND_NAME = "triton"
PRIORITY = 10
MIN_CAPABILITY = (7, 5)        # Triton itself (and our quantizer) runs on Turing ...
GEMM_MIN_CAPABILITY = (8, 0)   # ... but Triton cannot lower an int8 tl.dot before Ampere (checked for sm_75)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (device string, signature) -> reason, for kernels that failed at compile/launch time
_BROKEN: Dict[Tuple[str, str], str] = {}


@functools.lru_cache(maxsize=1)
def _triton_import() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"Triton is not importable ({type(exc).__name__}: {exc})"
    return True, f"Triton {triton.__version__}"


def triton_available(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """(True, description) when the Triton kernels can run on `device` (default: the current CUDA device)."""
    ok, why = _triton_import()
    if not ok:
        return False, why
    if interpreting():
        return True, why + " (TRITON_INTERPRET=1: kernels run on the CPU interpreter)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    dev = device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.version, "hip", None):
        return False, "ROCm is not supported by these kernels yet"
    cap = torch.cuda.get_device_capability(dev)
    if cap < MIN_CAPABILITY:
        return False, f"compute capability {cap[0]}.{cap[1]} is below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    return True, why + f" on sm_{cap[0]}{cap[1]}"


def _signature(call: LinearCall) -> str:
    rot = ROT_KINDS[call.rot_kind] if call.rot_kind else "none"
    group = call.k // call.scale.shape[1] if call.scale.dim() == 2 else 0
    lora = f" lora{call.lora_rank}" if call.lora_t is not None else ""
    act, res = call.epilogue
    epi = f" act{act}res{res}" if act or res else ""
    return (f"{call.x.dtype}->{call.out_dtype} {call.granularity}{group or ''} rot={rot}{call.rot_group or ''}"
            f"{lora}{epi}")


def check(call: LinearCall) -> Optional[str]:
    """None when the Triton backend can run `call`; otherwise the reason it cannot."""
    x, q, s = call.x, call.qdata, call.scale
    if x.device.type == "cuda":
        ok, why = triton_available(x.device)
        if not ok:
            return why
        cap = torch.cuda.get_device_capability(x.device)
        if cap < GEMM_MIN_CAPABILITY:
            return (f"the Triton INT8 GEMM needs compute capability 8.0+ (this GPU is {cap[0]}.{cap[1]}: "
                    f"Triton cannot compile an int8 tl.dot for it)")
    elif x.device.type == "cpu":
        if not interpreting():
            return "input is on the CPU (the Triton kernels need CUDA, or TRITON_INTERPRET=1 for tests)"
        ok, why = _triton_import()
        if not ok:
            return why
    else:
        return f"device type {x.device.type!r} is not supported"
    if x.dim() != 2:
        return f"expected a 2-D activation, got {x.dim()}-D"
    if call.prequantized:
        if x.dtype != torch.int8 or call.sx.dtype != torch.float32 or call.sx.numel() != call.m:
            return "pre-quantized input must be int8 codes [M, K] with fp32 scales [M]"
    elif x.dtype not in _FLOAT_DTYPES:
        return f"activation dtype {x.dtype} is not supported (bf16, fp16, fp32)"
    if call.out_dtype not in _FLOAT_DTYPES:
        return f"output dtype {call.out_dtype} is not supported (bf16, fp16, fp32)"
    if q.dtype != torch.int8 or q.dim() != 2:
        return f"weight must be 2-D int8, got {q.dim()}-D {q.dtype}"
    if q.device != x.device or s.device != x.device:
        return "weight, scale and input are on different devices"
    if s.dtype != torch.float32:
        return f"weight scale must be float32, got {s.dtype}"
    if call.bias is not None and (call.bias.device != x.device or call.bias.numel() != call.n):
        return "bias is on another device or has the wrong length"
    if s.dim() == 2:
        if s.shape[0] != call.n or call.k % s.shape[1]:
            return f"group scale shape {tuple(s.shape)} does not fit weight [{call.n}, {call.k}]"
        g = call.k // s.shape[1]
        if g % 16:
            return f"weight scale group size {g} is not a multiple of 16"
    elif s.dim() == 1 and s.shape[0] != call.n:
        return f"row scale has {s.shape[0]} entries for N={call.n}"
    if call.input_scale is not None and call.input_scale.numel() != 1:
        return "static input_scale must be a scalar"
    if call.lora_t is not None:
        t, b = call.lora_t, call.lora_b
        if t.dtype != b.dtype or t.dtype not in _FLOAT_DTYPES:
            return f"LoRA operands must share one of bf16/fp16/fp32 (got {t.dtype}, {b.dtype})"
        if t.device != x.device or b.device != x.device:
            return "LoRA operands are on another device"
    if call.residual is not None:
        r, g = call.residual, call.gate
        if tuple(r.shape) != (call.m, call.n) or r.stride(1) != 1 or r.dtype not in _FLOAT_DTYPES or r.device != x.device:
            return f"residual must be a float [M, N] tensor with unit stride along N on {x.device}"
        if g is not None and (g.dim() != 3 or g.shape[-1] != call.n or g.stride(-1) != 1 or g.device != x.device
                              or g.dtype not in _FLOAT_DTYPES):
            return "gate must be a float [B, G, N] tensor with unit stride along N"
    if call.rot_kind and not call.prequantized:
        from .triton_quant import rotation_unsupported
        reason = rotation_unsupported(ROT_KINDS[call.rot_kind], call.rot_group, call.k)
        if reason:
            return reason
        if call.signs is not None and call.signs.numel() != call.k:
            return f"sign vector has {call.signs.numel()} entries, expected K={call.k}"
    broken = _BROKEN.get((str(x.device), _signature(call)))
    if broken:
        return broken
    return None


_FNS: Optional[tuple] = None


def _kernel_fns() -> tuple:
    global _FNS
    if _FNS is None:
        from .triton_gemm import int8_gemm
        from .triton_quant import quantize_activation_triton
        _FNS = (quantize_activation_triton, int8_gemm)
    return _FNS


def triton_int8_linear(call: LinearCall) -> torch.Tensor:
    """Run one INT8 linear with the Triton kernels: quantize (+rotate) the activation, then GEMM + epilogue.

    Hot path (every eager call): no imports, no device context unless x is on another GPU than the current
    one, and both kernels launch through their cached per-signature plans (see `triton_launch`)."""
    quant, gemm = _FNS or _kernel_fns()
    x = call.x
    rot = ROT_KINDS[call.rot_kind] if call.rot_kind else "none"
    scale = call.scale
    if scale.dim() == 2 and scale.stride(1) != 1:
        scale = scale.contiguous()
    try:
        dev = x.device
        if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return _run(call, quant, gemm, rot, scale)
        return _run(call, quant, gemm, rot, scale)
    except Exception as exc:
        if not _looks_like_compile_failure(exc):
            raise
        key = (str(x.device), _signature(call))
        reason = f"Triton kernel failed to build for {key[1]} on {key[0]}: {type(exc).__name__}: {exc}"[:500]
        _BROKEN[key] = reason
        log.error("INT8 layer %s: %s; this layer shape now uses the torch reference", call.name or "?", reason)
        from .registry import REFERENCE
        return REFERENCE.run(call)


def _run(call: LinearCall, quant, gemm, rot: str, scale: torch.Tensor) -> torch.Tensor:
    if call.prequantized:
        xq, sx = call.x, call.sx
    else:
        xq, sx = quant(call.x, rot, call.rot_group, call.signs, call.input_scale)
    return gemm(xq, call.qdata, sx, scale, call.bias, call.out_dtype, lora_t=call.lora_t, lora_b=call.lora_b,
                act=call.act, residual=call.residual, gate=call.gate, seq=call.seq, per=call.per)


def _looks_like_compile_failure(exc: Exception) -> bool:
    """Compile/resource errors (an old GPU, a Triton version lacking a feature) degrade; real bugs propagate."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"CompilationError", "OutOfResources", "PTXASError", "CompileTimeAssertionFailure",
                "MLIRCompilationError", "BackendCompilerError"}:
        return True
    text = str(exc)
    return any(s in text for s in ("PassManager::run failed", "ptxas", "LLVM ERROR"))


TRITON_BACKEND = Backend(BACKEND_NAME, check, triton_int8_linear, priority=PRIORITY)


def register_triton_backends(registry) -> None:
    """Add the "triton" backend to `registry` (a `KernelRegistry`).  Cheap: imports no Triton."""
    registry.register(TRITON_BACKEND)
