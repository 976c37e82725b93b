"""The built-in demo dataset: short writing prompts (wz_engine/demo/prompts.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.jsonl")
HOLDOUT = 24
"""Held-out prompts at the end of the file (`data.holdout` in demo_cpu.toml): 4 per topic."""


def load_demo_prompts() -> list[dict]:
    """Rows {"prompt": str}; the last HOLDOUT are the demo's held-out evaluation prompts."""
    with PROMPTS_FILE.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_prompts_file(seed: int = 0) -> None:  # how prompts.jsonl was made (kept for the record)
    import random

    from wz_engine.demo.judge import TOPICS

    forms = [
        "Write a short poem about the {t}.", "Describe the {t} in a few words.",
        "Tell a tiny story set in the {t}.", "Write two lines about the {t}.",
        "Paint the {t} with words.", "What does the {t} feel like?",
        "Write a calm scene about the {t}.", "Give me a vivid image of the {t}.",
        "Write a haiku about the {t}.", "Sing a little song of the {t}.", "Show me the {t} at dawn.",
        "Write a memory of the {t}.", "Say something kind about the {t}.", "Capture the mood of the {t}.",
        "Write a postcard from the {t}.", "Write a line a child would say about the {t}.",
    ]
    rng = random.Random(seed)
    train, holdout = [], []
    for t in TOPICS:  # every topic equally often among the held-out prompts, each in forms it is not trained on
        picked = rng.sample(forms, len(forms))
        k = HOLDOUT // len(TOPICS)
        holdout += [{"prompt": f.format(t=t)} for f in picked[:k]]
        train += [{"prompt": f.format(t=t)} for f in picked[k:]]
    rng.shuffle(train)
    rng.shuffle(holdout)
    rows = train + holdout
    PROMPTS_FILE.write_text("".join(json.dumps(r) + "\n" for r in rows))
