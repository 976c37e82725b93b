"""GenRM on a tiny real HF model through HFSampler, and the three weight-sharing options.

A random-init Qwen2 writes gibberish: the invalid path must run end to end without a crash. The
weight-sharing tests check what each option does to the policy module and measure the extra
parameter memory each costs (printed; run with -s to see it).
"""

import copy

import pytest
import torch

from wz_engine.demo.tiny import build_tiny_qwen2, build_tokenizer
from wz_engine.judge import Comparison, GenRM, GenRMConfig, PairwiseRequest, judge_metrics
from wz_engine.judge.sharing import AdapterScopedSampler, build_judge_engine, param_bytes

peft = pytest.importorskip("peft")

CFG = dict(max_new_tokens=6, temperature=1.0, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["Scores: A=7, B=4. Write a story about the sea. principles critique"] * 4, 320)


@pytest.fixture
def policy(tokenizer):
    return build_tiny_qwen2(len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1, seed=1,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _logits(model, ids=((5, 9, 14, 3),)):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


@pytest.fixture
def lora_dir(tmp_path, policy):
    """A LoRA adapter with non-zero B (init_lora_weights=False) saved to disk, made on a copy."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(policy), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model


def test_gibberish_judge_end_to_end(tokenizer, policy):
    engine = build_judge_engine(GenRMConfig(), policy, tokenizer)
    genrm = GenRM(engine.sampler, tokenizer, GenRMConfig(votes=2, **CFG))
    results = genrm.compare([Comparison("Write a story.", "The sea.", "A boat."), Comparison("q", "a", "b")])
    judgements = [j for r in results for j in r.judgements]
    assert len(judgements) == 8 and genrm.last_stats.generate_calls == 1
    assert all(not j.valid and j.score_x is None and j.winner is None for j in judgements)
    assert all(isinstance(j.raw, str) for j in judgements) and any(j.raw for j in judgements)
    assert {r.outcome for r in results} == {"invalid"}
    assert judge_metrics([j.verdict for j in judgements])["judge/invalid_rate"] == 1.0
    for mode in ("reference", "pointwise"):  # the other modes go through the same path
        g = GenRM(engine.sampler, tokenizer, GenRMConfig(mode=mode, **CFG))
        [v] = g.judge([PairwiseRequest("q", "a", "b", reference="gold")])
        assert not v.valid


def test_self_sharing_is_the_live_module(tokenizer, policy):
    engine = build_judge_engine(GenRMConfig(weight_sharing="self"), policy, tokenizer)
    assert engine.model is policy and engine.sampler.model is policy and engine.extra_bytes == 0
    print(f"\n[weight sharing] self: extra parameter bytes = {engine.extra_bytes}")


def test_lora_sharing(tokenizer, policy, lora_dir):
    path, peft_model = lora_dir
    base_logits = _logits(policy)
    base_param_ids = {id(p) for p in policy.parameters()}
    policy.train()
    engine = build_judge_engine(GenRMConfig(weight_sharing="lora", lora_path=str(path)), policy, tokenizer)
    assert engine.model is policy and isinstance(engine.sampler, AdapterScopedSampler)

    # the base weights are the same tensors, still trainable; the adapter is frozen
    names = dict(policy.named_parameters())
    lora = {n: p for n, p in names.items() if "lora_" in n}
    assert base_param_ids <= {id(p) for p in policy.parameters()}
    assert lora and all(not p.requires_grad for p in lora.values())
    assert all(p.requires_grad for n, p in names.items() if "lora_" not in n)

    # extra memory = the adapter: r * (in + out) floats per targeted projection
    cfg = policy.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_out, v_out = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    expected = cfg.num_hidden_layers * 4 * ((cfg.hidden_size + q_out) + (cfg.hidden_size + v_out)) * 4
    assert engine.extra_bytes == expected == sum(p.numel() * p.element_size() for p in lora.values())
    print(f"\n[weight sharing] lora: extra parameter bytes = {engine.extra_bytes} "
          f"({engine.extra_bytes / param_bytes(policy):.2%} of the policy)")

    # adapter off by default: the policy computes exactly what it did before
    torch.testing.assert_close(_logits(policy), base_logits, rtol=0, atol=0)
    # inside the judge scope the adapter is on and matches peft's own model of the same adapter
    with engine.sampler.adapter_enabled():
        judge_logits = _logits(policy)
    torch.testing.assert_close(judge_logits, _logits(peft_model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(judge_logits, base_logits)
    torch.testing.assert_close(_logits(policy), base_logits, rtol=0, atol=0)

    # the judge path runs through the scoped sampler and leaves the adapter disabled afterwards
    genrm = GenRM(engine.sampler, tokenizer, GenRMConfig(**CFG))
    assert len(genrm.judge([PairwiseRequest("q", "a", "b")])) == 1
    torch.testing.assert_close(_logits(policy), base_logits, rtol=0, atol=0)

    # gradients still reach the base weights, not the adapter
    policy.train()
    policy(torch.tensor([[5, 9, 14]])).logits.sum().backward()
    assert all(p.grad is None for p in lora.values())
    assert names["model.layers.0.self_attn.q_proj.base_layer.weight"].grad is not None


def test_checkpoint_sharing(tokenizer, policy, tmp_path):
    judge = build_tiny_qwen2(len(tokenizer), hidden_size=48, intermediate_size=96, num_layers=2, seed=7,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    judge.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    config = GenRMConfig(weight_sharing="checkpoint", checkpoint_path=str(tmp_path / "judge"), **CFG)
    engine = build_judge_engine(config, policy, tokenizer)
    assert engine.model is not policy and not any(p.requires_grad for p in engine.model.parameters())
    # float32 parameters (no tied weights) + buffers (rotary inv_freq)
    expected = sum(t.numel() for t in [*judge.parameters(), *judge.buffers()]) * 4
    assert engine.extra_bytes == expected
    torch.testing.assert_close(_logits(engine.model), _logits(judge), rtol=0, atol=0)
    print(f"\n[weight sharing] checkpoint: extra parameter bytes = {engine.extra_bytes} "
          f"(policy: {param_bytes(policy)})")
    genrm = GenRM(engine.sampler, engine.tokenizer, config)
    [v] = genrm.judge([PairwiseRequest("q", "a", "b")])
    assert not v.valid
    with pytest.raises(ValueError, match="checkpoint_path"):
        build_judge_engine(GenRMConfig(weight_sharing="checkpoint", checkpoint_path=str(tmp_path / "nope")),
                           policy, tokenizer)
