"""wan-int8 LoRA stacks on ComfyUI ModelPatchers: state per clone, installed on load, removed on unload.

A LoRA node clones the patcher and stores the whole stack (every LoRA and strength so far) in one
`PatcherInjection` under the key `wan_int8_lora`.  ComfyUI calls its `inject` when that patcher is patched
onto the model (`patch_model` / `partially_load`, i.e. on `load_models_gpu`) and `eject` when it is detached
or unpatched, so only the patcher that is running has its slots on the shared modules; a branch without the
LoRA, or with another strength, is another clone with another (or no) injection.  Why injections rather
than `add_object_patch` (the seed's way): object patches replace whole modules and are keyed by name, so two
nodes overwrite each other and the patched module is shared; rather than ON_PRE_RUN/ON_CLEANUP callbacks:
those do not run around every load/unload (e.g. when ComfyUI swaps clones between two samplers).

Parsed LoRA files are cached by (path, size, mtime), so re-queueing with a new strength re-uses them: only
the cheap stack object changes.

The LoRA maths lives in `wan_int8.lora`; this module reaches it only through `LoraBackend` (`load`, `install`,
`bake`), adapted in `library_backend()`.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from typing import Any, Callable, Optional, Protocol, Sequence, Tuple

import torch

from ..quant.types import Int8Weight

log = logging.getLogger("wan_int8.comfy")

INJECTION_KEY = "wan_int8_lora"
_INSTALLED = "_wan_int8_lora_installed"   # attribute on the diffusion model: (owner stack, remover)


class LoraBackend(Protocol):
    """What the nodes need from the LoRA library."""

    def load(self, path: str) -> Any:
        """Parse a LoRA file (any supported naming) into the library's adapter object."""

    def install(self, model: torch.nn.Module, stack: Sequence[Tuple[Any, float]],
                offload: bool = False) -> Callable[[], None]:
        """Put one stacked adapter per affected layer into the layers' `lora` slots (their tensors kept on the
        CPU and prefetched per layer when `offload`); return the remover."""

    def bake(self, name: str, weight: Int8Weight, stack: Sequence[Tuple[Any, float]]) -> Int8Weight:
        """The layer's INT8 weight with the stack merged in (the same object when no LoRA touches it)."""


class LibraryBackend:
    """`LoraBackend` over `wan_int8.lora`: `load_lora(path)`, `apply_loras(model, [(LoraFile, strength)])`,
    `remove_loras(model)`; per-layer merging through `bake_layer(name, Int8Weight, stack)` when the library has it."""

    def __init__(self, lib):
        self.lib = lib

    def load(self, path: str):
        return self.lib.load_lora(path)

    def install(self, model, stack, offload=False):
        self.lib.apply_loras(model, list(stack), offload_to_cpu=offload)
        return lambda: self.lib.remove_loras(model)

    def bake(self, name, weight, stack):
        bake_layer = getattr(self.lib, "bake_layer", None)
        if bake_layer is None:
            raise RuntimeError("wan_int8.lora has no per-layer bake (bake_layer); save without bake_loras, or "
                               "use `wan-int8 bake-lora` on the checkpoint file")
        return bake_layer(name, weight, list(stack))


def library_backend() -> LoraBackend:
    from .. import lora as lib
    missing = [f for f in ("load_lora", "apply_loras", "remove_loras") if not hasattr(lib, f)]
    if missing:
        raise RuntimeError(f"this wan-int8 build has no LoRA runtime (wan_int8.lora lacks {', '.join(missing)}); "
                           f"use ComfyUI's LoraLoaderModelOnly on wan-int8 models meanwhile")
    return LibraryBackend(lib)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    path: str
    strength: float
    name: str = ""
    offload: bool = False      # the node's offload_to_cpu: LoRA tensors on the CPU, prefetched per layer


class ParsedCache:
    """Parsed LoRA files by (backend, path, size, mtime); a few entries, least recently used dropped first."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, backend: LoraBackend, path: str):
        st = os.stat(path)
        key = (id(backend), os.path.abspath(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        parsed = backend.load(path)
        with self._lock:
            self.loads += 1
            self._items[key] = parsed
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return parsed


CACHE = ParsedCache()


class LoraStack:
    """The LoRAs of one patcher clone, and how to put them on / take them off its diffusion model."""

    def __init__(self, entries: Tuple[Tuple[LoraSpec, Any], ...], backend: LoraBackend):
        self.entries = entries
        self.backend = backend

    def active(self):
        return [(parsed, spec.strength) for spec, parsed in self.entries if spec.strength != 0]

    def describe(self) -> str:
        return ", ".join(f"{spec.name or os.path.basename(spec.path)}@{spec.strength:g}" for spec, _ in self.entries)

    @staticmethod
    def _target(patcher) -> torch.nn.Module:
        model = patcher.model
        return getattr(model, "diffusion_model", model)

    def inject(self, patcher) -> None:
        target = self._target(patcher)
        _remove(target)
        active = self.active()
        if active:
            offload = any(spec.offload for spec, _ in self.entries if spec.strength != 0)
            remover = self.backend.install(target, active, offload=offload)
            setattr(target, _INSTALLED, (self, remover))

    def eject(self, patcher) -> None:
        # tolerant: ComfyUI copies `is_injected` into clones, so eject can run for a stack that is not on
        _remove(self._target(patcher))


def _remove(target: torch.nn.Module) -> None:
    installed = getattr(target, _INSTALLED, None)
    if installed is not None:
        delattr(target, _INSTALLED)
        installed[1]()


def installed_stack(patcher) -> Optional[LoraStack]:
    installed = getattr(LoraStack._target(patcher), _INSTALLED, None)
    return installed[0] if installed else None


def _injection(stack: LoraStack):
    try:
        from comfy.patcher_extension import PatcherInjection
    except ImportError:   # stand-ins in tests: the stack itself has inject/eject
        return stack
    inj = PatcherInjection(inject=stack.inject, eject=stack.eject)
    inj.wan_int8_stack = stack
    return inj


def stack_of(patcher) -> Optional[LoraStack]:
    injections = patcher.get_injections(INJECTION_KEY)
    if not injections:
        return None
    inj = injections[0]
    return getattr(inj, "wan_int8_stack", inj)


def add_loras(patcher, specs: Sequence[LoraSpec], backend: Optional[LoraBackend] = None, cache: ParsedCache = CACHE):
    """A clone of `patcher` whose wan-int8 LoRA stack is the current one plus `specs` (files parsed once)."""
    specs = [s for s in specs if s.path]
    if not specs:
        return patcher
    current = stack_of(patcher)
    backend = backend or (current.backend if current is not None else library_backend())
    entries = tuple(current.entries) if current is not None else ()
    entries += tuple((spec, cache.get(backend, spec.path)) for spec in specs)
    clone = patcher.clone()
    clone.set_injections(INJECTION_KEY, [_injection(LoraStack(entries, backend))])
    log.info("wan-int8 LoRA stack: %s", LoraStack(entries, backend).describe())
    return clone


def comfy_lora_patches(patcher) -> dict:
    """ComfyUI's own weight patches on this patcher (stock LoraLoader), by state-dict key."""
    return dict(getattr(patcher, "patches", {}) or {})
