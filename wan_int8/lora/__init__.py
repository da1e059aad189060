"""LoRA on INT8 models: every LoRA file format -> one canonical form -> a stacked low-rank side path.

    report = apply_loras(model, [("style.safetensors", 0.8), ("lightx2v.safetensors", 1.0)])
    print(report.summary())
    set_lora_strength(model, 0, 0.5)      # no file read, no requant: only a scale vector changes
    remove_loras(model)                   # outputs are bit-exact again
    bake_loras("model.safetensors", [("lightx2v.safetensors", 1.0)], "baked.safetensors")   # explicit export

Modules: `keys` (names -> the model's modules, exactly), `parse` (files -> LowRank/Dense adapters and raw
patches; the parsed-file cache), `runtime` (stacking, the Int8Linear slot, offload), `bake` (merge into int8
and write ComfyUI-native), `cli` (`wan-int8 lora FILE --model CHECKPOINT`).
"""
from .parse import Dense, LoraCache, LoraError, LoraFile, LowRank, default_cache, load_lora, parse_tensors, read_lora
from .runtime import (FileReport, LoraReport, LoraSet, apply_loras, lora_state, match_lora, parse_lora_spec,
                      remove_loras, set_lora_strength)

__all__ = ["Dense", "LoraCache", "LoraError", "LoraFile", "LowRank", "default_cache", "load_lora", "parse_tensors",
           "read_lora", "FileReport", "LoraReport", "LoraSet", "apply_loras", "lora_state", "match_lora",
           "parse_lora_spec", "remove_loras", "set_lora_strength", "bake_layer", "bake_loras", "match_checkpoint"]


def __getattr__(name):   # bake pulls in the loader; import it only when asked
    if name in ("bake_layer", "bake_loras", "match_checkpoint"):
        from . import bake
        return getattr(bake, name)
    raise AttributeError(name)
