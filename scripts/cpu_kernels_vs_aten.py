"""Kernel-level timing of the fastlm CPU norm / softmax / cross-entropy / decode-linear ops against torch's own CPU
kernels (linear_rows: against aten::linear, MKL's sgemm).

Calls the registered ops directly (``torch.ops.fastlm.*_cpu`` vs ``torch.ops.aten.*``) on the same inputs, below the
autograd dispatch key (``torch._C._AutoDispatchBelowADInplaceOrView``: the Python autograd kernel that
``register_autograd`` puts on fastlm's forward ops costs ~5 us a call, and is not the kernel's): no fastlm dispatch,
validation or autograd layer, so the ratio is kernel (plus one dispatcher call) against kernel.
Interleaved call by call (fastlm, aten, fastlm, ...; up to --reps calls each); the table gives the median per-call
time and its 10th percentile (on a shared, loaded machine the low percentile is the steadier number: contention only
adds time, and with 2 threads a call that waits for a descheduled worker takes a scheduler quantum, 4-16 ms), and the
ratios aten / fastlm of both (> 1: fastlm faster).

    PYTHONPATH=. python scripts/cpu_kernels_vs_aten.py [--threads 2] [--reps 400] [--only layer_norm,softmax]
"""

import argparse
import os
import statistics
import time
from functools import partial

import torch

import fastlm  # noqa: F401  (loads fastlm._C: the torch.ops.fastlm.* ops)

A, FL = torch.ops.aten, torch.ops.fastlm
# (rows, width): the benchmark shapes (4 MB of fp32 / bf16 input, fastlm/bench/*.py) and small row counts.
NORM_SHAPES = {torch.float32: [(1365, 768), (256, 4096)], torch.bfloat16: [(2730, 768), (512, 4096)]}
SOFTMAX_SHAPES = {torch.float32: [(4096, 256), (256, 4096)], torch.bfloat16: [(8192, 256), (512, 4096)]}
SMALL = [(8, 768), (64, 4096), (8, 256)]
CE_SHAPES = {torch.float32: [(1024, 1024), (32, 32768)], torch.bfloat16: [(2048, 1024), (64, 32768)]}


def _key(dt):
    """The shape table of dt's element size (float16 takes bfloat16's shapes)."""
    return torch.float32 if dt == torch.float32 else torch.bfloat16


def norm_cases(dt):
    for M, N in NORM_SHAPES[_key(dt)] + SMALL[:2]:
        x, dy = torch.randn(M, N, dtype=dt), torch.randn(M, N, dtype=dt)
        w, b = torch.randn(N, dtype=dt), torch.randn(N, dtype=dt)
        _, mu, rs = A.native_layer_norm(x, [N], w, b, 1e-5)
        _, _, fmu, frs = FL.norm_fwd_cpu(x, None, w, b, 1e-5, False)
        s = f"{M}x{N}"
        yield (
            "layer_norm",
            s,
            "fwd",
            partial(FL.norm_fwd_cpu, x, None, w, b, 1e-5, False),
            partial(A.native_layer_norm, x, [N], w, b, 1e-5),
        )
        yield (
            "layer_norm",
            s,
            "bwd",
            partial(FL.norm_bwd_cpu, dy, x, w, fmu, frs, None, False, True),
            partial(A.native_layer_norm_backward, dy, x, [N], mu, rs, w, b, [True, True, True]),
        )
        yield (
            "rms_norm",
            s,
            "fwd",
            partial(FL.norm_fwd_cpu, x, None, w, None, 1e-5, True),
            partial(A.rms_norm, x, [N], w, 1e-5),
        )


def softmax_cases(dt):
    for R, N in SOFTMAX_SHAPES[_key(dt)] + SMALL[1:]:
        x, dy = torch.randn(R, N, dtype=dt), torch.randn(R, N, dtype=dt)
        s = f"{R}x{N}"
        for log, name in ((False, "softmax"), (True, "log_softmax")):
            fwd = A._log_softmax if log else A._softmax
            bwd = A._log_softmax_backward_data if log else A._softmax_backward_data
            y = fwd(x, -1, False)
            yield name, s, "fwd", partial(FL.softmax_fwd_cpu, x, -1, log), partial(fwd, x, -1, False)
            yield name, s, "bwd", partial(FL.softmax_bwd_cpu, dy, y, -1, log, 1.0), partial(bwd, dy, y, -1, dt)
    # scaled-masked causal softmax of (B, 16, 256, 256) scores, bool mask (B, 1, 256, 256): aten has no fused op,
    # the baseline is the eager composition (scale, masked_fill, causal fill, softmax)
    B = 1 if dt == torch.float32 else 2
    x = torch.randn(B, 16, 256, 256, dtype=dt)
    mask = torch.rand(B, 1, 256, 256) > 0.1
    causal = torch.ones(256, 256, dtype=torch.bool).triu(1)

    def composed():
        sc = (x * 0.125).masked_fill(~mask, float("-inf")).masked_fill(causal, float("-inf"))
        return A._softmax(sc, -1, False)

    fl = partial(FL.masked_softmax_fwd_cpu, x, mask.expand(B, 16, 256, 256), 0.125, True)
    yield "masked_softmax", f"{B}x16x256x256", "fwd", fl, composed


def _aten_ce_grad(x, t, dt):
    """torch's cross_entropy forward + backward, kernel by kernel."""
    lp = A._log_softmax(x, 1, False)
    _, tw = A.nll_loss_forward(lp, t, None, 1, -100)
    g = A.nll_loss_backward(torch.ones((), dtype=dt), lp, t, None, 1, -100, tw)
    return A._log_softmax_backward_data(g, lp, 1, dt)


def _aten_ce(x, t):
    return A.nll_loss_forward(A._log_softmax(x, 1, False), t, None, 1, -100)


def ce_cases(dt):
    for N, C in CE_SHAPES[_key(dt)] + [(8, 32768)]:
        x, t = torch.randn(N, C, dtype=dt), torch.randint(0, C, (N,))
        s = f"{N}x{C}"
        fl = partial(FL.cross_entropy_fwd_cpu, x, t, None, -100, 0.0, 1)
        yield "cross_entropy", s, "fwd", partial(fl, False), partial(_aten_ce, x, t)
        yield "cross_entropy", s, "fwd+bwd", partial(fl, True), partial(_aten_ce_grad, x, t, dt)


# (N, K) weights of decode-sized linear layers (a 32000-vocabulary LM head, Llama-style projections) x rows M
LINEAR_SHAPES = [(32000, 512), (1408, 512), (512, 1408), (4096, 4096), (151936, 1024)]
LINEAR_ROWS = (1, 2, 4, 8, 16)


def linear_rows_cases(dt):
    for N, K in LINEAR_SHAPES:
        w = torch.randn(N, K, dtype=dt)
        for M in LINEAR_ROWS:
            x = torch.randn(M, K, dtype=dt)
            yield (
                "linear_rows",
                f"{M}x{K}->{N}",
                "fwd",
                partial(FL.linear_rows_cpu, x, w, None),
                partial(A.linear, x, w),
            )


def measure(f_fl, f_at, reps, clock=time.perf_counter_ns):
    """Per-call times (us) of f_fl and f_at, alternating call by call: (median fl, median aten, p10 fl, p10 aten)."""
    for f in (f_fl, f_at):
        f()
    t0 = clock()
    f_at()
    # reps samples, or fewer for slow calls (~0.4 s per case)
    n = max(20, min(reps, int(4e8 / max(clock() - t0, 1))))
    tf, ta = [], []
    for _ in range(n):
        t0 = clock()
        f_fl()
        t1 = clock()
        f_at()
        t2 = clock()
        tf.append((t1 - t0) / 1e3)
        ta.append((t2 - t1) / 1e3)
    p10 = lambda v: statistics.quantiles(v, n=10)[0]  # noqa: E731
    return statistics.median(tf), statistics.median(ta), p10(tf), p10(ta)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=400)
    p.add_argument("--only", default="", help="comma-separated op names (layer_norm, rms_norm, softmax, ...)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the calling thread's CPU time (time.thread_time_ns) instead of the wall clock: with --threads 1 "
        "the kernel runs on that thread, and the time it spends descheduled on a loaded machine drops out",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    only = set(args.only.split(",")) - {""}
    clock = "thread CPU time" if args.cpu_time else "wall clock"
    print(f"threads {torch.get_num_threads()}, {clock}, torch {torch.__version__}, load average {os.getloadavg()}")
    print(f"{'op':15} {'dtype':9} {'shape':15} {'mode':8} {'fastlm us':>10} {'aten us':>10} {'aten/fl':>8}", end="")
    print(f" {'p10 fl':>9} {'p10 aten':>9} {'p10 a/f':>8}")
    with torch._C._AutoDispatchBelowADInplaceOrView():
        run(args, only)
    print(f"load average {os.getloadavg()}")


def run(args, only):
    for dt in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for gen in (norm_cases, softmax_cases, ce_cases, linear_rows_cases):
            for name, shape, mode, f_fl, f_at in gen(dt):
                if only and name not in only:
                    continue
                clock = time.thread_time_ns if args.cpu_time else time.perf_counter_ns
                tf, ta, qf, qa = measure(f_fl, f_at, args.reps, clock)
                print(f"{name:15} {str(dt)[6:]:9} {shape:15} {mode:8} {tf:10.1f} {ta:10.1f} {ta / tf:8.2f}", end="")
                print(f" {qf:9.1f} {qa:9.1f} {qa / qf:8.2f}", flush=True)


if __name__ == "__main__":
    main()
