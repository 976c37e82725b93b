"""Why a judge's verdicts are invalid, and whether its prompts fit the model (`wz judge eval`'s report).

- `invalid_reasons(records)`: per reason, the count and one example output, truncated to its end
  (the verdict line the parser looks for is the last line, so the tail is what explains the reason).
- `context_length(model, tokenizer)` and `context_overflow(...)`: judge prompts whose tokens plus the
  generation budget exceed the model's context, which cuts verdicts off (they then parse as invalid).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from wz_engine.judge.base import INVALID_REASONS
from wz_engine.judge.metrics import JudgementRecord

EXAMPLE_CHARS = 160


def truncate_example(text: str, limit: int = EXAMPLE_CHARS) -> str:
    """The last `limit` characters on one line (newlines shown as \\n), "..." marking the cut."""
    flat = text.replace("\r", "").replace("\n", "\\n")
    return flat if len(flat) <= limit else "..." + flat[-limit:]


def invalid_reasons(records: Sequence[JudgementRecord]) -> dict[str, dict]:
    """{reason: {"count", "meaning", "example"}} over the invalid records, most frequent first."""
    invalid = [r for r in records if not r.verdict.valid]
    counts = Counter(r.reason or "invalid" for r in invalid)
    examples = {}
    for r in invalid:
        examples.setdefault(r.reason or "invalid", r.verdict.raw)
    return {reason: {"count": n, "meaning": INVALID_REASONS.get(reason, ""),
                     "example": truncate_example(examples[reason])}
            for reason, n in counts.most_common()}


def format_invalid_reasons(summary: dict[str, dict], total: int) -> str:
    """A block for the terminal: one line per reason (count, share, meaning), then its example."""
    if not summary:
        return ""
    n_invalid = sum(s["count"] for s in summary.values())
    lines = [f"invalid verdicts: {n_invalid} of {total}, by reason"]
    width = max(len(reason) for reason in summary)
    for reason, s in summary.items():
        lines.append(f"  {reason:<{width}}  {s['count']:>6}  {s['meaning']}")
        lines.append(f"  {'':<{width}}  e.g. {s['example']!r}")
    return "\n".join(lines)


def context_length(model, tokenizer=None) -> int | None:
    """The model's context in tokens: `config.max_position_embeddings`, else a real (not placeholder)
    `tokenizer.model_max_length`; None when neither says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**8 else None  # transformers' "unset" is ~1e30


@dataclass(frozen=True)
class ContextOverflow:
    prompts: int
    """Judge prompts checked."""
    over: int
    """Prompts whose tokens + max_new_tokens exceed the context."""
    prompt_over: int
    """Prompts that alone exceed the context."""
    longest: int
    """Tokens of the longest prompt."""
    context: int
    max_new_tokens: int

    def message(self) -> str:
        text = (f"warning: {self.over} of {self.prompts} judge prompts plus --max-new-tokens {self.max_new_tokens} "
                f"exceed the model's context of {self.context} tokens (longest prompt: {self.longest} tokens)")
        if self.prompt_over:
            text += f"; {self.prompt_over} prompts exceed it on their own"
        return text + ("; their verdicts can be cut off and count as invalid. Lower --max-new-tokens, shorten "
                       "the data, or use a model with a longer context.")


def context_overflow(prompt_tokens: Sequence[int], max_new_tokens: int, context: int) -> ContextOverflow | None:
    """A ContextOverflow when any prompt plus the generation budget exceeds `context`, else None."""
    over = sum(n + max_new_tokens > context for n in prompt_tokens)
    if not over:
        return None
    return ContextOverflow(len(prompt_tokens), over, sum(n > context for n in prompt_tokens), max(prompt_tokens),
                           context, max_new_tokens)
