"""Benchmark machinery shared by ``fastlm bench`` and ``pytest benchmarks/``: timing, ceilings, the result schema.

Timing on GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between repetitions, median / p20 / p80), with
the inputs rotated over several copies so that the repetitions do not hit L2. On CPU: wall clock over repeated calls
(median / p20 / p80). Every result is reported as GB/s or TFLOP/s and as a fraction of the ceiling measured in the
same run.
"""

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

import fastlm
from fastlm import extension

# The real model configurations the benchmark shapes come from (one table for every family).
MODELS = {
    "gpt2": dict(hidden=768, heads=12, kv_heads=12, head_dim=64, vocab=50257),
    "bert-base": dict(hidden=768, heads=12, kv_heads=12, head_dim=64, vocab=30522),
    "llama3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, vocab=128256),
    "llama3-70b": dict(hidden=8192, heads=64, kv_heads=8, head_dim=128, vocab=128256),
}


# Performance targets of the issues as speed-ups (baseline time / fastlm time), per (device type, kernel, mode) and
# baseline provider; every report lists the measured ratio beside its target. CPU: issue 8, on the 2-core
# development machine.
TARGETS = {
    ("cpu", "add_layer_norm", "fwd"): {"torch-eager": 1.3, "torch-compile": 1.0},
    ("cpu", "add_rms_norm", "fwd"): {"torch-eager": 1.3, "torch-compile": 1.0},
    ("cpu", "scaled_masked_softmax", "fwd"): {"torch-eager": 1.3, "torch-compile": 1.0},
    ("cpu", "cross_entropy", "fwd+bwd"): {"torch-eager": 1.3, "torch-compile": 1.0},
    ("cpu", "distillation_loss", "fwd+bwd"): {"torch-eager": 1.3},
    ("cpu", "cross_entropy_soft", "fwd+bwd"): {"torch-eager": 1.3},
    ("cpu", "kl_div", "fwd+bwd"): {"torch-eager": 1.3},
    ("cpu", "rope", "fwd+bwd"): {"torch-eager": 1.3},
    ("cpu", "swiglu", "fwd+bwd"): {"torch-eager": 1.3},
    ("cpu", "geglu", "fwd+bwd"): {"torch-eager": 1.3},
    ("cuda", "linear_distillation_loss", "fwd+bwd"): {"torch-eager": 1.0},  # and peak memory <= 1/4 (MEMORY_TARGETS)
    # issue 25: the chunked LM-head losses at least as fast as the unfused eager path, at a fraction of its memory
    ("cpu", "linear_cross_entropy", "fwd+bwd"): {"torch-eager": 1.0},
    ("cpu", "linear_distillation_loss", "fwd+bwd"): {"torch-eager": 1.0},
    ("cpu", "layer_norm", "fwd"): {"torch-eager": 1.0},
    ("cpu", "softmax", "fwd"): {"torch-eager": 1.0},
    ("cpu", "sdpa", "fwd"): {"torch-sdpa": 1.0},
    ("cpu", "sdpa", "fwd+bwd"): {"torch-sdpa": 1.2},  # issue 25: the fused backward
    ("cpu", "decode", "fwd"): {"torch-sdpa": 1.5},  # issue 18: Sq = 1 at Sk 4096
    ("cpu", "linear_rows", "fwd"): {"torch-eager": 1.0},  # issue 25: decode's linear layers (linear_rows.MAX_ROWS)
    # issue 18 on the H200: every variant >= 1.1x the best torch baseline that can run it (FlexAttention for the
    # modifiers); decode at >= 70% of the copy bandwidth is read from the report's fraction of the ceiling
    ("cuda", "sdpa_mod", "fwd"): {"flex-attention": 1.1},
    ("cuda", "sdpa_mod", "fwd+bwd"): {"flex-attention": 1.1},
    ("cuda", "decode", "fwd"): {"flex-attention": 1.1, "torch-sdpa-flash": 1.1},
    # issue 25, the model level (the headline): a patched model against the one it replaces, on the 2-core CPU and
    # on an H100/H200 (Llama-3-8B's layer shape)
    ("cpu", "llama_train_step", "fwd+bwd"): {"torch-eager": 1.15, "torch-compile": 1.0},
    ("cpu", "llama_decode", "fwd"): {"torch-eager": 1.2},
    ("cpu", "bert-base_infer", "fwd"): {"torch-eager": 1.15},
    ("cpu", "gpt-tiny_train_step", "fwd+bwd"): {"torch-eager": 1.0},
    ("cuda", "llama_train_step", "fwd+bwd"): {"torch-eager": 1.2, "liger": 1.0},
}
# issue 25: host overhead per call at tiny shapes (fastlm/bench/overhead.py), fwd <= 3x torch's own op and fwd+bwd
# <= 1.5x, i.e. speed-ups of at least 1/3 and 2/3, on every device
for _device in ("cpu", "cuda"):
    for _kernel in ("layer_norm", "rms_norm", "softmax", "log_softmax", "cross_entropy", "sdpa", "rope", "swiglu"):
        TARGETS[(_device, f"call_{_kernel}", "fwd")] = {"torch-eager": 1 / 3}
        TARGETS[(_device, f"call_{_kernel}", "fwd+bwd")] = {"torch-eager": 1 / 1.5}


# Peak-memory targets (issue 17): fastlm's peak / the baseline's peak at most this, for the memory-saving losses.
MEMORY_TARGETS = {(device, "linear_distillation_loss", "fwd+bwd"): {"torch-eager": 0.25} for device in ("cpu", "cuda")}
MEMORY_TARGETS[("cpu", "llama_train_step", "fwd+bwd")] = {"torch-eager": 0.75}  # issue 25
MEMORY_TARGETS[("cuda", "llama_train_step", "fwd+bwd")] = {"torch-eager": 0.5}
MEMORY_TARGETS[("cpu", "linear_cross_entropy", "fwd+bwd")] = {"torch-eager": 0.5}  # issue 25
# issue 27: the post-training losses (DPO with a reference, ORPO, KTO, GRPO) against TRL's unfused computation and
# Liger-Kernel's chunked losses: CPU fp32 time <= 1.0x both, peak <= 0.25x TRL's; GPU bf16 time <= 0.9x Liger's,
# peak <= Liger's
for _loss in ("dpo", "orpo", "kto", "grpo"):
    TARGETS[("cpu", f"linear_{_loss}_loss", "fwd+bwd")] = {"torch-eager": 1.0, "liger": 1.0}
    TARGETS[("cuda", f"linear_{_loss}_loss", "fwd+bwd")] = {"liger": 1 / 0.9}
    MEMORY_TARGETS[("cpu", f"linear_{_loss}_loss", "fwd+bwd")] = {"torch-eager": 0.25}
    MEMORY_TARGETS[("cuda", f"linear_{_loss}_loss", "fwd+bwd")] = {"liger": 1.0}


class SkipCase(Exception):
    """A baseline cannot run this case (e.g. an SDPA backend that refuses a mask): noted, not an error."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: ``work`` is the bytes (unit GB/s) or FLOPs (unit TFLOP/s) one call must move or do."""

    kernel: str
    shape: str  # e.g. "8192x4096"
    dtype: torch.dtype
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    work: float
    unit: str = "GB/s"
    params: tuple = ()  # family-specific sizes, e.g. (rows, hidden)

    def throughput(self, ms: float) -> float:
        scale = {"GB/s": 1e6, "TFLOP/s": 1e9, "tok/s": 1e-3, "call/s": 1e-3}[self.unit]
        return self.work / (ms * scale)


def fastlm_providers(device: torch.device, backends=("triton", "cuda")) -> dict[str, str | None]:
    """Provider name -> fastlm backend (None for the torch baselines). On a GPU the given fused backends; on CPU the
    cpu backend (csrc/cpu/) when fastlm._C is loaded (the Triton interpreter is a test tool, not a timing)."""
    names = {"torch-eager": None, "torch-compile": None}
    if device.type == "cuda":
        names = {**{f"fastlm-{b}": b for b in backends}, **names}
    elif extension.lib is not None:
        names = {"fastlm-cpu": "cpu", **names}
    return names


def kernel_providers(device: torch.device) -> dict[str, str | None]:
    """The providers of the norms, softmax and cross-entropy families: fastlm's backends, torch eager and
    torch.compile, and the peer libraries that can run here (fastlm/bench/peers.py)."""
    from fastlm.bench.peers import liger_providers

    return fastlm_providers(device) | liger_providers(device)


def provider_fn(kernel: str, provider: str, backend: str | None, ours: Callable, ref: Callable) -> Callable:
    """What ``provider`` times for ``kernel``: fastlm's function ``ours`` under ``backend``, torch's ``ref`` (eager,
    or under torch.compile), or a peer library's counterpart."""
    from fastlm.bench.peers import LIGER, liger_fn

    if provider == LIGER:
        return liger_fn(kernel)
    fn = ref if backend is None else with_backend(ours, backend)
    return compiled(fn) if provider == "torch-compile" else fn


def compiled(fn: Callable) -> Callable:
    """torch.compile for a baseline that is timed over a grid of shapes and replays its backward."""
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False  # the bwd timing replays one graph's backward (retain_graph=True)
    # One compiled function serves every shape of the grid: raise dynamo's recompile limit so that no case
    # silently falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(fn, fullgraph=True)


def timed_call(fn: Callable, args: list, mode: str, grad_inputs: list | None = None) -> Callable[[], object]:
    """The callable timed for ``mode``: the forward, the backward of one kept graph, or both."""
    if mode == "fwd":
        return lambda: fn(*args)
    leaves = (
        grad_inputs if grad_inputs is not None else [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    )
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    # A scalar output is a loss: its backward starts from 1, as loss.backward() does (a kernel may rely on that, e.g.
    # the cross-entropy that skips scaling its saved gradient by 1); anything else gets a random incoming gradient.
    grads = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    def step():
        o = fn(*args)
        return torch.autograd.grad(o if isinstance(o, tuple) else (o,), leaves, grads)

    return step


def with_backend(fn: Callable, backend: str | None) -> Callable:
    if backend is None:
        return fn

    def call(*args, **kwargs):
        with fastlm.backend(backend):
            return fn(*args, **kwargs)

    return call


@dataclasses.dataclass
class Result:
    """One measured case (the result schema: one JSON object per case)."""

    kernel: str  # e.g. "layer_norm"
    provider: str  # e.g. "fastlm-triton", "torch-eager", "torch-compile"
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    shape: str  # e.g. "8192x4096"
    dtype: str
    metric: str  # "throughput"
    unit: str  # "GB/s" or "TFLOP/s"
    p50: float
    p20: float
    p80: float
    ms: float  # median time
    fraction_of_ceiling: float | None = None
    peak_mem_mb: float | None = None
    note: str = ""


def quantiles_ms(fn: Callable[[], object], device: torch.device, rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) of one call's time in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    fn()  # warm-up (and first-call compilation)
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(times, n=10) if len(times) >= 10 else [min(times)] * 2 + [max(times)] * 7
    return statistics.median(times), q[1], q[7]


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def interleaved_quantiles_ms(
    fns: dict[str, Callable[[], object]], rep_ms: int = 400, min_rounds: int = 15, warmup: int = 2, clock: str = "wall"
) -> dict[str, tuple]:
    """CPU timing of several providers of one case: (median, p20, p80) ms per provider, from calls interleaved
    round by round (the order rotating each round), so that the machine's drift (other processes, frequency, the
    allocator returning pages to the OS) hits every provider alike and the ratios stay meaningful. ``warmup`` calls
    each first, then at least ``min_rounds`` rounds, then until ``rep_ms`` per provider has passed or 300 rounds (a
    family whose calls take seconds, the whole models, sets fewer: its ``TIMING``). ``clock`` "thread" times the
    calling thread's CPU time instead of the wall clock (single-threaded host work that other processes must not
    inflate: the host-overhead family)."""
    now = CLOCKS[clock]
    names = list(fns)
    for name in names:  # warm-up (and first-call compilation)
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    spent = 0.0
    rounds = 0
    while rounds < min_rounds or (spent < rep_ms * len(names) and rounds < 300):
        order = names[rounds % len(names) :] + names[: rounds % len(names)] if names else []
        for name in order:
            t0 = now()
            fns[name]()
            dt = (now() - t0) * 1000
            times[name].append(dt)
            spent += dt
        rounds += 1
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else ts * 9
        out[name] = (statistics.median(ts), q[1], q[7])
    return out


# The child of subprocess_peak_rss_mb: builds the case's fwd+bwd step, runs it once (warm-up; torch.compile compiles
# here), then resets the peak RSS (/proc/self/clear_refs "5") and reports how far one more step raises it above the
# resident size before it (imports, inputs and compiled code excluded; the step's outputs, e.g. gradients, included).
_PEAK_CHILD = """
import gc, importlib, json, sys
import torch
from fastlm.bench.core import Case
a = json.loads(sys.argv[1])
c = a["case"]
case = Case(**{**c, "dtype": getattr(torch, c["dtype"].removeprefix("torch.")), "params": tuple(c["params"])})
step = importlib.import_module(a["module"]).runner(case, a["provider"], torch.device("cpu"))()
step()
gc.collect()
def kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
rss = kb("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
step()
print(json.dumps({"peak_mb": (kb("VmHWM:") - rss) / 1024}))
"""


def subprocess_peak_rss_mb(module: str, case: Case, provider: str, timeout_s: float = 900) -> float:
    """CPU peak memory of one fwd+bwd call of ``provider`` on ``case`` (family module ``module``, e.g.
    ``"fastlm.bench.distillation"``), in MiB: measured in a fresh child process (the same Python, importing fastlm
    from this installation) as the rise of its peak resident size (VmHWM, Linux) over its resident size just before
    the call, after one warm-up call. glibc's malloc is told to serve every block above 64 KiB by mmap
    (MALLOC_MMAP_THRESHOLD_, which also stops its adaptive threshold), so the warm-up's freed buffers go back to the
    OS instead of being reused unseen by the measured call."""
    # The child imports fastlm as this process did (the installed package, or PYTHONPATH, which it inherits). Never
    # put a source checkout's root on its path: its top-level kernels/ would shadow the Hugging Face "kernels"
    # package that transformers probes for.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    payload = {"module": module, "provider": provider, "case": dataclasses.asdict(case)}
    payload["case"]["dtype"] = str(case.dtype)
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, json.dumps(payload)],
        env=env,
        cwd=tempfile.gettempdir(),  # `python -c` puts its cwd first on sys.path: not the source tree (make bench)
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory child for {case.kernel} {provider} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def cpu_peak_mb(family, case: Case, provider: str) -> float | None:
    """The CPU peak memory of ``provider`` on ``case`` (subprocess_peak_rss_mb) for the kernels a family lists in
    ``MEMORY_KERNELS`` (where memory is the headline, e.g. the chunked LM-head losses); None for the others."""
    if case.kernel not in getattr(family, "MEMORY_KERNELS", ()):
        return None
    try:
        return subprocess_peak_rss_mb(family.__name__, case, provider)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:  # reported, and the column stays empty
        print(f"peak memory of {case.kernel} {case.shape} {provider} not measured: {exc}", file=sys.stderr)
        return None


def rotating(make: Callable[[], tuple], nbytes: int, device: torch.device, l2_bytes: int = 64 << 20):
    """Enough copies of the inputs from ``make()`` that cycling through them exceeds the L2 cache (GPU only);
    returns a function giving the next copy on each call."""
    copies = 1 if device.type != "cuda" else max(1, min(8, (2 * l2_bytes) // max(nbytes, 1) + 1))
    pool = [make() for _ in range(copies)]
    state = {"i": 0}

    def next_inputs():
        state["i"] = (state["i"] + 1) % len(pool)
        return pool[state["i"]]

    return next_inputs


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), the memory-bound ceiling."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = quantiles_ms(lambda: dst.copy_(src), device)
    return 2 * n / ms / 1e6


def matmul_tflops(device: torch.device) -> float:
    """bf16 matmul throughput on GPU (fp32 on CPU), the compute-bound ceiling."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _, _ = quantiles_ms(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9


def environment(device: torch.device) -> dict:
    """Device, driver, versions, commit and time stamp recorded with every run."""
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({_cpu_name()})",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "fastlm": fastlm.__version__,
        "python": platform.python_version(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["driver"] = _nvidia_smi("driver_version")
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    """The CPU model (/proc/cpuinfo on Linux), its core count and torch's thread count."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name or 'unknown'}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError):
        return None


def write_reports(results: list[Result], env: dict, ceilings: dict, out_dir: str, stem: str = "bench") -> list[str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    payload = {"environment": env, "ceilings": ceilings, "results": [dataclasses.asdict(r) for r in results]}
    jpath = os.path.join(out_dir, f"{stem}.json")
    with open(jpath, "w") as f:
        json.dump(payload, f, indent=1)
    mpath = os.path.join(out_dir, f"{stem}.md")
    with open(mpath, "w") as f:
        f.write(markdown(results, env, ceilings))
    return [jpath, mpath]


def ratios(results: list[Result], device_type: str) -> list[dict]:
    """Speed-up of each fastlm provider over each baseline measured on the same case (baseline ms / fastlm ms),
    with the target from ``TARGETS`` where there is one."""
    by_case: dict = {}
    for r in results:
        by_case.setdefault((r.kernel, r.shape, r.dtype, r.mode), {})[r.provider] = r
    rows = []
    for (kernel, shape, dtype, mode), provs in by_case.items():
        targets = TARGETS.get((device_type, kernel, mode), {})
        memory_targets = MEMORY_TARGETS.get((device_type, kernel, mode), {})
        for fp, fr in provs.items():
            if not fp.startswith("fastlm-"):
                continue
            for bp, br in provs.items():
                if bp.startswith("fastlm-"):
                    continue
                ratio = br.ms / fr.ms
                target = targets.get(bp)
                memory = fr.peak_mem_mb / br.peak_mem_mb if fr.peak_mem_mb and br.peak_mem_mb else None
                memory_target = memory_targets.get(bp)
                met = None if target is None else ratio >= target
                if memory_target is not None and memory is not None:
                    met = (met is not False) and memory <= memory_target
                rows.append(
                    dict(
                        kernel=kernel,
                        shape=shape,
                        dtype=dtype,
                        mode=mode,
                        fastlm=fp,
                        baseline=bp,
                        ratio=ratio,
                        target=target,
                        memory=memory,
                        memory_target=memory_target,
                        met=met,
                    )
                )
    return rows


def markdown(results: list[Result], env: dict, ceilings: dict) -> str:
    lines = [
        f"# fastlm benchmarks on {env['device']}",
        "",
        f"torch {env['torch']}, triton {env.get('triton')}, fastlm {env['fastlm']} ({env.get('git_commit')}), "
        f"{env['timestamp']}",
        "",
        "Ceilings measured in this run: "
        + ", ".join(f"{k} = {v:.1f}" for k, v in ceilings.items() if isinstance(v, (int, float))),
        "",
        "peak MB: on a GPU torch.cuda.max_memory_allocated over the timing (inputs included); on the CPU, where a "
        "family asks for it, the resident memory one fwd+bwd adds in a fresh process (inputs excluded).",
        "",
        "| kernel | shape | dtype | mode | provider | median ms | throughput | of ceiling | peak MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        frac = f"{100 * r.fraction_of_ceiling:.0f}%" if r.fraction_of_ceiling is not None else ""
        peak = f"{r.peak_mem_mb:.0f}" if r.peak_mem_mb is not None else ""
        lines.append(
            f"| {r.kernel} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {r.ms:.4f} | "
            f"{r.p50:.1f} {r.unit} | {frac} | {peak} | {r.note} |"
        )
    device_type = "cpu" if env["device"].startswith("CPU") else "cuda"
    rows = ratios(results, device_type)
    if rows:
        lines += [
            "",
            "Speed-ups (baseline time / fastlm time, same run); targets from the issues where they set one:",
            "",
            "| kernel | shape | dtype | mode | fastlm | vs baseline | speed-up | target | peak memory | target | |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in rows:
            target = f">= {x['target']:.2f}x" if x["target"] is not None else ""
            memory = f"{x['memory']:.2f}x" if x["memory"] is not None else ""
            memory_target = f"<= {x['memory_target']:.2f}x" if x["memory_target"] is not None else ""
            verdict = "" if x["met"] is None else ("met" if x["met"] else "**MISSED**")
            lines.append(
                f"| {x['kernel']} | {x['shape']} | {x['dtype']} | {x['mode']} | {x['fastlm']} | {x['baseline']} | "
                f"{x['ratio']:.2f}x | {target} | {memory} | {memory_target} | {verdict} |"
            )
    return "\n".join(lines) + "\n"
