"""One Wan block, bf16 against ours, in one process, on the same inputs (issue 7's block benchmark).

    python bench/block.py                  # Wan 14B block at L=32760 and 75600, 5B block at 27280 (H100: ~3 min)
    python bench/block.py --cpu-smoke      # no GPU: a tiny block, torch references, exits 0

Variants: bf16 (PyTorch block, SDPA attention); INT8 linears (our op, per-token x per-channel, eager);
+ INT8 self-attention (P·V fp8: the Gluon kernel on Hopper, and on a GPU also the Triton kernel, fused block
only; cross-attention stays SDPA, as in the ComfyUI node's default);
+ INT8 attention (P·V 16-bit); each INT8 variant also with the fused block
(`wan_int8.fused`: norm+modulation+quantization, RMSNorm+RoPE, GELU and gated residual in the GEMM epilogue);
and (`--lora-rank`, default 64) the fp8 variants with one LoRA on every block linear, unfused and fused.
RoPE in the unfused blocks: comfy-kitchen's Triton `apply_rope1` when importable (what ComfyUI runs; put its
Python files on PYTHONPATH, e.g. the ignored `.ck/` folder), else the model's torch RoPE (the table says which).
The block is `wan_int8.models.wan.WanAttentionBlock` (ComfyUI's math: fp32-free modulation in the model dtype)
with nn.Linear default init, norms at 1, modulation N(0, 0.1); x ~ N(0, 1); 512 text tokens; RoPE for the
latent grid.  Accuracy: cosine and relative L2 error of the block output against the bf16 block's output.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common import bench_ms, comfy_kitchen_rope, log, print_table  # noqa: E402  (bench/common.py)
from wan_int8.quant.metrics import cosine, rel_error  # noqa: E402
import torch.nn as nn  # noqa: E402

from wan_int8.attention import AttentionConfig, heads_attention  # noqa: E402
from wan_int8.layers import quantize_model  # noqa: E402
from wan_int8.models.wan import WanAttentionBlock, WanConfig, rope_freqs  # noqa: E402
from wan_int8.models.wan import attention as sdpa_heads  # noqa: E402
from wan_int8.quant.fp8 import family_rules  # noqa: E402

# (name, config, latent grid (t, h, w) after patching)
CASES = [
    ("14B 480p", WanConfig(dim=5120, ffn_dim=13824, num_layers=1), (21, 30, 52)),    # L = 32760
    ("14B 720p", WanConfig(dim=5120, ffn_dim=13824, num_layers=1), (21, 45, 80)),    # L = 75600
    ("5B 720p", WanConfig(dim=3072, ffn_dim=14336, num_layers=1), (31, 22, 40)),     # L = 27280
]
SMOKE = [("tiny", WanConfig(dim=256, ffn_dim=512, num_layers=1), (2, 4, 4))]


class OneBlock(nn.Module):
    """A block under `blocks.0` so the Wan family's quantization rules select its linears."""

    def __init__(self, block: WanAttentionBlock):
        super().__init__()
        self.blocks = nn.ModuleList([block])

    def set_attention(self, fn, cross_fn):
        b = self.blocks[0]
        b.self_attn.attention_fn = fn
        b.cross_attn.attention_fn = cross_fn

    def forward(self, *args):
        return self.blocks[0](*args)


def with_lora(model: nn.Module, rank: int, g: torch.Generator) -> nn.Module:
    """A copy of the INT8 block model with one random LoRA of `rank` on each of its linears (wan_int8.lora)."""
    from wan_int8.lora import apply_loras, parse_tensors
    lora_model = copy.deepcopy(model)
    tensors = {}
    for name, mod in lora_model.named_modules():
        if hasattr(mod, "int8_weight"):
            base = f"diffusion_model.{name}"
            tensors[f"{base}.lora_down.weight"] = 0.01 * torch.randn(rank, mod.in_features, generator=g)
            tensors[f"{base}.lora_up.weight"] = 0.01 * torch.randn(mod.out_features, rank, generator=g)
    apply_loras(lora_model, [(parse_tensors(tensors), 1.0)])
    return lora_model


def use_comfy_kitchen_rope() -> str:
    """Make the unfused blocks use comfy-kitchen's Triton RoPE (ComfyUI's) when it is importable."""
    name, rope = comfy_kitchen_rope()
    if rope is not None:
        import wan_int8.models.wan as wan
        wan.apply_rope = lambda x, freqs: rope(x, freqs)
    return name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--cases", default="", help="comma list of case names (default: all)")
    ap.add_argument("--variants", default="", help="comma list of variant labels to run (substring match)")
    ap.add_argument("--lora-rank", type=int, default=64,
                    help="also run the fp8-attention variants with one LoRA of this rank on every block linear "
                         "(0: not); their cosine is against the bf16 block without the LoRA")
    args = ap.parse_args(argv)
    rope_name = use_comfy_kitchen_rope()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    cases = CASES if cuda else SMOKE
    if args.cases:
        cases = [c for c in cases if c[0] in args.cases.split(",")]
    rows = []
    for name, cfg, grid in cases:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        with torch.device(device):
            block = WanAttentionBlock(cfg, dtype=torch.bfloat16)
        with torch.no_grad():
            block.modulation.copy_(0.1 * torch.randn(block.modulation.shape, generator=g))
        base = OneBlock(block).eval()
        seq = grid[0] * grid[1] * grid[2]
        x = torch.randn(1, seq, cfg.dim, generator=g).to(device, torch.bfloat16)
        e = (0.1 * torch.randn(1, 1, 6, cfg.dim, generator=g)).to(device, torch.bfloat16)
        ctx = torch.randn(1, 512, cfg.dim, generator=g).to(device, torch.bfloat16)
        freqs = rope_freqs(grid, cfg.head_dim, device=device)
        # "auto": the Gluon attention kernel on Hopper, else the Triton one (the interpreter runs the Triton one)
        attn_kind = "auto" if cuda or os.environ.get("TRITON_INTERPRET") == "1" else "reference"
        q8 = copy.deepcopy(base)
        quantize_model(q8, family_rules("wan"))
        variants = [("bf16 (SDPA)", base, None, False), ("INT8 linears", q8, None, False),
                    ("INT8 linears, fused block", q8, None, True)]
        for label, pv in (("INT8 linears + INT8 attn (fp8 P·V)", "fp8"),
                          ("INT8 linears + INT8 attn (16-bit P·V)", "fp16")):
            attn = heads_attention(AttentionConfig(pv=pv, backend=attn_kind))
            variants += [(label, q8, attn, False), (label + ", fused block", q8, attn, True)]
        if cuda:   # the Triton attention kernel, for comparison where "auto" picked the Gluon one
            attn = heads_attention(AttentionConfig(pv="fp8", backend="triton"))
            variants.append(("INT8 linears + INT8 attn (fp8 P·V, Triton kernel), fused block", q8, attn, True))
        if args.lora_rank:
            q8l = with_lora(q8, args.lora_rank, g)
            attn = heads_attention(AttentionConfig(pv="fp8", backend=attn_kind))
            label = f"INT8 linears + INT8 attn (fp8 P·V) + LoRA r{args.lora_rank}"
            variants += [(label, q8l, attn, False), (label + ", fused block", q8l, attn, True)]
        if args.variants:
            keep = args.variants.split(",")
            variants = variants[:1] + [v for v in variants[1:] if any(k in v[0] for k in keep)]
        with torch.no_grad():
            ref = base(x, e, freqs, ctx).float()
            base_ms = None
            for label, model, attn, fused in variants:
                # INT8 attention for self-attention only, as the ComfyUI node does by default (text cross-attention
                # is too short for the quantization passes to pay: bench/attention.py "cross text")
                model.set_attention(attn or sdpa_heads, sdpa_heads)
                model.blocks[0].fused = fused
                try:
                    out = model(x, e, freqs, ctx).float()
                    cos, rel = cosine(out, ref), rel_error(out, ref)
                    ms = bench_ms(lambda: model(x, e, freqs, ctx), cuda)
                    base_ms = base_ms or ms
                    rows.append((name, seq, label, ms, base_ms / ms, cos, rel, ""))
                    log(f"{name}: {label} {ms:.2f} ms cos {cos:.6f}")
                except Exception as exc:   # a failing variant is recorded, never fatal
                    rows.append((name, seq, label, float("nan"), 0.0, 0.0, 0.0, f"{type(exc).__name__}: {exc}"[:90]))
                    log(f"{name}: {label} failed: {exc}")
        del variants, q8, base, block
        q8l = None
        if cuda:
            torch.cuda.empty_cache()
    print_table(f"eager, bf16 activations, RoPE in unfused blocks: {rope_name}",
                ("block", "L", "variant", "ms", "x bf16", "cosine", "rel err", "note"), rows,
                ("", "", "", ".2f", ".2f", ".6f", ".2e", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
