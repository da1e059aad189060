"""The INT8 math in torch: quantizers, rotation, dequantization, the reference linear, metrics."""
from .hadamard import default_group_size, hadamard_matrix, rotate, unrotate
from .int8 import (dequantize, int8_linear_reference, int_matmul, quantize_activation, quantize_weight)
from .metrics import cosine, max_rel_error, rel_error
from .types import Int8Weight, QuantFormatError, Rotation

__all__ = [
    "Int8Weight", "QuantFormatError", "Rotation", "cosine", "default_group_size", "dequantize",
    "hadamard_matrix", "int8_linear_reference", "int_matmul", "max_rel_error", "quantize_activation",
    "quantize_weight", "rel_error", "rotate", "unrotate",
]
