"""A programmatic pairwise writing judge for the CPU demo: learnable preferences, no model.

`writing_judge(prompt, response_a, response_b) -> (score_a, score_b)` scores each response in
whole points from 0 to 10, as a generative judge writes its verdict. Being on topic is decisive, so the
only way to score well is to read the prompt:
- on topic (6 pts): recall x purity over the topic lexicons. Recall: distinct words of the prompt
  topic's lexicon (2 of them earn it all). Purity: (words of the prompt topic - words of other
  topics) / all topic words, floored at 0, so a text that mixes in as many other topics' words as
  the prompt topic's earns none of it (and a fixed text naming every topic, the same answer to every
  prompt, earns nothing),
- real words (2 pts): share of words that are English words of the demo vocabulary, gibberish and
  stray punctuation counted against it,
- length (1 pt): 4-10 words earns all, fewer or more lose points linearly (0 at 0 and 20 words),
- varied vocabulary (1 pt): distinct words / words (repetition costs).
The pairwise form is what BRPO consumes; it is symmetric, so it has no position bias.

`is_on_topic` is the measurable definition the demo's evaluation reports (the on-topic rate).
"""

from __future__ import annotations

import math
import re

TOPICS: dict[str, list[str]] = {
    "sea": ["wave", "salt", "shore", "tide", "boat", "blue"],
    "forest": ["tree", "leaf", "moss", "green", "deer", "shade"],
    "city": ["street", "light", "crowd", "tower", "noise", "car"],
    "winter": ["snow", "cold", "ice", "white", "frost", "fire"],
    "night": ["moon", "star", "dark", "dream", "owl", "sleep"],
    "desert": ["sand", "sun", "dry", "dune", "heat", "gold"],
}
FUNCTION_WORDS = [
    "the", "a", "and", "of", "in", "on", "with", "is", "was", "by", "under", "over", "its", "my",
    "we", "i", "it", "as", "through", "from", "into", "all", "so", "soft", "old", "slow", "bright",
]
LEXICONS: dict[str, frozenset[str]] = {t: frozenset([t, *ws]) for t, ws in TOPICS.items()}
"""Each topic's words: its name and its six associated words (no word belongs to two topics)."""
TOPIC_WORDS = frozenset().union(*LEXICONS.values())
VOCABULARY = frozenset(FUNCTION_WORDS) | TOPIC_WORDS
_WORD = re.compile(r"[a-z]+")
_WORD_END = re.compile(r"(?<=[a-z])[.,']")
_JUNK = re.compile(r"[^a-z\s]")


def topic_of(prompt: str) -> str | None:
    for word in _WORD.findall(prompt.lower()):
        if word in TOPICS:
            return word
    return None


def topic_counts(prompt: str, words: list[str]) -> tuple[int, int, int]:
    """-> (words of the prompt topic's lexicon, distinct ones, words of other topics' lexicons only)."""
    lexicon = LEXICONS.get(topic_of(prompt) or "", frozenset())
    on = [w for w in words if w in lexicon]
    off = sum(w in TOPIC_WORDS and w not in lexicon for w in words)
    return len(on), len(set(on)), off


def is_on_topic(prompt: str, response: str) -> bool:
    """On topic: at least one word of the prompt topic's lexicon, and more of them than words of all
    other topics' lexicons together (so neither a topic-free text nor one naming every topic counts)."""
    on, _, off = topic_counts(prompt, _WORD.findall(response.lower()))
    return on > off


def writing_score(prompt: str, response: str) -> float:
    """Score one response to `prompt` in [0, 10], unrounded (see the module docstring)."""
    words = _WORD.findall(response.lower())
    # Any other character is gibberish: bytes the tokenizer knows but words do not, and punctuation
    # beyond one mark right after a word (a run of dots would pad the length for free).
    junk = len(_JUNK.findall(_WORD_END.sub("", response.lower())))
    if not words:
        return 0.0
    on, distinct_on, off = topic_counts(prompt, words)
    on_topic = min(distinct_on, 2) / 2 * (max(on - off, 0) / (on + off) if on else 0.0)
    real = sum(w in VOCABULARY for w in words) / (len(words) + junk)
    n = len(words)
    length = 1.0 if 4 <= n <= 10 else n / 4 if n < 4 else max(0.0, 1 - (n - 10) / 10)
    varied = len(set(words)) / n
    return 6 * on_topic + 2 * real + 1 * length + 1 * varied


def writing_judge(prompt: str, response_a: str, response_b: str) -> tuple[int, int]:
    """Both scores rounded to whole points, as a generative judge writes them ("Scores: A=7, B=4")."""
    return _whole(writing_score(prompt, response_a)), _whole(writing_score(prompt, response_b))


def _whole(score: float) -> int:
    return math.floor(score + 0.5)


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
