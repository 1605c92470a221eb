"""Peak memory per rank of the vocab-parallel linear cross-entropy (fastlm/ops/vocab_parallel.py) against the
single-rank fused one (fastlm/ops/linear_cross_entropy.py), on CPU with gloo: issue 26's target is
per-rank peak <= single-rank peak / world + O(tokens).

Each configuration runs in fresh processes (world 1: the plain F.linear_cross_entropy; world N: N gloo ranks, the
(V, H) head a DTensor sharded on V): one fwd+bwd as warm-up, then the peak resident size (VmHWM, reset through
/proc/self/clear_refs) of one more fwd+bwd over the resident size before it, with glibc told to mmap every block
above 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed buffers leave the resident set (fastlm/bench/core.py's method).
The inputs are allocated before the measurement; the gradients (.grad of the input and of the weight shard) are
made during it and count.

What the formulas say (fp32, e = 4 bytes, chunk c tokens from chunk_size_for(T, V, H)):
    single rank:  gw V*H*e + gx T*H*e + chunk logits c*V*e + the cpu kernel's gradient c*V*e + O(T)
    rank of N:    gw V/N*H*e + gx T*H*e + chunk logits c*V/N*e (gradient written over them) + O(T)
so the (V, H)- and (c, V)-sized terms shrink by N and the input gradient (T, H) is the O(tokens) part.

    PYTHONPATH=. python scripts/vocab_parallel_memory.py [--tokens 4096 --hidden 256 --vocab 32768 --worlds 2 4]
"""

import argparse
import json
import os
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp


def _kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _measure(step, reset) -> float:
    """MiB: the peak resident size of step() over the resident size before it, after a warm-up call and reset()
    (which drops the warm-up's gradients, so that the measured step's own count in full)."""
    import gc

    step()
    reset()
    gc.collect()
    rss = _kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return (_kb("VmHWM:") - rss) / 1024


def _worker(rank, world, port, a, out):
    import fastlm
    import fastlm.functional as F

    torch.manual_seed(0)
    T, H, V = a["tokens"], a["hidden"], a["vocab"]
    x = torch.randn(T, H, requires_grad=True)
    t = torch.randint(0, V, (T,))
    if world == 1:
        w = torch.randn(V, H, requires_grad=True)
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh("cpu", (world,))
        chunk = -(-V // world)
        rows = max(0, min(chunk, V - rank * chunk))
        local = torch.randn(rows, H)
        w = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(V, H), stride=(H, 1))
        w = torch.nn.Parameter(w)

    def step():
        with fastlm.backend(a["backend"]):
            loss = F.linear_cross_entropy(x, w, t)
        loss.backward()

    def reset():
        x.grad = w.grad = None

    peak = _measure(step, reset)
    with open(f"{out}.{world}.{rank}", "w") as f:
        json.dump({"peak_mb": peak}, f)
    if world > 1:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--backend", default="cpu", help="fastlm backend of the per-shard kernels")
    args = vars(p.parse_args())
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned processes
    from fastlm.ops.linear_cross_entropy import chunk_size_for

    T, H, V = args["tokens"], args["hidden"], args["vocab"]
    chunk = chunk_size_for(T, V, H)
    out = os.path.join(tempfile.mkdtemp(), "peak")
    peaks = {}
    for world in [1, *args["worlds"]]:
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        peaks[world] = [json.load(open(f"{out}.{world}.{r}"))["peak_mb"] for r in range(world)]
    mib = 1 / 2**20
    tokens_part = T * H * 4 * mib  # the input gradient: the O(tokens) term
    print(f"T={T} H={H} V={V} fp32, backend {args['backend']}, chunk {chunk} tokens; torch {torch.__version__}")
    terms = f"gw {V * H * 4 * mib:.1f} + gx {tokens_part:.1f} + logits/grad 2 x {chunk * V * 4 * mib:.1f} MiB"
    print(f"formula, single rank: {terms}")
    single = peaks[1][0]
    print(f"single-rank fused path: peak {single:.1f} MiB")
    for world in args["worlds"]:
        bound = single / world + tokens_part
        worst = max(peaks[world])
        print(
            f"world {world}: per-rank peaks {', '.join(f'{v:.1f}' for v in peaks[world])} MiB; "
            f"bound single/{world} + T*H*4 = {bound:.1f} MiB; worst rank / bound = {worst / bound:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
