"""The `wan-int8` command line: inspect, quantize, run, demo.

Every command prints a short human summary; `--json` variants print one machine-readable object instead.
Errors in user input (a damaged file, an unknown layout) end with a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

log = logging.getLogger("wan_int8")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _progress(total: int, desc: str):
    """A tqdm bar on stderr (disabled when not a terminal or total is small); returns a callback."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return (lambda name: None), (lambda: None)
    bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, disable=total < 8 or not sys.stderr.isatty())
    return (lambda name: bar.update(1)), bar.close


def _load_config(args, quantize_float=True):
    from .loader import LoadConfig
    return LoadConfig(quantize_float=quantize_float, granularity=getattr(args, "granularity", "row"),
                      group_size=getattr(args, "group_size", 128), rotate=True if getattr(args, "rotate", False) else None,
                      family=getattr(args, "family", None))


# -- inspect --------------------------------------------------------------------------------------

SCALE_SUFFIXES = ("weight_scale", "scale_weight", "scale", "weight.scale", "weight.weight_scale")
SMALL_TENSOR = 1 << 24   # float tensors up to this many elements are scanned by default (norms, biases, ...)


def inspect_checkpoint(path: str, family: Optional[str] = None, scan: bool = True, deep: bool = False) -> dict:
    """Everything `inspect` prints, as a dict: verdict, per-layer kinds, loaders, problems.

    The default scan reads only what is small: every INT8 layer's scale tensor and the float tensors up to 16M
    elements, so a 28 GB checkpoint is inspected in seconds.  `deep` also builds every layer (conversions
    included) and reads every float weight.
    """
    import torch
    from .formats import open_checkpoint
    from .formats.comfy_native import native_loaders
    from .loader import LoadConfig, plan_load

    with open_checkpoint(path) as ckpt:
        report, fam = plan_load(ckpt, LoadConfig(family=family))
        problems: List[str] = []
        if scan:
            for name, layer in ckpt.layers.items():
                if layer.in_features % 16 or layer.out_features % 16:
                    problems.append(f"{name}: [{layer.out_features}, {layer.in_features}] is not a multiple of 16: "
                                    f"runs on a slower path")
                scales = [k for k in layer.source_keys if k.endswith(SCALE_SUFFIXES) and ckpt.file is not None
                          and k in ckpt.file]
                try:
                    values = [layer.load().scale] if deep else [ckpt.file.get(k).float() for k in scales]
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                for s in values:
                    if not bool(torch.isfinite(s).all()):
                        problems.append(f"{name}: weight scale contains NaN/Inf")
                    zeros = int((s == 0).sum())
                    if zeros:
                        problems.append(f"{name}: {zeros} zero weight scale(s): those output channels are always 0")
            for key, t in ckpt.tensors.items():
                numel = 1
                for d in t.shape:
                    numel *= d
                if t.dtype.is_floating_point and len(t.shape) and t.dtype != torch.float64 \
                        and (deep or numel <= SMALL_TENSOR):
                    v = t.build()
                    if not bool(torch.isfinite(v).all()):
                        problems.append(f"{key}: contains NaN/Inf")
        layers = {}
        for name, plan in report.layers.items():
            layers[name] = {"kind": {"file": "int8", "quantize": "float->int8 at load", "float": "float"}[plan.action],
                            "granularity": plan.granularity or None,
                            "group_size": plan.group_size if plan.granularity == "group" else None,
                            "rotation": plan.rotation or None, "note": plan.note or None}
        quantized = report.int8_layers()
        if ckpt.format == "float":
            loaders = "wan-int8 (quantizes at load); stock ComfyUI runs it in bf16/fp8"
        elif all(p.action == "file" for p in quantized) and ckpt.format == "comfy-native" and not report.count("quantize"):
            loaders = native_loaders(quantized)
        else:
            loaders = "wan-int8 (stock ComfyUI: after `wan-int8 quantize` converts it to native format)"
        return {"file": path, "verdict": report.verdict(), "format": ckpt.format, "format_detail": ckpt.format_detail,
                "renamed_from": ckpt.renamed_from or None, "family": report.family,
                "family_id": fam.name if fam else None,
                "int8_from_file": report.count("file"), "quantized_at_load": report.count("quantize"),
                "kept_float": report.count("float"), "scales": report.scale_kinds(), "rotations": report.rotations(),
                "loaders": loaders, "problems": problems, "warnings": report.warnings, "layers": layers,
                "tensors": len(ckpt.tensors)}


def cmd_inspect(args) -> int:
    info = inspect_checkpoint(args.file, args.family, deep=args.deep)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(info["verdict"])
    print(f"  format: {info['format_detail']}")
    print(f"  loaders: {info['loaders']}")
    for w in info["warnings"]:
        print(f"  warning: {w}")
    if info["problems"]:
        print(f"  problems ({len(info['problems'])}):")
        for p in info["problems"][:20]:
            print(f"    - {p}")
        if len(info["problems"]) > 20:
            print(f"    ... and {len(info['problems']) - 20} more (--json lists all)")
    else:
        print("  problems: none found")
    return 0


# -- quantize -------------------------------------------------------------------------------------

def cmd_quantize(args) -> int:
    from .formats import open_checkpoint
    from .loader import plan_load, write_native

    config = _load_config(args)
    with open_checkpoint(args.input) as ckpt:
        report, _ = plan_load(ckpt, config)
        work = report.count("file") + report.count("quantize")
        tick, close = _progress(work, "quantize")
        start = time.perf_counter()
        try:
            report = write_native(ckpt, args.output, config, progress=tick)
        finally:
            close()
        seconds = time.perf_counter() - start
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB) in {seconds:.1f} s")
    print(report.verdict())
    from_file = [p for p in report.layers.values() if p.action == "file"]
    if from_file:
        lossy = sum(not p.lossless for p in from_file)
        print(f"  {len(from_file) - lossy} INT8 layers of the {report.format} file kept their codes and scales "
              f"(lossless)" + (f"; {lossy} had to be requantized to fit the format (see inspect)" if lossy else ""))
    if report.errors:
        errs = sorted(report.errors.items(), key=lambda kv: -kv[1])
        mean = sum(report.errors.values()) / len(errs)
        print(f"  weight error of the {len(errs)} layers quantized now (‖W8 − W‖/‖W‖): mean {mean:.2e}, "
              f"max {errs[0][1]:.2e}")
        for name, e in errs[:5]:
            print(f"    {name:<40} {e:.2e}")
    for w in report.warnings:
        print(f"  warning: {w}")
    return 0


# -- run --------------------------------------------------------------------------------------------

def run_checkpoint(path: str, steps: int, seed: int, frames: int, height: int, width: int, device: str,
                   dtype_name: str = "bf16", quantize_float: bool = True, family: Optional[str] = None,
                   loras=(), offload_loras: bool = False, fused_blocks: bool = False, attention: str = "off"):
    """Load a Wan checkpoint (any format), apply LoRAs, sample on seeded inputs; returns (latents, report, seconds)."""
    import torch
    from .loader import LoadConfig, build_wan_model
    from .models.wan import sample, seeded_inputs

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    model, report = build_wan_model(path, LoadConfig(quantize_float=quantize_float, family=family), device=device,
                                    dtype=dtype)
    if loras:
        from .lora import apply_loras
        lora_report = apply_loras(model, list(loras), offload_to_cpu=offload_loras)
        log.info("%s", lora_report.summary())
    apply_speed_options(model, fused_blocks, attention)
    inputs = seeded_inputs(model.config, seed, frames, height, width, device=device, dtype=dtype)
    start = time.perf_counter()
    with torch.inference_mode():
        latents = sample(model, inputs.noise, inputs.context, steps=steps, clip_fea=inputs.clip_fea, cond=inputs.cond)
    if latents.is_cuda:
        torch.cuda.synchronize()
    return latents, report, time.perf_counter() - start


def cmd_run(args) -> int:
    from .formats.safetensors_io import save_tensors
    latents, report, seconds = run_checkpoint(args.checkpoint, args.steps, args.seed, args.frames, args.height,
                                              args.width, args.device, args.dtype, not args.no_quantize, args.family,
                                              _lora_specs(args), args.offload_loras, args.fused_blocks,
                                              args.int8_attention)
    print(report.verdict())
    print(f"sampled {args.steps} steps in {seconds:.2f} s; latents {list(latents.shape)}")
    if args.out:
        save_tensors(args.out, {"latents": latents.float().cpu().contiguous()},
                     {"checkpoint": os.path.basename(args.checkpoint), "seed": str(args.seed),
                      "steps": str(args.steps), "size": f"{args.frames}x{args.height}x{args.width}"})
        print(f"saved {args.out}")
    return 0


# -- demo -------------------------------------------------------------------------------------------

def apply_speed_options(model, fused_blocks: bool = False, attention: str = "off") -> str:
    """The ComfyUI nodes' speed options for a library model: INT8 self-attention (P·V "fp8" or "fp16"; where the
    kernel cannot run, its torch reference, logged) and the fused block.  Returns a short label of what is on."""
    on = []
    if attention != "off":
        from .accuracy import attention_config
        from .attention import heads_attention
        model.set_attention(heads_attention(attention_config(attention, model)), cross=False)
        on.append(f"INT8 attention {attention}")
    if fused_blocks:
        import torch
        from .fused import kernels_unavailable
        why = kernels_unavailable(torch.zeros(1, device=next(model.parameters()).device))
        model.set_fused_blocks(True)
        on.append("fused blocks" if why is None else f"fused blocks not run: {why}")
    return ", ".join(on)


def _add_speed_args(s) -> None:
    s.add_argument("--int8-attention", choices=("off", "fp8", "fp16"), default="off",
                   help="INT8 self-attention with P·V in fp8 or 16 bits (as the Wan INT8 Attention node)")
    s.add_argument("--fused-blocks", action="store_true",
                   help="fused Wan blocks (as the Wan INT8 Fused Blocks node; needs Triton on a GPU)")


def _lora_specs(args):
    from .lora import parse_lora_spec
    return [parse_lora_spec(s) for s in (getattr(args, "lora", None) or [])]


def _add_lora_args(s) -> None:
    s.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]",
                   help="apply a LoRA (repeatable; strength defaults to 1.0)")
    s.add_argument("--offload-loras", action="store_true", help="keep LoRA weights on the CPU, prefetch per layer")


def cmd_demo(args) -> int:
    from .demo import run_demo
    table = run_demo(device=args.device, steps=args.steps, seed=args.seed, keep_dir=args.keep,
                     loras=_lora_specs(args), offload_loras=args.offload_loras, fused_blocks=args.fused_blocks,
                     attention=args.int8_attention)
    print(table)
    return 0


# -- entry ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wan-int8", description="INT8 (W8A8) Wan and DiT checkpoints: inspect, convert, run")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="say what a checkpoint is and which loaders can run it")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="one JSON object (format, family, per-layer kinds)")
    s.add_argument("--family", default=None, help="model family (default: detect)")
    s.add_argument("--deep", action="store_true", help="also build every layer and read every float weight (slow "
                                                       "on big files)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("quantize", help="convert any supported checkpoint to ComfyUI-native INT8")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--granularity", choices=("row", "tensor", "group"), default="row")
    s.add_argument("--group-size", type=int, default=128, choices=(64, 128, 256))
    s.add_argument("--rotate", action="store_true", help="block-Hadamard rotation (ComfyUI convrot, group 256)")
    s.add_argument("--family", default=None, help="model family (default: detect)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("run", help="sample a Wan checkpoint on seeded inputs, save the latents")
    s.add_argument("checkpoint")
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--frames", type=int, default=5)
    s.add_argument("--height", type=int, default=64)
    s.add_argument("--width", type=int, default=64)
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    s.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    s.add_argument("--no-quantize", action="store_true", help="keep float linears float (a bf16 baseline)")
    s.add_argument("--family", default=None)
    s.add_argument("--out", default=None, help="save latents to this safetensors file")
    _add_lora_args(s)
    _add_speed_args(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="tiny Wan: bf16 vs INT8 through the real quantize/load path")
    s.add_argument("--device", default=None)
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--keep", default=None, help="keep the demo's files in this folder")
    _add_lora_args(s)
    _add_speed_args(s)
    s.set_defaults(func=cmd_demo)
    for module in _command_modules():
        module.add_commands(sub)
    return p


# Subcommands that live beside the code they drive: each module has `add_commands(subparsers)`.
COMMAND_MODULES = ("wan_int8.lora.cli", "wan_int8.accuracy")


def _command_modules():
    import importlib
    import importlib.util
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            yield importlib.import_module(name)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if getattr(args, "device", "x") is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from .config import SettingsError
    from .formats.safetensors_io import CheckpointError
    from .lora.parse import LoraError
    from .quant.types import QuantFormatError
    try:
        return args.func(args)
    except (CheckpointError, QuantFormatError, SettingsError, LoraError, FileNotFoundError) as exc:
        print(f"wan-int8 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
