"""The data that ships with the repository: the writing prompts the example configs train on, and the
format examples the README shows, each read through the real loaders."""

from pathlib import Path

import pytest
import tomllib

from wz_engine.config import DataConfig
from wz_engine.data import load_rows, render_prompts
from wz_engine.demo.tiny import build_tokenizer
from wz_engine.judge.eval import load_pairs

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "data" / "writing_prompts.jsonl"
EXAMPLES = ROOT / "data" / "examples"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([PROMPTS.read_text()], vocab_size=400)


def test_writing_prompts_load_render_and_are_distinct(tokenizer):
    cfg = DataConfig(path=str(PROMPTS), max_prompt_tokens=4096)
    rows = load_rows(cfg)
    assert len(rows) >= 200
    assert all(set(row) == {"prompt"} and isinstance(row["prompt"], str) for row in rows)
    texts = [row["prompt"] for row in rows]
    assert len({t.strip().lower() for t in texts}) == len(texts)  # no duplicates, even up to case
    assert all(20 <= len(t) <= 200 and t == t.strip() for t in texts)
    # varied: many different opening words and forms, not one template
    assert len({t.split()[0] for t in texts}) >= 3 and len({" ".join(t.split()[:3]) for t in texts}) >= 20
    prompts, filtered = render_prompts(rows, tokenizer, cfg)
    assert filtered == 0 and [p.text for p in prompts] == texts


def test_example_configs_point_at_shipped_data():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        data_path = tomllib.loads(path.read_text()).get("data", {}).get("path", "demo")
        if data_path != "demo" and not data_path.startswith("hf:"):
            assert (ROOT / data_path).is_file(), f"{path.name}: data.path {data_path!r} does not exist"
            assert load_rows(DataConfig(path=str(ROOT / data_path)))


def test_license_is_stated():
    readme = (ROOT / "data" / "README.md").read_text()
    assert "writing_prompts.jsonl" in readme and "CC0" in readme


def test_chat_and_system_prompt_examples(tokenizer):
    cfg = DataConfig(path=str(EXAMPLES / "chat_prompts.jsonl"), system_prompt="Be vivid.", max_prompt_tokens=4096)
    rows = load_rows(cfg)
    prompts, _ = render_prompts(rows, tokenizer, cfg)
    decoded = [tokenizer.decode(list(p.token_ids)) for p in prompts]
    # a row that brings its own system message keeps it; the others get data.system_prompt
    assert rows[0]["prompt"][0]["role"] == "system" and "Be vivid." not in decoded[0]
    assert decoded[1].startswith("<|im_start|>system\nBe vivid.") and "assistant\nWhat would you like" in decoded[1]
    assert prompts[1].text == rows[1]["prompt"][-1]["content"]  # the judge sees the last user turn


def test_reference_examples_carry_their_reference(tokenizer):
    cfg = DataConfig(path=str(EXAMPLES / "reference_prompts.jsonl"))
    prompts, _ = render_prompts(load_rows(cfg), tokenizer, cfg)
    assert len(prompts) == 3 and all(p.reference for p in prompts)


def test_preference_pair_examples_load_in_judge_eval():
    pairs = load_pairs(EXAMPLES / "preference_pairs.jsonl")
    assert [p.prompt for p in pairs] == ["Write one sentence describing a thunderstorm.",
                                         "Write a haiku about the sea.",
                                         "Give a title for a story about a lost dog finding its way home."]
    assert all(p.chosen and p.rejected and p.chosen != p.rejected for p in pairs)
