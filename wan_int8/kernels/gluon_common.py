"""What the Gluon kernels share: the guarded import of Triton's Gluon API and the check that one can run here.

Gluon (Triton >= 3.5) writes warp-specialised Hopper kernels (TMA producers, wgmma consumers, mbarriers) that
plain Triton cannot express.  Its API moves between Triton releases, so a kernel runs by default only on the
releases it was tested with (TESTED_TRITON); it has no CPU interpreter, so its tests need a Hopper GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

import triton

try:   # written and measured against Triton 3.6's Gluon API
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the installed Triton
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = TensorDescriptor = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

TESTED_TRITON = ("3.6",)


def hopper_unavailable(device: torch.device, what: str, forced: bool = False) -> Optional[str]:
    """Why the Gluon kernel `what` cannot run on `device` (None: it can).  forced: the caller asked for it by name,
    so a Triton release it was not tested with is tried rather than refused."""
    from .triton_launch import interpreting
    if interpreting():
        return "the Triton interpreter (TRITON_INTERPRET=1) does not run Gluon"
    if IMPORT_ERROR is not None:
        return f"Gluon is not importable ({IMPORT_ERROR})"
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return f"the Gluon {what} is written for Hopper (sm_90) wgmma"
    if not forced and not triton.__version__.startswith(TESTED_TRITON):
        return f"Triton {triton.__version__}: the Gluon {what} is tested with Triton {', '.join(TESTED_TRITON)}"
    return None
