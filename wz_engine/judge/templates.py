"""Judge prompt templates: Jinja files rendered into one user message, then the tokenizer's chat template.

Bundled templates live next to this module in `templates/` (`writing_pairwise.jinja`,
`reference_pairwise.jinja`, `pointwise.jinja`); any other file can be named by path. Variables:
pairwise/reference templates get `query`, `response_a`, `response_b`, `reference`, `final_line`;
pointwise templates get `query`, `response`, `reference`, `final_line`. Undefined variables are
errors (StrictUndefined), so a typo in a template fails at the first render, not silently.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_SUFFIXES = (".jinja", ".txt")


def template_path(name_or_path: str) -> Path:
    """Resolve a bundled template name (with or without suffix) or a file path."""
    if not name_or_path:
        raise ValueError("template: empty name")
    candidates = [Path(name_or_path)]
    candidates += [TEMPLATE_DIR / name_or_path] + [TEMPLATE_DIR / (name_or_path + s) for s in TEMPLATE_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    bundled = sorted(p.stem for p in TEMPLATE_DIR.iterdir() if p.suffix in TEMPLATE_SUFFIXES)
    raise ValueError(f"template: {name_or_path!r} is neither a file nor a bundled template {bundled}")


@lru_cache(maxsize=32)
def _load(path: str, mtime: float):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)
    return env.from_string(Path(path).read_text(encoding="utf-8"))


def render_template(name_or_path: str, **variables) -> str:
    """Render a template file with `variables` (all must be defined)."""
    path = template_path(name_or_path)
    return _load(str(path), path.stat().st_mtime).render(**variables).strip() + "\n"


def to_chat_text(tokenizer, user_message: str, system_prompt: str | None = None, **chat_kwargs) -> str:
    """The full judge prompt as text: the tokenizer's chat template with the generation prompt.

    A tokenizer without a chat template (a base model) gets the bare message.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return user_message if system_prompt is None else f"{system_prompt}\n\n{user_message}"
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": user_message})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **chat_kwargs)
