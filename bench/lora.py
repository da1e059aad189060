"""LoRA overhead on INT8 layers: the stacked side path at Wan 14B shapes, offload, strength changes.

    python bench/lora.py                       # GPU: M=32760, the three 14B block shapes, rank 64
    python bench/lora.py --m 75600 --rank 128 --json out.json
    python bench/lora.py --cpu-smoke           # no GPU: tiny sizes, checks the script runs (exits 0)

Per shape (M x K -> N, bf16 input with outlier channels): the INT8 linear alone, + one rank-r LoRA,
+ four stacked rank-r LoRAs (one GEMM pair of rank 4r), + four stacked with offload_to_cpu (pinned host
memory, prefetched one layer ahead on a side stream: measured over a chain of layers so the prefetch can
overlap), each the median of timed repeats (CUDA events), with the overhead over INT8 alone.  The LoRA rows
run the fused path (the up-projection added in the Triton GEMM epilogue; "fused" says which backend ran it:
only "triton" fuses); `--unfused` adds the same rows with fusion off (the separate addmm_ pass) to compare.  Then the time
to change one LoRA's strength on a 14B-sized model: 400 INT8 layers with the real shapes (the int8 weights
are shared between layers to save memory; every layer has its own stacked adapters).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from wan_int8.kernels.registry import REGISTRY  # noqa: E402
from wan_int8.layers import Int8Linear  # noqa: E402
from wan_int8.lora import apply_loras, parse_tensors, remove_loras, runtime, set_lora_strength  # noqa: E402
from wan_int8.quant.int8 import quantize_weight  # noqa: E402

SHAPES_14B = [(5120, 5120), (5120, 13824), (13824, 5120)]     # (K, N)
SMOKE_SHAPES = [(256, 256), (256, 512), (512, 256)]
BLOCK_14B = {"self_attn.q": (5120, 5120), "self_attn.k": (5120, 5120), "self_attn.v": (5120, 5120),
             "self_attn.o": (5120, 5120), "cross_attn.q": (5120, 5120), "cross_attn.k": (5120, 5120),
             "cross_attn.v": (5120, 5120), "cross_attn.o": (5120, 5120), "ffn.0": (5120, 13824),
             "ffn.2": (13824, 5120)}


def timed(fn, device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def lora_file(names, shapes, rank, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name in names:
        k, n = shapes[name]
        t[f"diffusion_model.{name}.lora_down.weight"] = (torch.randn(rank, k, generator=g) / k ** 0.5).bfloat16()
        t[f"diffusion_model.{name}.lora_up.weight"] = (torch.randn(n, rank, generator=g) * 0.01).bfloat16()
        t[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank))
    return parse_tensors(t, f"bench-lora-{seed}")


def ran_fused(chain, x) -> str:
    """Run once; say which backends ran the LoRA layers' INT8 op ("triton" adds the LoRA in its epilogue; the
    others add it after their GEMM) and whether the runtime handed the LoRA to the op at all."""
    layer = chain.layers[0].lora
    if layer is None or not runtime.FUSE:
        return "off"
    if layer.host_tensors()[0] is None or layer.host_tensors()[3] is not None:
        return "no (nothing fusable: no low-rank part, or a DoRA row factor)"
    REGISTRY.reset()
    chain(x)
    backends = sorted({b for b, _ in REGISTRY.stats()})
    return ("yes" if backends == ["triton"] else "no") + f" ({'/'.join(backends)})"


class Chain(nn.Module):
    """`layers` INT8 layers of one shape sharing one int8 weight, run one after another on the same input."""

    def __init__(self, k, n, layers, device):
        super().__init__()
        w = quantize_weight(torch.randn(n, k, device=device) * 0.02)
        self.layers = nn.ModuleList(Int8Linear.from_int8_weight(w, torch.zeros(n, device=device, dtype=torch.bfloat16),
                                                                name=f"layers.{i}") for i in range(layers))
        self.dtype = torch.bfloat16

    def forward(self, x):
        for layer in self.layers:
            y = layer(x)
        return y


def bench_shapes(args, device):
    shapes = SMOKE_SHAPES if args.cpu_smoke else SHAPES_14B
    m = 64 if args.cpu_smoke else args.m
    rank = 8 if args.cpu_smoke else args.rank
    chain_len = 2 if args.cpu_smoke else args.chain
    rows = []
    for k, n in shapes:
        chain = Chain(k, n, chain_len, device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g)
        x[:, torch.randperm(k, generator=g)[:8]] *= 20
        x = x.to(device=device, dtype=torch.bfloat16)
        names = [f"layers.{i}" for i in range(chain_len)]
        shape_map = {nm: (k, n) for nm in names}
        loras = [lora_file(names, shape_map, rank, seed) for seed in range(4)]
        row = {"M": m, "K": k, "N": n, "rank": rank, "layers": chain_len}
        cases = [("lora1", loras[:1], False, True), ("lora4", loras, False, True), ("lora4_offload", loras, True, True)]
        if args.unfused:
            cases += [("lora1_unfused", loras[:1], False, False), ("lora4_unfused", loras, False, False)]
        with torch.no_grad():
            row["int8_ms"] = timed(lambda: chain(x), device, args.repeats) / chain_len
            for label, sel, offload, fuse in cases:
                apply_loras(chain, [(lf, 1.0) for lf in sel], offload_to_cpu=offload)
                runtime.FUSE = fuse
                try:
                    row[f"{label}_fused"] = ran_fused(chain, x) if fuse else "off"
                    row[f"{label}_ms"] = timed(lambda: chain(x), device, args.repeats) / chain_len
                finally:
                    runtime.FUSE = True
                row[f"{label}_overhead"] = row[f"{label}_ms"] / row["int8_ms"] - 1
            remove_loras(chain)
        rows.append(row)
        text = " | ".join(f"{label} {row[label + '_ms']:.3f} ms ({row[label + '_overhead']:+.1%}, fused: "
                          f"{row[label + '_fused']})" for label, *_ in cases)
        print(f"M={m} K={k} N={n} rank={rank}: int8 {row['int8_ms']:.3f} ms | {text}", file=sys.stderr)
        del chain
    return rows


class Model14B(nn.Module):
    def __init__(self, blocks, shapes, device):
        super().__init__()
        weights = {}
        for name, (k, n) in shapes.items():
            if (k, n) not in weights:
                weights[(k, n)] = quantize_weight(torch.randn(n, k, device=device) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            blk = nn.Module()
            for name, (k, n) in shapes.items():
                parent = blk
                for part in name.split(".")[:-1]:
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(name.split(".")[-1], Int8Linear.from_int8_weight(
                    weights[(k, n)], torch.zeros(n, device=device, dtype=torch.bfloat16)))
            self.blocks.append(blk)
        self.dtype = torch.bfloat16


def bench_strength(args, device):
    blocks = 2 if args.cpu_smoke else 40
    shapes = {k: (256, 256) for k in BLOCK_14B} if args.cpu_smoke else BLOCK_14B
    rank = 8 if args.cpu_smoke else args.rank
    model = Model14B(blocks, shapes, device)
    names = [f"blocks.{b}.{n}" for b in range(blocks) for n in shapes]
    full = {f"blocks.{b}.{n}": shapes[n] for b in range(blocks) for n in shapes}
    t0 = time.perf_counter()
    loras = [(lora_file(names, full, rank, seed), 1.0) for seed in range(2)]
    parse_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply_loras(model, loras)
    if device.type == "cuda":
        torch.cuda.synchronize()
    apply_s = time.perf_counter() - t0
    times = []
    for s in (0.5, 0.8, 1.2):
        t0 = time.perf_counter()
        set_lora_strength(model, 0, s)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    remove_loras(model)
    out = {"layers": len(names), "rank": rank, "loras": 2, "build_lora_tensors_s": parse_s, "apply_s": apply_s,
           "strength_change_s": statistics.median(times)}
    print(f"{len(names)} layers, 2 LoRAs of rank {rank}: apply {apply_s:.2f} s, strength change "
          f"{out['strength_change_s'] * 1e3:.1f} ms (no file read, no requant)", file=sys.stderr)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=32760)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--chain", type=int, default=4, help="layers per timed chain (the offload prefetch needs > 1)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--unfused", action="store_true", help="also time the LoRA rows with fusion off (addmm_ pass)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.repeats = 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --cpu-smoke", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    rows = bench_shapes(args, device)
    strength = bench_strength(args, device)
    print(f"\n{info['device']}, torch {info['torch']}, {info['date']}")
    labels = ["lora1", "lora4", "lora4_offload"] + (["lora1_unfused", "lora4_unfused"] if args.unfused else [])
    heads = {"lora1": "+1 LoRA", "lora4": "+4 stacked", "lora4_offload": "+4 offloaded",
             "lora1_unfused": "+1 unfused", "lora4_unfused": "+4 unfused"}
    print("| M | K | N | rank | INT8 ms | " + " | ".join(heads[lb] for lb in labels) + " | fused |")
    print("|---" * (6 + len(labels)) + "|")
    for r in rows:
        print(f"| {r['M']} | {r['K']} | {r['N']} | {r['rank']} | {r['int8_ms']:.3f} | "
              + " | ".join(f"{r[lb + '_ms']:.3f} ({r[lb + '_overhead']:+.1%})" for lb in labels)
              + f" | {r['lora1_fused']} |")
    print(f"\nstrength change, {strength['layers']} layers x {strength['loras']} LoRAs: "
          f"{strength['strength_change_s'] * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "shapes": rows, "strength": strength}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
