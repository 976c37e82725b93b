"""Prompts: loading (JSONL, a `datasets` dataset, or the built-in demo set), chat rendering, filtering,
and a resumable, seeded stream of global batches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from wz_engine.config import DataConfig

log = logging.getLogger("wz_engine")


@dataclass(frozen=True)
class Prompt:
    uid: int
    """Stable index in the dataset (seeds BRPO's reference draw; survives shuffling and sharding)."""
    text: str
    """The user prompt as written (what the judge sees)."""
    token_ids: tuple[int, ...]
    """The prompt rendered with the chat template, generation prompt included."""
    reference: str | None = None


def load_rows(cfg: DataConfig) -> list[dict]:
    """Raw rows with at least `cfg.prompt_field`."""
    if cfg.path == "demo":
        from wz_engine.demo.prompts import load_demo_prompts

        rows = load_demo_prompts()
    elif cfg.path.startswith("hf:"):
        import datasets

        rows = [dict(r) for r in datasets.load_dataset(cfg.path[3:], split=cfg.split)]
    else:
        path = Path(cfg.path)
        if not path.is_file():
            raise ValueError(f"data.path: no such file {cfg.path!r} (or use 'demo' / 'hf:<name>')")
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"data.path: {cfg.path!r} holds no prompts")
    if cfg.prompt_field not in rows[0]:
        raise ValueError(f"data.prompt_field: {cfg.prompt_field!r} not in the rows (keys: {sorted(rows[0])})")
    return rows


def render_prompts(rows: list[dict], tokenizer, cfg: DataConfig) -> tuple[list[Prompt], int]:
    """Render every row with the chat template; returns (prompts, number filtered as over-long)."""
    prompts, filtered = [], 0
    for uid, row in enumerate(rows):
        content = row[cfg.prompt_field]
        messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
        if cfg.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            if cfg.overlong == "error":
                raise ValueError(f"data.max_prompt_tokens: prompt {uid} has {len(ids)} tokens "
                                 f"> {cfg.max_prompt_tokens} (set data.overlong = 'filter' to drop it)")
            filtered += 1
            continue
        user_text = messages[-1]["content"] if isinstance(content, list) else content
        prompts.append(Prompt(uid, user_text, tuple(ids), row.get(cfg.reference_field)))
    if filtered:
        log.warning("data: filtered %d prompt(s) longer than data.max_prompt_tokens=%d", filtered,
                    cfg.max_prompt_tokens)
    if not prompts:
        raise ValueError("data: every prompt was filtered as over-long; raise data.max_prompt_tokens")
    return prompts, filtered


def split_holdout(prompts: list[Prompt], holdout: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): the last `holdout` prompts are kept out of training."""
    if holdout < 0 or holdout >= len(prompts):
        raise ValueError(f"data.holdout: must be in [0, {len(prompts)}), got {holdout}")
    return (prompts[: len(prompts) - holdout], prompts[len(prompts) - holdout :]) if holdout else (prompts, [])


class PromptStream:
    """Endless stream of global batches: a fresh seeded permutation every epoch.

    `state_dict()` is the data position (epoch, index) saved in checkpoints, so a resumed run sees
    exactly the prompts the uninterrupted run would have.
    """

    def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True):
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_batch(self, size: int) -> list[Prompt]:
        out = []
        while len(out) < size:
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            out.append(self.prompts[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
