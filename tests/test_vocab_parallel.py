"""Vocab-parallel cross-entropy and linear cross-entropy over DTensors (fastlm/ops/vocab_parallel.py), on real gloo
process groups: 4 processes spawned once for the module; each runs every check on the 4-rank mesh and on its 2-rank
sub-mesh (ranks {0, 1} and {2, 3} at the same time), and writes the outcome of each check to a file that the test
functions below read. Uneven splits: V = 37 over 4 ranks is 10, 10, 10, 7 (over 2: 19, 18); V = 5 over 4 leaves the
last rank no class at all. The references: torch's cross-entropy on the full (gathered by the test, never by the op)
logits in float64, and fastlm's single-process fused loss on the same backend. Also a `fastlm train --tp 2` run on
(dp 2, tp 2) against the single-process run on the same global batches."""

import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from helpers import ON_GPU
from test_models import _args

import fastlm
import fastlm.functional as F
from fastlm import train as T

pytestmark = pytest.mark.skipif(ON_GPU, reason="gloo on CPU tensors (the CPU-only CI runs these)")

WORLD = 4
TRAIN = dict(steps=4, batch=2, seq=16, tp=2, save_every=100)  # per process; dp = 2: global batch 4
REDUCTIONS = ("mean", "sum", "none")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(out, ref, tol, name):
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _ce_case(mesh, backend, dtype, V, reduction, eps, weighted, seed):
    """The vocab-parallel F.cross_entropy of (N, V) logits sharded on V: loss (a replicated DTensor) and the logits'
    gradient (sharded like them) against the float64 full computation and the single-process fused loss."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    N = 13
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, V, (N,), generator=g)
    t[[1, 7]] = -100  # ignored rows
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    dl = torch.randn(N, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7).double()
    xd = distribute_tensor(x.to(dtype), mesh, [Shard(1)]).requires_grad_()
    target = distribute_tensor(t, mesh, [Replicate()]) if seed % 2 else t  # a replicated DTensor or a plain tensor
    with fastlm.backend(backend):
        loss = F.cross_entropy(xd, target, None if w is None else w.to(dtype), reduction=reduction, label_smoothing=eps)
        assert loss.placements == (Replicate(),), loss.placements
        loss.backward(distribute_tensor(dl.to(loss.dtype), mesh, [Replicate()]))
    assert xd.grad.placements == (Shard(1),), xd.grad.placements
    xr = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xr, t, w, reduction=reduction, label_smoothing=eps)
    ref.backward(dl)
    tol = 1e-9 if dtype == torch.float64 else (2e-5 if dtype == torch.float32 else 3e-2)
    _close(loss.full_tensor(), ref, tol, "loss")
    _close(xd.grad.full_tensor(), xr.grad, tol, "grad logits")
    if dtype != torch.float64:  # the single-process fused loss on the same backend
        xs = x.to(dtype).detach().clone().requires_grad_()
        with fastlm.backend(backend):
            single = F.cross_entropy(
                xs, t, None if w is None else w.to(dtype), reduction=reduction, label_smoothing=eps
            )
            single.backward(dl.to(single.dtype))
        _close(loss.full_tensor(), single, tol, "loss vs single-process")
        _close(xd.grad.full_tensor(), xs.grad, tol, "grad vs single-process")


def _linear_case(mesh, backend, V, reduction, eps, bias, seed):
    """The vocab-parallel F.linear_cross_entropy with the (V, H) head sharded on V (and a Shard(0) bias), several
    token chunks: loss, grad_input (all-reduced), grad_weight / grad_bias (sharded) against float64."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    H, shape = 8, (3, 7)
    h = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, shape, generator=g)
    t[0, 2] = t[2, 6] = -100
    dl = torch.randn(shape, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3).double()
    dtype = torch.float64 if backend == "torch" else torch.float32
    replicated_input = seed % 2 == 1
    hd = h.to(dtype).detach().clone().requires_grad_()
    inp = DTensor.from_local(hd, mesh, [Replicate()], run_check=False) if replicated_input else hd
    Wd = distribute_tensor(W.to(dtype), mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b.to(dtype), mesh, [Shard(0)]).requires_grad_() if bias else None
    with fastlm.backend(backend):
        loss = F.linear_cross_entropy(
            inp, Wd, t, linear_bias=bd, reduction=reduction, label_smoothing=eps, chunk_size=8
        )  # 21 tokens: 3 chunks, the last one short
        loss.backward(distribute_tensor(dl.to(loss.dtype), mesh, [Replicate()]))
    assert loss.placements == (Replicate(),)
    assert Wd.grad.placements == (Shard(0),)
    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    br = b.clone().requires_grad_() if bias else None
    logits = torch.nn.functional.linear(hr, Wr, br)
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, V), t.reshape(-1), reduction=reduction, label_smoothing=eps
    )
    ref = ref.reshape(shape) if reduction == "none" else ref
    ref.backward(dl)
    tol = 1e-9 if dtype == torch.float64 else 3e-5
    _close(loss.full_tensor(), ref, tol, "loss")
    _close(hd.grad, hr.grad, tol, "grad input")
    _close(Wd.grad.full_tensor(), Wr.grad, tol, "grad weight")
    if bias:
        _close(bd.grad.full_tensor(), br.grad, tol, "grad bias")


def _post_training_case(mesh, seed):
    """The post-training losses with the head sharded on V (the vocab-parallel linear log-probabilities underneath):
    loss, metrics and the hidden states' gradient equal the single-process losses on the full head."""
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, 5, 8, generator=g)
    W = torch.randn(37, 8, generator=g) * 0.5
    t = torch.randint(0, 37, (4, 5), generator=g)
    t[:, 0] = -100
    adv = torch.randn(4, generator=g)
    runs = {}
    for name, w in (("full", W.clone().requires_grad_()), ("sharded", distribute_tensor(W, mesh, [Shard(0)]))):
        w.requires_grad_()
        x = h.clone().requires_grad_()
        dpo, m = F.linear_dpo_loss(x, w, t, ref_logps=torch.zeros(4), loss_type="ipo")
        grpo, mg = F.linear_grpo_loss(x, w, t.clamp(min=0), t != -100, adv, old_logps=-torch.ones(4, 5))
        (dpo + grpo).backward()
        runs[name] = (dpo, grpo, m, mg, x.grad, _full(w.grad))
    for a, b in zip(runs["sharded"], runs["full"], strict=True):
        if isinstance(a, dict):
            assert set(a) == set(b)
            for k in a:
                _close(a[k], b[k], 1e-5, k)
        else:
            _close(a, b, 1e-5, "post-training")


def _error_cases(mesh, mesh2d):
    """Bad layouts raise a clear ValueError before any collective (so every rank raises alike)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    x, t = torch.randn(5, 12), torch.randint(0, 12, (5,))
    W, h = torch.randn(12, 4), torch.randn(5, 4)
    cases = {
        "2-D mesh": (
            lambda: F.cross_entropy(distribute_tensor(x, mesh2d, [Replicate(), Shard(1)]), t),
            "1-D device mesh",
        ),
        "sharded targets": (
            lambda: F.cross_entropy(distribute_tensor(x, mesh, [Shard(1)]), distribute_tensor(t, mesh, [Shard(0)])),
            "replicated",
        ),
        "logits sharded on rows": (lambda: F.cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), t), "Shard(1)"),
        "weight on the wrong dim": (
            lambda: F.linear_cross_entropy(h, distribute_tensor(W, mesh, [Shard(1)]), t),
            "Shard(0)",
        ),
        "plain bias": (
            lambda: F.linear_cross_entropy(h, distribute_tensor(W, mesh, [Shard(0)]), t, linear_bias=torch.zeros(12)),
            "linear_bias",
        ),
        "target out of range": (
            lambda: F.cross_entropy(distribute_tensor(x, mesh, [Shard(1)]), torch.full((5,), 12)),
            "outside [0, 12)",
        ),
        "3-D logits": (
            lambda: F.cross_entropy(distribute_tensor(x.view(5, 12, 1), mesh, [Shard(1)]), t.view(5, 1)),
            "(N, C)",
        ),
        "trainable class weights": (
            lambda: F.cross_entropy(distribute_tensor(x, mesh, [Shard(1)]), t, torch.ones(12, requires_grad=True)),
            "requires grad",
        ),
    }
    for name, (fn, words) in cases.items():
        try:
            fn()
        except ValueError as exc:
            assert words in str(exc), f"{name}: {exc}"
        else:
            raise AssertionError(f"{name}: no error")


# (V, reduction, label smoothing, class weights) of the cross-entropy checks: the whole matrix on the cpu backend;
# on the Triton kernels (interpreted here, ~10x slower) and torch's float64 pieces, every reduction, smoothing and
# weights, and the empty shard, in fewer combinations (the reduction happens outside the kernels).
CE_FULL = [(V, r, e, w) for V in (37, 5) for r in REDUCTIONS for e, w in ((0.0, False), (0.1, True), (0.2, False))]
CE_SOME = [(37, "mean", 0.1, True), (37, "none", 0.2, False), (37, "sum", 0.0, False), (5, "mean", 0.1, False)]
# (reduction, label smoothing, bias) of the linear cross-entropy checks
LINEAR_FULL = [(r, e, b) for r in REDUCTIONS for e, b in ((0.0, True), (0.1, False))]
LINEAR_SOME = [("mean", 0.1, True), ("none", 0.0, False)]


def _checks(mesh, mesh2d):
    """name -> (function, args), for one 1-D mesh."""
    n = mesh.size()
    checks = {}
    seed = 0
    for backend, dtype in (("cpu", torch.float32), ("triton", torch.float32), ("torch", torch.float64)):
        for V, reduction, eps, weighted in CE_FULL if backend == "cpu" else CE_SOME:
            seed += 1
            name = f"ce-{n}-{backend}-V{V}-{reduction}-eps{eps}-{'w' if weighted else 'nw'}"
            checks[name] = (_ce_case, (mesh, backend, dtype, V, reduction, eps, weighted, seed))
        for reduction, eps, bias in LINEAR_FULL if backend == "cpu" else LINEAR_SOME:
            seed += 1
            name = f"linear-{n}-{backend}-{reduction}-eps{eps}-{'b' if bias else 'nb'}"
            checks[name] = (_linear_case, (mesh, backend, 37, reduction, eps, bias, seed))
    checks[f"ce-{n}-cpu-bf16"] = (_ce_case, (mesh, "cpu", torch.bfloat16, 37, "mean", 0.1, False, 1))
    checks[f"errors-{n}"] = (_error_cases, (mesh, mesh2d))
    checks[f"post-training-{n}"] = (_post_training_case, (mesh, 3))
    return checks


def _worker(rank, world, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    # a timeout: a check that fails on one rank leaves the others in a collective (they then fail too)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    mesh4 = init_device_mesh("cpu", (world,))
    mesh2d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    for mesh in (mesh2d["tp"], mesh4):
        for name, (fn, args) in _checks(mesh, mesh2d).items():
            try:
                fn(*args)
                results[name] = "ok"
            except Exception:  # recorded, reported by the test that reads it
                results[name] = traceback.format_exc()
    try:
        results["train-tp"] = T.train(_args(**TRAIN))["loss"]
    except Exception:
        results["train-tp"] = traceback.format_exc()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vp") / "results")
    mp.spawn(_worker, args=(WORLD, _free_port(), out), nprocs=WORLD, join=True)
    per_rank = []
    for r in range(WORLD):
        with open(f"{out}.{r}") as f:
            per_rank.append(json.load(f))
    return per_rank


def _expect_ok(results, prefix):
    names = [n for n in results[0] if n.startswith(prefix)]
    assert names, f"no check named {prefix}*"
    failed = {f"rank {r} {n}": res[n] for r, res in enumerate(results) for n in names if res[n] != "ok"}
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in list(failed.items())[:3])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_cross_entropy_matches_full(results, world, backend):
    """Loss and the logits' gradient, every reduction, label smoothing, class weights, ignored rows, uneven splits
    and an empty shard: equal to the float64 full computation and to the single-process fused loss."""
    _expect_ok(results, f"ce-{world}-{backend}-")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_linear_cross_entropy_matches_full(results, world, backend):
    """Loss, grad_input, grad_weight and grad_bias of the chunked vocab-parallel linear cross-entropy."""
    _expect_ok(results, f"linear-{world}-{backend}-")


@pytest.mark.parametrize("world", [2, 4])
def test_post_training_losses_with_a_vocab_sharded_head(results, world):
    _expect_ok(results, f"post-training-{world}")


@pytest.mark.parametrize("world", [2, 4])
def test_bf16(results, world):
    _expect_ok(results, f"ce-{world}-cpu-bf16")


@pytest.mark.parametrize("world", [2, 4])
def test_bad_layouts_raise(results, world):
    """A 2-D mesh, sharded targets, logits sharded on rows, a head weight sharded on H, a plain bias, targets out of
    range, 3-D logits, trainable class weights: each a ValueError naming what was expected."""
    _expect_ok(results, f"errors-{world}")


def test_train_tensor_parallel_matches_single(results):
    """`fastlm train --tp 2` on 4 processes (data-parallel 2 x tensor-parallel 2; the head split on the vocabulary,
    the blocks by columns / rows): each data-parallel pair's loss, averaged, follows the single-process run on the
    same global batches within fp32 tolerance, and the two ranks of a tensor-parallel pair agree exactly."""
    curves = [res["train-tp"] for res in results]
    assert all(isinstance(c, list) for c in curves), next(c for c in curves if not isinstance(c, list))
    assert curves[0] == curves[1] and curves[2] == curves[3]  # the tp pairs: one replicated loss
    mean = [(a + b) / 2 for a, b in zip(curves[0], curves[2], strict=True)]
    single = T.train(_args(**{**TRAIN, "tp": 1, "batch": 4}))["loss"]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(single), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("smooth", [False, True])
def test_local_grad_of_an_ignored_row_is_zero_even_with_minus_inf_logits(backend, smooth):
    """A shard's gradient from the global statistics: an ignored row (a = b = 0) gets exact zeros even where its
    logits and its lse are -inf (exp(-inf - -inf) is NaN, and NaN * 0 is NaN); the other rows against the formula
    a (p - onehot) + b (W p - w) in float64. Single process: the per-shard step of the vocab-parallel backward."""
    from fastlm.ops import vocab_parallel as vp

    x = torch.randn(3, 11)
    x[1] = float("-inf")
    t = torch.tensor([2, 5, 20])  # row 2's target on another rank
    lse = torch.logsumexp(x.double(), 1)
    a = torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64)
    b = torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64) if smooth else torch.zeros(3, dtype=torch.float64)
    stats = torch.stack([lse, a, b]).float()
    w_sum = torch.tensor([44.0])
    out = vp.local_grad(x.clone(), t, stats, None, w_sum, smooth, backend)
    assert torch.equal(out[1], torch.zeros(11)), out[1]
    p = torch.exp(x.double() - lse[:, None])
    onehot = torch.nn.functional.one_hot(t.clamp(max=10), 11).double() * (t < 11)[:, None]
    ref = a[:, None] * (p - onehot) + b[:, None] * (44.0 * p - 1.0)
    torch.testing.assert_close(out[[0, 2]].double(), ref[[0, 2]], atol=1e-6, rtol=1e-5)
