"""Static kernel report: compile the shipped Triton kernel configurations for sm_90 (and sm_80) without a GPU and
read registers, spills and instruction counts with the cuobjdump that Triton ships.

Spills show as local memory (LOCAL / STACK in ``cuobjdump -res-usage``); 128-bit global accesses as
``LDG.E.128`` / ``STG.E.128`` in the SASS.
"""

import dataclasses
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@dataclasses.dataclass
class KernelStat:
    kernel: str
    config: str
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    ldg128: int
    stg128: int
    hmma: int  # HMMA: mma.sync tensor-core instructions (sm_80 style)
    hgmma: int  # HGMMA: sm_90 warpgroup MMA (wgmma)
    utmaldg: int = 0  # UTMALDG: TMA (tensor-descriptor) loads, sm_90
    setmaxreg: int = 0  # USETMAXREG: register reallocation between warp groups (warp specialisation)

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton package ({path})")
    return path


def compile_stat(
    fn, signature: dict, constexprs: dict, num_warps: int, arch: int, name: str, config: str, num_stages: int = 3
):
    """Compile one kernel configuration for ``arch`` and read its resource usage and SASS."""
    # As the launcher sees a typical call: 16-byte aligned pointers, and strides and row widths (N, R, C) multiples
    # of 16 (Triton specialises on that at run time, which is what enables 128-bit accesses).
    aligned = [
        i
        for i, name in enumerate(fn.arg_names)
        if signature.get(name, "").startswith("*") or "stride" in name or name in ("N", "R", "C")
    ]
    src = ASTSource(fn, signature, constexprs, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    k = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True)
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res.stdout))
    text = sass.stdout
    return KernelStat(
        kernel=name,
        config=config,
        arch=arch,
        registers=int(usage.get("REG", 0)),
        stack_bytes=int(usage.get("STACK", 0)),
        local_bytes=int(usage.get("LOCAL", 0)),
        shared_bytes=int(k.metadata.shared),  # dynamic shared memory (cuobjdump shows only the static part)
        ldg128=len(re.findall(r"LDG\.E\.128|LDG\.E\.[A-Z.]*128", text)),
        stg128=len(re.findall(r"STG\.E\.128|STG\.E\.[A-Z.]*128", text)),
        hmma=len(re.findall(r"\bHMMA\.", text)),
        hgmma=len(re.findall(r"\bHGMMA\.", text)),
        utmaldg=len(re.findall(r"\bUTMALDG\b", text)),
        setmaxreg=len(re.findall(r"\bUSETMAXREG\b", text)),
    )


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
    """Every (kernel, signature, constexprs, num_warps, label) the launchers can pick, per op family."""
    from fastlm.kernels import attention, norms

    yield from norms.static_configs()
    yield from softmax_configs()
    yield from cross_entropy_configs()
    yield from attention.static_configs()


# Softmax rows are addressed through (stride_outer, stride_inner, stride_col); a last-dim softmax has inner == 1 and
# a unit column stride, which Triton specialises at launch as the constant 1: compiled so here.
_SOFTMAX_UNIT = dict(inner=1, stride_col=1, y_stride_col=1, dy_stride_col=1)


def softmax_configs():
    """The softmax family's block-size classes (``kernels/softmax.config``) for a last-dim row: widths from 64 to
    MAX_FUSED in one pass, and the split path (statistics kernels + pass); the forward with its heaviest flags
    (additive mask, causal), both softmax and log-softmax in the backward; bf16 data."""
    from fastlm.kernels import softmax as sm

    ptrs = {"X": "*bf16", "Mask": "*bf16", "Y": "*bf16", "DY": "*bf16", "DX": "*bf16", "WS": "*fp32"}
    seen = set()
    for R in (64, 512, 4096, sm.MAX_FUSED, 4 * sm.MAX_FUSED):
        cfg = sm.config(R)
        launch = cfg["num_warps"]
        tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        label = f"R={R} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} split={cfg['SPLIT']} w={launch}"
        kernels = [
            (
                sm._softmax_fwd_kernel,
                "softmax_fwd",
                dict(LOG=False, MASK_KIND=sm.MASK_ADD, CAUSAL=True, ZERO_EMPTY=True),
            ),
            (sm._softmax_bwd_kernel, "softmax_bwd", dict(LOG=False)),
            (sm._softmax_bwd_kernel, "log_softmax_bwd", dict(LOG=True)),
        ]
        consts = dict(SPLIT=cfg["SPLIT"], CHUNKS=max(2, triton.next_power_of_2(cfg["n_chunks"])), **tiles)
        if cfg["SPLIT"]:
            kernels += [
                (sm._softmax_stats_kernel, "softmax_stats", dict(MASK_KIND=sm.MASK_ADD, CAUSAL=True)),
                (sm._softmax_bwd_stats_kernel, "softmax_bwd_stats", dict(LOG=False)),
            ]
        for kernel, name, flags in kernels:
            names = set(kernel.arg_names)
            c = {k: v for k, v in {**consts, **flags, **_SOFTMAX_UNIT}.items() if k in names}
            key = (name, tuple(sorted(c.items())))
            if key not in seen:
                seen.add(key)
                yield kernel, signature(kernel, c, ptrs, ("scale",)), c, launch, name, label


def cross_entropy_configs():
    """The cross-entropy kernel's block-size classes (``kernels/cross_entropy.block_n``) at a GPT-2 sized and a
    Llama-3 sized vocabulary (one chunk, many chunks), with every flag on (weights, mean, gradient, smoothing)."""
    from fastlm.kernels import cross_entropy as ce

    ptrs = {"X": "*bf16", "T": "*i64", "W": "*fp32", "Loss": "*fp32", "G": "*bf16", "Denom": "*fp32", "WSum": "*fp32"}
    for C in (1024, 50304, 128256):  # widths a multiple of 16, as padded vocabularies are
        consts = dict(HAS_W=True, MEAN=True, WRITE_GRAD=True, SMOOTH=True, BLOCK_N=ce.block_n(C))
        consts |= dict(inner=1, stride_col=1, g_stride_col=1)
        label = f"C={C} BLOCK_N={consts['BLOCK_N']} w={ce.warps(C)}"
        yield (
            ce._ce_kernel,
            signature(ce._ce_kernel, consts, ptrs, ("smoothing",)),
            consts,
            ce.warps(C),
            "cross_entropy",
            label,
        )


def report(archs=(90,)) -> list[KernelStat]:
    """Compile and inspect every shipped config for each arch. Under TRITON_INTERPRET=1 the kernels are
    interpreter objects that cannot be compiled, so the report then runs in a subprocess without it."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _report_in_subprocess(archs)
    stats = []
    for fn, sig, consts, launch, name, label, *only in shipped_configs():
        warps, stages = launch if isinstance(launch, tuple) else (launch, 3)
        for arch in archs:
            if only and arch not in only[0]:  # e.g. TMA configs: sm_90 only
                continue
            stats.append(compile_stat(fn, sig, consts, warps, arch, name, label, num_stages=stages))
    return stats


def _report_in_subprocess(archs) -> list[KernelStat]:
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import dataclasses, json, sys; from fastlm.bench import static; "
        f"print(json.dumps([dataclasses.asdict(s) for s in static.report({tuple(archs)!r})]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"static report subprocess failed:\n{out.stderr[-3000:]}")
    return [KernelStat(**d) for d in json.loads(out.stdout.strip().splitlines()[-1])]


def format_table(stats: list[KernelStat]) -> str:
    lines = [
        "| kernel | config | sm | regs | spill (stack/local B) | smem B | LDG.128 | STG.128 | HMMA | HGMMA | UTMALDG "
        "| USETMAXREG |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        lines.append(
            f"| {s.kernel} | {s.config} | {s.arch} | {s.registers} | {s.stack_bytes}/{s.local_bytes} | "
            f"{s.shared_bytes} | {s.ldg128} | {s.stg128} | {s.hmma} | {s.hgmma} | {s.utmaldg} | {s.setmaxreg} |"
        )
    return "\n".join(lines)


def cuda_extension_report(arch: int = 90) -> list[dict]:
    """Registers, spills and shared memory of the CUDA kernels compiled into fastlm._C for ``arch``."""
    from fastlm import _ext

    if _ext._C is None or not _ext._C.with_cuda:
        return []
    res = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", "-arch", f"sm_{arch}", _ext._C.__file__], capture_output=True, text=True
    )
    rows = []
    name = None
    for line in res.stdout.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line))
        if name and usage:
            rows.append({"kernel": name, "arch": arch, **{k.lower(): int(v) for k, v in usage.items()}})
            name = None
    return _demangle(rows)


def _demangle(rows: list[dict]) -> list[dict]:
    """Readable kernel names (``fastlm::norm_fwd_kernel<__nv_bfloat16, float>``) via c++filt when present."""
    import shutil

    if not rows or shutil.which("c++filt") is None:
        return rows
    out = subprocess.run(["c++filt"], input="\n".join(r["kernel"] for r in rows), capture_output=True, text=True)
    names = out.stdout.splitlines()
    for r, n in zip(rows, names, strict=False):
        n = n.replace("(anonymous namespace)::", "").removeprefix("void ")
        r["kernel"] = n.split("(")[0]  # drop the argument list
    return rows


def format_cuda_table(rows: list[dict]) -> str:
    lines = ["| CUDA kernel (fastlm._C) | sm | regs | spill (stack/local B) | static smem B |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| `{r['kernel'][:90]}` | {r['arch']} | {r.get('reg', 0)} | {r.get('stack', 0)}/"
            f"{r.get('local', 0)} | {r.get('shared', 0)} |"
        )
    return "\n".join(lines)
