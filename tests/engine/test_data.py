"""Prompt loading, chat rendering, over-long handling, hold-out, and the resumable stream."""

import json

import pytest

from wz_engine.config import DataConfig
from wz_engine.data import PromptStream, load_rows, render_prompts, split_holdout
from wz_engine.demo.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["write a story about the sea and the quiet river"] * 4, vocab_size=300)


def test_jsonl_render_and_overlong(tmp_path, tok):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "sea", "reference": "blue"}, {"prompt": "river " * 200},
            {"prompt": [{"role": "user", "content": "a story"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(f), max_prompt_tokens=64, system_prompt="be brief")
    prompts, filtered = render_prompts(load_rows(cfg), tok, cfg)
    assert filtered == 1 and [p.uid for p in prompts] == [0, 2]
    assert prompts[0].reference == "blue" and prompts[1].text == "a story"
    text = tok.decode(list(prompts[0].token_ids))
    assert text.startswith("<|im_start|>system\nbe brief") and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="data.max_prompt_tokens: prompt 1"):
        render_prompts(load_rows(cfg), tok, DataConfig(path=str(f), max_prompt_tokens=64, overlong="error"))
    with pytest.raises(ValueError, match="data.prompt_field"):
        load_rows(DataConfig(path=str(f), prompt_field="question"))
    with pytest.raises(ValueError, match="data.path"):
        load_rows(DataConfig(path=str(tmp_path / "missing.jsonl")))


def test_stream_epochs_resume_and_holdout(tok):
    cfg = DataConfig(path="demo")
    prompts, _ = render_prompts(load_rows(cfg), tok, cfg)
    train, held = split_holdout(prompts, 32)
    assert len(held) == 32 and {p.uid for p in train}.isdisjoint({p.uid for p in held})
    a = PromptStream(train, seed=3)
    first_epoch = [p.uid for p in a.next_batch(len(train))]
    assert sorted(first_epoch) == sorted(p.uid for p in train)  # a permutation
    a.next_batch(5)
    state = a.state_dict()
    b = PromptStream(train, seed=3)
    b.load_state_dict(state)
    assert [p.uid for p in a.next_batch(70)] == [p.uid for p in b.next_batch(70)]
