"""Plain float checkpoints (bf16/fp16/fp32): every tensor passes through; INT8 happens at load (row-wise)."""
from __future__ import annotations

from typing import Optional

from .base import Checkpoint, passthrough_rest
from .safetensors_io import SafetensorsFile

NAME = "float"
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


def detect(f: SafetensorsFile, prefix: str) -> Optional[str]:
    weights = [i for k, i in f.header.tensors.items() if k.endswith(".weight") and len(i.shape) == 2]
    if weights and all(i.dtype in FLOAT_DTYPES for i in weights):
        kinds = sorted({i.dtype for i in weights})
        return f"{len(weights)} 2-D float weights ({'/'.join(kinds)}), no quantized tensors"
    return None


def read(f: SafetensorsFile, prefix: str, detail: str) -> Checkpoint:
    return Checkpoint(f.path, NAME, detail, {}, passthrough_rest(f, prefix), dict(f.header.metadata), f)
