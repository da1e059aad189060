"""`wan-int8 demo`: the whole path on an embedded model, bf16 against INT8.

It builds a Wan in code (the tiny Wan on CPU; on a GPU, two blocks of Wan 14B size so the times mean
something), saves it as a bf16 safetensors file, converts it with the same code as `wan-int8 quantize`,
loads both files back through the loader the ComfyUI node uses, samples a few steps from the same seeded
inputs, and prints a table: error, cosine similarity, weight bytes, time and the kernels that ran.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from typing import Optional

import torch

from .formats.safetensors_io import save_tensors
from .kernels.registry import REGISTRY
from .loader import LoadConfig, build_wan_model, write_native
from .models.tiny_wan import tiny_wan_config, wan_state_dict
from .models.wan import WanConfig, sample, seeded_inputs
from .quant.metrics import cosine, max_rel_error, rel_error


def demo_config(device: str) -> WanConfig:
    if device.startswith("cuda"):
        # Two blocks of Wan 14B (dim 5120, ffn 13824): the block GEMMs have their real shapes.
        return WanConfig(dim=5120, ffn_dim=13824, num_layers=2, in_dim=16, out_dim=16)
    return tiny_wan_config()


def run_demo(device: str = "cpu", steps: int = 4, seed: int = 0, keep_dir: Optional[str] = None,
             config: Optional[WanConfig] = None, loras=(), offload_loras: bool = False, fused_blocks: bool = False,
             attention: str = "off") -> str:
    """The demo table. With `loras`, both models take them (bf16: the hook path on float linears; INT8: the
    stacked side path), so the table compares INT8+LoRA with bf16+LoRA.  `fused_blocks` / `attention` ("fp8",
    "fp16"): the INT8 model also runs with the fused block / INT8 self-attention (`cli.apply_speed_options`)."""
    cfg = config or demo_config(device)
    big = cfg.dim >= 1024
    frames, height, width = (21 * 4 - 3, 480, 832) if big else (5, 64, 64)
    work = keep_dir or tempfile.mkdtemp(prefix="wan-int8-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        float_path = os.path.join(work, "wan_demo_bf16.safetensors")
        int8_path = os.path.join(work, "wan_demo_int8.safetensors")
        save_tensors(float_path, wan_state_dict(cfg, seed=seed, dtype=torch.bfloat16))
        report = write_native(float_path, int8_path, LoadConfig())

        REGISTRY.reset()
        rows, lora_lines = [], []
        results = {}
        for label, path, quantize in (("bf16", float_path, False), ("int8", int8_path, True)):
            model, load_report = build_wan_model(path, LoadConfig(quantize_float=quantize), device=device)
            if loras:
                from .lora import apply_loras
                lora_lines.append(f"{label}: " + apply_loras(model, list(loras), offload_to_cpu=offload_loras).summary())
            if quantize:
                from .cli import apply_speed_options
                options = apply_speed_options(model, fused_blocks, attention)
                label = f"int8 ({options})" if options else label
            inputs = seeded_inputs(model.config, seed, frames, height, width, device=device, dtype=torch.bfloat16)
            run = functools.partial(sample, model, inputs.noise, inputs.context, steps=steps, cond=inputs.cond,
                                    clip_fea=inputs.clip_fea)
            with torch.inference_mode():
                if device.startswith("cuda"):
                    run()  # warm-up: kernel compilation and tuning stay out of the timing
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = run()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            linear_bytes = sum(m.weight.numel() * m.weight.element_size() + _scale_bytes(m)
                               for n, m in model.named_modules() if _is_block_linear(n, m))
            results[label] = out.float().cpu()
            rows.append((label, linear_bytes, seconds, load_report))
            del model
        ref = results["bf16"]
        kernels = sorted({backend for backend, _ in REGISTRY.stats()})
        lines = [f"wan-int8 demo: Wan dim {cfg.dim}, {cfg.num_layers} blocks, {frames} frames {height}x{width}, "
                 f"{steps} steps, seed {seed}, device {device}",
                 f"converted: {report.verdict()}", "",
                 "| model | rel err vs bf16 (‖·‖) | mean rel err | max rel err | cosine | block-linear weights | time |",
                 "|---|---|---|---|---|---|---|"]
        for label, nbytes, seconds, _ in rows:
            out = results[label]
            mean_rel = ((out - ref).abs().mean() / ref.abs().mean()).item()
            lines.append(f"| {label} | {rel_error(out, ref):.2e} | {mean_rel:.2e} | {max_rel_error(out, ref):.2e} | "
                         f"{cosine(out, ref):.6f} | {nbytes / 2**20:.1f} MiB | {seconds:.2f} s |")
        lines.append("")
        lines += [f"LoRA {line}" for line in lora_lines]
        lines.append(f"INT8 kernels that ran: {', '.join(kernels) or 'none'}")
        if keep_dir:
            lines.append(f"files kept in {work}")
        return "\n".join(lines)
    finally:
        if not keep_dir:
            shutil.rmtree(work, ignore_errors=True)


def _is_block_linear(name: str, module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return name.startswith("blocks.") and isinstance(w, torch.Tensor) and w.dim() == 2


def _scale_bytes(module: torch.nn.Module) -> int:
    s = getattr(module, "weight_scale", None)
    return 0 if s is None else s.numel() * s.element_size()
