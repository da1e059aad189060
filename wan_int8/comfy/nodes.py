"""The wan-int8 ComfyUI nodes (classic node API).

Node ids and input names of the seed (ThunderFun/ComfyUI-Wan-INT8) are kept so saved workflows load:
`WanVideoINT8Loader`, `WanLoRALoaderINT8`, `WanLoRALoaderWithCLIPINT8`; new inputs come last with defaults.
New nodes: `WanLoRAStackINT8`, `WanINT8ModelSaver`, `WanINT8Attention`.  Importing this module needs ComfyUI's `folder_paths`
and nothing heavy: the ComfyUI model code is imported when a node runs.
"""
from __future__ import annotations

import logging
import os

import folder_paths

from ..loader import LoadConfig

log = logging.getLogger("wan_int8.comfy")

CATEGORY = "WanVideo/INT8"
MODEL_TYPES = ["auto", "wan", "flux2", "z-image", "chroma", "ltx2", "qwen", "anima"]
QUANT_MODES = ["auto", "tensorwise", "rowwise", "blockwise"]
ON_OFF = ["enable", "disable"]
STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}


def load_config(model_type: str, quantization_mode: str, auto_convert_to_int8: str, rotation: str) -> LoadConfig:
    """The node's widgets as a `LoadConfig` (what happens to float linears; INT8 layers of a file stay as stored)."""
    granularity = {"auto": "row", "rowwise": "row", "tensorwise": "tensor", "blockwise": "group"}[quantization_mode]
    return LoadConfig(quantize_float=auto_convert_to_int8 == "enable", granularity=granularity, group_size=128,
                      rotate=rotation == "on", family=None if model_type == "auto" else model_type)


def kernel_summary_line() -> str:
    from ..config import get_settings
    from ..kernels.registry import REGISTRY
    forced = get_settings().force_kernel
    if forced != "auto":
        return f"forced {forced}"
    names = [b.name for b in REGISTRY.backends() if b.name != "reference"]
    return f"fastest per shape of {', '.join(names) or 'none'} (reference on CPU)"


def _progress_bar(total_hint: int = 1):
    import comfy.utils
    bar = comfy.utils.ProgressBar(total_hint)

    def update(done: int, total: int) -> None:
        bar.update_absolute(done, total)
    return update


class WanVideoINT8Loader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"),),
            "model_type": (MODEL_TYPES, {"default": "auto"}),
            "quantization_mode": (QUANT_MODES, {"default": "auto",
                                                "tooltip": "for float layers quantized at load: rowwise (auto), "
                                                           "tensorwise, blockwise (groups of 128)"}),
            "offload_to_cpu": (ON_OFF, {"default": "disable",
                                        "tooltip": "kept for saved workflows: ComfyUI's memory manager offloads"}),
            "auto_convert_to_int8": (ON_OFF, {"default": "enable"}),
            "debug_mode": ("BOOLEAN", {"default": False}),
            "rotation": (["off", "on"], {"default": "off",
                                         "tooltip": "Hadamard rotation (ComfyUI convrot) for layers quantized at load"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a diffusion model as INT8 W8A8 (any int8/fp8/float format) and runs it with wan-int8 kernels."

    def load_unet(self, unet_name, model_type="auto", quantization_mode="auto", offload_to_cpu="disable",
                  auto_convert_to_int8="enable", debug_mode=False, rotation="off"):
        from .load import load_int8_model
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        config = load_config(model_type, quantization_mode, auto_convert_to_int8, rotation)
        patcher, report, found = load_int8_model(path, config, progress=_progress_bar(), inspect=debug_mode)
        report.kernel = kernel_summary_line()
        log.info("wan-int8: %s: %s (%.1f s)", os.path.basename(path), report.verdict(), report.seconds)
        for w in report.warnings[:10]:
            log.warning("wan-int8: %s", w)
        if debug_mode:
            for line in found.lines():
                log.info("wan-int8 %s", line)
            _add_debug_summary(patcher)
        return (patcher,)


def _add_debug_summary(patcher) -> None:
    """Kernel statistics after each sampling run of this model (a patcher callback, not a global flag)."""
    from comfy.patcher_extension import CallbacksMP

    from ..kernels.registry import print_kernel_summary
    patcher.add_callback_with_key(CallbacksMP.ON_CLEANUP, "wan_int8_debug", lambda p: print_kernel_summary())


def _lora_path(name):
    return folder_paths.get_full_path_or_raise("loras", name)


def _log_match_report(patcher, path: str, strength: float) -> None:
    """The LoRA nodes' debug input: which layers this LoRA hits on this model, what it misses and why."""
    from ..lora import load_lora, match_lora
    from ..lora.keys import ModelTargets
    model = getattr(patcher.model, "diffusion_model", patcher.model)
    report = match_lora(load_lora(path), ModelTargets.from_model(model), strength).report
    log.info("wan-int8 LoRA %s: %s", os.path.basename(path), report.summary())


class WanLoRALoaderINT8:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength": ("FLOAT", dict(STRENGTH)),
            "offload_to_cpu": (ON_OFF, {"default": "disable",
                                        "tooltip": "keep this LoRA's weights on the CPU (pinned), prefetched to the "
                                                   "GPU one layer ahead"}),
        }, "optional": {"debug": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora"
    CATEGORY = CATEGORY
    DESCRIPTION = "Adds a LoRA as a low-rank side path of the INT8 layers (the int8 weights are not rewritten)."

    def load_lora(self, model, lora_name, strength, offload_to_cpu="disable", debug=False, backend=None):
        from .lora import LoraSpec, add_loras
        if strength == 0:
            return (model,)
        spec = LoraSpec(_lora_path(lora_name), float(strength), lora_name, offload_to_cpu == "enable")
        if debug:
            _log_match_report(model, spec.path, spec.strength)
        return (add_loras(model, [spec], backend),)


def _text_encoder_part(lora_sd: dict) -> dict:
    """The keys of a LoRA file that can belong to a text encoder (the diffusion-model part is ours)."""
    unet = ("diffusion_model.", "lora_unet_", "transformer.", "model.diffusion_model.", "blocks.", "unet.")
    return {k: v for k, v in lora_sd.items() if not k.startswith(unet)}


class WanLoRALoaderWithCLIPINT8:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength_model": ("FLOAT", dict(STRENGTH)),
            "strength_clip": ("FLOAT", dict(STRENGTH)),
            "offload_to_cpu": (ON_OFF, {"default": "disable"}),
            "clip_type": ("STRING", {"default": "WAN", "tooltip": "kept for saved workflows (the CLIP knows its type)"}),
        }, "optional": {"clip": ("CLIP",), "debug": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load_lora"
    CATEGORY = CATEGORY

    def load_lora(self, model, lora_name, strength_model, strength_clip, offload_to_cpu="disable", clip_type="WAN",
                  clip=None, debug=False, backend=None):
        from .lora import LoraSpec, add_loras
        path = _lora_path(lora_name)
        if strength_model != 0:
            if debug:
                _log_match_report(model, path, float(strength_model))
            model = add_loras(model, [LoraSpec(path, float(strength_model), lora_name, offload_to_cpu == "enable")],
                              backend)
        if clip is not None and strength_clip != 0:
            import comfy.sd
            import comfy.utils
            te = _text_encoder_part(comfy.utils.load_torch_file(path, safe_load=True))
            if te:
                _, clip = comfy.sd.load_lora_for_models(None, clip, te, 0.0, float(strength_clip))
            else:
                log.info("wan-int8: %s has no text-encoder weights; CLIP unchanged", lora_name)
        return (model, clip)


class WanLoRAStackINT8:
    SLOTS = 4

    @classmethod
    def INPUT_TYPES(cls):
        names = ["None"] + folder_paths.get_filename_list("loras")
        req = {"model": ("MODEL",)}
        for i in range(1, cls.SLOTS + 1):
            req[f"lora_{i}"] = (names, {"default": "None"})
            req[f"strength_{i}"] = ("FLOAT", dict(STRENGTH))
            req[f"enabled_{i}"] = ("BOOLEAN", {"default": True})
        return {"required": req}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Several LoRAs at once, each with its strength and on/off switch, run as one stacked side path."

    def apply(self, model, backend=None, **kw):
        from .lora import LoraSpec, add_loras
        specs = []
        for i in range(1, self.SLOTS + 1):
            name, strength, on = kw.get(f"lora_{i}", "None"), float(kw.get(f"strength_{i}", 1.0)), kw.get(f"enabled_{i}", True)
            if on and name and name != "None" and strength != 0:
                specs.append(LoraSpec(_lora_path(name), strength, name))
        return (add_loras(model, specs, backend),)


class WanINT8ModelSaver:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "filename_prefix": ("STRING", {"default": "diffusion_models/wan_int8"}),
            "bake_loras": (ON_OFF, {"default": "disable",
                                    "tooltip": "merge this model's LoRAs into the int8 weights (requantized)"}),
        }}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Writes the model as a ComfyUI-native INT8 safetensors file (stock ComfyUI loads it)."

    def save(self, model, filename_prefix, bake_loras="disable", backend=None):
        from .save import save_native
        out_dir = folder_paths.get_output_directory()
        full, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        path = os.path.join(full, f"{name}_{counter:05}_.safetensors")
        info = save_native(model, path, bake=bake_loras == "enable", backend=backend)
        log.info("wan-int8: saved %s (%s)", path, info)
        return {}


class WanINT8Attention:
    MODES = {"int8 (P·V fp8 where supported)": "auto", "int8 (P·V 16-bit, most accurate)": "fp16", "off": None}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "attention": (list(cls.MODES), {"default": "off", "tooltip": (
                "INT8 attention for this model (off by default; measured speed and accuracy against bf16 "
                "attention: bench/RESULTS.md). Needs an Ampere or newer GPU; elsewhere ComfyUI's attention runs "
                "and the log says why.")}),
            "self_attention_only": ("BOOLEAN", {"default": True, "tooltip": (
                "keep ComfyUI's attention for cross-attention (512 text / 257 image keys: too short for the INT8 "
                "kernel to pay; it measured 0.5-0.6x bf16 there on an H100)")}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs this model's attention through the wan-int8 INT8 kernel (Q·K in INT8 with smoothed keys, "
                   "P·V in fp8 or 16 bits). Per model: other models and clones keep their attention.")

    def apply(self, model, attention="off", self_attention_only=True):
        from .attention import apply_int8_attention, remove_int8_attention
        pv = self.MODES.get(attention, "missing")
        if pv == "missing":
            raise ValueError(f"WanINT8Attention: unknown attention mode {attention!r}; choose one of {list(self.MODES)}")
        if pv is None:
            return (remove_int8_attention(model),)
        return (apply_int8_attention(model, pv, self_only=self_attention_only),)


class WanINT8FusedBlocks:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "fused_blocks": ("BOOLEAN", {"default": True, "tooltip": (
                "run each Wan block with fused passes: LayerNorm + modulation + INT8 quantization in one pass "
                "shared by q/k/v, RMSNorm + RoPE in one pass, GELU and the gated residual inside the INT8 GEMM. "
                "Same function as ComfyUI's block, fewer trips through memory (bench/RESULTS.md); blocks it cannot "
                "serve (Wan 2.1 i2v, attention patches, lowvram weight patches) run ComfyUI's block and the log "
                "says why.")}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs this Wan model's blocks through wan-int8's fused block (per model; other models and clones "
                   "keep ComfyUI's block). Combine with the INT8 loader and, optionally, Wan INT8 Attention.")

    def apply(self, model, fused_blocks=True):
        from .fused import apply_fused_blocks, remove_fused_blocks
        return ((apply_fused_blocks if fused_blocks else remove_fused_blocks)(model),)


NODE_CLASS_MAPPINGS = {
    "WanVideoINT8Loader": WanVideoINT8Loader,
    "WanLoRALoaderINT8": WanLoRALoaderINT8,
    "WanLoRALoaderWithCLIPINT8": WanLoRALoaderWithCLIPINT8,
    "WanLoRAStackINT8": WanLoRAStackINT8,
    "WanINT8ModelSaver": WanINT8ModelSaver,
    "WanINT8Attention": WanINT8Attention,
    "WanINT8FusedBlocks": WanINT8FusedBlocks,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanVideoINT8Loader": "Wan Video Loader (INT8)",
    "WanLoRALoaderINT8": "Wan LoRA Loader (INT8)",
    "WanLoRALoaderWithCLIPINT8": "Wan LoRA Loader with CLIP (INT8)",
    "WanLoRAStackINT8": "Wan LoRA Stack (INT8)",
    "WanINT8ModelSaver": "Save Model (wan-int8 native INT8)",
    "WanINT8Attention": "Wan INT8 Attention",
    "WanINT8FusedBlocks": "Wan INT8 Fused Blocks",
}
