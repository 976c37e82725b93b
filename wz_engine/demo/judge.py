"""A programmatic pairwise writing judge for the CPU demo: learnable preferences, no model.

`writing_judge(prompt, response_a, response_b) -> (score_a, score_b)` scores each response in
[0, 10] against writing principles a tiny model can discover by RL in minutes:
- on topic (4 pts): distinct words from the prompt topic's lexicon (4 of them earn all the points),
- real words (3 pts): share of words that are English words of the demo vocabulary (no gibberish),
- length (2 pts): 6-14 words earns all, fewer or more lose points linearly,
- varied vocabulary (1 pt): distinct words / words (repetition costs).
The pairwise form is what BRPO consumes; it is symmetric, so it has no position bias.
"""

from __future__ import annotations

import re

TOPICS: dict[str, list[str]] = {
    "sea": ["wave", "salt", "shore", "tide", "boat", "blue"],
    "forest": ["tree", "leaf", "moss", "green", "deer", "shade"],
    "city": ["street", "light", "crowd", "tower", "noise", "car"],
    "winter": ["snow", "cold", "ice", "white", "frost", "fire"],
    "night": ["moon", "star", "dark", "dream", "owl", "sleep"],
    "garden": ["rose", "seed", "bee", "soil", "bloom", "rain"],
    "mountain": ["peak", "rock", "climb", "stone", "high", "wind"],
    "desert": ["sand", "sun", "dry", "dune", "heat", "gold"],
    "river": ["water", "fish", "flow", "bank", "bridge", "reed"],
    "kitchen": ["bread", "salt", "pot", "warm", "spoon", "soup"],
    "train": ["track", "steam", "seat", "ride", "whistle", "station"],
    "storm": ["thunder", "cloud", "rain", "wind", "grey", "flash"],
}
FUNCTION_WORDS = [
    "the", "a", "and", "of", "in", "on", "with", "is", "was", "by", "under", "over", "its", "my",
    "we", "i", "it", "as", "through", "from", "into", "all", "so", "soft", "old", "slow", "bright",
]
VOCABULARY = frozenset(FUNCTION_WORDS) | {w for ws in TOPICS.values() for w in ws} | set(TOPICS)
_WORD = re.compile(r"[a-z]+")


def topic_of(prompt: str) -> str | None:
    for word in _WORD.findall(prompt.lower()):
        if word in TOPICS:
            return word
    return None


def writing_score(prompt: str, response: str) -> float:
    """Score one response to `prompt` in [0, 10] (see the module docstring)."""
    words = _WORD.findall(response.lower())
    # Any non-letter, non-space character (bytes the tokenizer knows but words do not) is gibberish.
    junk = len(re.findall(r"[^a-zA-Z\s.,']", response))
    if not words:
        return 0.0
    topic = topic_of(prompt)
    lexicon = set(TOPICS.get(topic, [])) | ({topic} if topic else set())
    on_topic = min(len(set(words) & lexicon), 4) / 4
    real = sum(w in VOCABULARY for w in words) / (len(words) + junk)
    n = len(words)
    length = 1.0 if 6 <= n <= 14 else max(0.0, 1 - (6 - n) / 6) if n < 6 else max(0.0, 1 - (n - 14) / 14)
    varied = len(set(words)) / n
    return 4 * on_topic + 3 * real + 2 * length + 1 * varied


def writing_judge(prompt: str, response_a: str, response_b: str) -> tuple[float, float]:
    return writing_score(prompt, response_a), writing_score(prompt, response_b)


def corpus() -> list[str]:
    """Text the demo tokenizer is trained on: the prompts and the judge's vocabulary."""
    from wz_engine.demo.prompts import load_demo_prompts

    lines = [row["prompt"] for row in load_demo_prompts()]
    # Every judge word often enough that BPE merges it into one token (with its leading space).
    lines += [" ".join([word] * 20) for word in sorted(VOCABULARY)]
    return lines


def writing_reward(prompt: str, response: str, reference: str | None = None) -> float:
    """Pointwise form (a rule reward for GRPO-family estimators): the score scaled to [0, 1]."""
    return writing_score(prompt, response) / 10
