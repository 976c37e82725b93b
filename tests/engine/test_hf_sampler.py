"""HFSampler: generate on the live module, left padding, seeds, stop handling, logprobs."""

import pytest
import torch

from wz_engine.demo.tiny import build_tiny_qwen2, build_tokenizer
from wz_engine.rollout.base import Sampler, SamplingParams
from wz_engine.rollout.hf import HFSampler


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer(["write a story about the sea and the quiet river at night"] * 8, vocab_size=300)
    model = build_tiny_qwen2(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=3)
    return model, tok


def test_protocol_shapes_seed_and_train_mode(tiny):
    model, tok = tiny
    sampler = HFSampler(model, tok)
    assert isinstance(sampler, Sampler)
    prompts = [tok("sea")["input_ids"], tok("write a story about the quiet river")["input_ids"]]
    params = SamplingParams(max_new_tokens=6, n=3, seed=7, temperature=1.0)
    model.train()
    out = sampler.generate(prompts, params)
    assert model.training  # restored
    assert [len(g) for g in out] == [3, 3]
    again = sampler.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in out] == [[c.token_ids for c in g] for g in again]
    for g in out:
        for c in g:
            assert 1 <= len(c.token_ids) <= 6
            assert c.finish_reason == ("stop" if c.token_ids[-1] == tok.eos_token_id else "length")
            assert tok.eos_token_id not in c.token_ids[:-1]
            assert c.weight_version == 0
    sampler.update_weights(model, 5)
    assert sampler.generate(prompts[:1], params)[0][0].weight_version == 5


def test_left_padding_matches_unbatched_greedy(tiny):
    model, tok = tiny
    sampler = HFSampler(model, tok)
    short, long = tok("sea")["input_ids"], tok("write a story about the quiet river at night")["input_ids"]
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    batched = sampler.generate([short, long], greedy)
    alone = [sampler.generate([p], greedy)[0][0] for p in (short, long)]
    assert [g[0].token_ids for g in batched] == [c.token_ids for c in alone]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_forward_pass(tiny, temperature):
    model, tok = tiny
    sampler = HFSampler(model, tok)
    prompt = tok("write a story about the sea")["input_ids"]
    c = sampler.generate([prompt], SamplingParams(max_new_tokens=6, seed=1, temperature=temperature,
                                                  return_logprobs=True))[0][0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + c.token_ids])).logits[0].double()
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(c.token_ids)] / temperature
    expected = torch.log_softmax(steps, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=1e-4)


def test_stop_token_ids_end_a_completion(tiny):
    model, tok = tiny
    sampler = HFSampler(model, tok)
    prompt = tok("the sea")["input_ids"]
    free = sampler.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0.0))[0][0]
    stop = free.token_ids[1]
    stopped = sampler.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0.0,
                                                        stop_token_ids=(stop,)))[0][0]
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop) + 1]
    assert stopped.finish_reason == "stop"


def test_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="prompt_ids"):
        HFSampler(model, tok).generate([[]], SamplingParams())
