"""Prompt loading, chat rendering, over-long handling, hold-out, and the resumable stream."""

import json
import re
from pathlib import Path

import pytest

from wz_engine.config import DataConfig
from wz_engine.data import DataError, PromptStream, load_rows, render_prompts, split_holdout
from wz_engine.demo.tiny import build_tokenizer

TINY = Path(__file__).with_name("tiny_run.toml")


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


# ---------------------------------------------------------------------- errors that point at the line

GOOD = '{"prompt": "a fine prompt"}'


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "unterminated}', r"not valid JSON: Unterminated string starting at \(column 12\)"),
    ('{"prompt": "x",}', r"not valid JSON: .*column"),
    ('["a list", "not an object"]', r"expected a JSON object, got a list"),
    ('{"question": "right text, wrong key"}', r"no 'prompt' field \(data.prompt_field\); the row has \['question'\]"),
    ('{"prompt": ""}', r"'prompt' is empty"),
    ('{"prompt": "   \\n "}', r"'prompt' is empty"),
    ('{"prompt": 42}', r"'prompt' must be a string or a list of chat messages, got a number"),
    ('{"prompt": null}', r"'prompt' must be a string or a list of chat messages, got null"),
    ('{"prompt": {"text": "x"}}', r"'prompt' must be a string or a list of chat messages, got an object"),
    ('{"prompt": []}', r"'prompt' is an empty message list"),
    ('{"prompt": [{"role": "user"}]}', r"'prompt' message 0 must be \{\"role\": str, \"content\": str\}"),
    ('{"prompt": [{"role": "user", "content": " "}]}', r"'prompt' ends with an empty message"),
    ('{"prompt": "x", "reference": ["not", "text"]}', r"'reference' \(data.reference_field\) must be a string"),
])
def test_bad_line_is_named_by_file_and_line(tmp_path, bad_line, message):
    # five good lines and a blank one before the bad line: it is line 7 of the file (1-based)
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join([GOOD] * 3 + [""] + [GOOD] * 2 + [bad_line, GOOD]) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:7: {message}"):
        load_rows(DataConfig(path=str(f)))


def test_bad_utf8_and_empty_file_are_named(tmp_path):
    f = tmp_path / "bytes.jsonl"
    f.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:2: not UTF-8 text"):
        load_rows(DataConfig(path=str(f)))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no prompts"):
        load_rows(DataConfig(path=str(tmp_path / "empty.jsonl")))


def test_custom_fields_are_checked_under_their_names(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "ok", "gold": "fine"}\n{"text": "ok", "gold": 3}\n')
    cfg = DataConfig(path=str(f), prompt_field="text", reference_field="gold")
    with pytest.raises(DataError, match=r":2: 'gold' \(data.reference_field\) must be a string, got a number"):
        load_rows(cfg)


def test_hf_load_failure_names_dataset_and_split(tmp_path):
    pytest.importorskip("datasets")
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(DataError, match=rf"loading dataset '{re.escape(str(missing))}' split 'train' "
                                        r"\(data.split\) failed: \w+"):
        load_rows(DataConfig(path=f"hf:{missing}"))


def test_hf_rows_are_checked_by_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "fine"}, {"prompt": ""}]).to_json(str(d / "train.jsonl"))
    with pytest.raises(DataError, match=rf"dataset '{re.escape(str(d))}' split 'train' row 1: 'prompt' is empty"):
        load_rows(DataConfig(path=f"hf:{d}"))


def test_wz_train_reports_the_data_error_without_a_traceback(tmp_path, capsys):
    from wz_engine.cli import main

    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join([GOOD] * 5 + ['{"prompt": "oops"']) + "\n")
    rc = main(["train", str(TINY), "--set", f'data.path="{f}"', "--set", f'train.output_dir="{tmp_path / "run"}"'])
    err = capsys.readouterr().err
    assert rc == 2 and f"wz train: data error: {f}:6: not valid JSON" in err and "Traceback" not in err
