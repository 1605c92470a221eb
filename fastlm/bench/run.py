"""``fastlm bench``: run the benchmark cases of the chosen op families, measure the ceilings in the same run, and
write a JSON and a Markdown report.

On a machine without a GPU it says so, times what is meaningful there (the CPU paths: torch eager against
torch.compile; fastlm's CPU backend is torch's own ops until CPU kernels exist), prints the static sm_90 kernel
report, and shows the latest committed GPU results from ``benchmarks/results/``, marked as such.
"""

import glob
import os
import sys

import torch

from fastlm.bench import core
from fastlm.bench import cross_entropy as ce_cases
from fastlm.bench import norms as norm_cases
from fastlm.bench import softmax as softmax_cases

FAMILIES = {"norms": norm_cases, "softmax": softmax_cases, "ce": ce_cases}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _progress(i: int, n: int, label: str) -> None:
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:<60}")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run(ops: list[str], quick: bool, dtype: str | None, out_dir: str, static: bool = True) -> int:
    """Run the suite; returns a process exit code (non-zero when a fastlm backend is missing on a GPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dt = DTYPES[dtype or ("bf16" if on_gpu else "fp32")]
    if not on_gpu:
        print("No GPU visible: fastlm's fused kernels need one, so this run times the CPU paths (torch eager vs")
        print("torch.compile at CPU sizes; fastlm's CPU backend is torch's ops until CPU kernels land), prints the")
        print("static sm_90 kernel report, and shows the latest committed GPU results.\n")
    env = core.environment(device)
    ceilings = {"copy_GB/s": core.copy_bandwidth_gbs(device)}
    ceilings["matmul_TFLOP/s"] = core.matmul_tflops(device)
    print(f"device: {env['device']}; ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))

    work = []
    for op in ops:
        family = FAMILIES[op]
        for case in family.cases(device, dt, quick):
            for provider in family.providers(device):
                work.append((family, case, provider))
    results, errors = [], []
    for i, (family, case, provider) in enumerate(work):
        label = f"{case.kernel} {case.shape} {case.mode} {provider}"
        _progress(i, len(work), label)
        try:
            fn = family.runner(case, provider, device)()
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            p50, p20, p80 = core.quantiles_ms(fn, device)
            peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
        except Exception as exc:  # a missing fastlm backend on a GPU machine is an error, reported at the end
            errors.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        ceiling = ceilings["copy_GB/s"] if case.unit == "GB/s" else ceilings["matmul_TFLOP/s"]
        results.append(
            core.Result(
                kernel=case.kernel,
                provider=provider,
                mode=case.mode,
                shape=case.shape,
                dtype=str(case.dtype).replace("torch.", ""),
                metric="throughput",
                unit=case.unit,
                p50=case.throughput(p50),
                p20=case.throughput(p80),  # the 20th percentile of throughput is the 80th of time
                p80=case.throughput(p20),
                ms=p50,
                fraction_of_ceiling=case.throughput(p50) / ceiling,
                peak_mem_mb=peak,
            )
        )
    _progress(len(work), len(work), "done")
    paths = core.write_reports(results, env, ceilings, out_dir)
    print(core.markdown(results, env, ceilings))
    if static:
        _static(out_dir)
    if not on_gpu:
        _committed_gpu_results()
    print("wrote " + ", ".join(paths))
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


def _static(out_dir: str) -> None:
    from fastlm.bench import static

    try:
        stats = static.report((90,))
    except (ImportError, FileNotFoundError, RuntimeError) as exc:
        print(f"static report skipped: {exc}")
        return
    table = static.format_table(stats)
    with open(os.path.join(out_dir, "static.md"), "w") as f:
        f.write("# Static sm_90 report of the shipped Triton configs\n\n" + table + "\n")
    spills = [s for s in stats if s.spills]
    print("Static sm_90 report of the shipped Triton configs (no GPU needed):\n" + table)
    print(f"{len(stats)} configs, {len(spills)} with register spills\n")


def _committed_gpu_results() -> None:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
    found = sorted(glob.glob(os.path.join(root, "results", "*", "*.md")), key=os.path.getmtime)
    if not found:
        print("No committed GPU results under benchmarks/results/ yet.")
        return
    latest = found[-1]
    print(f"Latest committed GPU results (NOT measured on this machine): {os.path.relpath(latest, root)}\n")
    with open(latest) as f:
        print(f.read())
