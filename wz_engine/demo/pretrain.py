"""The demo's base model: a tiny Qwen2 pretrained (seconds on CPU) to write, but not to follow the prompt.

Real RL post-training starts from a model that already writes. The demo's base is the tiny model
language-model-trained on chat documents whose answer is a short sentence about a topic drawn at RANDOM,
independent of the prompt: it learns the vocabulary, the 4-10 word form and to end its turn, and writes
on topic for some topic, the prompt's one about 1/T of the time (T topics). Which topic to write about
given the prompt is what RL has to learn (a contextual choice the judge pays for).
Deterministic given the seed: the same seed builds the same weights.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wz_engine.demo.judge import FUNCTION_WORDS, LEXICONS, TOPICS

MODIFIERS = ["the", "the", "a", "its", "my", "all"]
ADJECTIVES = ["soft", "old", "slow", "bright"]
LINKS = ["and", "in", "on", "with", "under", "over", "by", "through", "from", "into", "of", "as"]
THIRD_WORD = 0.6  # share of sentences with a third topic word away from the pair (its topic needs attention)
assert set(MODIFIERS + ADJECTIVES + LINKS) <= set(FUNCTION_WORDS)  # every word one the judge knows


@dataclass
class PretrainConfig:
    """How the demo's base model is pretrained (on top of `model.tiny`'s shape and seed)."""

    steps: int = 150
    """Optimizer steps. Around step 100-150 the model learns to keep a sentence on one topic across words
    that are not side by side (by attention); a base with that skill learns to follow the prompt much faster."""
    batch_size: int = 128
    """Documents per step."""
    lr: float = 5e-3
    """Peak AdamW learning rate (linear warmup over 10 steps, then linear decay to 10%)."""
    documents: int = 4096
    """Chat documents in the corpus (prompt, sentence about a random topic)."""


def write_sentence(topic: str, rng: random.Random) -> str:
    """A 3-8 word sentence with 2-3 distinct words of `topic`'s lexicon, the first two side by side (as an
    adjective and its noun would be), e.g. "the old dream owl." or "my soft snow ice under the white frost."."""
    lexicon = sorted(LEXICONS[topic])
    pair = rng.sample(lexicon, 2)
    words = [rng.choice(MODIFIERS)] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.4 else []) + pair
    if rng.random() < THIRD_WORD:
        words += [rng.choice(LINKS), rng.choice(MODIFIERS)] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else [])
        words.append(rng.choice([w for w in lexicon if w not in pair]))
    return " ".join(words) + "."


def chat_corpus(prompts: list[str], documents: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: each prompt drawn from `prompts`, each answer about a uniformly random topic,
    drawn independently of the prompt."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    return [(rng.choice(prompts), write_sentence(rng.choice(topics), rng)) for _ in range(documents)]


def _encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """-> (input ids, labels): the rendered chat; loss only on the answer and the end-of-turn token."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return head_ids + answer_ids, [-100] * len(head_ids) + answer_ids


def pretrain(model, tokenizer, documents: list[tuple[str, str]], cfg: PretrainConfig, seed: int) -> list[float]:
    """Language-model training of `model` (in place) on `documents`; -> the loss of every step."""
    encoded = [_encode(tokenizer, p, a) for p, a in documents]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / max(cfg.steps, 1)))
    pad = tokenizer.pad_token_id
    losses = []
    model.train()
    for _ in range(cfg.steps):
        batch = rng.sample(encoded, cfg.batch_size)
        width = max(len(ids) for ids, _ in batch)  # right-padded; pads are masked out of attention and loss
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])  # [B, T]
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])  # [B, T]
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])  # [B, T]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_base_model(tiny, prompts: list[str], out_dir: str | Path, cfg: PretrainConfig | None = None) -> dict:
    """Build the tokenizer and the tiny Qwen2 of `tiny` (a `TinyModelConfig`), pretrain it on a corpus over
    `prompts`, and save both to `out_dir` as an HF model directory; -> a record of how (also written to
    `out_dir/pretrain.json`). Seeds: `tiny.seed` for the weights, the corpus and the batches."""
    import json

    from wz_engine.demo.judge import corpus
    from wz_engine.demo.tiny import _seeded, build_tiny_qwen2, build_tokenizer

    cfg = cfg or PretrainConfig()
    tokenizer = build_tokenizer(corpus(), vocab_size=tiny.vocab_size, full_byte_alphabet=tiny.full_byte_alphabet)
    model = build_tiny_qwen2(len(tokenizer), hidden_size=tiny.hidden_size, num_layers=tiny.num_layers,
                             num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads,
                             intermediate_size=tiny.intermediate_size, seed=tiny.seed,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with _seeded(tiny.seed):
        losses = pretrain(model, tokenizer, chat_corpus(prompts, cfg.documents, tiny.seed), cfg, tiny.seed)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    record = {"pretrain": asdict(cfg), "tiny": asdict(tiny), "loss_first": losses[0] if losses else None,
              "loss_last": losses[-1] if losses else None}
    (out / "pretrain.json").write_text(json.dumps(record, indent=2))
    return record
