"""Synthetic preference pairs with a checkable label: a tiny GenRM can learn them by RL on CPU.

Each prompt asks for writing about a topic of the demo (`wz_engine.demo.judge.TOPICS`); the chosen
response is on topic (it contains the topic's own word, the prompt's key word, with two words of its
lexicon), the rejected one is about another topic (its word and two of its words). `keyword_judge`
is that rule as a programmatic judge: the label's independent check, and the ceiling a judge can reach
(`wz judge eval --judge wz_engine.demo.pairs:keyword_judge --data PAIRS`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from wz_engine.demo.judge import TOPICS

PROMPT_FORM = "Write about the {topic}."
_WORD = re.compile(r"[a-z]+")


def synthetic_pairs(n: int, seed: int = 0, words: int = 3) -> list[dict]:
    """`n` rows {"prompt", "chosen", "rejected"}, seeded; responses hold `words` words."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)

    def response(topic: str) -> str:
        picked = [topic, *rng.sample(TOPICS[topic], words - 1)]
        rng.shuffle(picked)
        return " ".join(picked)

    rows = []
    for _ in range(n):
        topic, other = rng.sample(topics, 2)
        rows.append({"prompt": PROMPT_FORM.format(topic=topic), "chosen": response(topic),
                     "rejected": response(other)})
    return rows


def keyword_judge(prompt: str, response_a: str, response_b: str) -> tuple[float, float]:
    """10 for a response holding a key word of the prompt (a topic name it mentions), else 0."""
    keys = {w for w in _WORD.findall(prompt.lower()) if w in TOPICS}

    def score(response: str) -> float:
        return 10.0 if keys & set(_WORD.findall(response.lower())) else 0.0

    return score(response_a), score(response_b)


def write_pairs(path: str | Path, n: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in synthetic_pairs(n, seed)))
    return path
