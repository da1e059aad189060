"""Settings: every environment variable is read once, here, into one immutable object.

The seed read `os.environ` on every call and kept its options in class attributes, so the last loader
won for every model and torch.compile saw data-dependent Python branches.  Here the environment is parsed
once (on first use) into a frozen `Settings`; the few runtime switches the seed exported
(`set_hadamard_quip_enabled`) replace that object instead of mutating state scattered over modules.
Code that needs options receives a `Settings` (or reads `get_settings()` once, outside hot loops).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Mapping, Optional

log = logging.getLogger("wan_int8")

KERNEL_CHOICES = ("auto", "triton", "ampere", "fallback", "fixed", "cublaslt", "int_mm", "comfy_kitchen", "reference")
CLEAR_CACHE_CHOICES = ("auto", "always", "never")
DEFAULT_LORA_CACHE_SIZE = 32


class SettingsError(ValueError):
    """An environment variable holds a value we cannot use; the message names it and the accepted values."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """All run-time options of the library (environment names in brackets)."""

    debug: bool = False                  # INT8_DEBUG_MODE: verbose logging, NaN/Inf checks on outputs
    cuda_sync: bool = False              # INT8_ENABLE_CUDA_SYNC: synchronize after each INT8 op (debugging)
    clear_cache: str = "auto"            # INT8_CLEAR_CACHE: auto | always | never (empty CUDA cache after big temporaries)
    lora_cache_size: int = DEFAULT_LORA_CACHE_SIZE  # INT8_LORA_CACHE_SIZE: parsed LoRA files kept in memory (entries)
    log_kernel: bool = False             # INT8_LOG_KERNEL: log the backend chosen for each layer shape
    force_kernel: str = "auto"           # INT8_FORCE_KERNEL: backend override (see KERNEL_CHOICES)
    hadamard_quip: bool = False          # INT8_HADAMARD_QUIP: rotate weights when quantizing on the fly
    disable_hadamard_quip: bool = False  # INT8_DISABLE_HADAMARD_QUIP: veto rotation even if requested
    hadamard_chunk_size: int = 2048      # HADAMARD_CHUNK_SIZE: rows per chunk when rotating very large inputs in torch
    hadamard_diagnostics: bool = False   # HADAMARD_DIAGNOSTICS: log rotation statistics (outlier ratio before/after)
    cache_dir: str = dataclasses.field(default_factory=lambda: _default_cache_dir({}))  # WAN_INT8_CACHE_DIR

    @property
    def rotation_enabled(self) -> bool:
        """Rotation for on-the-fly quantization: requested and not vetoed."""
        return self.hadamard_quip and not self.disable_hadamard_quip

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if env is None else env
        force = _choice(env, "INT8_FORCE_KERNEL", KERNEL_CHOICES, "auto")
        return cls(
            debug=_flag(env, "INT8_DEBUG_MODE"),
            cuda_sync=_flag(env, "INT8_ENABLE_CUDA_SYNC"),
            clear_cache=_choice(env, "INT8_CLEAR_CACHE", CLEAR_CACHE_CHOICES, "auto"),
            lora_cache_size=_int(env, "INT8_LORA_CACHE_SIZE", DEFAULT_LORA_CACHE_SIZE, minimum=0),
            log_kernel=_flag(env, "INT8_LOG_KERNEL"),
            force_kernel=force,
            hadamard_quip=_flag(env, "INT8_HADAMARD_QUIP"),
            disable_hadamard_quip=_flag(env, "INT8_DISABLE_HADAMARD_QUIP"),
            hadamard_chunk_size=_int(env, "HADAMARD_CHUNK_SIZE", 2048, minimum=0),
            hadamard_diagnostics=_flag(env, "HADAMARD_DIAGNOSTICS"),
            cache_dir=_default_cache_dir(env),
        )


def _default_cache_dir(env: Mapping[str, str]) -> str:
    """Where measured kernel choices are kept: WAN_INT8_CACHE_DIR, else $XDG_CACHE_HOME/wan_int8, else ~/.cache."""
    if env.get("WAN_INT8_CACHE_DIR"):
        return env["WAN_INT8_CACHE_DIR"]
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wan_int8")


_TRUE = {"1", "true", "yes", "on", "enable", "enabled"}
_FALSE = {"", "0", "false", "no", "off", "disable", "disabled"}


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean; use 1/0 (also true/false, yes/no, on/off)")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer (default {default})") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be >= {minimum} (default {default})")
    return value


def _choice(env: Mapping[str, str], name: str, choices, default: str) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise SettingsError(f"{name}={value!r} is not one of: {', '.join(choices)}")
    return value


# The process-wide settings: parsed from the environment once, replaced (never mutated) by the setters.
_lock = threading.Lock()
_current: Optional[Settings] = None


def get_settings() -> Settings:
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = Settings.from_env()
    return _current


def set_settings(settings: Settings) -> Settings:
    """Install `settings` as the process-wide settings; returns the previous ones."""
    global _current
    with _lock:
        previous = _current if _current is not None else Settings.from_env()
        _current = settings
    return previous


def update_settings(**changes) -> Settings:
    """Replace some fields of the process-wide settings (e.g. `update_settings(debug=True)`)."""
    new = dataclasses.replace(get_settings(), **changes)
    set_settings(new)
    return new


def set_hadamard_quip_enabled(enabled: bool) -> None:
    """Turn rotation (block Hadamard) on or off for layers quantized from now on (the seed's runtime switch).

    Files that are already rotated keep their rotation: it is part of their weights.
    """
    update_settings(hadamard_quip=bool(enabled))
    log.info("Hadamard rotation for on-the-fly quantization %s", "enabled" if enabled else "disabled")


def is_hadamard_quip_enabled() -> bool:
    return get_settings().rotation_enabled
