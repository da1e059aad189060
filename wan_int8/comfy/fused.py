"""Fused Wan blocks in ComfyUI: ComfyUI's block-replacement hook, per model patcher.

ComfyUI's Wan forward looks up `transformer_options["patches_replace"]["dit"][("double_block", i)]` for every
block and, when set, calls it with the block's inputs and the original block.  We set it on a patcher clone to
`FusedBlockReplace`, which runs `wan_int8.fused.fused_block_forward` on ComfyUI's own block modules (its INT8
linears are our glue's, so the GEMM epilogue and the shared quantization apply; LoRA stacks in their slots and
ComfyUI's attention, including our INT8 attention override, run as usual).  Why this hook rather than a drop-in
block class chosen at load: it needs no change to ComfyUI's Wan code or to the loaded model, it is per model (a
Wan 2.2 expert can run fused while the other does not), it is undone by taking the node out, and it composes:
a replacement another node set before is kept and called with ours as its "original block".

Calls the fused block cannot serve go to ComfyUI's block, with the reason logged once: Wan 2.1 i2v blocks (a
block replacement is not told how many context tokens are CLIP image tokens), `attn1_patch`/`attn2_patch`
patches, lowvram weight patches, no Triton on this device.
"""
from __future__ import annotations

import logging
import weakref

from .. import fused

log = logging.getLogger("wan_int8.comfy")

PATCH_NAME, BLOCK_NAME = "dit", "double_block"


class FusedBlockReplace:
    """The replacement for one block index.  Holds the diffusion model weakly: ComfyUI deep-copies model_options
    on every clone, and a weak reference is copied as itself."""

    def __init__(self, diffusion_model, index: int, previous=None):
        self.model = weakref.ref(diffusion_model)
        self.index = index
        self.previous = previous

    def __repr__(self) -> str:
        return f"FusedBlockReplace(block {self.index})"

    def __call__(self, args, extra):
        if self.previous is not None:   # another node's replacement first; ours stands in for the original block
            original = extra["original_block"]
            return self.previous(args, {**extra, "original_block": lambda a: self._run(a, original)})
        return self._run(args, extra["original_block"])

    def _why_not(self, block, args) -> str:
        if block is None:
            return "the diffusion model is gone"
        if hasattr(block.cross_attn, "k_img"):
            return "Wan 2.1 i2v cross-attention (the replacement hook does not pass the CLIP token count)"
        patches = args["transformer_options"].get("patches", {})
        for name in ("attn1_patch", "attn2_patch"):
            if patches.get(name):
                return f"the model has {name} patches"
        return fused.fused_block_unavailable(block, args["img"]) or ""

    def _run(self, args, original):
        model = self.model()
        block = model.blocks[self.index] if model is not None else None
        why = self._why_not(block, args)
        fused.log_decision(why, "ComfyUI's block")
        if why:
            return original(args)
        opts = args["transformer_options"]
        from comfy.ldm.modules.attention import optimized_attention

        def attention(q, k, v, heads):
            return optimized_attention(q, k, v, heads=heads, transformer_options=opts)
        out = fused.fused_block_forward(block, args["img"], args["vec"], args["pe"], args["txt"],
                                        attention=attention)
        return {"img": out}


def _replacements(patcher) -> dict:
    return patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get(PATCH_NAME, {})


def apply_fused_blocks(patcher):
    """A clone of `patcher` whose Wan blocks run fused; the original is unchanged."""
    clone = patcher.clone()
    model = clone.get_model_object("diffusion_model")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "self_attn") and hasattr(b, "ffn") for b in blocks):
        raise ValueError("Wan INT8 Fused Blocks: this model is not a Wan model (no Wan attention blocks)")
    existing = _replacements(clone)
    for i in range(len(blocks)):
        previous = existing.get((BLOCK_NAME, i))
        if isinstance(previous, FusedBlockReplace):
            previous = previous.previous
        clone.set_model_patch_replace(FusedBlockReplace(model, i, previous), PATCH_NAME, BLOCK_NAME, i)
    log.info("wan-int8: fused Wan blocks on for this model (%d blocks)", len(blocks))
    return clone


def remove_fused_blocks(patcher):
    """A clone of `patcher` without our block replacements (another node's, chained behind ours, come back)."""
    clone = patcher.clone()
    table = _replacements(clone)
    for key, value in list(table.items()):
        if isinstance(value, FusedBlockReplace):
            if value.previous is not None:
                table[key] = value.previous
            else:
                del table[key]
    return clone
