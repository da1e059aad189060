"""`wan-int8 lora FILE --model CHECKPOINT`: how a LoRA maps onto a model; `wan-int8 bake-lora`: merge and export."""
from __future__ import annotations

import json
import os
import sys


def add_commands(sub) -> None:
    s = sub.add_parser("lora", help="match a LoRA file against a checkpoint and report what it changes")
    s.add_argument("file")
    s.add_argument("--model", required=True, help="the checkpoint the LoRA is for (only its header is read)")
    s.add_argument("--strength", type=float, default=1.0)
    s.add_argument("--json", action="store_true", help="one JSON object (matched, unmatched, harmless, unsupported)")
    s.set_defaults(func=cmd_lora)

    s = sub.add_parser("bake-lora", help="merge LoRAs into a checkpoint and write ComfyUI-native INT8")
    s.add_argument("model")
    s.add_argument("output")
    s.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="a LoRA and its strength (repeat to stack)")
    s.add_argument("--family", default=None)
    s.set_defaults(func=cmd_bake)


def cmd_lora(args) -> int:
    from .bake import match_checkpoint
    from .parse import LoraError
    try:
        report = match_checkpoint(args.file, args.model, args.strength)
    except LoraError as exc:
        print(f"wan-int8 lora: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print(report.summary())
        for key, why in report.unmatched[:20]:
            print(f"  not matched: {key} ({why})")
        if len(report.unmatched) > 20:
            print(f"  ... and {len(report.unmatched) - 20} more (--json lists all)")
        for key, why in report.skipped[:10]:
            print(f"  unsupported: {key}: {why}")
    if report.matched == 0:
        print(f"wan-int8 lora: error: no key of {os.path.basename(args.file)} matches {args.model}", file=sys.stderr)
        return 2
    return 0


def cmd_bake(args) -> int:
    from ..loader import LoadConfig
    from .bake import bake_loras
    from .parse import LoraError
    from .runtime import parse_lora_spec
    try:
        report, lora_report = bake_loras(args.model, [parse_lora_spec(s) for s in args.lora], args.output,
                                         LoadConfig(family=args.family))
    except LoraError as exc:
        print(f"wan-int8 bake-lora: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB)")
    print(lora_report.summary())
    print(report.verdict())
    return 0
