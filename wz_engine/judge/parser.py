"""Strict parser for the judge's final verdict line.

Grammar (the templates ask for exactly this; `final_line_instruction` renders the request):

    style "scores", pairwise:   Scores: A=<num>, B=<num>
    style "scores", pointwise:  Score: <num>
    style "boxed",  pairwise:   <any text>\\boxed{<num>, <num>}
    style "boxed",  pointwise:  <any text>\\boxed{<num>}
    style "choice", pairwise:   A   or   B   (the letter of the better response, alone on its line;
                                scored as (score_max, score_min) / (score_min, score_max); no ties.
                                One token, so that a tiny model can emit a valid verdict at all)

    <num> = ASCII digits with an optional ASCII fractional part: `7`, `10`, `6.5` (no sign, no
    exponent, no nan/inf). Keywords are case-insensitive; ASCII spaces/tabs are allowed around
    `:`, `=`, `,` and inside the braces; a trailing `.` is allowed. The line may be wrapped in
    markdown decoration (`*`, `_`, `` ` ``, leading `#`/`>`), and a boxed line may end in `$`, `\\]`
    or `\\)` (LaTeX math).

Rules, applied in this order (the first that fires gives the reason):
    1. Thinking: everything up to the LAST `</think>` is thinking and ignored (nested blocks, a missing
       opening tag as in Qwen3 templates). A `<think>` after that point was never closed (a
       truncated output): invalid, "unclosed_think".
    2. "empty": nothing but whitespace remains.
    3. A *verdict line* is any line (str.splitlines) that matches the grammar above, whatever the
       magnitude of its numbers. More than one verdict line: invalid, "multiple_verdicts" - the
       judge changed its mind or repeated itself, and we refuse to guess which one it meant.
    4. The last non-blank line must be that verdict line; if the one verdict line is elsewhere:
       "not_final". If the last line starts like a verdict (`Score:`/`Scores:` or contains
       `\\boxed`, or a choice line starts with the letter as a word) but does not match: "malformed";
       otherwise "no_verdict".
    5. Scores are finite and inside [score_min, score_max], else "out_of_range" (never clamped).
    6. Equal scores with allow_ties=False: "tie_not_allowed".

`parse_verdict` never raises: any input, including non-strings, gives a ParsedVerdict.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_SP = r"[ \t]*"
_DECORATION = "*_`#> \t"
_BOXED_TAIL = r"(?:[ \t$.*_`]|\\\]|\\\))*"

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class VerdictGrammar:
    n_scores: int = 2
    """2 for pairwise (A and B), 1 for pointwise."""
    style: str = "scores"
    """"scores" (`Scores: A=7, B=4`), "boxed" (`\\boxed{7, 4}`) or "choice" (`A` / `B`, pairwise only)."""
    score_min: float = 0.0
    """Lowest legal score (inclusive)."""
    score_max: float = 10.0
    """Highest legal score (inclusive)."""
    allow_ties: bool = True
    """Equal pairwise scores are a valid tie; False makes them invalid ("tie_not_allowed")."""

    def __post_init__(self) -> None:
        if self.n_scores not in (1, 2):
            raise ValueError(f"n_scores must be 1 or 2, got {self.n_scores!r}")
        if self.style not in ("scores", "boxed", "choice"):
            raise ValueError(f"style must be 'scores', 'boxed' or 'choice', got {self.style!r}")
        if self.style == "choice" and self.n_scores != 2:
            raise ValueError("style 'choice' names the better of two responses: it needs n_scores = 2 (pairwise)")
        if not float(self.score_min) < float(self.score_max):
            raise ValueError(f"score_min must be < score_max, got [{self.score_min}, {self.score_max}]")


@dataclass(frozen=True)
class ParsedVerdict:
    scores: tuple[float, ...] | None
    """(score_a, score_b) or (score,) when valid, else None."""
    reason: str
    """"ok" or why the output is invalid (see the module docstring)."""

    @property
    def valid(self) -> bool:
        return self.reason == "ok"


@lru_cache(maxsize=None)
def _patterns(n_scores: int, style: str) -> tuple[re.Pattern, re.Pattern]:
    """(full verdict line on the undecorated line, 'looks like a verdict attempt')."""
    flags = re.ASCII | re.IGNORECASE
    if style == "scores":
        if n_scores == 2:
            body = rf"scores{_SP}:{_SP}a{_SP}={_SP}{_NUM}{_SP},{_SP}b{_SP}={_SP}{_NUM}{_SP}\.?"
        else:
            body = rf"score{_SP}:{_SP}{_NUM}{_SP}\.?"
        return re.compile(body, flags), re.compile(r"scores?[ \t]*:", flags)
    if style == "choice":
        return re.compile(rf"([ab]){_SP}\.?", flags), re.compile(r"[ab]\b", flags)
    inner = rf"{_NUM}{_SP},{_SP}{_NUM}" if n_scores == 2 else _NUM
    body = rf"[^\n]*?\\boxed\{{{_SP}{inner}{_SP}\}}{_BOXED_TAIL}"
    return re.compile(body, flags), re.compile(r"[^\n]*\\boxed", flags)


def _strip_decoration(line: str) -> str:
    return line.strip().strip(_DECORATION)


def _match_verdict(line: str, grammar: VerdictGrammar) -> re.Match | None:
    full, _ = _patterns(grammar.n_scores, grammar.style)
    if grammar.style == "boxed":
        if line.count("\\boxed") != 1:
            return None
        return full.fullmatch(line.strip().lstrip(_DECORATION))
    return full.fullmatch(_strip_decoration(line))


def strip_thinking(text: str) -> tuple[str, bool]:
    """(text after the last `</think>`, whether an unclosed `<think>` remains after it)."""
    cut = text.rfind(THINK_CLOSE)
    body = text if cut < 0 else text[cut + len(THINK_CLOSE):]
    return body, THINK_OPEN in body


def parse_verdict(text: object, grammar: VerdictGrammar = VerdictGrammar()) -> ParsedVerdict:
    """Parse a judge output into scores, or say why it is invalid. Never raises."""
    try:
        return _parse(text, grammar)
    except Exception:  # a parser bug must not take the trainer down; tests assert it never happens
        return ParsedVerdict(None, "parser_error")


def _parse(text: object, grammar: VerdictGrammar) -> ParsedVerdict:
    if not isinstance(text, str):
        return ParsedVerdict(None, "not_text")
    body, unclosed = strip_thinking(text)
    if unclosed:
        return ParsedVerdict(None, "unclosed_think")
    lines = [line for line in body.splitlines() if line.strip()]
    if not lines:
        return ParsedVerdict(None, "empty")
    matches = [(i, m) for i, line in enumerate(lines) if (m := _match_verdict(line, grammar)) is not None]
    if len(matches) > 1:
        return ParsedVerdict(None, "multiple_verdicts")
    if not matches or matches[0][0] != len(lines) - 1:
        if matches:
            return ParsedVerdict(None, "not_final")
        _, attempt = _patterns(grammar.n_scores, grammar.style)
        looks_like = attempt.match(lines[-1].strip().lstrip(_DECORATION)) is not None
        return ParsedVerdict(None, "malformed" if looks_like else "no_verdict")
    scores = _scores(matches[0][1], grammar)
    lo, hi = float(grammar.score_min), float(grammar.score_max)
    if not all(math.isfinite(s) and lo <= s <= hi for s in scores):
        return ParsedVerdict(None, "out_of_range")
    if len(scores) == 2 and scores[0] == scores[1] and not grammar.allow_ties:
        return ParsedVerdict(None, "tie_not_allowed")
    return ParsedVerdict(scores, "ok")


def _scores(match: re.Match, grammar: VerdictGrammar) -> tuple[float, ...]:
    if grammar.style == "choice":  # the chosen letter gets the top score, the other the bottom one
        hi, lo = float(grammar.score_max), float(grammar.score_min)
        return (hi, lo) if match.group(1).lower() == "a" else (lo, hi)
    return tuple(float(g) for g in match.groups())


def final_line_instruction(grammar: VerdictGrammar) -> str:
    """The exact final-line format, as the templates show it to the judge."""
    if grammar.style == "choice":
        return "A or B"
    lo, hi = _fmt(grammar.score_min), _fmt(grammar.score_max)
    if grammar.style == "scores":
        if grammar.n_scores == 2:
            return f"Scores: A=<score of Response A>, B=<score of Response B>   (each a number from {lo} to {hi})"
        return f"Score: <score>   (a number from {lo} to {hi})"
    if grammar.n_scores == 2:
        return f"\\boxed{{<score of Response A>, <score of Response B>}}   (each a number from {lo} to {hi})"
    return f"\\boxed{{<score>}}   (a number from {lo} to {hi})"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
