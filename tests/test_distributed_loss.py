"""The fused LM-head losses under DDP, FSDP2 and ZeRO-3 (issue 26): no silent gradient errors at scale.

One 2-process gloo group for the module (spawned once; every check runs on both ranks and writes its outcome to a
file that the tests below read). A tiny Llama (transformers, built from a config, untied head, vocabulary 97: FSDP2
splits the head 49 + 48 rows), patched with fastlm.patch (cpu backend), on a global batch of 4 sequences, 2 per rank:

- DDP: the loss through the wrapped model's forward; loss and every parameter gradient equal to the single-process
  unpatched model's (the mean of the two ranks' losses' gradients, DDP's all-reduce), and the parameters identical
  on both ranks after an optimizer step.
- FSDP2, every decoder layer and the LM head their own units with ``reshard_after_forward=True`` (the head's weight
  is a resharded DTensor as soon as its forward returns): the same comparison, and the parameters after a step.
- FSDP2 with a mixed-precision policy (bf16 params, fp32 reduce): the patched model against the unpatched one under
  the same policy, both compared with the fp32 single-process gradients (the patched error at most twice the
  unpatched one, FlashAttention's rule).
- ``F.linear_cross_entropy`` / ``F.linear_distillation_loss`` given an FSDP2 module's sharded weight (and bias)
  outside that module's forward: gathered once per call (not per chunk), in the policy's compute dtype, the
  gradient reduce-scattered into the sharded parameter; a plain loss (not the vocab-parallel one, whose placements
  FSDP2's look the same). Reduction "none" too (the weight is read again in the backward, after the reshard).
- DeepSpeed ZeRO-3 (its CPU accelerator on the same gloo group), where ``deepspeed`` is importable (skipped, saying
  so, where not: it is no fastlm dependency): the patched Llama's loss computed inside the LM head's forward, and
  ``F.linear_cross_entropy`` on a partitioned head outside its forward (mean and none), against single-process.
"""

import copy
import datetime
import importlib.util
import json
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from helpers import ON_GPU

import fastlm
import fastlm.functional as F

pytestmark = [
    pytest.mark.skipif(ON_GPU, reason="gloo on CPU tensors (the CPU-only CI runs these)"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed"),
]

WORLD = 2
TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TOL = dict(atol=2e-5, rtol=2e-4)  # fp32: fused vs unfused kernels and another summation order over the ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _batch(rank: int):
    """This rank's half of the global batch (4 x 12 tokens; ignored labels on both ranks, unequal counts)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (4, 12), generator=g)
    labels = ids.clone()
    labels[0, 3:6] = labels[3, 8:] = labels[2, 0] = -100
    return ids[2 * rank : 2 * rank + 2], labels[2 * rank : 2 * rank + 2]


def _reference(model):
    """The single-process unpatched model: each rank's loss and the mean of their gradients (DDP's and FSDP2's
    averaging), in fp32."""
    ref = copy.deepcopy(model)
    losses = []
    for r in range(WORLD):
        ids, labels = _batch(r)
        loss = ref(input_ids=ids, labels=labels).loss
        (loss / WORLD).backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in ref.named_parameters()}, ref


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _close(a, b, name, **tol):
    torch.testing.assert_close(_full(a).float(), b.float(), **(tol or TOL), msg=lambda m: f"{name}: {m}")


def _same_on_every_rank(model) -> int:
    """The number of parameters whose full values differ between the ranks (all-gathered, compared bitwise)."""
    differing = 0
    for _, p in model.named_parameters():
        full = _full(p.detach()).contiguous()
        gathered = [torch.empty_like(full) for _ in range(WORLD)]
        torch.distributed.all_gather(gathered, full)
        differing += any(not torch.equal(gathered[0], g) for g in gathered[1:])
    return differing


def _step_matches_reference(model, ref, ref_grads):
    """An SGD step on both: the updated parameters equal the single-process update with the reference gradients."""
    lr = 0.5
    torch.optim.SGD(model.parameters(), lr=lr).step()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            expected = p - lr * ref_grads[n]
            _close(dict(model.named_parameters())[_plain(n)], expected, f"{n} after a step")


def _plain(name: str) -> str:
    return name.replace("module.", "", 1) if name.startswith("module.") else name


def check_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _llama()
    ref_losses, ref_grads, ref = _reference(model)
    ddp = DDP(fastlm.patch(copy.deepcopy(model)))
    ids, labels = _batch(rank)
    with fastlm.backend("cpu"):
        out = ddp(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused loss ran: no logits
    out.loss.backward()
    _close(out.loss, ref_losses[rank], "loss")
    grads = dict(ddp.module.named_parameters())
    for n, g in ref_grads.items():
        _close(grads[n].grad, g, f"grad {n}")
    _step_matches_reference(ddp.module, ref, ref_grads)
    assert _same_on_every_rank(ddp.module) == 0


def _fsdp(model, mp_policy=None):
    """Each decoder layer and the LM head their own FSDP2 units (``reshard_after_forward=True``), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(mp_policy=mp_policy or MixedPrecisionPolicy(), reshard_after_forward=True)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model.lm_head, **kw)
    fully_shard(model, **kw)
    return model


def check_fsdp(rank):
    from torch.distributed.tensor import DTensor

    model = _llama()
    ref_losses, ref_grads, ref = _reference(model)
    sharded = _fsdp(fastlm.patch(copy.deepcopy(model)))
    ids, labels = _batch(rank)
    with fastlm.backend("cpu"):
        out = sharded(input_ids=ids, labels=labels)
    # the head was resharded when its forward returned: reading its weight afterwards would give a shard
    assert isinstance(sharded.lm_head.weight, DTensor), type(sharded.lm_head.weight)
    out.loss.backward()
    _close(out.loss, ref_losses[rank], "loss")
    for n, p in sharded.named_parameters():
        _close(p.grad, ref_grads[n], f"grad {n}")
    _step_matches_reference(sharded, ref, ref_grads)
    assert _same_on_every_rank(sharded) == 0


def _rel_errors(model, ref_grads) -> dict:
    return {
        n: float((_full(p.grad).float() - ref_grads[n]).norm() / ref_grads[n].norm())
        for n, p in model.named_parameters()
    }


def check_fsdp_mixed_precision(rank):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _llama()
    ref_losses, ref_grads, _ = _reference(model)
    ids, labels = _batch(rank)
    runs = {}
    for name, m in (("unpatched", copy.deepcopy(model)), ("patched", fastlm.patch(copy.deepcopy(model)))):
        m = _fsdp(m, policy)
        with fastlm.backend("cpu"):
            loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
        runs[name] = (float(loss), _rel_errors(m, ref_grads))
    (loss_u, err_u), (loss_p, err_p) = runs["unpatched"], runs["patched"]
    ref = float(ref_losses[rank])
    assert abs(loss_p - ref) <= 2 * abs(loss_u - ref) + 2e-3, (loss_p, loss_u, ref)
    worse = {n: (err_p[n], err_u[n]) for n in err_p if err_p[n] > 2 * err_u[n] + 1e-3}
    assert not worse, f"patched vs unpatched relative gradient error (bf16 params), beyond 2x: {worse}"
    assert max(err_p.values()) < 0.05, err_p  # bf16 compute: a few per cent at most
    return {"max error patched": max(err_p.values()), "max error unpatched": max(err_u.values())}


class _Net(torch.nn.Module):
    """hidden = tanh(embed(ids) @ body); head (V, H) with bias: a causal LM's shape, the loss outside forward."""

    def __init__(self, V=97, H=16):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.body = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V)

    def forward(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


def _net_fsdp(net, mp_policy=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(mp_policy=mp_policy or MixedPrecisionPolicy(), reshard_after_forward=True)
    fully_shard(net.head, **kw)
    fully_shard(net, **kw)
    return net


class _CountGathers:
    """Counts the all-gathers FSDP2 issues (torch.distributed's all_gather_single / all_gather_into_tensor)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor")

    def __enter__(self):
        self.n, self.saved = 0, {}
        for name in self.NAMES:
            fn = getattr(torch.distributed, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def counted(*args, _fn=fn, **kwargs):
                self.n += 1
                return _fn(*args, **kwargs)

            setattr(torch.distributed, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.distributed, name, fn)


def _net_batch(rank, V=97):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (4, 5), generator=g)
    t = torch.randint(0, V, (4, 5), generator=g)
    t[1, 2] = -100
    return ids[2 * rank : 2 * rank + 2], t[2 * rank : 2 * rank + 2]


def _net_reference(net, loss_of):
    """Single-process: the mean over the ranks' batches of the gradients of ``loss_of(net, ids, target)``."""
    ref = copy.deepcopy(net)
    losses = []
    for r in range(WORLD):
        ids, t = _net_batch(r)
        loss = loss_of(ref, ids, t)
        (loss / WORLD).backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}


def check_linear_ce_fsdp_weight(rank):
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    net = _Net()
    for reduction in ("mean", "none"):

        def head_loss(m, h, t, reduction=reduction):  # 10 tokens in chunks of 3: 4 chunks
            w, b = m.head.weight, m.head.bias
            loss = F.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction, chunk_size=3)
            return loss.sum() / 7 if reduction == "none" else loss

        ref_losses, ref_grads = _net_reference(net, lambda m, ids, t: head_loss(m, m(ids), t))
        sharded = _net_fsdp(copy.deepcopy(net))
        ids, t = _net_batch(rank)
        with fastlm.backend("cpu"):
            h = sharded(ids)
            assert isinstance(sharded.head.weight, DTensor)  # the head never ran its forward: sharded
            with _CountGathers() as count:
                loss = head_loss(sharded, h, t)
            assert count.n == 1, f"{count.n} all-gathers for one call (chunk_size=3 over 10 tokens)"
            assert not isinstance(loss, DTensor), "an FSDP2 weight taken for a vocab-sharded one"
            loss.backward()
        assert isinstance(sharded.head.weight, DTensor)  # resharded again after the backward
        _close(loss, ref_losses[rank], f"{reduction} loss")
        for n, p in sharded.named_parameters():
            _close(p.grad, ref_grads[n], f"{reduction} grad {n}")


def check_linear_ce_fsdp_mixed_precision(rank):
    """bf16 param_dtype: the weight is gathered in bf16 (not the fp32 master), the hidden states cast to it; the
    loss and gradients equal the single-process bf16 computation (the head's parameters in bf16, as FSDP2 casts)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.manual_seed(0)
    net = _Net()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    sharded = _net_fsdp(copy.deepcopy(net), policy)
    ids, t = _net_batch(rank)
    with fastlm.backend("cpu"):
        h = sharded(ids)
        loss = F.linear_cross_entropy(h, sharded.head.weight, t, linear_bias=sharded.head.bias, chunk_size=3)
    assert loss.dtype == torch.bfloat16, loss.dtype  # computed in the policy's compute dtype
    loss.backward()

    def loss_of(m, ids, t):
        hb = m(ids).bfloat16()
        w, b = m.head.weight.bfloat16(), m.head.bias.bfloat16()
        return F.linear_cross_entropy(hb, w, t, linear_bias=b, chunk_size=3)

    bf16 = copy.deepcopy(net).bfloat16()  # the whole net in bf16, as FSDP2's param_dtype makes it
    with fastlm.backend("cpu"):
        ref_losses, ref_grads = _net_reference(bf16, loss_of)
    tol = dict(atol=2e-2, rtol=2e-2)
    _close(loss, ref_losses[rank], "loss", **tol)
    for n, p in sharded.named_parameters():
        assert p.grad.dtype == torch.float32  # reduced into the fp32 sharded parameter
        _close(p.grad, ref_grads[n], f"grad {n}", **tol)


def check_linear_distillation_fsdp(rank):
    """The student's head an FSDP2 unit (gradient reduce-scattered), the teacher's a frozen FSDP2 unit (a plain
    all-gather, no hooks): loss and the student's gradients against the single-process computation."""
    torch.manual_seed(0)
    student, teacher = _Net(), _Net()
    teacher.requires_grad_(False)

    def loss_of(m, ids, t, tm):
        with torch.no_grad():
            th = tm(ids)
        return F.linear_distillation_loss(
            m(ids), m.head.weight, th, tm.head.weight, target=t, hard_weight=0.3, chunk_size=3
        )

    ref_teacher = copy.deepcopy(teacher)
    ref_losses, ref_grads = _net_reference(student, lambda m, ids, t: loss_of(m, ids, t, ref_teacher))
    s, tch = _net_fsdp(copy.deepcopy(student)), _net_fsdp(copy.deepcopy(teacher))
    ids, t = _net_batch(rank)
    with fastlm.backend("cpu"):
        loss = loss_of(s, ids, t, tch)
        loss.backward()
    _close(loss, ref_losses[rank], "loss")
    for n, p in s.named_parameters():
        if n.startswith("head.bias"):
            assert p.grad is None  # the distillation takes no bias
            continue
        _close(p.grad, ref_grads[n], f"grad {n}")


def _zero3(model):
    """A DeepSpeed ZeRO-3 engine around ``model`` (CPU accelerator, the module's gloo group, SGD)."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    return engine


def _zero3_grads(engine) -> dict:
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}


def check_zero3_hf(rank):
    """The patched Llama under ZeRO-3: the loss computed inside the LM head's forward (gathered by ZeRO-3's module
    hooks); loss and every gradient as the single-process unpatched model."""
    model = _llama()
    ref_losses, ref_grads, _ = _reference(model)
    engine = _zero3(fastlm.patch(copy.deepcopy(model)))
    ids, labels = _batch(rank)
    with fastlm.backend("cpu"):
        out = engine(input_ids=ids, labels=labels)
        engine.backward(out.loss)
    _close(out.loss, ref_losses[rank], "loss")
    for n, g in _zero3_grads(engine).items():
        _close(g, ref_grads[n], f"grad {n}")


def check_zero3_functional(rank):
    """F.linear_cross_entropy on a partitioned head (``numel() == 0`` outside its forward): gathered for the call
    and again for the backward until the gradient is accumulated; mean and none."""
    torch.manual_seed(0)
    net = _Net()
    for reduction in ("mean", "none"):

        def head_loss(m, h, t, reduction=reduction):
            w, b = m.head.weight, m.head.bias
            loss = F.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction, chunk_size=3)
            return loss.sum() / 7 if reduction == "none" else loss

        ref_losses, ref_grads = _net_reference(net, lambda m, ids, t: head_loss(m, m(ids), t))
        engine = _zero3(copy.deepcopy(net))
        assert engine.module.head.weight.numel() == 0  # partitioned
        ids, t = _net_batch(rank)
        with fastlm.backend("cpu"):
            loss = head_loss(engine.module, engine(ids), t)
            engine.backward(loss)
        assert engine.module.head.weight.numel() == 0  # released again
        _close(loss, ref_losses[rank], f"{reduction} loss")
        for n, g in _zero3_grads(engine).items():
            _close(g, ref_grads[n], f"{reduction} grad {n}")


CHECKS = {
    "ddp": check_ddp,
    "fsdp": check_fsdp,
    "fsdp_mixed_precision": check_fsdp_mixed_precision,
    "linear_ce_fsdp_weight": check_linear_ce_fsdp_weight,
    "linear_ce_fsdp_mixed_precision": check_linear_ce_fsdp_mixed_precision,
    "linear_distillation_fsdp": check_linear_distillation_fsdp,
    "zero3_hf": check_zero3_hf,
    "zero3_functional": check_zero3_functional,
}
NO_DEEPSPEED = (
    "deepspeed is not installed in this environment (it is not a fastlm dependency), so the ZeRO-3 checks (the HF "
    "loss inside the LM head's forward, GatheredParameters in fastlm/ops/sharded_params.py) do not run here"
)


def _worker(rank, world, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    torch.set_num_threads(1)
    results = {}
    if importlib.util.find_spec("deepspeed") is not None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo: this group)
    for name, fn in CHECKS.items():
        if name.startswith("zero3") and importlib.util.find_spec("deepspeed") is None:
            results[name] = {"ok": None, "info": NO_DEEPSPEED}
            continue
        try:
            info = fn(rank)
            results[name] = {"ok": True, "info": info}
        except Exception:  # recorded, reported by the test that reads it
            results[name] = {"ok": False, "info": traceback.format_exc()}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist_loss") / "results")
    mp.spawn(_worker, args=(WORLD, _free_port(), out), nprocs=WORLD, join=True)
    per_rank = []
    for r in range(WORLD):
        with open(f"{out}.{r}") as f:
            per_rank.append(json.load(f))
    return per_rank


def _expect_ok(results, name):
    failed = {r: res[name]["info"] for r, res in enumerate(results) if not res[name]["ok"]}
    assert not failed, "\n".join(f"rank {r}:\n{v}" for r, v in failed.items())


def test_ddp_matches_single_process(results):
    """DDP: loss and every gradient as the single-process unpatched model; identical parameters after a step."""
    _expect_ok(results, "ddp")


def test_fsdp2_reshard_after_forward_matches_single_process(results):
    """FSDP2, the head its own unit resharded after its forward: loss, every gradient, the parameters after a step."""
    _expect_ok(results, "fsdp")


def test_fsdp2_mixed_precision_matches_unpatched(results):
    """FSDP2 with bf16 params / fp32 reduce: the patched model's error against the fp32 single-process gradients at
    most twice the unpatched model's under the same policy."""
    _expect_ok(results, "fsdp_mixed_precision")


def test_linear_cross_entropy_gathers_fsdp2_weight_once(results):
    """F.linear_cross_entropy given an FSDP2 head's sharded weight and bias outside its forward (mean and none):
    one all-gather per call, a plain loss, gradients as single-process."""
    _expect_ok(results, "linear_ce_fsdp_weight")


def test_linear_cross_entropy_fsdp2_compute_dtype(results):
    """With a bf16 param_dtype the gathered weight is bf16 (not the fp32 master) and the gradient lands in fp32."""
    _expect_ok(results, "linear_ce_fsdp_mixed_precision")


def test_linear_distillation_fsdp2_student_and_teacher(results):
    _expect_ok(results, "linear_distillation_fsdp")


@pytest.mark.parametrize("name", ["zero3_hf", "zero3_functional"])
def test_zero3(results, name):
    """DeepSpeed ZeRO-3 (CPU accelerator, gloo): the patched Llama's loss inside the LM head's forward, and
    F.linear_cross_entropy on a partitioned head outside its forward; loss and every gradient as single-process."""
    if results[0][name]["ok"] is None:
        pytest.skip(results[0][name]["info"])
    _expect_ok(results, name)
