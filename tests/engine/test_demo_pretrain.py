"""The demo's base model (wz_engine/demo/pretrain.py): its corpus writes on topic for a topic drawn
independently of the prompt, the loss covers only the answer, and the build is deterministic."""

import random
from collections import Counter

import pytest
import torch

from wz_engine.config import TinyModelConfig
from wz_engine.demo.judge import LEXICONS, TOPICS, VOCABULARY, is_on_topic, topic_of
from wz_engine.demo.pretrain import PretrainConfig, _encode, build_base_model, chat_corpus, write_sentence
from wz_engine.demo.prompts import load_demo_prompts


@pytest.mark.parametrize("topic", sorted(TOPICS))
def test_sentences_are_on_their_topic_and_use_only_judge_words(topic):
    rng = random.Random(7)
    for _ in range(200):
        sentence = write_sentence(topic, rng)
        words = sentence.rstrip(".").split()
        assert sentence.endswith(".") and 3 <= len(words) <= 8, sentence
        assert set(words) <= VOCABULARY, sentence
        on = {w for w in words if w in LEXICONS[topic]}
        assert len(on) >= 2 and not any(w in LEXICONS[t] for t in TOPICS if t != topic for w in words), sentence
        assert is_on_topic(f"Write about the {topic}.", sentence)


def test_answer_topic_is_independent_of_the_prompt():
    prompts = [r["prompt"] for r in load_demo_prompts()]
    docs = chat_corpus(prompts, 6000, seed=3)
    pairs = Counter((topic_of(p), next(t for t in TOPICS if is_on_topic(f"the {t}", a))) for p, a in docs)
    assert len(pairs) == len(TOPICS) ** 2  # every answer topic follows every prompt topic
    same = sum(n for (pt, at), n in pairs.items() if pt == at) / len(docs)
    assert abs(same - 1 / len(TOPICS)) < 0.03  # chance: 1/6 (binomial sd 0.005)
    assert chat_corpus(prompts, 50, seed=3) == docs[:50]  # seeded


@pytest.fixture(scope="module")
def tokenizer():
    from wz_engine.demo.judge import corpus
    from wz_engine.demo.tiny import build_tokenizer

    return build_tokenizer(corpus(), vocab_size=320, full_byte_alphabet=False)


def test_loss_covers_the_answer_and_its_end_of_turn_only(tokenizer):
    ids, labels = _encode(tokenizer, "Write about the sea.", "the blue wave.")
    assert len(ids) == len(labels)
    answer = [i for i, y in zip(ids, labels) if y != -100]
    assert answer == [y for y in labels if y != -100]  # labels are the ids themselves (transformers shifts)
    assert tokenizer.decode(answer) == "the blue wave.<|im_end|>"
    head = tokenizer.apply_chat_template([{"role": "user", "content": "Write about the sea."}], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer.decode(ids[: len(ids) - len(answer)]) == tokenizer.decode(tokenizer(head)["input_ids"])


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_build_is_deterministic_and_learns(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [r["prompt"] for r in load_demo_prompts()][:72]
    cfg = PretrainConfig(steps=25, batch_size=16, documents=400)
    tiny = TinyModelConfig(vocab_size=320, full_byte_alphabet=False, seed=5)
    torch.set_num_threads(1)
    a = build_base_model(tiny, prompts, tmp_path / "a", cfg)
    b = build_base_model(tiny, prompts, tmp_path / "b", cfg)
    other = build_base_model(TinyModelConfig(vocab_size=320, full_byte_alphabet=False, seed=6), prompts,
                             tmp_path / "c", cfg)
    wa, wb, wc = (_weights(tmp_path / n) for n in "abc")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert a == b and a["loss_last"] < a["loss_first"] - 1.0 and other["tiny"]["seed"] == 6
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))  # a plain HF model directory
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert lm.config.vocab_size == len(tok) and tok.chat_template and (tmp_path / "a" / "pretrain.json").is_file()
