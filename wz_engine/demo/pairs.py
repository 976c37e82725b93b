"""Synthetic preference pairs with a checkable label: a tiny GenRM learns them by RL on CPU in minutes.

Each prompt asks for writing about one of 12 topics (`PAIR_TOPICS`: the BRPO demo's 6 and 6 more, as these
pairs were measured; with the 6 alone, seed 2 did not learn them in 150 steps). The chosen
response is a word of that topic's lexicon and a praising word (`POSITIVE`); the rejected one a word of
another topic and a disparaging word (`NEGATIVE`), each in random order. `label_judge` is the rule as a
programmatic judge: the labels' independent check, and the ceiling a judge can reach
(`wz judge eval --judge wz_engine.demo.pairs:label_judge --data PAIRS`).

Measured (bench/RESULTS.md): a tiny random Qwen2 learns these in 75-100 RL steps (seeds 0-5); it does not
learn, within the same budget, the harder rule "the chosen response contains the prompt's key word" (token
equality with the prompt), which is why the praising word is there.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from wz_engine.demo.judge import TOPICS

PAIR_TOPICS: dict[str, list[str]] = {
    **TOPICS,  # the BRPO demo's six, and six more:
    "garden": ["rose", "seed", "bee", "soil", "bloom", "rain"],
    "mountain": ["peak", "rock", "climb", "stone", "high", "wind"],
    "river": ["water", "fish", "flow", "bank", "bridge", "reed"],
    "kitchen": ["bread", "salt", "pot", "warm", "spoon", "soup"],
    "train": ["track", "steam", "seat", "ride", "whistle", "station"],
    "storm": ["thunder", "cloud", "rain", "wind", "grey", "flash"],
}
"""Topic -> its words (a few words belong to two topics; a chosen response always has one of its own)."""
PROMPT_FORM = "Write about the {topic}."
POSITIVE = ("good", "fine", "great", "kind")
NEGATIVE = ("bad", "dull", "weak", "flat")
_WORD = re.compile(r"[a-z]+")


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` rows {"prompt", "chosen", "rejected"}, seeded (see the module docstring)."""
    rng = random.Random(seed)
    topics = sorted(PAIR_TOPICS)

    def response(topic: str, tone: tuple[str, ...]) -> str:
        words = [rng.choice(PAIR_TOPICS[topic]), rng.choice(tone)]
        rng.shuffle(words)
        return " ".join(words)

    rows = []
    for _ in range(n):
        topic, other = rng.sample(topics, 2)
        rows.append({"prompt": PROMPT_FORM.format(topic=topic), "chosen": response(topic, POSITIVE),
                     "rejected": response(other, NEGATIVE)})
    return rows


def label_judge(prompt: str, response_a: str, response_b: str) -> tuple[float, float]:
    """Per response: 5 for a praising word, 5 for a word of the prompt's topic (so 10 vs 0 on these pairs)."""
    topics = [w for w in _WORD.findall(prompt.lower()) if w in PAIR_TOPICS]
    lexicon = {w for t in topics for w in PAIR_TOPICS[t]}

    def score(response: str) -> float:
        words = set(_WORD.findall(response.lower()))
        return 5.0 * bool(words & set(POSITIVE)) + 5.0 * bool(words & lexicon)

    return score(response_a), score(response_b)


def write_pairs(path: str | Path, n: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in synthetic_pairs(n, seed)))
    return path
