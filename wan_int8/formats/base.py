"""The canonical, lazy view of a checkpoint that every format reader produces.

A reader looks only at the header and returns a `Checkpoint`: for each INT8 linear layer a `LayerSource`
(shapes, scale kind, rotation and a function that builds the canonical `Int8Weight` when asked) and for
every other tensor a `TensorSource` (ComfyUI key name, shape, dtype, and how to read or build it).
Nothing is read until a consumer iterates, so loading and converting stream one layer at a time.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from ..quant.types import Int8Weight
from .safetensors_io import CheckpointError, SafetensorsFile, TensorInfo


@dataclasses.dataclass
class LayerSource:
    """One INT8 linear layer of the checkpoint, in canonical terms."""

    name: str                          # module name, ComfyUI spelling: "blocks.0.self_attn.q"
    out_features: int
    in_features: int
    granularity: str                   # tensor | row | group
    group_size: int                    # K for tensor/row
    rotation: str                      # "" or e.g. "regular-hadamard-256"
    source_keys: Tuple[str, ...]       # keys of the file it is built from
    build: Callable[[], Int8Weight]
    note: str = ""                     # what the reader did (e.g. "tile scales expanded to groups")
    lossless: bool = True              # False when building it requantizes (fp8 -> int8, two-sided QuIP)
    has_input_scale: bool = False

    def load(self) -> Int8Weight:
        w = self.build()
        return w.validate(self.name)


@dataclasses.dataclass
class TensorSource:
    """A non-INT8 tensor (float weight, bias, norm, modulation...) under its ComfyUI key."""

    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    source_keys: Tuple[str, ...]
    build: Callable[[], torch.Tensor]


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint in canonical terms: INT8 layers + other tensors, all lazy."""

    path: str
    format: str                        # e.g. "comfy-native", "lightx2v", "seed", "scaled-fp8", "float"
    format_detail: str                 # one line on what was recognised and why
    layers: Dict[str, LayerSource]
    tensors: Dict[str, TensorSource]
    metadata: Dict[str, str]
    file: Optional[SafetensorsFile] = None
    renamed_from: str = ""             # e.g. "diffusers" when keys were renamed to ComfyUI names
    warnings: List[str] = dataclasses.field(default_factory=list)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """ComfyUI state-dict shapes (INT8 layers report their weight as [N, K])."""
        out = {k: t.shape for k, t in self.tensors.items()}
        for name, layer in self.layers.items():
            out[f"{name}.weight"] = (layer.out_features, layer.in_features)
        return out

    def items(self) -> Iterator[Tuple[str, Union[Int8Weight, torch.Tensor]]]:
        """Stream (layer name, Int8Weight) and (key, tensor) pairs, one at a time, in file order."""
        for name, layer in self.layers.items():
            yield name, layer.load()
        for key, t in self.tensors.items():
            yield key, t.build()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unprefixed(key: str, prefix: str) -> str:
    """`key` without the checkpoint-wide model prefix (see `strip_prefix`)."""
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def passthrough_rest(f: SafetensorsFile, prefix: str, used=frozenset()) -> Dict[str, TensorSource]:
    """Every tensor of the file not in `used`, as is, under its prefix-free name."""
    return {unprefixed(key, prefix): passthrough(f, key, unprefixed(key, prefix)) for key in f.keys()
            if key not in used}


def read_tensor(f: SafetensorsFile, key: str) -> Callable[[], torch.Tensor]:
    return lambda: f.get(key)


def passthrough(f: SafetensorsFile, key: str, out_key: Optional[str] = None) -> TensorSource:
    info: TensorInfo = f.info(key)
    if info.torch_dtype is None:
        raise CheckpointError(f"{f.path}: tensor {key!r} has dtype {info.dtype}, which torch cannot hold")
    return TensorSource(out_key or key, info.shape, info.torch_dtype, (key,), read_tensor(f, key))


def decode_json_tensor(t: torch.Tensor, where: str) -> dict:
    """ComfyUI's `comfy_quant` marker: a uint8 tensor holding UTF-8 JSON."""
    try:
        value = json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: damaged comfy_quant JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: comfy_quant is not a JSON object")
    params = value.get("params")
    if isinstance(params, dict):  # ComfyUI accepts keys nested under "params" too
        value = {**params, **{k: v for k, v in value.items() if k != "params"}}
    return value


def encode_json_tensor(value: dict) -> torch.Tensor:
    raw = json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return torch.tensor(list(raw), dtype=torch.uint8)


MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def strip_prefix(keys) -> str:
    """The checkpoint-wide prefix in front of model keys ("" if none); only a prefix shared by all model keys."""
    keys = [k for k in keys if not k.startswith("__")]
    for p in MODEL_PREFIXES:
        hits = sum(k.startswith(p) for k in keys)
        if hits and hits >= 0.9 * len(keys):
            return p
    return ""
