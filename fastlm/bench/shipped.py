"""Every Triton launch configuration fastlm ships, per op family, for the static report (fastlm/bench/static.py):
the kernels and their config rules are read from ``fastlm.kernels``; nothing there knows about this module.

Each entry is a ``Shipped`` tuple, one shape for every family. Configurations are compiled with the heaviest flag set
a launcher can pick for them (residual + weight + bias for the norms, an additive mask + causal for the softmax, a
mask + dropout for the "lean" attention tables), bf16 data unless said, and the row widths and strides a typical call
has (a multiple of 16, which Triton specialises on at launch; a unit column stride, specialised as the constant 1).
"""

from typing import NamedTuple

import triton


class Shipped(NamedTuple):
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr", a tensordesc)
    constexprs: dict
    num_warps: int
    num_stages: int
    name: str  # the kernel's name in the report
    label: str  # the configuration, readable
    archs: tuple | None = None  # the only archs it is compiled for (TMA configs: sm_90); None: every arch asked


def signature(fn, consts: dict, pointers: dict, floats=(), int64=()) -> dict:
    """A compile signature from the kernel's argument names: pointers by name (e.g. ``{"X": "*bf16"}``), then
    fp32 / i64 scalars by name, constexprs, and i32 for every other argument."""
    names = fn.arg_names if hasattr(fn, "arg_names") else fn.fn.__code__.co_varnames[: fn.fn.__code__.co_argcount]
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in pointers:
            sig[n] = pointers[n]
        elif n in floats:
            sig[n] = "fp32"
        elif n in int64:
            sig[n] = "i64"
        else:
            sig[n] = "i32"
    return sig


def shipped_configs():
    """Every shipped configuration of every family."""
    yield from norm_configs()
    yield from softmax_configs()
    yield from cross_entropy_configs()
    yield from kl_div_configs()
    yield from distillation_configs()
    yield from logprob_entropy_configs()
    yield from attention_configs()
    yield from decode_configs()
    yield from gated_mlp_configs()
    yield from rope_configs()


def norm_configs():
    """Every block-size class the norm launchers can pick (``kernels/norms.fwd_config`` / ``bwd_config``) with the
    heaviest flags (LayerNorm, residual, weight, bias; bf16 data, fp32 weights)."""
    from fastlm.kernels import norms

    fwd_sig = {k: "*bf16" for k in ("X", "R", "Y", "H")}
    fwd_sig.update({k: "*fp32" for k in ("W", "B", "Mean", "Rstd")})
    fwd_sig.update({"stride_x": "i32", "stride_r": "i32", "M": "i32", "N": "i32", "eps": "fp32"})
    bwd_sig = {k: "*bf16" for k in ("DY", "X", "DH", "DX")}
    bwd_sig.update({k: "*fp32" for k in ("W", "Mean", "Rstd", "DW", "DB")})
    bwd_sig.update({"stride_dy": "i32", "stride_x": "i32", "stride_dh": "i32", "M": "i32", "N": "i32"})
    bwd_sig["rows_per_program"] = "i32"
    widths = [2**i for i in range(15)] + [norms.MAX_N]  # one N per block-size class, and the chunked path
    seen = set()
    for kernel, name, sig, config, flags in (
        (
            norms.norm_fwd_kernel,
            "norm_fwd_kernel",
            fwd_sig,
            norms.fwd_config,
            dict(RMS=False, HAS_RES=True, HAS_W=True, HAS_B=True),
        ),
        (
            norms.norm_bwd_kernel,
            "norm_bwd_kernel",
            bwd_sig,
            norms.bwd_config,
            dict(RMS=False, HAS_W=True, HAS_DB=True, HAS_DH=True),
        ),
    ):
        for n in widths:
            cfg = config(n)
            key = (name, tuple(sorted(cfg.items())))
            if key in seen:
                continue
            seen.add(key)
            consts = {**flags, **{k: v for k, v in cfg.items() if k != "num_warps"}}
            full_sig = {**sig, **{k: "constexpr" for k in consts}}
            label = (
                f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} single={cfg['SINGLE_PASS']} w={cfg['num_warps']}"
            )
            yield Shipped(kernel, full_sig, consts, cfg["num_warps"], 3, name, label)


# Softmax rows are addressed through (stride_outer, stride_inner, stride_col); a last-dim softmax has inner == 1 and
# a unit column stride, which Triton specialises at launch as the constant 1: compiled so here.
_SOFTMAX_UNIT = dict(inner=1, stride_col=1, y_stride_col=1, dy_stride_col=1)


def softmax_configs():
    """The softmax family's block-size classes (``kernels/softmax.config``) for a last-dim row: widths from 64 to
    MAX_FUSED in one pass, and the split path (statistics kernels + pass); the forward with its heaviest flags
    (additive mask, causal), both softmax and log-softmax in the backward; bf16 data."""
    from fastlm.kernels import MASK_ADD
    from fastlm.kernels import softmax as sm

    ptrs = {"X": "*bf16", "Mask": "*bf16", "Y": "*bf16", "DY": "*bf16", "DX": "*bf16", "WS": "*fp32"}
    seen = set()
    for R in (64, 512, 4096, sm.MAX_FUSED, 4 * sm.MAX_FUSED):
        cfg = sm.config(R)
        warps = cfg["num_warps"]
        tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        label = f"R={R} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} split={cfg['SPLIT']} w={warps}"
        kernels = [
            (sm.softmax_fwd_kernel, "softmax_fwd", dict(LOG=False, MASK_KIND=MASK_ADD, CAUSAL=True, ZERO_EMPTY=True)),
            (sm.softmax_bwd_kernel, "softmax_bwd", dict(LOG=False)),
            (sm.softmax_bwd_kernel, "log_softmax_bwd", dict(LOG=True)),
        ]
        consts = dict(SPLIT=cfg["SPLIT"], CHUNKS=max(2, triton.next_power_of_2(cfg["n_chunks"])), **tiles)
        if cfg["SPLIT"]:
            kernels += [
                (sm.softmax_stats_kernel, "softmax_stats", dict(MASK_KIND=MASK_ADD, CAUSAL=True)),
                (sm.softmax_bwd_stats_kernel, "softmax_bwd_stats", dict(LOG=False)),
            ]
        for kernel, name, flags in kernels:
            names = set(kernel.arg_names)
            c = {k: v for k, v in {**consts, **flags, **_SOFTMAX_UNIT}.items() if k in names}
            key = (name, tuple(sorted(c.items())))
            if key not in seen:
                seen.add(key)
                yield Shipped(kernel, signature(kernel, c, ptrs, ("scale",)), c, warps, 3, name, label)


def cross_entropy_configs():
    """The cross-entropy kernel's block-size classes (``kernels/cross_entropy.block_n``) at a GPT-2 sized and a
    Llama-3 sized vocabulary (one chunk, many chunks), with every flag on (weights, mean, gradient, smoothing)."""
    from fastlm.kernels import cross_entropy as ce

    ptrs = {"X": "*bf16", "T": "*i64", "W": "*fp32", "Loss": "*fp32", "G": "*bf16", "Denom": "*fp32", "WSum": "*fp32"}
    ptrs |= {"TGrad": "*bf16", "RowStats": "*fp32"}
    for C in (1024, 50304, 128256):  # widths a multiple of 16, as padded vocabularies are
        for soft in (False, True):  # class indices; class probabilities with both gradients (T: bf16)
            consts = dict(HAS_W=True, MEAN=True, WRITE_GRAD=True, SMOOTH=True, BLOCK_N=ce.block_n(C))
            consts |= dict(SOFT=soft, WRITE_TGRAD=soft, STATS=False, EXT_GRAD=False, ROW_SCALE=False)
            consts |= dict(inner=1, stride_col=1, g_stride_col=1)
            label = f"C={C} BLOCK_N={consts['BLOCK_N']} w={ce.warps(C)}" + (" soft" if soft else "")
            sig = signature(ce.cross_entropy_kernel, consts, ptrs | ({"T": "*bf16"} if soft else {}), ("smoothing",))
            name = "cross_entropy_soft" if soft else "cross_entropy"
            yield Shipped(ce.cross_entropy_kernel, sig, consts, ce.warps(C), 3, name, label)
    # the vocab-parallel passes (fastlm/ops/vocab_parallel.py) at a shard of Llama-3's vocabulary over 8 ranks
    C = 128256 // 8
    for mode in ("STATS", "EXT_GRAD"):
        consts = dict(HAS_W=True, MEAN=False, WRITE_GRAD=mode == "EXT_GRAD", SMOOTH=True, BLOCK_N=ce.block_n(C))
        consts |= dict(SOFT=False, WRITE_TGRAD=False, STATS=mode == "STATS", EXT_GRAD=mode == "EXT_GRAD")
        consts |= dict(ROW_SCALE=False)
        consts |= dict(inner=1, stride_col=1, g_stride_col=1)
        label = f"C={C} BLOCK_N={consts['BLOCK_N']} w={ce.warps(C)} {mode}"
        sig = signature(ce.cross_entropy_kernel, consts, ptrs, ("smoothing",))
        yield Shipped(ce.cross_entropy_kernel, sig, consts, ce.warps(C), 3, "cross_entropy_vocab_parallel", label)
    # the linear losses' chunk kernel with per-token incoming gradients (linear_logprobs, reduction "none")
    C = 128256
    consts = dict(HAS_W=False, MEAN=False, WRITE_GRAD=True, SMOOTH=False, BLOCK_N=ce.block_n(C), SOFT=False)
    consts |= dict(WRITE_TGRAD=False, STATS=False, EXT_GRAD=False, ROW_SCALE=True)
    consts |= dict(inner=1, stride_col=1, g_stride_col=1)
    sig = signature(ce.cross_entropy_kernel, consts, ptrs, ("smoothing",))
    label = f"C={C} BLOCK_N={consts['BLOCK_N']} w={ce.warps(C)} ROW_SCALE"
    yield Shipped(ce.cross_entropy_kernel, sig, consts, ce.warps(C), 3, "cross_entropy_row_scale", label)


def logprob_entropy_configs():
    """linear_logprobs(return_entropy=True)'s row kernel (kernels/linear_logprobs.py) at a small and at Llama-3's
    vocabulary, forward and gradient."""
    from fastlm.kernels import linear_logprobs as lk

    ptrs = {"X": "*bf16", "T": "*i64", "LP": "*fp32", "ENT": "*fp32", "GA": "*fp32", "GC": "*fp32"}
    for V in (1024, 128256):
        block = min(lk.MAX_BLOCK, 1 << (V - 1).bit_length())
        w = max(1, min(16, block // 256))
        for grad in (False, True):
            consts = dict(WRITE_GRAD=grad, BLOCK_N=block)
            sig = signature(lk.logprob_entropy_kernel, consts, ptrs)
            label = f"V={V} BLOCK_N={block} w={w}" + (" grad" if grad else "")
            yield Shipped(lk.logprob_entropy_kernel, sig, consts, w, 3, "logprob_entropy", label)


def kl_div_configs():
    """The kl_div kernel's one block size, with the reduced loss and both gradients, for each form of the target."""
    from fastlm.kernels import kl_div as kl

    ptrs = {"X": "*bf16", "T": "*bf16", "Loss": "*bf16", "Partials": "*fp32", "GX": "*bf16", "GT": "*bf16"}
    for log_target in (False, True):
        consts = dict(LOG_TARGET=log_target, REDUCE=True, WRITE_GX=True, WRITE_GT=True, BLOCK=kl.BLOCK)
        label = f"BLOCK={kl.BLOCK} w={kl.WARPS} log_target={log_target}"
        sig = signature(kl.kl_div_kernel, consts, ptrs, ("scale",))
        yield Shipped(kl.kl_div_kernel, sig, consts, kl.WARPS, 3, "kl_div", label)


def gated_mlp_configs():
    """The gated-MLP kernels' block-size classes (``kernels/gated_mlp.config``: one per BLOCK_N class), forward and
    backward, with the heaviest activation (exact GELU: libdevice's erf); bf16 data."""
    from fastlm.kernels import gated_mlp as gm

    ptrs = {name: "*bf16" for name in ("G", "U", "Y", "DY", "DG", "DU")}
    for block_n in gm.BLOCK_N_CLASSES:
        cfg = gm.config(block_n)
        consts = dict(ACT=gm.ACT_GELU_ERF, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        label = f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} act=gelu_erf w={cfg['num_warps']}"
        for kernel, name in ((gm.gated_mlp_fwd_kernel, "gated_mlp_fwd"), (gm.gated_mlp_bwd_kernel, "gated_mlp_bwd")):
            yield Shipped(kernel, signature(kernel, consts, ptrs), consts, cfg["num_warps"], 3, name, label)


def distillation_configs():
    """The distillation kernel's block-size classes (``kernels/distillation.block_n``) at a small and at Llama-3's
    vocabulary, for the lightest (forward KL: two passes) and the heaviest kind (JSD: three passes, a log per
    logit), every flag on (target, gradient scale, gradient)."""
    from fastlm.kernels import distillation as d

    ptrs = {"S": "*bf16", "Tch": "*bf16", "Tgt": "*i64", "Loss": "*fp32", "G": "*bf16", "Scale": "*fp32"}
    for C, kind in ((1024, d.JSD), (128256, d.KL), (128256, d.JSD)):
        consts = dict(KIND=kind, HAS_TARGET=True, HAS_SCALE=True, WRITE_GRAD=True, BLOCK_N=d.block_n(C))
        label = f"C={C} {['kl', 'reverse_kl', 'jsd'][kind]} BLOCK_N={consts['BLOCK_N']} w={d.warps(C)}"
        sig = signature(d.distillation_kernel, consts, ptrs, ("beta", "inv_temp", "temp"))
        yield Shipped(d.distillation_kernel, sig, consts, d.warps(C), 3, "distillation", label)


def attention_configs():
    """Every shipped launch configuration of the attention forward and the two backward kernels at head dims 64 /
    128 / 256: bf16 (the defaults causal and not, the autotune alternatives non-causal, the lean configs with an
    additive mask and dropout; TMA and warp-specialised ones too, sm_90 only) and float32 (its own tables, pointer
    loads, plain and lean)."""
    from fastlm.kernels import MASK_ADD, MASK_NONE
    from fastlm.kernels.attention import backward, configs, forward

    floats = ("qk_scale", "sm_scale", "dropout_p", "softcap")
    kernels = (
        (
            "attn_fwd",
            forward.attn_fwd_kernel,
            lambda D, t, lean, f: configs.fwd_configs(D, t, configs.WS_TRITON, False, lean, f),
            configs.FWD_BOXES,
        ),
        (
            "attn_bwd_dkdv",
            backward.attn_bwd_dkdv_kernel,
            lambda D, t, lean, f: (
                configs.bwd_dkdv_configs(D, t, False, lean, f) if configs.dkdv_tma(D, True, lean) or not t else []
            ),
            backward.DKDV_BOXES,
        ),
        (
            "attn_bwd_dq",
            backward.attn_bwd_dq_kernel,
            lambda D, t, lean, f: configs.bwd_dq_configs(D, t, False, lean, f),
            backward.DQ_BOXES,
        ),
    )
    cases = [("bf16", tma, lean) for tma in (False, True) for lean in (False, True)]
    cases += [("fp32", False, lean) for lean in (False, True)]  # fp32 never takes TMA (use_tma: fp16/bf16)
    for D in (64, 128, 256):
        BD = configs.block_d(D)
        for name, kernel, table, boxes in kernels:
            for dt, tma, lean in cases:
                ptrs = {n: f"*{dt}" for n in ("Q", "K", "V", "Mask", "O", "DO", "DK", "DV", "DQ")}
                ptrs |= {"Lse": "*fp32", "Delta": "*fp32", "CuQ": "*i32", "CuK": "*i32", "Seed": "*i64"}
                ptrs |= {"Sinks": "*fp32", "Alibi": "*fp32", "DMask": "*fp32"}
                for i, config in enumerate(table(D, tma, lean, dt == "fp32")):
                    for causal in (False, True) if i == 0 else (False,):
                        cfg = dict(config)
                        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                        # lean configs: compiled with the heaviest case, an additive mask and dropout
                        consts = dict(MASK_KIND=MASK_ADD if lean else MASK_NONE, CAUSAL=causal, DROPOUT=lean)
                        consts |= dict(VARLEN=False, BLOCK_D=BD, PREC="ieee" if dt == "fp32" else "tf32")
                        consts |= dict(TMA=tma, **cfg)
                        # the variants' flags (window, soft cap, sinks, ALiBi, mask gradient) off
                        feats = dict(SOFTCAP=False, SINKS=False, ALIBI=False, WINDOW=False, MASK_GRAD=0)
                        consts |= {f: x for f, x in feats.items() if f in kernel.arg_names}
                        descs = {n: (f"tensordesc<{dt}[1,1,{cfg[b]},{BD}]>" if tma else f"*{dt}") for n, b in boxes}
                        sig = signature(kernel, consts, ptrs | descs, floats, ("rng_offset",))
                        label = f"D={D} causal={causal} M={cfg['BLOCK_M']} N={cfg['BLOCK_N']} w={warps} s={stages}"
                        label += (
                            (" fp32" if dt == "fp32" else "")
                            + (" tma" if tma else "")
                            + (" ws" if cfg.get("WS") else "")
                            + (" mask+dropout" if lean else "")
                        )
                        label += " default" if i == 0 else ""
                        yield Shipped(kernel, sig, consts, warps, stages, name, label, (90,) if tma else None)


def decode_configs():
    """The split-KV decode kernel's configs (``kernels/attention/decode.decode_config``) at head dims 64 / 128 / 256
    for one query of a 4-head group (16 packed rows) and 16 queries of an 8-head group (128 rows: the largest tile),
    bf16 and float32: the dense entry with every flag on (additive mask, causal, window, soft cap, ALiBi), and paged
    keys with per-batch lengths (attention_with_kvcache) without and with the modifiers; and the combine kernel at
    the most splits (128) with sinks."""
    import torch

    from fastlm.kernels import MASK_ADD, MASK_NONE
    from fastlm.kernels.attention import configs, decode

    for D in (64, 128, 256):
        BD = configs.block_d(D)
        for dt, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            for rows in (4, 128):
                cfg = dict(decode.decode_config(rows, D, tdt))
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                # the dense entry with every flag, and attention_with_kvcache's paged keys without a mask (another
                # code shape: it spilled where the masked one did not), plain and with every modifier
                for kind, flags in (
                    ("dense all flags", dict(MASK_KIND=MASK_ADD, CAUSAL=True, WINDOW=True, SOFTCAP=True, ALIBI=True)),
                    ("paged", dict(MASK_KIND=MASK_NONE, CAUSAL=False, WINDOW=False, SOFTCAP=False, ALIBI=False)),
                    ("paged modifiers", dict(MASK_KIND=MASK_NONE, CAUSAL=False, WINDOW=True, SOFTCAP=True, ALIBI=True)),
                ):
                    paged = kind.startswith("paged")
                    consts = dict(flags, SEQLENS=paged, PAGED=paged, EVEN_D=D == BD, BLOCK_D=BD, **cfg)
                    consts["PREC"] = "ieee" if dt == "fp32" else "tf32"
                    ptrs = {n: f"*{dt}" for n in ("Q", "K", "V", "Mask")}
                    ptrs |= {"Seqlens": "*i32", "BlockTable": "*i32", "Alibi": "*fp32"}
                    ptrs |= {"OPart": "*fp32", "LPart": "*fp32"}
                    sig = signature(decode.decode_split_kernel, consts, ptrs, ("scale", "softcap"))
                    label = f"D={D} rows={rows} M={cfg['BLOCK_M']} N={cfg['BLOCK_N']} w={warps} s={stages} {kind}"
                    label += " fp32" if dt == "fp32" else ""
                    yield Shipped(decode.decode_split_kernel, sig, consts, warps, stages, "attn_decode_split", label)
        consts = dict(SINKS=True, BLOCK_S=decode.MAX_SPLITS, SPLIT_TILE=16, BLOCK_D=BD, EVEN_D=D == BD)
        ptrs = {"OPart": "*fp32", "LPart": "*fp32", "Sinks": "*fp32", "O": "*bf16", "Lse": "*fp32"}
        sig = signature(decode.decode_combine_kernel, consts, ptrs)
        yield Shipped(decode.decode_combine_kernel, sig, consts, 4, 1, "attn_decode_combine", f"D={D} sinks")


def rope_configs():
    """The rotary kernel's tile classes (``kernels/rope.config``) at Llama-3-8B's heads (32 / 8, D = 128; forward,
    backward, interleaved), a partial rotary out of place (rot 64 of D 128: the pass-through copy) and D = 256 (16 / 16
    heads: tiles capped at TILE elements, a loop over heads); bf16."""
    from fastlm.kernels import rope

    ptrs = {n: "*bf16" for n in ("Q", "K", "QO", "KO", "Cos", "Sin")}
    for Hq, Hk, rot, D, copy_pass, interleaved, backward in (
        (32, 8, 128, 128, False, False, False),
        (32, 8, 128, 128, False, False, True),
        (32, 8, 128, 128, False, True, False),
        (32, 8, 64, 128, True, False, False),
        (16, 16, 256, 256, False, False, True),
    ):
        cfg = rope.config(Hq, Hk, rot, D, copy_pass)
        warps = cfg.pop("num_warps")
        consts = dict(INTERLEAVED=interleaved, BACKWARD=backward, COPY_PASS=copy_pass, **cfg)
        label = f"H={Hq}/{Hk} D={D} rot={rot} {'bwd' if backward else 'fwd'}" + (" interleaved" if interleaved else "")
        label += f" BLOCK_H={cfg['BLOCK_HQ']}/{cfg['BLOCK_HK']} w={warps}"
        yield Shipped(rope.rope_kernel, signature(rope.rope_kernel, consts, ptrs), consts, warps, 3, "rope", label)
