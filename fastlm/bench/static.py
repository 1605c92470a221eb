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


def report(archs=(90,)) -> list[KernelStat]:
    """Compile and inspect every shipped config for each arch. Under TRITON_INTERPRET=1 the kernels are
    interpreter objects that cannot be compiled, so the report then runs in a subprocess without it."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _report_in_subprocess(archs)
    from fastlm.bench.shipped import shipped_configs

    stats = []
    for c in shipped_configs():
        for arch in archs:
            if c.archs is None or arch in c.archs:  # e.g. TMA configs: sm_90 only
                stats.append(
                    compile_stat(c.kernel, c.signature, c.constexprs, c.num_warps, arch, c.name, c.label, c.num_stages)
                )
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
    from fastlm import extension

    if extension.lib is None or not extension.lib.with_cuda:
        return []
    res = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", "-arch", f"sm_{arch}", extension.lib.__file__],
        capture_output=True,
        text=True,
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
