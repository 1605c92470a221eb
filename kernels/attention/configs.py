"""Launch configurations of the Triton attention kernels (forward.py, backward.py beside this): the per-head-dim
config tables (the first entry of each is the default, the list is the FASTLM_AUTOTUNE=1 search space), the rules
that pick a table (TMA, warp specialisation, "lean" for a user mask or dropout, fp32), and the autotuner wrapper.
Per-architecture choices live here only. The static report (fastlm/bench/static.py) compiles every entry.
"""

import os

import torch
import triton
from fastlm.kernels import MASK_NONE

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SM90_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

try:  # host-side TMA descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

# Triton's Hopper warp specialisation (`tl.range(..., warp_specialize=True)`: a TMA producer warp group and two
# consumer warp groups with register reallocation) compiles this forward on Triton 3.6 (static sm_90 check: USETMAXREG,
# no spills); the 3.8 pass asserts on it (WSLowerToken), so warp-specialised configs exist only on 3.6.
WS_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)


def fwd_entry(m, n, warps, stages, ws=False):
    """A forward config: BLOCK_M queries per program, BLOCK_N keys per step, warps, stages, warp-specialised."""
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages, WS=ws)


# Forward configs per head-dim bucket; the first is the default, the list is what FASTLM_AUTOTUNE=1 searches. Every
# entry was compiled for sm_90 (bf16; Triton 3.6 and 3.8): every dot on wgmma, no spills, shared memory <= 227 KiB;
# TMA entries load Q, K and V with UTMALDG (tests/test_static.py keeps this true).
FWD_TMA = {
    64: [
        fwd_entry(128, 64, 8, 3),
        fwd_entry(128, 64, 4, 2, True),
        fwd_entry(128, 128, 4, 2, True),
        fwd_entry(128, 64, 4, 3, True),
        fwd_entry(64, 64, 4, 3),
        fwd_entry(128, 32, 8, 3),
        fwd_entry(64, 128, 8, 2),
    ],
    128: [
        fwd_entry(128, 64, 8, 2),
        fwd_entry(128, 64, 4, 2, True),
        fwd_entry(128, 128, 4, 2, True),
        fwd_entry(128, 64, 4, 3, True),
        fwd_entry(128, 64, 8, 3),
        fwd_entry(64, 64, 4, 3),
        fwd_entry(128, 32, 8, 3),
    ],
    256: [
        fwd_entry(64, 32, 8, 2),
        fwd_entry(128, 64, 4, 2, True),
        fwd_entry(128, 64, 8, 2),
        fwd_entry(64, 64, 8, 2),
        fwd_entry(128, 32, 8, 3),
    ],
}
# Pointer loads (sm_80, varlen, layouts TMA cannot describe).
FWD_PTR = {
    64: [fwd_entry(128, 64, 4, 3), fwd_entry(128, 64, 8, 3), fwd_entry(64, 32, 8, 2)],
    128: [fwd_entry(128, 64, 8, 3), fwd_entry(64, 32, 8, 2)],
    256: [fwd_entry(64, 32, 8, 2)],
}
# A user mask (its tiles, the skip test) and dropout (its Philox numbers) take registers: the "lean" configs stay
# spill-free with either or both, causal and not (every combination compiled for sm_90 with Triton 3.6 and 3.8; a few
# bytes of spill come and go between versions at larger tiles), and are the only ones used (and searched) in those
# cases. Keyed by TMA, then head-dim bucket.
FWD_LEAN = {
    False: {64: fwd_entry(64, 16, 8, 2), 128: fwd_entry(64, 16, 8, 2), 256: fwd_entry(32, 32, 8, 2)},
    True: {64: fwd_entry(64, 32, 8, 2), 128: fwd_entry(64, 16, 8, 2), 256: fwd_entry(32, 32, 8, 2)},
}
INTERPRET_CFG = fwd_entry(16, 16, 4, 1)

# float32 inputs: true fp32 dots (PREC "ieee", as torch's fp32 SDPA; no TF32), which Triton lowers to FMA on the CUDA
# cores, holding both operands of each dot in registers: the bf16 tiles spill kilobytes there (fwd D=128 128x64:
# ~11 KB of stack per thread, 19 s per compile). Small tiles of their own, one per head-dim bucket, keyed by lean
# (a user mask and/or dropout); each compiled for sm_90 spill-free on Triton 3.6 and 3.8, except D = 256 with a
# mask or dropout, where no FMA tiling is (~300 B; 16x16 is the least). fp32 attention is for checking and
# debugging: use fp16/bf16 (tensor cores) for speed.
FWD_FP32 = {
    False: {64: fwd_entry(32, 32, 16, 2), 128: fwd_entry(16, 16, 8, 1), 256: fwd_entry(32, 16, 16, 2)},
    True: {64: fwd_entry(32, 16, 8, 1), 128: fwd_entry(16, 16, 8, 1), 256: fwd_entry(16, 16, 8, 1)},
}


FEATURES = ("SOFTCAP", "SINKS", "ALIBI", "WINDOW")  # the kernels' feature flags (forward.feature_args)
# The features whose registers (the tanh and its derivative, the ALiBi distances) push default tiles into spills, so
# that the lean configs apply with them, as with a mask or dropout: always in dK/dV, and in the forward and dQ on the
# pointer path (no TMA: sm_80, varlen, fp32). Static sm_90 compile, Triton 3.8, 2026-11-29, soft cap + ALiBi + window
# (+ sinks): bf16 dK/dV's default TMA tile at D = 128 spills 16 B (soft cap alone: 253 registers); the pointer-load
# forward at D = 64 spills 104 B; fp32 dQ / dK/dV at D = 128 spill 8 / 32 B; every TMA forward and dQ config stays
# spill-free (up to 255 registers at D = 256), and so is every bf16 lean config with the features and a mask and
# dropout on top. float32 (FMA tiles at their limit) keeps 8-32 B of spill in a few lean tiles with soft cap / ALiBi
# (fwd D = 64, dQ D = 128, dK/dV D = 256): fp32 attention is for checking. A window costs only its edge tiles'
# masks, and sinks nothing in the loop (the online softmax starts from the sink): neither needs the lean configs,
# but for the pointer-load forward with a window (``is_lean``'s ``fwd``; the review's Triton 3.6 compile).
HEAVY_FEATURES = ("SOFTCAP", "ALIBI")


def ws_ok(tma: bool, mask_kind: int, dropout: bool, feats=None) -> bool:
    """Warp-specialised forward configs apply: TMA, no user mask (its tile skipping is a branch the pass cannot
    split), no dropout (the Philox numbers push those configs into spills), none of the features (``feats``: a
    dict holding the FEATURES flags; not compiled warp-specialised), Triton 3.6."""
    plain = not any((feats or {}).get(f) for f in FEATURES)
    return tma and WS_TRITON and mask_kind == MASK_NONE and not dropout and plain


def bucket(D: int) -> int:
    """The head-dim bucket of the config tables: 64, 128 or 256."""
    return 64 if D <= 64 else (128 if D <= 128 else 256)


def fwd_configs(
    D: int, tma: bool, ws: bool, interpret: bool = INTERPRET, lean: bool = False, fp32: bool = False
) -> list:
    """The forward's configs for head dim D: the default first. ws: warp-specialised entries allowed (`ws_ok`);
    lean: a user mask or dropout, whose one config is FWD_LEAN's; fp32: float32 inputs, FWD_FP32's one config.
    One config when interpreting."""
    if interpret:
        return [INTERPRET_CFG]
    if fp32:
        return [FWD_FP32[lean][bucket(D)]]
    if lean:
        return [FWD_LEAN[tma][bucket(D)]]
    return [c for c in (FWD_TMA if tma else FWD_PTR)[bucket(D)] if ws or not c["WS"]]


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 dots (as torch's fp32 SDPA), not TF32; fp16/bf16 dots ignore this
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def autotune_enabled(t: torch.Tensor) -> bool:
    """FASTLM_AUTOTUNE=1: search the config list once per (head dim, causal, mask kind, dropout, layout, dtype) and
    keep the fastest. Off by default (a first call then costs seconds of compiling, and the pick may differ between
    processes), under the interpreter and under torch.use_deterministic_algorithms."""
    return (
        not INTERPRET
        and t.is_cuda
        and os.environ.get("FASTLM_AUTOTUNE", "0") == "1"
        and not torch.are_deterministic_algorithms_enabled()
    )


def tma_strides(t: torch.Tensor):
    """Strides a TMA descriptor can take for the dense (B, H, S, D) tensor t, or None. Size-1 dims get the span of
    the dims inside them (their stride is never used)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16 or 0 in t.shape:
        return None
    strides = list(t.stride())
    align = 16 // t.element_size()
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            span = max(strides[j] * t.shape[j] for j in range(i + 1, t.dim()))
            strides[i] = -(-span // align) * align
    if any(st <= 0 or (st * t.element_size()) % 16 or st * t.element_size() >= 2**40 for st in strides[:-1]):
        return None
    return strides


def use_tma(*ts: torch.Tensor) -> bool:
    """Load through host TMA descriptors: fp16/bf16 on sm_90+ when every tensor's layout allows it (16-byte aligned
    base and strides). FASTLM_ATTENTION_TMA=0 turns it off; =1 uses it wherever the layout allows (also under the
    interpreter, which is how the CPU tests run this path)."""
    mode = os.environ.get("FASTLM_ATTENTION_TMA", "auto")
    if mode == "0" or TensorDescriptor is None:
        return False
    t = ts[0]
    if mode != "1" and not (
        t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(t.device)[0] >= 9
    ):
        return False
    return all(tma_strides(x) is not None for x in ts)


def descriptor(t: torch.Tensor, rows: int):
    """Host TMA descriptor of the dense (B, H, S, D) tensor t with [1, 1, rows, block_d(D)] boxes; the copy engine
    zero-fills the rows past S and the columns past D."""
    return TensorDescriptor(t, list(t.shape), tma_strides(t), [1, 1, rows, block_d(t.shape[-1])])


def set_boxes(nargs, pairs):
    """Autotune pre-hook body: each descriptor's box follows the config's block sizes."""
    if nargs.get("TMA"):
        bd = nargs["BLOCK_D"]
        for name, block in pairs:
            nargs[name].block_shape = [1, 1, nargs[block], bd]


FWD_BOXES = (("QDesc", "BLOCK_M"), ("KDesc", "BLOCK_N"), ("VDesc", "BLOCK_N"))  # descriptor argument -> its box rows


def autotuned(kernel, tables, pairs, prune, reset_to_zero=None):
    """``kernel`` under Triton's autotuner over every config of ``tables`` (deduplicated), pruned per call to the
    ones ``prune(kwargs)`` allows, each config's pre-hook re-boxing the TMA descriptors named in ``pairs``;
    ``reset_to_zero``: the arguments a kernel accumulates into (zeroed before each timed run and the final one)."""
    seen, configs = set(), []
    for table in tables:
        for cfgs in table.values():
            for c in cfgs:
                key = tuple(sorted(c.items()))
                if key not in seen:
                    seen.add(key)
                    kw = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
                    configs.append(
                        triton.Config(
                            kw,
                            num_warps=c["num_warps"],
                            num_stages=c["num_stages"],
                            pre_hook=lambda n: set_boxes(n, pairs),
                        )
                    )

    def early_prune(configs, nargs, **kw):
        allowed = prune(kw)
        return [c for c in configs if {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} in allowed]

    keys = ["BLOCK_D", "CAUSAL", "MASK_KIND", "DROPOUT", "VARLEN", "TMA", "PREC", *FEATURES, "MASK_GRAD"]
    keys = [k for k in keys if k in kernel.arg_names]  # newer Tritons refuse a key that is not an argument
    prune_by = {"early_config_prune": early_prune}
    return triton.autotune(configs, key=keys, prune_configs_by=prune_by, reset_to_zero=reset_to_zero)(kernel)


# ---------------------------------------------------------------------------------------------------------------
# Backward launch configurations: the first entry per head-dim bucket is the default, the list is the autotune space
# (FASTLM_AUTOTUNE=1). Checked by the static sm_90 compile (tests/test_static.py): no spills, shared memory <= 227 KiB,
# wgmma (HGMMA) up to D = 128. At D = 256 no wgmma tiling of dK/dV is spill-free (two [BLOCK_N, 256] fp32
# accumulators), so it uses mma.sync tiles; dQ at D = 256 gets wgmma with TMA only (pointer loads spill there).


def bwd_entry(m, n, warps, stages):
    """A backward config (dK/dV: BLOCK_N keys per program, BLOCK_M queries per step; dQ: the other way round)."""
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


# dK/dV: BLOCK_N keys per program, BLOCK_M queries per step
DKDV_PTR = {
    64: [bwd_entry(64, 64, 8, 2), bwd_entry(32, 64, 4, 2)],
    128: [bwd_entry(128, 64, 8, 2), bwd_entry(64, 64, 8, 2)],
    256: [bwd_entry(32, 64, 8, 1)],
}
# no D = 256 entry: every TMA tiling of dK/dV spills there (160+ bytes), so that case keeps pointer loads
DKDV_TMA = {
    64: [bwd_entry(64, 64, 8, 2), bwd_entry(64, 64, 4, 3)],
    128: [bwd_entry(128, 64, 8, 2), bwd_entry(64, 64, 8, 2)],
}
# dQ: BLOCK_M queries per program, BLOCK_N keys per step
DQ_PTR = {
    64: [bwd_entry(64, 64, 8, 2), bwd_entry(128, 64, 8, 2), bwd_entry(64, 32, 4, 2)],
    128: [bwd_entry(64, 64, 8, 2), bwd_entry(128, 64, 8, 2), bwd_entry(64, 32, 4, 2)],
    256: [bwd_entry(32, 64, 8, 1)],
}
DQ_TMA = {
    64: [bwd_entry(64, 64, 8, 2), bwd_entry(128, 64, 8, 2), bwd_entry(64, 64, 4, 3), bwd_entry(128, 128, 8, 2)],
    128: [bwd_entry(64, 64, 8, 2), bwd_entry(128, 64, 8, 2), bwd_entry(64, 64, 4, 3), bwd_entry(128, 32, 8, 3)],
    256: [
        bwd_entry(64, 32, 8, 2),
        bwd_entry(64, 64, 8, 2),
        bwd_entry(32, 64, 8, 1),
    ],  # TMA frees the registers wgmma needs here
}


# A user mask or dropout (see FWD_LEAN): the spill-free "lean" configs, the only ones used (and searched) then;
# dK/dV then loads with pointers (its TMA tilings spill with dropout). D = 128 takes 32x32: 32x64 spilled 8 B on
# Triton 3.6 once the 1-D grid and the device-side seed came in (2026-11-29).
DKDV_LEAN = {64: bwd_entry(32, 64, 8, 2), 128: bwd_entry(32, 32, 8, 2), 256: bwd_entry(16, 32, 8, 1)}
DQ_LEAN = {
    False: {64: bwd_entry(64, 64, 8, 2), 128: bwd_entry(64, 16, 8, 2), 256: bwd_entry(32, 64, 8, 1)},
    True: {64: bwd_entry(64, 32, 8, 2), 128: bwd_entry(64, 16, 8, 2), 256: bwd_entry(32, 64, 8, 1)},
}
# float32 inputs (see FWD_FP32), keyed by lean then head-dim bucket; dQ at D = 256 with a mask or dropout spills
# (~280 B), as the forward does.
DKDV_FP32 = {
    False: {64: bwd_entry(16, 16, 4, 1), 128: bwd_entry(16, 16, 8, 1), 256: bwd_entry(16, 16, 8, 1)},
    True: {64: bwd_entry(32, 16, 8, 1), 128: bwd_entry(32, 16, 8, 1), 256: bwd_entry(32, 16, 8, 1)},
}
DQ_FP32 = {
    False: {64: bwd_entry(32, 32, 16, 2), 128: bwd_entry(32, 32, 16, 2), 256: bwd_entry(32, 32, 16, 2)},
    True: {64: bwd_entry(32, 16, 8, 1), 128: bwd_entry(16, 16, 8, 1), 256: bwd_entry(16, 16, 8, 1)},
}


def dkdv_tma(D: int, tma: bool, lean: bool) -> bool:
    """dK/dV takes the TMA path: TMA layouts, D <= 128 (see DKDV_TMA), neither mask nor dropout."""
    return tma and not lean and bucket(D) in DKDV_TMA


def bwd_dkdv_configs(D: int, tma: bool, interpret: bool = INTERPRET, lean: bool = False, fp32: bool = False) -> list:
    """dK/dV configs (the default first); tma: the TMA table (no D = 256 entry, see DKDV_TMA); lean (a mask or
    dropout): its one config (pointer loads); fp32: float32 inputs, DKDV_FP32's one config."""
    if interpret:
        return [bwd_entry(16, 16, 4, 1)]
    if fp32:
        return [DKDV_FP32[lean][bucket(D)]]
    if lean:
        return [DKDV_LEAN[bucket(D)]]
    return (DKDV_TMA if tma else DKDV_PTR)[bucket(D)]


def bwd_dq_configs(D: int, tma: bool, interpret: bool = INTERPRET, lean: bool = False, fp32: bool = False) -> list:
    if interpret:
        return [bwd_entry(16, 16, 4, 1)]
    if fp32:
        return [DQ_FP32[lean][bucket(D)]]
    if lean:
        return [DQ_LEAN[tma][bucket(D)]]
    return (DQ_TMA if tma else DQ_PTR)[bucket(D)]


def is_lean(
    mask_kind: int, dropout: bool, feats=None, tma: bool = False, dkdv: bool = False, fwd: bool = False
) -> bool:
    """The lean tables apply (the one statement of that rule): a user mask, dropout, or a HEAVY_FEATURES flag set in
    ``feats`` (a dict of the FEATURES flags) for dK/dV (``dkdv``) or a kernel without TMA loads (``tma``); and a
    window in the forward (``fwd``) without TMA loads (its three inlined tile loops: the D = 64 default tile, at 251
    registers without features, spills 16-24 B with a window, Triton 3.6 and 3.8)."""
    feats = feats or {}
    heavy = (dkdv or not tma) and any(feats.get(f) for f in HEAVY_FEATURES)
    heavy = heavy or (fwd and not tma and bool(feats.get("WINDOW")))
    return mask_kind != MASK_NONE or bool(dropout) or heavy


def lean_case(kw, dkdv: bool = False, fwd: bool = False) -> bool:
    """``is_lean`` of a launch's constexpr kwargs (the autotuner's prune)."""
    return is_lean(kw["MASK_KIND"], kw["DROPOUT"], kw, kw["TMA"], dkdv, fwd)


def fp32_case(kw) -> bool:
    """float32 inputs (true fp32 dots): the FP32 tables apply."""
    return kw["PREC"] == "ieee"


def describe() -> str:
    """How the attention kernels launch on this machine (``fastlm info``): TMA, warp specialisation, autotuning,
    and the knobs that change them."""
    mode = os.environ.get("FASTLM_ATTENTION_TMA", "auto")
    if mode == "0" or TensorDescriptor is None:
        tma = "off" + (" (FASTLM_ATTENTION_TMA=0)" if mode == "0" else " (Triton without tensor descriptors)")
    elif mode == "1":
        tma = "on wherever the layout allows (FASTLM_ATTENTION_TMA=1)"
    elif torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 9:
        tma = "on for fp16/bf16 with 16-byte aligned layouts"
    else:
        tma = "off (needs an sm_90+ GPU)"
    ws = "available (Triton 3.6)" if WS_TRITON else "off (compile on Triton 3.6 only)"
    tune = "on" if os.environ.get("FASTLM_AUTOTUNE", "0") == "1" else "off (FASTLM_AUTOTUNE=1 turns it on)"
    return f"TMA {tma}; warp-specialised configs {ws}; autotuning {tune}"
