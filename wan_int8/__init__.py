"""wan-int8: INT8 (W8A8) inference for Wan 2.1/2.2 and other diffusion transformers.

Import cost: torch only.  Triton, ComfyUI and CUDA are touched lazily, when a kernel first runs.
"""
from .config import (Settings, get_settings, is_hadamard_quip_enabled, set_hadamard_quip_enabled, set_settings,
                     update_settings)
from .kernels.registry import print_kernel_summary, reset_kernel_stats
from .layers import Int8Linear, QuantizeConfig, quantize_model
from .quant import Int8Weight, QuantFormatError, Rotation, dequantize, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "Int8Linear", "Int8Weight", "QuantFormatError", "QuantizeConfig", "Rotation", "Settings", "dequantize",
    "get_settings", "is_hadamard_quip_enabled", "print_kernel_summary", "quantize_model", "quantize_weight",
    "reset_kernel_stats", "set_hadamard_quip_enabled", "set_settings", "update_settings",
]
