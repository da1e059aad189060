"""Plain float checkpoints (bf16/fp16/fp32): every tensor passes through; INT8 happens at load (row-wise)."""
from __future__ import annotations

from typing import Optional

from .base import Checkpoint, passthrough
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
    tensors = {}
    for key in f.keys():
        out = key[len(prefix):] if prefix and key.startswith(prefix) else key
        tensors[out] = passthrough(f, key, out)
    return Checkpoint(f.path, NAME, detail, {}, tensors, dict(f.header.metadata), f)
