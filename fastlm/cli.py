"""The ``fastlm`` command.

fastlm info       versions, backends (and why one is unavailable), compiled CUDA archs, the GPU
fastlm bench      the benchmark suite on this machine (GB/s, TFLOP/s against measured ceilings), or the static
                  sm_80/sm_90 kernel report (--static, no GPU needed)
fastlm train      pre-train a GPT (causal LM) or BERT (masked LM) on fastlm's kernels; distil from a teacher
fastlm finetune   fine-tune a BERT classifier on a CSV/JSONL file
fastlm eval       validation perplexity, or zero-shot classification
"""

import argparse
import sys


def _info() -> int:
    import torch

    import fastlm
    from fastlm import dispatch, extension

    print(f"fastlm {fastlm.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"GPU: {gpu}")
    info = extension.build_info()
    if info:
        nvcc = f", nvcc {info['nvcc_version']}" if info["nvcc_version"] else ""
        print(
            f"fastlm._C: built against torch {info['torch_build']}, CUDA kernels: {info['with_cuda']}"
            + (f" (CUDA {info['cuda_version']}{nvcc}, archs {info['cuda_archs']})" if info["with_cuda"] else "")
        )
    else:
        print(f"fastlm._C: {extension.LOAD_ERROR}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("triton", "cuda", "cpu", "torch"):
        reason = dispatch.unavailable_reason(name, "norms", dev)
        print(f"backend {name:<6} on {dev.type}: {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"backend in force: {fastlm.current_backend()}")
    print(f"auto on {dev.type} (op, size class, mode -> backend; fastlm/auto_table.py, from a committed bench run):")
    print("\n".join(dispatch.auto_table_lines(dev.type)))
    print(_attention_info(torch))
    return 0


def _attention_info(torch) -> str:
    """How the Triton attention launches on this machine: TMA, warp specialisation, autotuning (and the knobs)."""
    try:
        from fastlm.kernels.attention import configs
    except ImportError as exc:  # no triton
        return f"attention (Triton): unavailable ({exc})"
    return "attention (Triton): " + configs.describe()


def build_parser() -> argparse.ArgumentParser:
    """The parser of the five commands (every flag with a help text; defaults shown by --help)."""
    fmt = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser = argparse.ArgumentParser(
        prog="fastlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, backends and why one is unavailable, compiled CUDA archs, the GPU", **fmt)
    b = sub.add_parser("bench", help="run the benchmark suite on this machine", **fmt)
    b.add_argument(
        "--ops",
        default="model,overhead,norms,softmax,ce,attention,decode,rope,gated_mlp,kl_div,distill,post",
        help="comma-separated op families, run in this order: model (whole models: the headline table), overhead "
        "(host time per call at tiny shapes), norms, softmax, ce, attention, decode, rope, gated_mlp, kl_div, distill, "
        "post (the post-training losses: DPO, ORPO, KTO, GRPO)",
    )
    b.add_argument("--quick", action="store_true", help="a short grid (about a minute per family on a GPU)")
    b.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="None: bf16 on GPU, fp32 on CPU")
    b.add_argument("--out", default="bench-out", help="folder for the JSON / Markdown reports")
    b.add_argument("--no-static", action="store_true", help="skip the static sm_90 kernel report")
    b.add_argument(
        "--static",
        action="store_true",
        help="only the static report: compile every shipped kernel config for sm_80/sm_90, no GPU",
    )
    b.add_argument("--archs", default="80,90", help="compute capabilities of the static report")
    b.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="ratios of two JSON runs (nothing is run)")
    from fastlm import train

    train.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return _info()
    if args.cmd in ("train", "finetune", "eval"):
        from fastlm import train

        return train.main(args)
    from fastlm.bench import run

    if args.compare:
        return run.compare(*args.compare)
    if args.static:
        return run.static_report(args.out, tuple(int(a) for a in args.archs.split(",")))
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in run.FAMILIES]
    if unknown:
        parser.error(f"unknown op families {unknown}; known: {sorted(run.FAMILIES)}")
    return run.run(ops, args.quick, args.dtype, args.out, static=not args.no_static)


if __name__ == "__main__":
    sys.exit(main())
