"""``fastlm bench``: run the benchmark cases of the chosen op families, measure the ceilings in the same run, and
write a JSON and a Markdown report.

On a machine without a GPU it says so, times what is meaningful there (fastlm's CPU kernels, the ``cpu`` backend,
against torch eager and torch.compile at CPU sizes, with the speed-ups and issue 8's targets), prints the static
sm_90 kernel report, and shows the latest committed GPU results from ``benchmarks/results/``, marked as such.
"""

import gc
import glob
import importlib.util
import os
import subprocess
import sys

import torch

from fastlm.bench import attention as attention_cases
from fastlm.bench import core
from fastlm.bench import cross_entropy as ce_cases
from fastlm.bench import decode as decode_cases
from fastlm.bench import distillation as distill_cases
from fastlm.bench import gated_mlp as gated_mlp_cases
from fastlm.bench import kl_div as kl_div_cases
from fastlm.bench import model as model_cases
from fastlm.bench import norms as norm_cases
from fastlm.bench import overhead as overhead_cases
from fastlm.bench import post_training as post_cases
from fastlm.bench import rope as rope_cases
from fastlm.bench import softmax as softmax_cases
from fastlm.dispatch import UnsupportedCaseError

FAMILIES = {
    "model": model_cases,
    "overhead": overhead_cases,
    "norms": norm_cases,
    "softmax": softmax_cases,
    "ce": ce_cases,
    "kl_div": kl_div_cases,
    "distill": distill_cases,
    "post": post_cases,
    "attention": attention_cases,
    "decode": decode_cases,
    "gated_mlp": gated_mlp_cases,
    "rope": rope_cases,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _progress(i: int, n: int, label: str) -> None:
    """A progress bar on a terminal; in a log, one line per tenth of the work."""
    if not sys.stderr.isatty():
        if i == n or i % max(1, n // 10) == 0:
            print(f"[{i}/{n}] {label}", file=sys.stderr, flush=True)
        return
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
        print("No GPU visible: this run times fastlm's CPU kernels (the cpu backend) against torch eager and")
        print("torch.compile at CPU sizes, prints the static sm_90 kernel report, and shows the latest committed GPU")
        print("results (the Triton and CUDA kernels need a GPU to be timed).\n")
    env = core.environment(device)
    ceilings = {"copy_GB/s": core.copy_bandwidth_gbs(device)}
    ceilings["matmul_TFLOP/s"] = core.matmul_tflops(device)
    print(f"device: {env['device']}; ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))

    groups = [(FAMILIES[op], case) for op in ops for case in FAMILIES[op].cases(device, dt, quick)]
    results, errors, skipped = [], [], []
    for pkg, name in (("liger_kernel", "Liger-Kernel"), ("flash_attn", "flash-attn")):
        if importlib.util.find_spec(pkg) is None:
            skipped.append(f"{name} is not installed: its baselines are not measured")
    interrupted = False
    try:  # an interrupt (gpu_check.sh's time limit sends SIGINT) keeps what was measured
        for i, (family, case) in enumerate(groups):
            if i and groups[i - 1][0] is not family:  # a family is done: write what we have (a time-out keeps it)
                core.write_reports(results, env, ceilings, out_dir)
            _progress(i, len(groups), f"{case.kernel} {case.shape} {case.mode}")
            fns = {}
            for provider in family.providers(device):
                label = f"{case.kernel} {case.shape} {case.mode} {provider}"
                try:
                    fns[provider] = family.runner(case, provider, device)()
                    if on_gpu:  # one provider at a time (CUDA events, L2 flushed), peak memory per provider
                        torch.cuda.reset_peak_memory_stats()
                        fns[provider] = (core.quantiles_ms(fns[provider], device), torch.cuda.max_memory_allocated())
                except Exception as exc:
                    # A baseline that cannot run a case, or a fastlm backend that does not implement it, is noted; a
                    # fastlm backend failing otherwise (missing on a GPU machine, crashing) is an error (exit code 1).
                    fns.pop(provider, None)
                    note = f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if isinstance(exc, (core.SkipCase, UnsupportedCaseError)) or not provider.startswith("fastlm-"):
                        skipped.append(note)
                    else:
                        errors.append(note)
                if on_gpu:  # a whole model's parameters and optimizer state must go before the next provider's
                    gc.collect()
                    torch.cuda.empty_cache()
            if on_gpu:
                timings = {p: (q, mem / 2**20) for p, (q, mem) in fns.items()}
            else:  # the providers' calls interleaved, so that the machine's drift hits them alike
                timings = {
                    p: (q, core.cpu_peak_mb(family, case, p))
                    for p, q in core.interleaved_quantiles_ms(fns, **getattr(family, "TIMING", {})).items()
                }
            ceiling = {"GB/s": ceilings["copy_GB/s"], "TFLOP/s": ceilings["matmul_TFLOP/s"]}.get(case.unit)
            for provider, ((p50, p20, p80), peak) in timings.items():
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
                        fraction_of_ceiling=case.throughput(p50) / ceiling if ceiling else None,
                        peak_mem_mb=peak,
                    )
                )
    except KeyboardInterrupt:
        interrupted = True
        errors.append(f"interrupted after {len(results)} results: the reports hold what was measured until then")
    _progress(len(groups), len(groups), "done")
    paths = core.write_reports(results, env, ceilings, out_dir)
    print(core.markdown(results, env, ceilings))
    if interrupted:
        for e in errors:
            print(f"ERROR {e}", file=sys.stderr)
        return 130
    paths.extend(plots(results, ceilings, out_dir))
    if static:
        try:
            static_report(out_dir)
        except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"static report failed: {type(exc).__name__}: {exc}")
    if not on_gpu:
        _committed_gpu_results()
    for note in skipped:
        print(f"skipped {note}")
    print("wrote " + ", ".join(paths))
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


def static_report(out_dir: str, archs=(80, 90)) -> int:
    """``fastlm bench --static``: compile every shipped Triton config for sm_80 / sm_90 without a GPU, read the
    CUDA kernels in fastlm._C, print both tables and write static.md / static.json. Returns 1 if any spills."""
    import dataclasses
    import json

    from fastlm.bench import static

    stats = static.report(archs)
    cuda_rows = [r for a in archs for r in static.cuda_extension_report(a)]
    table = static.format_table(stats)
    ctable = static.format_cuda_table(cuda_rows) if cuda_rows else "(fastlm._C has no CUDA kernels in this build)"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "static.md"), "w") as f:
        f.write(f"# Static report (sm_{', sm_'.join(map(str, archs))}; no GPU needed)\n\n{table}\n\n{ctable}\n")
    with open(os.path.join(out_dir, "static.json"), "w") as f:
        json.dump({"triton": [dataclasses.asdict(s) for s in stats], "cuda": cuda_rows}, f, indent=1)
    spills = [s for s in stats if s.spills]
    cuda_spills = [r for r in cuda_rows if r.get("stack", 0) or r.get("local", 0)]
    print("Static report of the shipped Triton configs (compiled here, no GPU):\n" + table + "\n")
    print("CUDA kernels in fastlm._C:\n" + ctable + "\n")
    print(
        f"{len(stats)} Triton configs: {len(spills)} with register spills "
        f"({', '.join(f'{s.kernel} {s.config} sm_{s.arch}' for s in spills) or 'none'}); "
        f"{len(cuda_rows)} CUDA kernel entries: {len(cuda_spills)} with spills"
    )
    return 0


def plots(results: list, ceilings: dict, out_dir: str) -> list[str]:
    """One PNG per (kernel, mode): throughput against size, a line per provider, the ceiling drawn in."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install fastlm[plot])")
        return []
    paths = []
    groups: dict = {}
    for r in results:
        groups.setdefault((r.kernel, r.mode, r.unit), []).append(r)
    for (kernel, mode, unit), rs in groups.items():
        shapes = list(dict.fromkeys(r.shape for r in rs))
        fig, ax = plt.subplots(figsize=(7, 4))
        for provider in dict.fromkeys(r.provider for r in rs):
            pts = [(shapes.index(r.shape), r.p50) for r in rs if r.provider == provider]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ceiling = {"GB/s": ceilings["copy_GB/s"], "TFLOP/s": ceilings["matmul_TFLOP/s"]}.get(unit)
        if ceiling:
            ax.axhline(ceiling, color="gray", linestyle="--", label=f"measured ceiling {ceiling:.0f} {unit}")
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(f"{kernel} {mode}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{kernel}_{mode.replace('+', '_')}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def compare(a_path: str, b_path: str) -> int:
    """Ratios B / A of the median throughput of the cases two JSON runs share."""
    import json

    def load(p):
        with open(p) as f:
            d = json.load(f)
        return d, {(r["kernel"], r["shape"], r["dtype"], r["mode"], r["provider"]): r for r in d["results"]}

    (da, a), (db, b) = load(a_path), load(b_path)
    print(f"A: {a_path} ({da['environment']['device']}, {da['environment'].get('git_commit')})")
    print(f"B: {b_path} ({db['environment']['device']}, {db['environment'].get('git_commit')})\n")
    print("| kernel | shape | dtype | mode | provider | A | B | B / A |\n|---|---|---|---|---|---|---|---|")
    for key in a.keys() & b.keys():
        ra, rb = a[key], b[key]
        print(f"| {' | '.join(key)} | {ra['p50']:.1f} {ra['unit']} | {rb['p50']:.1f} | {rb['p50'] / ra['p50']:.2f}x |")
    only = a.keys() ^ b.keys()
    if only:
        print(f"\n{len(only)} cases are in only one of the runs")
    return 0


def _is_cpu_report(path: str) -> bool:
    with open(path) as f:
        return f.readline().startswith("# fastlm benchmarks on CPU")


def _committed_gpu_results() -> None:
    # run from a checkout (make bench): its benchmarks/results; an editable install also finds them beside the package
    candidates = [
        os.path.join(os.getcwd(), "benchmarks"),
        os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"),
    ]
    root = next((c for c in candidates if os.path.isdir(os.path.join(c, "results"))), candidates[0])
    found = sorted(glob.glob(os.path.join(root, "results", "*", "bench.md")), key=os.path.getmtime)
    found = [p for p in found if not _is_cpu_report(p)]  # results/cpu-dev/ is the development machine's CPU run
    if not found:
        print("No committed GPU results under benchmarks/results/ yet.")
        return
    latest = found[-1]
    print(f"Latest committed GPU results (NOT measured on this machine): {os.path.relpath(latest, root)}\n")
    with open(latest) as f:
        print(f.read())
