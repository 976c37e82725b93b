"""WZGRPOTrainer against the installed TRL: same loss, same gradients, same metrics, on the same batch.

A tiny Qwen2 is saved with save_pretrained (TRL rebuilds the reference model from the path when beta > 0);
both trainers load it from there, so their weights are identical. One batch comes from TRL's own
`_generate_and_score_completions`; it is then made harder: random advantages, ragged completion masks
(a 1-token and an empty row), a tool mask, perturbed reference log-probs, and off-policy old log-probs.
"""

import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer

from wz_engine.demo.tiny import build_tiny_qwen2, build_tokenizer
from wz_engine.integrations.trl import WZGRPOTrainer, trl_loss_normalisation

PROMPTS = ["write a poem", "tell a story", "the cat sat", "numbers one two"]
MAX_COMPLETION = 8
GRAD_ACCUM = 2


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    corpus = PROMPTS * 5 + ["once upon a time there was a small model that wrote short poems"] * 5
    tok = build_tokenizer(corpus, vocab_size=300)
    model = build_tiny_qwen2(len(tok), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_trainer(cls, model_dir, out_dir, prompts=PROMPTS, callbacks=None, **overrides):
    from transformers import AutoTokenizer

    options = {  # bf16=False: fp32 throughout (TRL autocasts its LM head to bf16 by default)
        "output_dir": str(out_dir), "use_cpu": True, "per_device_train_batch_size": 4, "num_generations": 2,
        "max_completion_length": MAX_COMPLETION, "gradient_accumulation_steps": GRAD_ACCUM, "temperature": 0.7,
        "epsilon": 0.2, "epsilon_high": 0.28, "report_to": [], "save_strategy": "no", "logging_steps": 1,
        "seed": 0, "max_steps": 3, "bf16": False,
    }
    options.update(overrides)
    trainer = cls(model=model_dir, reward_funcs=length_reward, args=GRPOConfig(**options),
                  train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                  processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=callbacks)
    trainer.current_gradient_accumulation_steps = GRAD_ACCUM  # set by Trainer's loop; compute_loss reads it
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def batches(model_dir, tmp_path_factory):
    """(on-policy inputs, off-policy inputs) built from one real TRL generation batch."""
    trainer = make_trainer(GRPOTrainer, model_dir, tmp_path_factory.mktemp("gen"), beta=0.1)
    rows = [{"prompt": p} for p in PROMPTS for _ in range(2)]
    with torch.no_grad():
        inputs = trainer._generate_and_score_completions(rows)
    gen = torch.Generator().manual_seed(1)
    b, t = inputs["completion_ids"].shape
    assert t == MAX_COMPLETION and "ref_per_token_logps" in inputs and "old_per_token_logps" not in inputs
    mask = inputs["completion_mask"].clone()
    lengths = torch.tensor([8, 5, 1, 0, 8, 3, 7, 6])[:b]
    mask[torch.arange(t).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    inputs["completion_mask"] = mask
    inputs["num_items_in_batch"] = mask.sum()
    inputs["advantages"] = torch.randn(b, generator=gen)
    inputs["ref_per_token_logps"] = inputs["ref_per_token_logps"] + 0.5 * torch.randn(b, t, generator=gen)
    on_policy = inputs
    off_policy = copy.copy(inputs)
    tool_mask = torch.ones_like(mask)
    tool_mask[0, 2:4] = 0
    off_policy["tool_mask"] = tool_mask
    off_policy["num_items_in_batch"] = (mask * tool_mask).sum()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], mask], 1), t)
    # per-token noise plus a per-row shift, so that sequence-level ratios clip too
    off_policy["old_per_token_logps"] = logps + 0.3 * torch.randn(b, t, generator=gen) + 0.3 * torch.randn(
        b, 1, generator=gen)
    return on_policy, off_policy


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


# Every TRL 1.16 loss_type we support x both importance_sampling_levels x beta 0 / > 0; the two-sided clip
# (delta above and below 1 + epsilon_high), the top-entropy mask, the off-policy sequence mask and the KL's
# importance weighting spread over them. cispo's cap is epsilon_high itself (None: TRL falls back to epsilon).
CASES = [  # (loss_type, importance_sampling_level, beta, extra config)
    ("grpo", "token", 0.0, {"delta": 1.5}),
    ("grpo", "sequence", 0.0, {}),
    ("grpo", "token", 0.05, {"use_bias_correction_kl": True}),
    ("grpo", "sequence", 0.05, {"use_bias_correction_kl": True, "delta": 1.35}),
    ("bnpo", "token", 0.0, {"delta": 1.1}),
    ("bnpo", "sequence", 0.0, {"top_entropy_quantile": 0.4}),
    ("bnpo", "token", 0.05, {"use_bias_correction_kl": False}),
    ("bnpo", "sequence", 0.05, {"use_bias_correction_kl": False, "off_policy_mask_threshold": 0.02}),
    ("dr_grpo", "token", 0.0, {"top_entropy_quantile": 0.2}),
    ("dr_grpo", "sequence", 0.0, {"delta": 1.25}),
    ("dr_grpo", "token", 0.05, {"use_bias_correction_kl": True, "delta": 1.4}),
    ("dr_grpo", "sequence", 0.05, {"use_bias_correction_kl": True}),
    ("dapo", "token", 0.0, {}),
    ("dapo", "sequence", 0.0, {"off_policy_mask_threshold": 0.02}),
    ("dapo", "token", 0.05, {"use_bias_correction_kl": False, "top_entropy_quantile": 0.5}),
    ("dapo", "sequence", 0.05, {"use_bias_correction_kl": True}),
    ("luspo", "token", 0.0, {}),
    ("luspo", "sequence", 0.0, {}),
    ("luspo", "token", 0.05, {"use_bias_correction_kl": True, "off_policy_mask_threshold": 0.02}),
    ("luspo", "sequence", 0.05, {"use_bias_correction_kl": True, "top_entropy_quantile": 0.3, "delta": 1.2}),
    ("cispo", "token", 0.0, {"epsilon_high": 1.1}),
    ("cispo", "sequence", 0.0, {"epsilon_high": 1.05, "top_entropy_quantile": 0.5}),
    ("cispo", "token", 0.05, {"epsilon_high": None, "use_bias_correction_kl": True}),
    ("cispo", "sequence", 0.05, {"epsilon_high": 1.05, "use_bias_correction_kl": True, "delta": 1.5}),
    ("sapo", "token", 0.0, {"sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.3}),
    ("sapo", "sequence", 0.0, {}),
    ("sapo", "token", 0.05, {"use_bias_correction_kl": True, "top_entropy_quantile": 0.5}),
    ("sapo", "sequence", 0.05, {"use_bias_correction_kl": True, "off_policy_mask_threshold": 0.02}),
    ("vespo", "token", 0.0, {"vespo_k_pos": 1.5, "vespo_lambda_neg": 1.0}),
    ("vespo", "sequence", 0.0, {"off_policy_mask_threshold": 0.02}),
    ("vespo", "token", 0.05, {"use_bias_correction_kl": True}),
    ("vespo", "sequence", 0.05, {"use_bias_correction_kl": True, "top_entropy_quantile": 0.4}),
]


def case_id(case):
    loss_type, level, beta, extra = case
    return "-".join([loss_type, level, f"beta{beta}", *(f"{k}={v}" for k, v in extra.items())])


@pytest.mark.parametrize("loss_type,level,beta,extra", CASES, ids=[case_id(c) for c in CASES])
def test_loss_and_grads_match_trl(model_dir, batches, tmp_path, loss_type, level, beta, extra):
    config = dict({"loss_type": loss_type, "importance_sampling_level": level, "beta": beta}, **extra)
    stock = make_trainer(GRPOTrainer, model_dir, tmp_path / "stock", **config)
    ours = make_trainer(WZGRPOTrainer, model_dir, tmp_path / "ours", **config)
    for name, inputs in zip(("on-policy", "off-policy"), batches):
        want_loss, want_grads = loss_and_grads(stock, inputs)
        got_loss, got_grads = loss_and_grads(ours, inputs)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7, msg=f"{name}: loss")
        assert want_grads.keys() == got_grads.keys()
        assert any(g.abs().max() > 0 for g in want_grads.values()), "degenerate case: no gradient at all"
        for param, want in want_grads.items():
            torch.testing.assert_close(got_grads[param], want, rtol=1e-4, atol=1e-7, msg=f"{name}: grad {param}")
        assert_same_metrics(ours._metrics["train"], stock._metrics["train"], name)
    logged = stock._metrics["train"]
    assert "entropy" in logged and ("kl" in logged) == (beta != 0)
    # the off-policy batch really exercises the clipping / weighting (otherwise the metric comparison proves
    # little); with delta <= 1 + epsilon_high TRL's high-clip count is 0 by construction, and at sequence
    # level the low side alone may not fire on this batch
    if loss_type == "vespo":
        assert logged["vespo/phi_seq_mean"][-1] != pytest.approx(1.0, abs=1e-3)
    elif loss_type != "sapo" and not (level == "sequence" and extra.get("delta", math.inf) <= 1.28):
        assert logged["cispo_clip_ratio" if loss_type == "cispo" else "clip_ratio/region_mean"][-1] > 0


def assert_same_metrics(ours: dict, stock: dict, name: str) -> None:
    """Every metric TRL's _compute_loss logged, by name, with the same values (NaN where TRL has NaN)."""
    assert set(ours) == set(stock), f"{name}: metric names {sorted(ours)} != TRL's {sorted(stock)}"
    for metric, want in stock.items():
        got = ours[metric]
        assert len(got) == len(want), f"{name}: {metric}"
        for g, w in zip(got, want):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-5, abs=1e-6), \
                f"{name}: {metric} {got} != TRL's {want}"


def test_three_training_steps(model_dir, tmp_path):
    trainer = make_trainer(WZGRPOTrainer, model_dir, tmp_path, beta=0.04, gradient_accumulation_steps=1,
                           learning_rate=1e-3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    assert trainer.state.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(x)) for x in losses)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in changed and len(changed) > len(before) // 2


# The vLLM importance-sampling correction: TRL multiplies the policy term by inputs["importance_sampling_ratio"]
# ([B, T] in its token modes, [B, 1] in its sequence modes; 0 where a *_mask mode rejected a token). vLLM cannot
# run here, so both trainers get the flags use_vllm=True sets and the ratio TRL's generation would add.
VLLM_IS_CASES = [  # (loss_type, importance_sampling_level, beta, ratio shape, extra config)
    ("grpo", "token", 0.0, "token", {}),
    ("dapo", "sequence", 0.05, "token", {"use_bias_correction_kl": True}),
    ("cispo", "token", 0.05, "sequence", {"epsilon_high": 1.05}),
    ("sapo", "sequence", 0.0, "token", {}),
    ("bnpo", "token", 0.0, "sequence", {"top_entropy_quantile": 0.5, "off_policy_mask_threshold": 0.02}),
]


@pytest.mark.parametrize("loss_type,level,beta,ratio_shape,extra", VLLM_IS_CASES,
                         ids=[f"{c[0]}-{c[1]}-beta{c[2]}-{c[3]}_ratio" for c in VLLM_IS_CASES])
def test_vllm_importance_sampling_correction_matches_trl(model_dir, batches, tmp_path, loss_type, level, beta,
                                                         ratio_shape, extra):
    config = dict({"loss_type": loss_type, "importance_sampling_level": level, "beta": beta}, **extra)
    stock = make_trainer(GRPOTrainer, model_dir, tmp_path / "stock", **config)
    ours = make_trainer(WZGRPOTrainer, model_dir, tmp_path / "ours", **config)
    for trainer in (stock, ours):
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    inputs = copy.copy(batches[1])  # with vLLM, TRL always has old log-probs
    b, t = inputs["completion_ids"].shape
    ratio = 0.3 + 1.5 * torch.rand(b, t if ratio_shape == "token" else 1, generator=torch.Generator().manual_seed(3))
    ratio[1, 0] = 0.0  # a token (or a whole sequence) a *_mask mode rejected
    inputs["importance_sampling_ratio"] = ratio
    want_loss, want_grads = loss_and_grads(stock, inputs)
    got_loss, got_grads = loss_and_grads(ours, inputs)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7)
    for param, want in want_grads.items():
        torch.testing.assert_close(got_grads[param], want, rtol=1e-4, atol=1e-7, msg=f"grad {param}")
    assert_same_metrics(ours._metrics["train"], stock._metrics["train"], "vllm-is")
    # the ratio really enters: without it (the flag off) TRL's loss differs
    stock.vllm_importance_sampling_correction = False
    assert not torch.allclose(loss_and_grads(stock, inputs)[0], want_loss)


def test_vllm_importance_sampling_correction_with_vespo_is_refused():
    from wz_engine.integrations.trl import unsupported_options

    args = {"output_dir": "unused", "use_cpu": True, "bf16": False, "use_vllm": True}
    assert unsupported_options(GRPOConfig(loss_type="grpo", vllm_importance_sampling_correction=True, **args)) == []
    problems = unsupported_options(GRPOConfig(loss_type="vespo", vllm_importance_sampling_correction=True, **args))
    assert len(problems) == 1 and "vllm_importance_sampling_correction" in problems[0]
    assert unsupported_options(GRPOConfig(loss_type="vespo", vllm_importance_sampling_correction=False, **args)) == []


@pytest.mark.parametrize("option,value", [
    ("importance_sampling_level", "sequence_token"),
    ("entropy_coef", 0.01), ("use_adaptive_entropy", True), ("cast_lm_head_to_fp32", True),
])
def test_unsupported_option_is_a_clear_error(model_dir, tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        make_trainer(WZGRPOTrainer, model_dir, tmp_path, **{option: value})


def test_dapo_normaliser_matches_trl_formula():
    norm = trl_loss_normalisation("dapo", num_sequences=4, max_completion_length=8, num_items_in_batch=torch.tensor(30),
                                  num_processes=2, grad_accum_steps=4, steps_per_generation=2, training=True)
    assert norm.agg == "token-mean" and float(norm.global_tokens) == pytest.approx(30 / 2 * 4 / 2)
    assert norm.divisor == 1.0
    evaluation = trl_loss_normalisation("grpo", num_sequences=4, max_completion_length=8, num_items_in_batch=None,
                                        num_processes=1, grad_accum_steps=4, steps_per_generation=4, training=False)
    assert evaluation.divisor == 1.0 and evaluation.global_seqs == 4
    luspo = trl_loss_normalisation("luspo", num_sequences=4, max_completion_length=8, num_items_in_batch=None,
                                   num_processes=1, grad_accum_steps=4, steps_per_generation=4, training=True)
    assert (luspo.agg, luspo.global_seqs, luspo.divisor) == ("seq-mean-token-sum", 4.0, 4.0)
    with pytest.raises(ValueError, match="loss_type"):
        trl_loss_normalisation("gspo", num_sequences=1, max_completion_length=1, num_items_in_batch=None,
                               num_processes=1, grad_accum_steps=1, steps_per_generation=1, training=True)


def test_peft_lora_matches_trl(model_dir, batches, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    stock = make_trainer(GRPOTrainer, model_dir, tmp_path / "stock", loss_type="dapo", beta=0.05)
    stock.model = peft.get_peft_model(stock.model, lora)  # as TRL does with peft_config, on identical weights
    ours = make_trainer(WZGRPOTrainer, model_dir, tmp_path / "ours", loss_type="dapo", beta=0.05)
    ours.model = peft.get_peft_model(ours.model, copy.deepcopy(lora))
    ours.model.load_state_dict(stock.model.state_dict())
    with torch.no_grad():  # non-zero B so that A gets a gradient too
        for a, b in zip(stock.model.parameters(), ours.model.parameters()):
            if a.requires_grad:
                a.normal_(0, 0.1, generator=torch.Generator().manual_seed(a.numel()))
                b.copy_(a)
    for inputs in batches:
        want_loss, want = loss_and_grads(stock, inputs)
        got_loss, got = loss_and_grads(ours, inputs)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7)
        assert want and all("lora_" in name for name in want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


def test_default_bf16_autocast_agrees_to_bf16_rounding(model_dir, batches, tmp_path):
    """TRL's default bf16=True autocasts its LM head to bf16 on CPU; ours computes the head in the weight's dtype
    (fp32 here), so the two agree to bf16 rounding, not to fp32 precision."""
    stock = make_trainer(GRPOTrainer, model_dir, tmp_path / "stock", beta=0.05, bf16=True)
    ours = make_trainer(WZGRPOTrainer, model_dir, tmp_path / "ours", beta=0.05, bf16=True)
    want_loss, want = loss_and_grads(stock, batches[1])
    got_loss, got = loss_and_grads(ours, batches[1])
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-3, atol=1e-5)
    for name in want:
        scale = want[name].abs().max()
        assert (got[name] - want[name]).abs().max() <= 3e-2 * scale + 1e-7, name


def test_on_policy_beta_zero_is_one_fused_pass(monkeypatch):
    """On-policy with beta = 0 at token level runs only `fused_linear_policy_loss(old_logprobs=None)`: no
    separate `fused_linear_logprobs` sweep (loss / grads vs TRL: test_loss_and_grads_match_trl)."""
    from wz_engine.integrations import trl_loss

    def no_second_pass(*args, **kwargs):
        raise AssertionError("fused_linear_logprobs called on the one-pass route")

    monkeypatch.setattr(trl_loss._logprob, "fused_linear_logprobs", no_second_pass)
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(17, 8, generator=g)
    targets, seq_ids = torch.randint(0, 17, (6,), generator=g), torch.tensor([0, 0, 0, 1, 1, 2])
    norm = trl_loss.trl_loss_normalisation("grpo", num_sequences=3, max_completion_length=4,
                                           num_items_in_batch=None, num_processes=1, grad_accum_steps=1,
                                           steps_per_generation=1, training=True)
    for objective in (trl_loss.TRLObjective(), trl_loss.TRLObjective("cispo", epsilon_high=5.0),
                      trl_loss.TRLObjective(delta=1.1), trl_loss.TRLObjective("sapo")):
        advantages = torch.randn(6, generator=g)
        loss, metrics, _ = trl_loss.fused_grpo_loss(hidden, weight, targets, None, advantages, seq_ids,
                                                    norm=norm, objective=objective)
        assert torch.isfinite(loss) and float(metrics["ratio_mean"]) == 1.0
