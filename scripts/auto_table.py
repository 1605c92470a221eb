"""Write fastlm/auto_table.py, the measured part of the ``auto`` backend, from ``fastlm bench`` JSON reports.

    python scripts/auto_table.py benchmarks/results/cpu-dev/bench.json [benchmarks/results/h200/<date>/bench.json ...]

For every (op, device type, size class, mode) that a report measured, ``auto`` runs the provider that was fastest:
a fastlm backend (provider ``fastlm-<backend>``) or torch's own ops (``torch-eager``, the ``torch`` backend).
torch.compile and the peer libraries are not backends and are not candidates. Over several shapes of one class the
winner is the candidate with the smallest geometric mean of its time relative to torch's (so every shape counts
alike, whatever its size). The LM-head losses (linear cross-entropy and distillation) are never given to torch's
ops: their point is memory (the full logits), which a timing does not see. Size classes: ``small`` is the host-
overhead family's tiny shapes (kernels ``call_<op>``), ``decode`` the few-query attention of the decode family,
``large`` every other kernel family's shapes; a call's class comes from its input's element count (``SMALL_NUMEL``)
or, for attention, its query length (fastlm/dispatch.py).
"""

import argparse
import json
import math
import os
import sys

# bench kernel -> (the op resolve names, size class); kernels not listed are not ops (whole models) or measure
# something a plain call does not select on (sdpa_mod: the score modifiers)
KERNEL_OPS = {
    "decode": ("scaled_dot_product_attention", "decode"),
    "kvcache": ("attention_with_kvcache", "decode"),
    "sdpa": ("scaled_dot_product_attention", "large"),
    "rope": ("apply_rotary_pos_emb", "large"),
    "call_sdpa": ("scaled_dot_product_attention", "small"),
    "call_rope": ("apply_rotary_pos_emb", "small"),
}
PLAIN = (
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "softmax",
    "log_softmax",
    "scaled_masked_softmax",
    "cross_entropy",
    "cross_entropy_soft",
    "linear_cross_entropy",
    "kl_div",
    "distillation_loss",
    "linear_distillation_loss",
    "swiglu",
    "geglu",
)
KERNEL_OPS.update({k: (k, "large") for k in PLAIN})
KERNEL_OPS.update({f"call_{k}": (k, "small") for k in PLAIN})
MEMORY_OPS = ("linear_cross_entropy", "linear_distillation_loss")
SMALL_NUMEL = 16384  # the host-overhead cases have ~10^3 elements, the kernel families' CPU shapes ~10^6


def backend_of(provider: str) -> str | None:
    """The backend a provider's timing stands for: torch's own ops for torch eager and torch's SDPA (its default
    dispatch on CPU; on a GPU, where the suite times each SDPA backend, the fastest of flash / efficient / cuDNN, as
    its dispatcher would pick one of them)."""
    if provider in ("torch-eager", "torch-sdpa") or provider in (
        "torch-sdpa-flash",
        "torch-sdpa-efficient",
        "torch-sdpa-cudnn",
    ):
        return "torch"
    if provider.startswith("fastlm-") and provider != "fastlm-auto":
        return provider.removeprefix("fastlm-")
    return None  # torch-compile, peers, fastlm-auto (whatever auto picked in that run)


def winners(reports: list[dict]) -> dict:
    """(op, device, size, mode) -> (backend, note)."""
    times: dict = {}  # (op, device, size, mode) -> {shape: {backend: ms}}
    for report in reports:
        device = "cpu" if report["environment"]["device"].startswith("CPU") else "cuda"
        for r in report["results"]:
            if r["kernel"] not in KERNEL_OPS or r["mode"] == "bwd":
                continue
            op, size = KERNEL_OPS[r["kernel"]]
            backend = backend_of(r["provider"])
            if backend is None or (backend == "torch" and op in MEMORY_OPS):
                continue
            key = (op, device, size, r["mode"])
            per = times.setdefault(key, {}).setdefault((r["shape"], r["dtype"]), {})
            per[backend] = min(r["ms"], per.get(backend, float("inf")))
    out = {}
    for key, shapes in sorted(times.items()):
        candidates = {b for per in shapes.values() for b in per}
        scores = {}
        for b in candidates:
            rel = [per[b] / per["torch"] for per in shapes.values() if b in per and "torch" in per]
            if rel:
                scores[b] = math.exp(sum(math.log(x) for x in rel) / len(rel))
        if not scores:  # no torch baseline (the memory ops): the fastest fused backend by total time
            totals = {b: sum(per[b] for per in shapes.values() if b in per) for b in candidates}
            best = min(totals, key=totals.get)
            out[key] = (best, f"{len(shapes)} shape(s), no torch baseline")
            continue
        best = min(scores, key=scores.get)
        others = ", ".join(f"{b} {scores[b]:.2f}" for b in sorted(scores) if b != best)
        out[key] = (best, f"time / torch's: {best} {scores[best]:.2f}; {others} ({len(shapes)} shape(s))")
    return out


def render(table: dict, sources: list[str]) -> str:
    lines = [
        "# ruff: noqa: E501",
        '"""The measured part of the ``auto`` backend (fastlm/dispatch.py): for each (op, device type, size class,',
        "mode), the backend a committed ``fastlm bench`` run measured fastest, torch's own ops included (``torch``).",
        "",
        "GENERATED by scripts/auto_table.py from the reports below; do not edit by hand: rerun the script on a new",
        "run. A key that is not here falls back to dispatch.AUTO's family default.",
        "",
        "Sources:",
        *(f"    {s}" for s in sources),
        '"""',
        "",
        f"SMALL_NUMEL = {SMALL_NUMEL}  # below: size class 'small' (the host-overhead shapes); else 'large'",
        "",
        "# (op, device type, size class, mode) -> (backend, what the run measured)",
        "# fmt: off",
        "MEASURED = {",
    ]
    for key, (backend, note) in table.items():
        key_text = ", ".join(json.dumps(k) for k in key)
        lines.append(f"    ({key_text}): ({json.dumps(backend)}, {json.dumps(note)}),")
    lines += ["}", "# fmt: on"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="bench.json files written by `fastlm bench`")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastlm", "auto_table.py"),
        help="the module to write",
    )
    args = parser.parse_args(argv)
    reports, sources = [], []
    for path in args.reports:
        with open(path) as f:
            report = json.load(f)
        env = report["environment"]
        reports.append(report)
        sources.append(
            f"{path}: {env['device']}, torch {env['torch']}, commit {env.get('git_commit')}, {env['timestamp']}"
        )
    table = winners(reports)
    with open(args.out, "w") as f:
        f.write(render(table, sources))
    print(f"wrote {args.out}: {len(table)} entries")
    for key, (backend, note) in table.items():
        print(f"  {key}: {backend}  ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
