"""The built-in demo dataset: short writing prompts (wz_engine/demo/prompts.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.jsonl")


def load_demo_prompts() -> list[dict]:
    """Rows {"prompt": str}; the last 32 are the demo's held-out evaluation prompts."""
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
    ]
    rows = [{"prompt": f.format(t=t)} for t in TOPICS for f in forms]
    random.Random(seed).shuffle(rows)
    PROMPTS_FILE.write_text("".join(json.dumps(r) + "\n" for r in rows))
