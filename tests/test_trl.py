"""fastlm.trl: TRL's DPOTrainer and GRPOTrainer with fastlm's fused LM-head losses (the recipe of issue 27).

On one prepared batch, the subclass's ``compute_loss`` (fastlm's ``cpu`` backend) gives TRL's own loss, the same
gradient on every parameter and the same logged metrics; ``trainer.train()`` runs a few steps. A tiny Llama built
from a config and a word-level tokenizer (no downloads), fp32 (``bf16=False``: TRL's configs default to bf16 mixed
precision, under which accelerate runs the reference model's forward in bf16 autocast), one process.
"""

import contextlib
import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is a test-only dependency of fastlm.trl (pip install trl)")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import fastlm  # noqa: E402
from fastlm.trl import FastlmDPOTrainer, FastlmGRPOTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(90)]
# what TRL logs and fastlm's losses do not compute (they need the logits)
NOT_LOGGED = {"entropy", "mean_token_accuracy"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, tokenizer): a 2-layer Llama saved locally, so TRL can build reference models from it."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def _sentence(g: torch.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _policy(path: str) -> torch.nn.Module:
    """The saved model, perturbed: the policy differs from the reference (TRL's, loaded from ``path``)."""
    return _perturb(AutoModelForCausalLM.from_pretrained(path))


def _common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, logging_steps=1,
                save_strategy="no", disable_tqdm=True)  # fmt: skip


def _compare(trainer, stock, inputs):
    """TRL's own loss (``stock(model, inputs)``: the parent class's ``_compute_loss`` on this trainer) and the
    subclass's ``compute_loss`` on the same batch: losses, every parameter's gradient, and the metrics both log."""
    model = trainer.model
    model.train()
    out = []
    for fn, ctx in ((stock, contextlib.nullcontext()), (trainer.compute_loss, fastlm.backend("cpu"))):
        model.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        with ctx:
            loss = fn(model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        out.append((loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}))
    (lt, gt, mt), (lf, gf, mf) = out
    assert lf.dtype == torch.float32 and torch.isfinite(lt)
    torch.testing.assert_close(lf, lt, rtol=1e-5, atol=1e-7)
    assert gf.keys() == gt.keys() and len(gt) == len(list(model.parameters()))
    assert all(g.abs().sum() > 0 for g in gt.values()), "a vacuous batch: zero gradients"
    for name in gt:
        assert gt[name] is not None and gf[name] is not None, name
        torch.testing.assert_close(gf[name], gt[name], rtol=1e-4, atol=1e-4 * gt[name].abs().max().item() + 1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip
    assert set(mf) == set(mt) - NOT_LOGGED, (set(mf), set(mt))
    for key in mf:
        if key != "num_tokens":  # a running total over both calls
            assert math.isclose(mf[key], mt[key], rel_tol=1e-4, abs_tol=1e-5), (key, mf[key], mt[key])
    return lt.item(), mf


# ---------------------------------------------------------------------------------------------------------- DPO


def _dpo_dataset(n: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(2)
    return Dataset.from_dict({
        "prompt": [_sentence(g, 3 + i % 3) for i in range(n)],
        "chosen": [" " + _sentence(g, 2 + i % 4) for i in range(n)],
        "rejected": [" " + _sentence(g, 1 + i % 3) for i in range(n)],
    })  # fmt: skip


def _dpo_trainer(tiny, tmp_path, ref=True, dataset=None, **config):
    path, tok = tiny
    args = trl.DPOConfig(**_common(tmp_path), per_device_train_batch_size=4, max_steps=2, **config)
    ref_model = AutoModelForCausalLM.from_pretrained(path) if ref else None
    return FastlmDPOTrainer(_policy(path), ref_model=ref_model, args=args, train_dataset=dataset or _dpo_dataset(),
                            processing_class=tok)  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type="sigmoid", beta=0.5),
        dict(loss_type="ipo", beta=0.1),
        dict(loss_type=["hinge", "sft"], loss_weights=[1.0, 0.5], beta=0.2),
        dict(loss_type="robust", label_smoothing=0.1, beta=0.3),
        dict(loss_type="sigmoid", beta=0.5, precompute_ref_log_probs=True),
    ],
    ids=["sigmoid", "ipo", "hinge+sft", "robust", "sigmoid-precomputed-ref"],
)
def test_dpo_matches_trl(tiny, tmp_path, config):
    precomputed = config.get("precompute_ref_log_probs", False)
    trainer = _dpo_trainer(tiny, tmp_path, ref=not precomputed, **config)
    if precomputed:  # TRL precomputed them with the policy itself, at init: move the policy away from them
        _perturb(trainer.model, seed=6)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert ("ref_chosen_logps" in inputs) == precomputed
    _, metrics = _compare(trainer, lambda m, x: trl.DPOTrainer._compute_loss(trainer, m, x, False), inputs)
    assert metrics["rewards/chosen"] != 0.0  # the policy differs from the reference


def test_dpo_train(tiny, tmp_path):
    trainer = _dpo_trainer(tiny, tmp_path, loss_type="sigmoid", beta=0.5)
    with fastlm.backend("cpu"):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert "rewards/margins" in logs[0] and "entropy" not in logs[0]  # fastlm's metrics, not TRL's own loss


def test_dpo_unsupported(tiny, tmp_path):
    with pytest.raises(NotImplementedError, match="ld_alpha"):
        _dpo_trainer(tiny, tmp_path, loss_type="sigmoid", ld_alpha=0.5)
    with pytest.raises(NotImplementedError, match="f_divergence_type"):
        _dpo_trainer(tiny, tmp_path, loss_type="sigmoid", f_divergence_type="js_divergence")
    with pytest.raises(NotImplementedError, match="loss_type"):
        _dpo_trainer(tiny, tmp_path, loss_type=["sigmoid", "ipo"])
    # ipo with an empty prompt: TRL's length normaliser counts a completion token that nothing predicts
    empty = Dataset.from_dict({"prompt": ["", "w1 w2"], "chosen": ["w3 w4", " w5"], "rejected": ["w6", " w7 w8"]})
    trainer = _dpo_trainer(tiny, tmp_path, dataset=empty, loss_type="ipo")
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with pytest.raises(NotImplementedError, match="empty prompt"), fastlm.backend("cpu"):
        trainer.compute_loss(trainer.model, inputs)


# --------------------------------------------------------------------------------------------------------- GRPO


def _reward(completions, **kwargs):
    """A reward that varies between completions: the mean word index (0 for an empty completion)."""
    return [sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) / max(len(c.split()), 1) for c in completions]


def _grpo_trainer(tiny, tmp_path, **config):
    path, tok = tiny
    g = torch.Generator().manual_seed(3)
    prompts = Dataset.from_dict({"prompt": [_sentence(g, 2 + i % 3) for i in range(8)]})
    args = trl.GRPOConfig(**_common(tmp_path), **{"per_device_train_batch_size": 4, "num_generations": 2,
                          "max_completion_length": 6, "max_steps": 2, **config})  # fmt: skip
    return FastlmGRPOTrainer(_policy(path), reward_funcs=_reward, args=args, train_dataset=prompts,
                             processing_class=tok)  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type="dapo", temperature=0.7),
        dict(loss_type="grpo", gradient_accumulation_steps=2, per_device_train_batch_size=2),
        dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False, epsilon_high=0.28),
        dict(loss_type="dr_grpo", importance_sampling_level="sequence"),
        dict(loss_type="cispo", epsilon_high=1.1),
    ],
    ids=["dapo-temperature", "grpo-accumulation", "bnpo-beta", "dr_grpo-sequence", "cispo"],
)
def test_grpo_matches_trl(tiny, tmp_path, config):
    torch.manual_seed(4)  # generation samples
    trainer = _grpo_trainer(tiny, tmp_path, **config)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # TRL's generation and scoring
    assert inputs["advantages"].abs().sum() > 0 and inputs["completion_mask"].sum() > 0
    assert (inputs["ref_per_token_logps"] is not None) if trainer.beta else "ref_per_token_logps" not in inputs
    # off-policy: TRL's own current log-probabilities, perturbed, as the sampling policy's (ratios away from 1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        lp = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, inputs["completion_ids"].size(1))[0]
    inputs["old_per_token_logps"] = lp + 0.3 * torch.randn_like(lp)
    _, metrics = _compare(trainer, lambda m, x: trl.GRPOTrainer._compute_loss(trainer, m, x), inputs)
    if trainer.beta:
        assert metrics["kl"] > 0


def test_grpo_train(tiny, tmp_path):
    torch.manual_seed(5)
    trainer = _grpo_trainer(tiny, tmp_path, loss_type="dapo")
    with fastlm.backend("cpu"):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert "clip_ratio/region_mean" in logs[0] and "entropy" not in logs[0]


def test_grpo_unsupported(tiny, tmp_path):
    with pytest.raises(NotImplementedError, match="sapo"):
        _grpo_trainer(tiny, tmp_path, loss_type="sapo")
    with pytest.raises(NotImplementedError, match="use_bias_correction_kl"):
        _grpo_trainer(tiny, tmp_path, beta=0.1)  # TRL's default use_bias_correction_kl=True
    with pytest.raises(NotImplementedError, match="top_entropy_quantile"):
        _grpo_trainer(tiny, tmp_path, top_entropy_quantile=0.5)
