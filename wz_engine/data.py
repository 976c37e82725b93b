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


class DataError(ValueError):
    """The prompt data is unreadable or malformed; the message names the file and line (or dataset row)."""


def load_rows(cfg: DataConfig) -> list[dict]:
    """Raw rows, each checked by `check_row` (a usable prompt, an optional string reference)."""
    if cfg.path == "demo":
        from wz_engine.demo.prompts import load_demo_prompts

        located = [(f"demo prompt {i}", row) for i, row in enumerate(load_demo_prompts())]
    elif cfg.path.startswith("hf:"):
        name = cfg.path[3:]
        located = [(f"dataset {name!r} split {cfg.split!r} row {i}", row)
                   for i, row in enumerate(load_hf_rows(name, cfg.split))]
    else:
        located = read_jsonl(cfg.path)
    if not located:
        raise DataError(f"data.path: {cfg.path!r} holds no prompts")
    for where, row in located:
        check_row(row, cfg, where)
    return [row for _, row in located]


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """(`path:line`, object) for each non-blank line of a JSONL file; errors name `path:line` (1-based)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: no such file {str(path)!r} (or use 'demo' / 'hf:<name>')")
    rows = []
    with path.open("rb") as f:  # bytes, so a bad UTF-8 sequence can name its line too
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON: {e.msg} (column {e.colno}); each line must hold "
                                "one JSON object, e.g. {\"prompt\": \"...\"}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {_json_type(row)}")
            rows.append((where, row))
    return rows


def load_hf_rows(name: str, split: str) -> list[dict]:
    """Rows of a `datasets` dataset split; a failure names the dataset and the split."""
    try:
        import datasets
    except ImportError:
        from wz_engine.optional_deps import pip_line

        raise DataError(f"data.path = 'hf:{name}' needs the datasets package: {pip_line('datasets')}") from None
    try:
        return [dict(r) for r in datasets.load_dataset(name, split=split)]
    except Exception as e:  # network, missing dataset, unknown split, ...: say which load failed
        raise DataError(f"data.path: loading dataset {name!r} split {split!r} (data.split) failed: "
                        f"{type(e).__name__}: {e}") from e


def check_row(row: dict, cfg: DataConfig, where: str) -> None:
    """Raise a DataError naming `where` unless the row holds a usable prompt (and a string reference)."""
    if cfg.prompt_field not in row:
        raise DataError(f"{where}: no {cfg.prompt_field!r} field (data.prompt_field); the row has {sorted(row)}")
    prompt = row[cfg.prompt_field]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: {cfg.prompt_field!r} is empty")
    elif isinstance(prompt, list):
        if not prompt:
            raise DataError(f"{where}: {cfg.prompt_field!r} is an empty message list")
        for k, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: {cfg.prompt_field!r} message {k} must be "
                                f"{{\"role\": str, \"content\": str}}, got {json.dumps(m)[:80]}")
        if not prompt[-1]["content"].strip():
            raise DataError(f"{where}: {cfg.prompt_field!r} ends with an empty message")
    else:
        raise DataError(f"{where}: {cfg.prompt_field!r} must be a string or a list of chat messages, "
                        f"got {_json_type(prompt)}")
    reference = row.get(cfg.reference_field)
    if reference is not None and not isinstance(reference, str):
        raise DataError(f"{where}: {cfg.reference_field!r} (data.reference_field) must be a string, "
                        f"got {_json_type(reference)}")


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


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
                raise DataError(f"data.max_prompt_tokens: prompt {uid} has {len(ids)} tokens "
                                f"> {cfg.max_prompt_tokens} (set data.overlong = 'filter' to drop it)")
            filtered += 1
            continue
        user_text = messages[-1]["content"] if isinstance(content, list) else content
        prompts.append(Prompt(uid, user_text, tuple(ids), row.get(cfg.reference_field)))
    if filtered:
        log.warning("data: filtered %d prompt(s) longer than data.max_prompt_tokens=%d", filtered,
                    cfg.max_prompt_tokens)
    if not prompts:
        raise DataError("data: every prompt was filtered as over-long; raise data.max_prompt_tokens")
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
