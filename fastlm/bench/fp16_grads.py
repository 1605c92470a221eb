"""fp16 + GradScaler: the fraction of gradient entries that are zero, fastlm's fused losses against torch's unfused
path, for every loss that writes its gradient in the forward (issue 26).

A GradScaler multiplies the loss by its scale S (65536 at the start) before the backward and divides the gradients
by S afterwards; here that is done by hand (on CPU as on GPU): ``(loss * S).backward()``, then ``grad.float() / S``.
Both paths run the mixed-precision recipe: fp16 inputs (the linear losses: fp32 master hidden states and head
weights cast to fp16, fp16 matmuls, as ``F.linear`` under autocast), the loss itself in fp32 (torch: the loss
function on ``.float()`` inputs, what autocast does with cross-entropy, kl_div and log_softmax; fastlm: the fused
loss on the fp16 inputs inside ``torch.autocast(dtype=torch.float16)``, whose loss is fp32). The fraction counts the
gradient entries of the inputs that get one (logits; for the linear losses the hidden states and the head's
weight) that are exactly 0 after unscaling. Logits are Gaussian with standard deviation ``std`` (std 3 gives
peaked rows like a trained model's, where the 1/N-scaled fp16 gradient underflows most).

``python -m fastlm.bench.fp16_grads [--quick]`` prints the table (the benchmark's large shapes: N = 4096 x V = 2000
and V = 128256); ``zero_fractions`` is what tests/test_fp16_grads.py runs at small shapes.
"""

import argparse
import time

import torch
import torch.nn.functional as TF

import fastlm
import fastlm.functional as F
from fastlm import reference

SCALE = 65536.0  # GradScaler's default initial scale
LOSSES = (
    "cross_entropy",
    "soft_cross_entropy",
    "kl_div",
    "kl_div_log_target",
    "distillation_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
)


def _inputs(loss: str, n: int, v: int, h: int, std: float, g: torch.Generator) -> dict:
    """The fp32 inputs of one case (the leaves whose gradients are counted are marked by their names)."""
    if loss.startswith("linear"):
        out = {
            "hidden": torch.randn(n, h, generator=g),
            "weight": torch.randn(v, h, generator=g) * (std / h**0.5),
        }
        if loss == "linear_distillation_loss":
            out["teacher_hidden"] = torch.randn(n, h, generator=g)
            out["teacher_weight"] = torch.randn(v, h, generator=g) * (std / h**0.5)
        out["target"] = torch.randint(0, v, (n,), generator=g)
        return out
    out = {"logits": torch.randn(n, v, generator=g) * std}
    if loss == "cross_entropy":
        out["target"] = torch.randint(0, v, (n,), generator=g)
    elif loss == "soft_cross_entropy":
        out["target"] = torch.softmax(torch.randn(n, v, generator=g) * std, -1)
    elif loss.startswith("kl_div"):
        out["logits"] = torch.log_softmax(out["logits"], -1)  # kl_div's input: log-probabilities
        t = torch.randn(n, v, generator=g) * std
        out["target"] = torch.log_softmax(t, -1) if loss == "kl_div_log_target" else torch.softmax(t, -1)
    else:  # distillation_loss
        out["teacher"] = torch.randn(n, v, generator=g) * std
    return out


GRADS = {"hidden", "weight", "logits"}  # the inputs that get a gradient


def _loss(loss: str, x: dict, mode: str):
    """The loss of one path: ``"fused"``, fastlm's function on fp16 inputs (under fp16 autocast: an fp32 loss);
    ``"torch"``, torch's unfused one on their fp32 casts; ``"fp64"``, the same on float64 casts (the reference)."""
    fused = mode == "fused"
    up = torch.float64 if mode == "fp64" else torch.float32
    f = (lambda t: t) if fused else (lambda t: t.to(up))
    if loss == "cross_entropy":
        return (F.cross_entropy if fused else TF.cross_entropy)(f(x["logits"]), x["target"])
    if loss == "soft_cross_entropy":
        return (F.cross_entropy if fused else TF.cross_entropy)(f(x["logits"]), f(x["target"]))
    if loss.startswith("kl_div"):
        kl = F.kl_div if fused else TF.kl_div
        return kl(f(x["logits"]), f(x["target"]), reduction="batchmean", log_target=loss == "kl_div_log_target")
    if loss == "distillation_loss":
        return (F.distillation_loss if fused else reference.distillation_loss)(f(x["logits"]), f(x["teacher"]))
    if fused:  # fp32 masters: autocast casts them to fp16 inside the function (as F.linear would)
        if loss == "linear_cross_entropy":
            return F.linear_cross_entropy(x["hidden"], x["weight"], x["target"])
        return F.linear_distillation_loss(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"])

    def logits(h, w):  # fp16 operands; torch: an fp16 matmul (autocast's F.linear); fp64: exact on them
        if mode == "fp64":
            return TF.linear(h.half().double(), w.half().double())
        return TF.linear(h.half(), w.half()).float()

    if loss == "linear_cross_entropy":
        return TF.cross_entropy(logits(x["hidden"], x["weight"]), x["target"])
    s, t = logits(x["hidden"], x["weight"]), logits(x["teacher_hidden"], x["teacher_weight"])
    return reference.distillation_loss(s, t)


def _grads(loss: str, inputs: dict, mode: str, backend: str) -> list:
    """The unscaled gradients of the inputs that get one, after ``(loss * SCALE).backward()``: float32 (exact for the
    fp16 gradients; the float64 reference's rounding, 2^-24 relative, is far below fp16's 2^-11)."""
    linear = loss.startswith("linear")
    x = {}
    for k, t in inputs.items():
        t = t if linear or not t.is_floating_point() else t.half()  # plain losses: fp16 inputs
        if mode == "fp64" and t.is_floating_point():
            t = t.double()  # float64 leaves: the reference gradient is not rounded to the inputs' dtype
        x[k] = t.clone().requires_grad_(k in GRADS)
    with fastlm.backend(backend), torch.autocast("cpu", dtype=torch.float16, enabled=mode == "fused"):
        out = _loss(loss, x, mode)
    if out.dtype != (torch.float64 if mode == "fp64" else torch.float32):
        raise AssertionError(f"{loss}: the {mode} loss must be fp32 (as under autocast), got {out.dtype}")
    (out * SCALE).backward()
    grads = [(x[k].grad.double() / SCALE).float() for k in x if k in GRADS]  # fp32 holds fp16 values exactly
    if not all(torch.isfinite(gr).all() for gr in grads):
        raise AssertionError(f"{loss}: non-finite gradients ({mode})")
    return grads


def _zero_fraction(grads: list) -> float:
    return sum(int((gr == 0).sum()) for gr in grads) / sum(gr.numel() for gr in grads)


def _error(grads: list, ref: list) -> float:
    """Mean relative error per entry against the float64 gradients, over the entries that are not 0 there: an
    entry lost to underflow counts 1 (its whole value), which a norm would hide behind the large entries."""
    err = [((g - r).abs() / r.abs())[r != 0] for g, r in zip(grads, ref, strict=True)]
    return float(torch.cat(err).mean())


def zero_fractions(loss: str, n: int, v: int, h: int = 64, std: float = 1.0, backend: str = "cpu", seed: int = 0):
    """((torch's unfused, fastlm's fused) fraction of zero gradient entries under fp16 + GradScaler, (torch's,
    fastlm's) mean relative error per entry against float64 (:func:`_error`))."""
    inputs = _inputs(loss, n, v, h, std, torch.Generator().manual_seed(seed))
    ref = _grads(loss, inputs, "fp64", backend)
    unfused, fused = _grads(loss, inputs, "torch", backend), _grads(loss, inputs, "fused", backend)
    return (_zero_fraction(unfused), _zero_fraction(fused)), (_error(unfused, ref), _error(fused, ref))


def old_fraction(n: int, v: int, std: float, seed: int = 0) -> float:
    """The cross-entropy's zero fraction with the 1/N folded into the fp16 gradient in the forward (fastlm before
    issue 26, for comparison): softmax - onehot divided by N, rounded to fp16, scaled and unscaled afterwards."""
    x = _inputs("cross_entropy", n, v, 64, std, torch.Generator().manual_seed(seed))
    g = ((torch.softmax(x["logits"].half().float(), -1) - TF.one_hot(x["target"], v)) / n).half()
    return float((g == 0).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cpu", help="fastlm backend of the fused losses (default cpu)")
    p.add_argument("--quick", action="store_true", help="V = 2000 only")
    args = p.parse_args(argv)
    shapes = [(4096, 2000, 64)] + ([] if args.quick else [(1024, 128256, 64)])
    print(f"fp16 + GradScaler (S = {SCALE:g}): zero gradient entries, torch unfused vs fastlm fused ({args.backend})")
    cols = ("loss", "N x V (x H)", "logits std", "zeros: torch", "fastlm", "diff (pp)", "1/N in fp16 (old)")
    print("| " + " | ".join(cols + ("error: torch", "fastlm", "s")) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, v, h in shapes:
        for std in (1.0, 3.0):
            for loss in LOSSES:
                t0 = time.time()
                (ref, ours), (e_ref, e_ours) = zero_fractions(loss, n, v, h, std, args.backend)
                old = f"{old_fraction(n, v, std):.2%}" if loss == "cross_entropy" else ""
                shape = f"{n} x {v}" + (f" x {h}" if loss.startswith("linear") else "")
                print(
                    f"| {loss} | {shape} | {std:g} | {ref:.4%} | {ours:.4%} | {100 * (ours - ref):+.3f} | {old} "
                    f"| {e_ref:.2e} | {e_ours:.2e} | {time.time() - t0:.1f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
