"""Triton INT8 GEMM with the dequantization epilogue fused: `y = (A·Bᵀ) * s_x[m] * s_w (+ bias)`.

A: int8 codes `[M, K]` (the quantized activation), B: the int8 weight `[N, K]` read in place as the K-major
`Bᵀ` (no copy; on Hopper int8 wgmma needs both operands K-major, which this is).  int32 accumulation by
`tl.dot`, fp32 epilogue in the oracle's order (`quant.int8._gemm_dequant`): `acc * s_w`, then `* s_x`, then
`+ bias`, stored as bf16/fp16/fp32.  Weight scales: tensor (scalar), row `[N]` or group `[N, K/g]`; for
groups the int32 partial dot of each K-group is folded into an fp32 accumulator inside the K loop
(`acc_f += acc_g * s_w[n, group]`), so BLOCK_K divides g.

Numerics: acc is exact; the epilogue is the oracle's sequence of fp32 operations, but the compiler may fuse a
multiply-add into one FMA (one rounding fewer), so fp32 outputs agree with the oracle to ~1 ulp (a few ulps of
the largest partial for group scales); bf16/fp16 outputs to 1 ulp of the output type.

Dispatch: one `@triton.jit` kernel; autotuned wrappers are built lazily per (architecture class, scale mode,
group size, small-M) from short explicit config lists, keyed on (M bucket, N, K) where the M bucket is the
next power of two of M, capped, so videos of different lengths do not re-tune.  `set_config_override`
replaces every list (tests use one tiny config; the CPU interpreter is slow).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch

import triton
import triton.language as tl

M_BUCKET_CAP = 8192
SMALL_M = 64
SW_TENSOR, SW_ROW, SW_GROUP = 0, 1, 2


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, K, M_BUCKET,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_sw,
                      SW_MODE: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles sweep N together so their B tiles stay in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap out-of-range rows/cols onto valid ones (loads stay in bounds, stores are masked)
    offs_am = tl.where(offs_m < M, offs_m, 0)
    offs_bn = tl.where(offs_n < N, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_bn[None, :] * stride_bn + offs_k[:, None].to(tl.int64) * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if SW_MODE == 2:
        acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sw_ptrs = sw_ptr + offs_bn * stride_sw
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        if SW_MODE == 2:
            if GROUP_K == BLOCK_K:   # BLOCK_K == g: each step's dot is one group's partial sum
                part = tl.dot(a, b, out_dtype=tl.int32)
                acc_f += part.to(tl.float32) * tl.load(sw_ptrs + kb)[None, :]
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
                if (kb + 1) % (GROUP_K // BLOCK_K) == 0:   # last step of a group: fold it in, restart
                    acc_f += acc.to(tl.float32) * tl.load(sw_ptrs + kb // (GROUP_K // BLOCK_K))[None, :]
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if SW_MODE == 2:
        y = acc_f
    elif SW_MODE == 1:
        y = acc.to(tl.float32) * tl.load(sw_ptr + offs_bn)[None, :]
    else:
        y = acc.to(tl.float32) * tl.load(sw_ptr + tl.zeros([BLOCK_N], dtype=tl.int32))[None, :]
    y = y * tl.load(sx_ptr + offs_am)[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_bn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _int8_gemm_persistent_kernel(a_ptr, b_ptr, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, K, M_BUCKET,
                                 stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_sw,
                                 SW_MODE: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, USE_TMA: tl.constexpr,
                                 FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr):
    """Persistent variant: NUM_SMS programs loop over the output tiles (grouped order).  USE_TMA: operands
    (and the output) through device-side tensor descriptors (Hopper TMA; needs contiguous K-major a and b, K
    and N*elem 16-byte aligned, and `triton.set_allocator`); else pointer loads (any strides, interpreter).
    Same epilogue and numerics as `_int8_gemm_kernel`."""
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    offs_k = tl.arange(0, BLOCK_K)
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_n = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        offs_am = tl.where(offs_m < M, offs_m, 0)
        offs_bn = tl.where(offs_n < N, offs_n, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if SW_MODE == 2:
            acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k_tiles):
            if USE_TMA:
                a = a_desc.load([off_m, kb * BLOCK_K])
                b = b_desc.load([off_n, kb * BLOCK_K]).T
            else:
                kk = kb * BLOCK_K + offs_k
                a = tl.load(a_ptr + offs_am[:, None] * stride_am + kk[None, :].to(tl.int64) * stride_ak,
                            mask=kk[None, :] < K, other=0)
                b = tl.load(b_ptr + offs_bn[None, :] * stride_bn + kk[:, None].to(tl.int64) * stride_bk,
                            mask=kk[:, None] < K, other=0)
            if SW_MODE == 2:
                if GROUP_K == BLOCK_K:
                    part = tl.dot(a, b, out_dtype=tl.int32)
                    acc_f += part.to(tl.float32) * tl.load(sw_ptr + offs_bn * stride_sw + kb)[None, :]
                else:
                    acc = tl.dot(a, b, acc, out_dtype=tl.int32)
                    if (kb + 1) % (GROUP_K // BLOCK_K) == 0:
                        sw_g = tl.load(sw_ptr + offs_bn * stride_sw + kb // (GROUP_K // BLOCK_K))
                        acc_f += acc.to(tl.float32) * sw_g[None, :]
                        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if SW_MODE == 2:
            y = acc_f
        elif SW_MODE == 1:
            y = acc.to(tl.float32) * tl.load(sw_ptr + offs_bn)[None, :]
        else:
            y = acc.to(tl.float32) * tl.load(sw_ptr + tl.zeros([BLOCK_N], dtype=tl.int32))[None, :]
        y = y * tl.load(sx_ptr + offs_am)[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_bn).to(tl.float32)[None, :]
        if USE_TMA:
            c_desc.store([off_m, off_n], y.to(c_ptr.dtype.element_ty))
        else:
            c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
            tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ------------------------------------------------------------------------------------------------------------
# configurations

def _c(bm, bn, bk, warps, stages, gm=8):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)


# Hopper (sm_90): int8 wgmma; 228 KB shared memory. 128x256x128 at 3 stages = 144 KB.
_HOPPER = [_c(128, 256, 128, 8, 3), _c(256, 128, 128, 8, 3), _c(128, 128, 128, 8, 4), _c(128, 128, 128, 4, 4),
           _c(128, 256, 64, 8, 4), _c(64, 256, 128, 4, 4), _c(128, 256, 128, 8, 4), _c(128, 128, 128, 8, 5),
           _c(128, 128, 256, 8, 3), _c(128, 256, 128, 8, 3, 16)]
# Hopper, 64 < M <= 1024: too few 128x128 tiles to fill 132 SMs (M=512, N=5120: 160), so narrower tiles too.
_HOPPER_MID = [_c(64, 128, 128, 4, 4), _c(128, 64, 128, 4, 4), _c(64, 256, 128, 4, 4), _c(128, 128, 128, 8, 4),
               _c(64, 64, 256, 4, 3), _c(64, 128, 256, 4, 3)]
# Persistent TMA kernel (Hopper), see `_int8_gemm_persistent_kernel`; extra key "FLATTEN"/"WARP_SPEC" allowed.
_HOPPER_PERSISTENT = [_c(128, 256, 128, 8, 3), _c(256, 128, 128, 8, 3),
                      _c(128, 128, 128, 8, 4), _c(128, 128, 128, 4, 5)]
# A100 (sm_80): 164 KB shared memory, mma.sync.
_AMPERE = [_c(128, 256, 64, 8, 3), _c(256, 128, 64, 8, 3), _c(128, 128, 64, 4, 4), _c(128, 128, 128, 8, 3),
           _c(64, 128, 128, 4, 4)]
# sm_86/89 (RTX 30xx/40xx): ~100 KB shared memory per block.
_ADA = [_c(128, 128, 64, 4, 4), _c(128, 256, 64, 8, 3), _c(256, 128, 64, 8, 3), _c(128, 128, 128, 8, 2),
        _c(64, 128, 64, 4, 4)]
# M <= 64: weight-bandwidth bound; narrow N tiles so enough programs cover the SMs.
_SMALL_M = [_c(16, 32, 256, 4, 4, 1), _c(16, 64, 128, 4, 4, 1), _c(32, 64, 128, 4, 4, 1),
            _c(64, 64, 128, 4, 4, 1), _c(16, 128, 128, 4, 3, 1), _c(64, 128, 128, 4, 3, 1)]

_OVERRIDE: Optional[List[dict]] = None
_KERNELS: Dict[tuple, object] = {}


def set_config_override(configs: Optional[Sequence[dict]]) -> None:
    """Use exactly `configs` (dicts as `_c` makes) for every GEMM from now on; None restores the defaults."""
    global _OVERRIDE
    _OVERRIDE = [dict(c) for c in configs] if configs is not None else None
    _KERNELS.clear()


def _arch(device: torch.device) -> str:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or device.type != "cuda":
        return "interp"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "hopper"     # also sm_100/120: these tiles are valid there (wgmma is sm_90a only; Triton picks)
    if (major, minor) == (8, 0):
        return "ampere"
    if major == 8:
        return "ada"
    return "turing"


def _config_list(arch: str, small: bool, group: int, mid: bool = False, persistent: bool = False) -> List[dict]:
    if _OVERRIDE is not None:
        cfgs = _OVERRIDE
    elif arch == "turing":
        # Triton 3.x cannot lower an int8 tl.dot for sm_75 (TritonGPUAccelerateMatmul fails); the backend's
        # check() refuses these GPUs, so reaching this is a caller bug.
        raise RuntimeError("the Triton INT8 GEMM needs compute capability 8.0 or newer")
    elif arch == "interp":
        cfgs = [_c(16, 32, 32, 4, 1, 1)]
    elif persistent:
        cfgs = _HOPPER_PERSISTENT
    elif small:
        cfgs = _SMALL_M
    elif mid and arch == "hopper":
        cfgs = _HOPPER_MID
    else:
        cfgs = {"hopper": _HOPPER, "ampere": _AMPERE, "ada": _ADA}[arch]
    if group:
        fixed = []
        for c in cfgs:
            c = dict(c)
            while group % c["BLOCK_K"]:
                c["BLOCK_K"] //= 2
            if c not in fixed:
                fixed.append(c)
        cfgs = fixed
    return cfgs


def _autotune_kwargs() -> dict:
    """Persist autotune results across processes where this Triton supports it (3.4+: cache_results)."""
    import inspect
    try:
        if "cache_results" in inspect.signature(triton.autotune).parameters:
            return dict(cache_results=True)
    except (TypeError, ValueError):
        pass
    return {}


def _kernel(arch: str, small: bool, group: int, mid: bool = False, persistent: bool = False):
    key = (arch, small, group, mid, persistent)
    fn = _KERNELS.get(key)
    if fn is None:
        configs = []
        for c in _config_list(arch, small, group, mid, persistent):
            c = dict(c)
            warps, stages = c.pop("num_warps"), c.pop("num_stages")
            if persistent:
                c.setdefault("FLATTEN", False)
                c.setdefault("WARP_SPEC", False)
            configs.append(triton.Config(c, num_warps=warps, num_stages=stages))
        keys = ["M_BUCKET", "N", "K", "SW_MODE", "GROUP_K", "HAS_BIAS"]
        if persistent:
            fn = triton.autotune(configs=configs, key=keys, **_autotune_kwargs())(_int8_gemm_persistent_kernel)
        else:
            heur = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_int8_gemm_kernel)
            fn = triton.autotune(configs=configs, key=keys, **_autotune_kwargs())(heur)
        _KERNELS[key] = fn
    return fn


# -- persistent / TMA support ----------------------------------------------------------------------------------

_ALLOCATOR_SET = False
_NUM_SMS: Dict[int, int] = {}
# Use the persistent TMA kernel by default on Hopper (set after bench/kernel_sweep.py shows it wins there).
PERSISTENT_DEFAULT = os.environ.get("WAN_INT8_GEMM_PERSISTENT", "0") == "1"


def tma_supported(device: torch.device) -> Optional[str]:
    """None when device-side tensor descriptors can run here, else why not."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"Triton {triton.__version__} has no tl.make_tensor_descriptor"
    if not hasattr(triton, "set_allocator"):
        return f"Triton {triton.__version__} has no triton.set_allocator"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return "TMA needs a Hopper (sm_90) or newer GPU"
    return None


def _ensure_allocator() -> None:
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")
        triton.set_allocator(alloc)
        _ALLOCATOR_SET = True


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _tma_operands_ok(a, b, c) -> bool:
    return (a.stride(1) == 1 and b.stride(1) == 1 and c.stride(1) == 1 and a.stride(0) % 16 == 0
            and b.stride(0) % 16 == 0 and (c.stride(0) * c.element_size()) % 16 == 0
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0 and c.data_ptr() % 16 == 0)


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), M_BUCKET_CAP)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
              out: Optional[torch.Tensor] = None, variant: Optional[str] = None,
              config: Optional[dict] = None) -> torch.Tensor:
    """`(a [M, K] int8) · (b [N, K] int8)ᵀ * sx[M] * sw (+ bias)` -> `[M, N]` in `out_dtype`.

    `variant`: "ptr" (grid of tiles, pointer loads), "persistent" (persistent, pointer loads) or "tma"
    (persistent, tensor descriptors); default: "tma" where PERSISTENT_DEFAULT and supported, else "ptr".
    `config` (benchmarks): one explicit configuration (dict as `_c` makes) instead of autotuning.

    `sw` is fp32: a scalar (tensor-wise), `[N]` (row-wise) or `[N, K/g]` (group-wise).  `a` and `b` may have
    any strides (K-contiguous is the fast case); `sx` is fp32 `[M]`; `bias` any float `[N]`.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise ValueError("int8_gemm expects 2-D int8 a [M, K] and b [N, K]")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a has K={k}, b has K={b.shape[1]}")
    c = out if out is not None else torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if sw.dim() == 0 or sw.numel() == 1 and sw.dim() <= 1 and n != 1:
        mode, group, stride_sw = SW_TENSOR, 0, 0
        sw = sw.reshape(1)
    elif sw.dim() == 1:
        mode, group, stride_sw = SW_ROW, 0, 0
    else:
        groups = sw.shape[1]
        if k % groups or sw.shape[0] != n:
            raise ValueError(f"group scales {tuple(sw.shape)} do not fit weight [{n}, {k}]")
        mode, group, stride_sw = SW_GROUP, k // groups, sw.stride(0)
        if sw.stride(1) != 1:
            sw = sw.contiguous()
            stride_sw = sw.stride(0)
        if group % 16:
            raise ValueError(f"group size {group} must be a multiple of 16")
    if sw.dtype != torch.float32 or sx.dtype != torch.float32:
        raise ValueError("scales must be float32")
    if k == 0:
        c.zero_()
        if bias is not None:
            c += bias.to(c.dtype)
        return c
    arch = _arch(a.device)
    if variant is None:
        variant = "ptr"
        if PERSISTENT_DEFAULT and arch == "hopper" and m > 1024 and tma_supported(a.device) is None \
                and _tma_operands_ok(a, b, c):
            variant = "tma"
    has_bias = bias is not None
    args = (a, b, c, sx, sw, bias if has_bias else sx, m, n, k, m_bucket(m),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), stride_sw)
    if variant in ("tma", "persistent"):
        use_tma = variant == "tma"
        if use_tma:
            why = tma_supported(a.device)
            if why is not None or not _tma_operands_ok(a, b, c):
                raise ValueError(f"TMA GEMM cannot run here: {why or 'operands not contiguous/16-byte aligned'}")
            _ensure_allocator()
        nsm = _num_sms(a.device)

        def pgrid(meta):
            return (max(1, min(nsm, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]))),)
        if config is not None:
            c_ = dict(config)
            warps, stages = c_.pop("num_warps"), c_.pop("num_stages")
            c_.setdefault("FLATTEN", False)
            c_.setdefault("WARP_SPEC", False)
            _int8_gemm_persistent_kernel[pgrid(c_)](*args, SW_MODE=mode, GROUP_K=group, HAS_BIAS=has_bias,
                                                    NUM_SMS=nsm, USE_TMA=use_tma, num_warps=warps,
                                                    num_stages=stages, **c_)
        else:
            fn = _kernel(arch, False, group, False, True)
            fn[pgrid](*args, SW_MODE=mode, GROUP_K=group, HAS_BIAS=has_bias, NUM_SMS=nsm, USE_TMA=use_tma)
        return c

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if config is not None:
        c_ = dict(config)
        warps, stages = c_.pop("num_warps"), c_.pop("num_stages")
        _int8_gemm_kernel[grid(c_)](*args, SW_MODE=mode, GROUP_K=group, HAS_BIAS=has_bias,
                                    EVEN_K=k % c_["BLOCK_K"] == 0, num_warps=warps, num_stages=stages, **c_)
        return c
    fn = _kernel(arch, m <= SMALL_M, group, SMALL_M < m <= 1024)
    fn[grid](*args, SW_MODE=mode, GROUP_K=group, HAS_BIAS=has_bias)
    return c


def best_configs() -> Dict[str, str]:
    """The configuration each autotuned wrapper picked, per key (for logs and the benchmark)."""
    out = {}
    for key, fn in _KERNELS.items():
        for tkey, cfg in getattr(fn, "cache", {}).items():
            out[f"{key} {tkey}"] = str(cfg)
    return out
