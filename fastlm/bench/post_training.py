"""Benchmark cases of the post-training losses on the LM head (fastlm/ops/preference.py, fastlm/ops/grpo.py): DPO
with a reference model, ORPO, KTO with a reference model, GRPO (dapo, with old and reference log-probabilities).

Work: TFLOP/s of the matmuls one forward + backward of the unfused computation needs, counted alike for every
provider: the policy's logits, grad_hidden and grad_weight (3 x 2 N V H for N = B T tokens), plus the reference's
logits where it has one (2 N V H): ``2 N V H (3 + ref)``. fastlm's two-pass losses also recompute the policy's
logits in the backward (one more matmul than counted). Peak memory (CPU: measured in a child process) is the
headline beside the time. Providers: fastlm's backends; ``torch-eager`` / ``torch-compile``: TRL's unfused
computation (the full (N, V) logits, log_softmax in fp32, the selected tokens gathered, the loss), as TRL's trainers
do without Liger; ``liger``: Liger-Kernel's chunked losses (torch + torch.compile, so they run on CPU too) where
liger_kernel is importable. On CPU ``--quick`` (the test suite's smoke run) times fastlm and torch eager only at a
small shape: torch.compile and Liger's compiled chunks cost about a minute of inductor compile per case there.
"""

import importlib.util

import torch
import torch.nn.functional as TF

import fastlm.functional as F
from fastlm.bench.core import Case, SkipCase, fastlm_providers, provider_fn, timed_call

LIGER = "liger"
SHAPE_GPU = (16, 1024, 4096, 128256)  # B x T x H x V (the H100/H200 target: Llama-3-8B's head)
SHAPE_GPU_QUICK = (8, 1024, 4096, 128256)
SHAPE_CPU = (8, 512, 512, 32000)  # the CPU target's shape
SHAPE_CPU_QUICK = (4, 64, 128, 4000)
LOSSES = ("dpo", "orpo", "kto", "grpo")
MEMORY_KERNELS = tuple(f"linear_{loss}_loss" for loss in LOSSES)  # fastlm.bench.core.cpu_peak_mb
BETA = 0.1
PROMPT = 0.25  # the fraction of each row that is prompt (ignore_index)


def providers(device: torch.device) -> dict[str, str | None]:
    names = fastlm_providers(device)
    if importlib.util.find_spec("liger_kernel") is not None:
        names[LIGER] = None
    return names


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    b, t, h, v = (SHAPE_GPU_QUICK if quick else SHAPE_GPU) if gpu else (SHAPE_CPU_QUICK if quick else SHAPE_CPU)
    out = []
    for loss in LOSSES:
        ref = 1 if loss in ("dpo", "kto") else 0
        flops = 2 * b * t * v * h * (3 + ref)
        out.append(
            Case(f"linear_{loss}_loss", f"{b}x{t}x{h}x{v}", dtype, "fwd+bwd", flops, "TFLOP/s", (b, t, h, v, quick))
        )
    return out


def _selective_logps(logits, target):
    """TRL's selective_log_softmax of the logits at the targets (0 where ignored), fp32."""
    keep = target != -100
    lp = logits.float().log_softmax(-1).gather(-1, torch.where(keep, target, 0).unsqueeze(-1)).squeeze(-1)
    return lp * keep


def _inputs(loss, b, t, h, v, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(b, t, h).requires_grad_()
    w = rnd(v, h, scale=h**-0.5).requires_grad_()
    target = torch.randint(0, v, (b, t), generator=g).to(device)
    target[:, : int(t * PROMPT)] = -100
    extra = {}
    if loss in ("dpo", "kto"):
        extra["rx"], extra["rw"] = rnd(b, t, h), rnd(v, h, scale=h**-0.5)
    if loss == "kto":
        extra["pref"] = (torch.arange(b) % 2 == 0).to(device)
    if loss == "grpo":
        extra["mask"] = target != -100
        extra["ids"] = target.clamp(min=0)
        extra["adv"] = torch.randn(b, generator=g).to(device)
        extra["old"] = (-torch.rand(b, t, generator=g) * 8).to(device)
        extra["ref"] = (-torch.rand(b, t, generator=g) * 8).to(device)
    return x, w, target, extra


def _ours(loss, target, e):
    if loss == "dpo":
        return lambda x, w: F.linear_dpo_loss(x, w, target, ref_hidden=e["rx"], ref_weight=e["rw"], beta=BETA)[0]
    if loss == "orpo":
        return lambda x, w: F.linear_orpo_loss(x, w, target, beta=BETA)[0]
    if loss == "kto":
        return lambda x, w: F.linear_kto_loss(
            x, w, target, preference=e["pref"], kl=0.1, ref_hidden=e["rx"], ref_weight=e["rw"], beta=BETA
        )[0]
    return lambda x, w: F.linear_grpo_loss(
        x, w, e["ids"], e["mask"], e["adv"], old_logps=e["old"], ref_logps=e["ref"], beta=0.04
    )[0]


def _unfused(loss, target, e):
    """TRL's computation without Liger: the full logits of the policy (and the reference), then the loss."""
    keep = target != -100

    def ref_sums():
        with torch.no_grad():
            return _selective_logps(e["rx"] @ e["rw"].T, target).sum(-1)

    if loss == "dpo":

        def fn(x, w):
            r = ref_sums()
            s = _selective_logps(x @ w.T, target).sum(-1)
            p = s.shape[0] // 2
            return -TF.logsigmoid(BETA * ((s[:p] - r[:p]) - (s[p:] - r[p:]))).mean()

        return fn
    if loss == "orpo":

        def fn(x, w):
            logits = x @ w.T
            p = x.shape[0] // 2
            avg = _selective_logps(logits, target).sum(-1) / keep.sum(-1)
            a, b = avg[:p], avg[p:]
            log_odds = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
            nll = TF.cross_entropy(logits[:p].flatten(0, 1).float(), target[:p].flatten())
            return nll - BETA * TF.logsigmoid(log_odds).mean()

        return fn
    if loss == "kto":

        def fn(x, w):
            r = ref_sums()
            rho = _selective_logps(x @ w.T, target).sum(-1) - r
            pref = e["pref"]
            losses = torch.where(pref, 1 - torch.sigmoid(BETA * (rho - 0.1)), 1 - torch.sigmoid(BETA * (0.1 - rho)))
            return losses.mean()

        return fn

    def fn(x, w):
        lp = _selective_logps(x @ w.T, target)
        ratio = torch.exp(lp - e["old"])
        adv = e["adv"].unsqueeze(1)
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
        d = e["ref"] - lp
        per_token = per_token + 0.04 * (torch.exp(d) - d - 1)
        m = e["mask"].float()
        return (per_token * m).sum() / m.sum()

    return fn


def _liger(loss, target, e):
    from liger_kernel.chunked_loss import (
        LigerFusedLinearDPOLoss,
        LigerFusedLinearGRPOLoss,
        LigerFusedLinearKTOLoss,
        LigerFusedLinearORPOLoss,
    )

    if loss == "dpo":
        m = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True)
        return lambda x, w: m(w, x, target, ref_input=e["rx"], ref_weight=e["rw"])[0]
    if loss == "orpo":
        m = LigerFusedLinearORPOLoss(beta=BETA)
        return lambda x, w: m(w, x, target)[0]
    if loss == "kto":
        m = LigerFusedLinearKTOLoss(beta=BETA, use_ref_model=True)
        return lambda x, w: m(
            x, w, target, preference_labels=e["pref"], ref_input=e["rx"], ref_weight=e["rw"], kl=torch.tensor(0.1)
        )[0]
    m = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="dapo", use_ref_model=True)
    return lambda x, w: m(
        x, w, e["ids"], e["mask"], e["adv"], ref_per_token_logps=e["ref"], old_per_token_logps=e["old"]
    )[0]


def runner(case: Case, provider: str, device: torch.device):
    backend = providers(device).get(provider)

    def setup():
        b, t, h, v, quick = case.params
        loss = case.kernel.removeprefix("linear_").removesuffix("_loss")
        if quick and device.type == "cpu" and provider in ("torch-compile", LIGER):
            raise SkipCase(f"{provider} is not timed in --quick on CPU (about a minute of inductor compile per case)")
        x, w, target, extra = _inputs(loss, b, t, h, v, device, case.dtype)
        if provider == LIGER:
            fn = _liger(loss, target, extra)
        else:
            fn = provider_fn(case.kernel, provider, backend, _ours(loss, target, extra), _unfused(loss, target, extra))
        return timed_call(fn, [x, w], case.mode, [x, w])

    return setup
