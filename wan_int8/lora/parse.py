"""LoRA files -> one canonical form, cached.

Canonical form (`LoraFile`), per base name (the key without its suffix; mapped onto the model later):
- `LowRank(up [N, r], down [r, K], scale, dora_scale)`: delta W = scale · up @ down.  Plain LoRA (every
  spelling), LoHa (exactly, as rank r1·r2 via the face-splitting / Khatri-Rao product:
  (U1 V1) ⊙ (U2 V2) = (U1 •row U2)(V1 •col V2)), LoKr (exactly: kron(U1 V1, U2 V2) = kron(U1, U2)·kron(V1, V2),
  rank r1·r2, where a full factor w is written as I·w or w·I, whichever has the smaller rank) and the seed's
  INT8 LoRAs (int8 up/down dequantized with their `scale_weight`, a scalar or one per row).
- `Dense(delta [N, K])`: a full delta (a `diff` on a linear weight; a LoKr whose exact rank is too large).
- raw patches `(base, role) -> tensor` for `diff` (norms, any weight), `diff_b` (biases, incl. diffusers'
  `lora_B.bias`) and `diff_m` (lightx2v modulation).
`scale` is alpha / rank (ComfyUI's rule; 1 without alpha), strength is applied later.  Tensors stay on the
CPU in their file dtype (int8 LoRAs become fp32).

Cache: parsed files are kept between runs in an LRU keyed by (realpath, size, mtime_ns), at most
`Settings.lora_cache_size` entries (INT8_LORA_CACHE_SIZE), so running again, or changing a strength, never
rereads the file; a file rewritten in place has a new mtime and is read again.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..config import get_settings
from ..formats.safetensors_io import CheckpointError, SafetensorsFile
from .keys import split_key

log = logging.getLogger("wan_int8.lora")


class LoraError(ValueError):
    """A LoRA file cannot be used as asked; the message names the file, the layer and what is wrong."""


@dataclasses.dataclass
class LowRank:
    up: torch.Tensor                   # [N, r]  (B)
    down: torch.Tensor                 # [r, K]  (A)
    scale: float                       # alpha / r (1.0 without alpha)
    dora_scale: Optional[torch.Tensor] = None   # [N, 1] (output axis) or [1, K] (input axis)
    kind: str = "lora"                 # lora | loha | lokr | int8-lora

    @property
    def shape(self) -> Tuple[int, int]:
        return int(self.up.shape[0]), int(self.down.shape[1])

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, dtype=torch.float64) -> torch.Tensor:
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))


@dataclasses.dataclass
class Dense:
    delta_weight: torch.Tensor         # [N, K], scale already folded in
    kind: str = "diff"
    dora_scale: Optional[torch.Tensor] = None

    @property
    def shape(self) -> Tuple[int, int]:
        return int(self.delta_weight.shape[0]), int(self.delta_weight.shape[1])

    @property
    def rank(self) -> int:
        return min(self.shape)

    def delta(self, dtype=torch.float64) -> torch.Tensor:
        return self.delta_weight.to(dtype)


Adapter = Union[LowRank, Dense]


@dataclasses.dataclass
class LoraFile:
    path: str
    adapters: Dict[str, Adapter]                    # base -> adapter
    patches: Dict[Tuple[str, str], torch.Tensor]    # (base, "diff" | "diff_b" | "diff_m") -> tensor
    skipped: List[Tuple[str, str]]                  # (key, why) for tensors we understood but cannot use
    styles: List[str]                               # e.g. ["kohya", "loha", "dora"]
    num_keys: int = 0

    def nbytes(self) -> int:
        total = 0
        for a in self.adapters.values():
            ts = (a.up, a.down) if isinstance(a, LowRank) else (a.delta_weight,)
            total += sum(t.numel() * t.element_size() for t in ts)
        return total + sum(t.numel() * t.element_size() for t in self.patches.values())


# LoKr factors whose exact rank exceeds this fraction of min(N, K) run as a dense delta instead
LOKR_DENSE_FRACTION = 0.5


def parse_tensors(tensors: Dict[str, torch.Tensor], path: str = "<memory>") -> LoraFile:
    """Group a LoRA state dict by base name and convert each group to the canonical form."""
    groups: Dict[str, Dict[str, torch.Tensor]] = collections.defaultdict(dict)
    skipped: List[Tuple[str, str]] = []
    styles = set()
    for key, t in tensors.items():
        base, role = split_key(key)
        if base is None:
            skipped.append((key, "unknown tensor kind (no LoRA suffix recognised)"))
            continue
        groups[base][role] = t
        if base.startswith("lora_unet_"):
            styles.add("kohya")
        elif "diffusion_model." in base:
            styles.add("comfyui")
        elif "lora_A" in key or "lora_B" in key:
            styles.add("peft")
    adapters: Dict[str, Adapter] = {}
    patches: Dict[Tuple[str, str], torch.Tensor] = {}
    for base, g in groups.items():
        where = f"{path}: {base}"
        for role in ("diff", "diff_b", "diff_m"):
            if role in g:
                patches[(base, role)] = g.pop(role)
                styles.add(role)
        g.pop("reshape_weight", None)     # only meaningful for convolutions
        unusable = [r for r in ("set_weight", "glora", "oft", "mid", "hada_t1", "hada_t2", "lokr_t2",
                                "peft_magnitude") if r in g]
        if unusable:   # the rest of this adapter would be wrong without the part we cannot apply
            skipped.append((base, f"{', '.join(unusable)}: not supported for linear layers (adapter skipped)"))
            g.clear()
        alpha = g.pop("alpha", None)
        dora = g.pop("dora_scale", None)
        if not g:
            continue
        try:
            if "up" in g or "down" in g:
                adapter = _lora(g, alpha, where)
                styles.add("int8" if adapter.kind == "int8-lora" else "lora")
            elif any(r.startswith("hada_") for r in g):
                adapter = _loha(g, alpha, where)
                styles.add("loha")
            elif any(r.startswith("lokr_") for r in g):
                adapter = _lokr(g, alpha, where)
                styles.add("lokr")
            else:
                skipped.append((base, f"incomplete adapter (only {', '.join(sorted(g))})"))
                continue
        except _Incomplete as exc:
            skipped.append((base, str(exc)))
            continue
        if dora is not None:
            adapter.dora_scale = dora
            styles.add("dora")
        adapters[base] = adapter
    return LoraFile(path, adapters, patches, skipped, sorted(styles), len(tensors))


class _Incomplete(Exception):
    pass


def _as_2d(t: torch.Tensor, where: str, what: str) -> torch.Tensor:
    if t.dim() > 2 and all(d == 1 for d in t.shape[2:]):       # conv-style [N, r, 1, 1]
        t = t.reshape(t.shape[0], t.shape[1])
    if t.dim() != 2:
        raise LoraError(f"{where}: {what} has shape {list(t.shape)}; a linear LoRA needs a 2-D tensor")
    return t


def _dequant(t: torch.Tensor, scale: Optional[torch.Tensor], where: str, what: str) -> torch.Tensor:
    """The seed's INT8 LoRA tensors: int8 codes times a scalar or per-row scale (any shape with that many values)."""
    if t.dtype != torch.int8:
        return t if scale is None else t.float() * _row_scale(scale, t, where, what)
    if scale is None:
        raise LoraError(f"{where}: {what} is int8 but the file has no scale_weight for it")
    return t.float() * _row_scale(scale, t, where, what)


def _row_scale(scale: torch.Tensor, t: torch.Tensor, where: str, what: str) -> torch.Tensor:
    s = scale.float().reshape(-1)
    if s.numel() == 1:
        return s.reshape(())
    if s.numel() == t.shape[0]:
        return s.reshape(-1, *([1] * (t.dim() - 1)))
    raise LoraError(f"{where}: {what} scale has {s.numel()} values; expected 1 or one per row ({t.shape[0]})")


def _alpha(alpha: Optional[torch.Tensor]) -> Optional[float]:
    return None if alpha is None else float(alpha.float().reshape(-1)[0])


def _lora(g: Dict[str, torch.Tensor], alpha, where: str) -> LowRank:
    if "up" not in g or "down" not in g:
        raise _Incomplete(f"LoRA has {'up' if 'up' in g else 'down'} but not {'down' if 'up' in g else 'up'}")
    is_int8 = g["up"].dtype == torch.int8 or g["down"].dtype == torch.int8
    up = _as_2d(_dequant(g["up"], g.get("up_scale"), where, "up"), where, "up")
    down = _as_2d(_dequant(g["down"], g.get("down_scale"), where, "down"), where, "down")
    if up.shape[1] != down.shape[0]:
        raise LoraError(f"{where}: up {list(up.shape)} and down {list(down.shape)} have different ranks")
    a = _alpha(alpha)
    scale = 1.0 if a is None else a / down.shape[0]
    return LowRank(up, down, scale, kind="int8-lora" if is_int8 else "lora")


def _loha(g, alpha, where: str) -> LowRank:
    need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if any(r not in g for r in need):
        raise _Incomplete(f"LoHa is missing {', '.join(r for r in need if r not in g)}")
    w1a, w1b, w2a, w2b = (_as_2d(g[r].float(), where, r) for r in need)
    n, r1, r2, k = w1a.shape[0], w1a.shape[1], w2a.shape[1], w1b.shape[1]
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(n, r1 * r2)
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, k)
    a = _alpha(alpha)
    return LowRank(up, down, 1.0 if a is None else a / r1, kind="loha")


def _factor(g, name: str, where: str):
    """(U, V, rank-from-factorization or None) for LoKr factor w1 / w2."""
    if f"lokr_{name}" in g:
        w = _as_2d(g[f"lokr_{name}"].float(), where, f"lokr_{name}")
        a, b = w.shape
        if a <= b:
            return torch.eye(a), w, None
        return w, torch.eye(b), None
    if f"lokr_{name}_a" in g and f"lokr_{name}_b" in g:
        u = _as_2d(g[f"lokr_{name}_a"].float(), where, f"lokr_{name}_a")
        v = _as_2d(g[f"lokr_{name}_b"].float(), where, f"lokr_{name}_b")
        return u, v, v.shape[0]
    raise _Incomplete(f"LoKr is missing lokr_{name}")


def _lokr(g, alpha, where: str) -> Adapter:
    u1, v1, d1 = _factor(g, "w1", where)
    u2, v2, d2 = _factor(g, "w2", where)
    dim = d2 if d2 is not None else d1          # ComfyUI: the last factorized factor's rank
    a = _alpha(alpha)
    scale = a / dim if (a is not None and dim is not None) else 1.0
    up, down = torch.kron(u1, u2), torch.kron(v1, v2)
    n, k = up.shape[0], down.shape[1]
    if up.shape[1] > LOKR_DENSE_FRACTION * min(n, k):
        return Dense(scale * (up.double() @ down.double()).float(), kind="lokr")
    return LowRank(up, down, scale, kind="lokr")


# -- reading and caching ------------------------------------------------------------------------------------
def read_lora(path: str) -> LoraFile:
    """Read and parse one LoRA safetensors file (no caching)."""
    try:
        with SafetensorsFile(path) as f:
            tensors = {k: f.get(k) for k in f.keys()}
    except CheckpointError as exc:
        raise LoraError(str(exc)) from None
    return parse_tensors(tensors, path)


def file_key(path: str) -> Tuple[str, int, int]:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise LoraError(f"{path}: cannot read LoRA file: {exc.strerror or exc}") from None
    return real, st.st_size, st.st_mtime_ns


class LoraCache:
    """LRU of parsed LoRA files keyed by (realpath, size, mtime_ns); `max_entries` None: the settings' value."""

    def __init__(self, max_entries: Optional[int] = None):
        self._max = max_entries
        self._items: "collections.OrderedDict[Tuple[str, int, int], LoraFile]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0      # files read from disk
        self.hits = 0

    @property
    def max_entries(self) -> int:
        return self._max if self._max is not None else get_settings().lora_cache_size

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def load(self, path: str) -> LoraFile:
        key = file_key(path)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit
        lora = read_lora(path)
        with self._lock:
            self.reads += 1
            # a rewritten file leaves a stale entry under its old (size, mtime): drop it
            for old in [k for k in self._items if k[0] == key[0]]:
                del self._items[old]
            if self.max_entries > 0:
                self._items[key] = lora
                while len(self._items) > self.max_entries:
                    self._items.popitem(last=False)
        return lora


_DEFAULT_CACHE = LoraCache()


def default_cache() -> LoraCache:
    """The process-wide parsed-LoRA cache (its size follows Settings.lora_cache_size)."""
    return _DEFAULT_CACHE


def load_lora(path: str, cache: Optional[LoraCache] = None) -> LoraFile:
    return (cache if cache is not None else _DEFAULT_CACHE).load(path)
