"""A scalar reward model (AutoModelForSequenceClassification): Writing-Zero's pointwise baseline."""

from __future__ import annotations

from typing import Sequence

import torch


class ScalarRewardModel:
    """Scores (prompt, response) chats with a sequence classifier's first logit.

    The chat is rendered with the reward model's own chat template (user turn, assistant turn).
    """

    def __init__(self, path: str, device: torch.device | str = "cpu", batch_size: int = 16,
                 dtype: torch.dtype = torch.float32, model=None, tokenizer=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model or AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], references=None) -> list[float]:
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            for p, r in zip(prompts, responses)
        ]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(device)
            logits = self.model(**enc).logits  # [b, num_labels]
            out.extend(logits[:, 0].float().tolist())
        return out
