"""The verdict parser: hand-written cases, then property tests (>= 10,000 strings each).

Grammar-built strings carry their expected classification, computed from how they were built
(independently of the parser's code); adversarial strings (random unicode mixed with verdict-ish
fragments) must never crash and must satisfy the grammar's invariants.
"""

import math
import random
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wz_engine.judge.parser import VerdictGrammar, final_line_instruction, parse_verdict

PAIR = VerdictGrammar()
POINT = VerdictGrammar(n_scores=1)
BOXED = VerdictGrammar(style="boxed")
REASONS = {
    "ok", "not_text", "empty", "unclosed_think", "no_verdict", "multiple_verdicts",
    "not_final", "malformed", "out_of_range", "tie_not_allowed",
}


@pytest.mark.parametrize(
    "text, grammar, reason, scores",
    [
        ("Scores: A=7, B=4", PAIR, "ok", (7.0, 4.0)),
        ("principles...\n\n**Scores: A=7.5, B=10.**\n  \n", PAIR, "ok", (7.5, 10.0)),
        ("<think>Scores: A=1, B=2</think>\nCritique.\nscores:a=0,b=0", PAIR, "ok", (0.0, 0.0)),
        ("draft Scores: A=1, B=2 inside\n</think>\nScores: A=3, B=2", PAIR, "ok", (3.0, 2.0)),  # no <think> opener
        ("Format: Scores: A=<score>, B=<score>\nScores: A=3, B=2", PAIR, "ok", (3.0, 2.0)),  # echoed format
        ("Scores: A=7, B=4\nThat is my verdict.", PAIR, "not_final", None),
        ("Scores: A=7, B=4\nScores: A=7, B=4", PAIR, "multiple_verdicts", None),
        ("Scores: A=2, B=4\nno wait\nScores: A=7, B=4", PAIR, "multiple_verdicts", None),
        ("Scores: A=11, B=4", PAIR, "out_of_range", None),
        ("Scores: A=" + "9" * 400 + ", B=4", PAIR, "out_of_range", None),  # float overflow -> inf
        ("Scores: A=nan, B=4", PAIR, "malformed", None),
        ("Scores: A=inf, B=4", PAIR, "malformed", None),
        ("Scores: A=-1, B=4", PAIR, "malformed", None),
        ("Scores: A=1e1, B=4", PAIR, "malformed", None),
        ("Scores: A=٧, B=4", PAIR, "malformed", None),  # non-ASCII digit
        ("Scores: A=7, B=", PAIR, "malformed", None),  # truncated
        ("I prefer A.", PAIR, "no_verdict", None),
        ("", PAIR, "empty", None),
        ("<think>long thought</think>\n \n", PAIR, "empty", None),
        ("Scores: A=7, B=4\n<think>more", PAIR, "unclosed_think", None),
        (None, PAIR, "not_text", None),
        (b"Scores: A=7, B=4", PAIR, "not_text", None),
        ("Scores: A=5, B=5", VerdictGrammar(allow_ties=False), "tie_not_allowed", None),
        ("Score: 6", POINT, "ok", (6.0,)),
        ("Scores: A=6, B=1", POINT, "malformed", None),
        ("**Final:** $\\boxed{7, 4}$", BOXED, "ok", (7.0, 4.0)),
        ("\\[\\boxed{ 3 ,10 }\\]", BOXED, "ok", (3.0, 10.0)),
        ("\\boxed{7, 4} or \\boxed{4, 7}", BOXED, "malformed", None),
        ("\\boxed{7, 4}\n\\boxed{7, 4}", BOXED, "multiple_verdicts", None),
        ("Scores: A=7, B=4", BOXED, "no_verdict", None),
        ("\\boxed{6}", VerdictGrammar(n_scores=1, style="boxed"), "ok", (6.0,)),
        ("Scores: A=2.5, B=3", VerdictGrammar(score_min=1, score_max=3), "ok", (2.5, 3.0)),
        ("Scores: A=0.5, B=3", VerdictGrammar(score_min=1, score_max=3), "out_of_range", None),
    ],
)
def test_parse_cases(text, grammar, reason, scores):
    parsed = parse_verdict(text, grammar)
    assert parsed.reason == reason
    assert parsed.valid == (reason == "ok")
    assert parsed.scores == scores


def test_instruction_is_not_itself_a_verdict():
    for g in (PAIR, POINT, BOXED, VerdictGrammar(n_scores=1, style="boxed")):
        assert parse_verdict(final_line_instruction(g), g).reason in {"malformed", "no_verdict"}


def test_grammar_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_scores"):
        VerdictGrammar(n_scores=3)
    with pytest.raises(ValueError, match="style"):
        VerdictGrammar(style="json")
    with pytest.raises(ValueError, match="score_min"):
        VerdictGrammar(score_min=5, score_max=5)


# -- grammar-built strings with known classification ---------------------------------------------
# Hypothesis draws the grammar and a seed; the string is built from the seed by plain Python
# (hypothesis' per-draw overhead is ~0.5 ms on a loaded 2-core machine, and 10,000 examples with
# ~30 draws each would cost minutes). Every choice below is still covered thousands of times.
_SANITIZE = re.compile(r"score|boxed|think", re.IGNORECASE | re.ASCII)
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_POOLS = [string.printable, " \t\u00a0\u3000", "٠١٢٣٧०१२৭", "😀🙂∞½²ℕ", "{}\\$*_`#>:=,.", _LINE_BREAKS]


def _random_text(rng: random.Random, max_size: int, line_breaks: bool = True) -> str:
    """Random unicode: ASCII, odd whitespace, every Unicode line boundary, digits of other scripts,
    emoji, markdown/LaTeX punctuation, and code points from all planes (surrogates excluded)."""
    out = []
    for _ in range(rng.randrange(max_size + 1)):
        if rng.random() < 0.15:
            c = rng.randrange(0x110000)
            out.append(chr(c) if not 0xD800 <= c < 0xE000 else "?")
        else:
            out.append(rng.choice(rng.choice(_POOLS)))
    text = "".join(out)
    if not line_breaks:
        text = "".join(c for c in text if c not in _LINE_BREAKS)
    return text


def _clean(s: str) -> str:
    """Text that can hold no verdict line, no verdict-looking line and no think tag."""
    return _SANITIZE.sub("x", s)


def _good_num(rng):
    return rng.choice([str(rng.randint(0, 10)), f"{rng.randint(0, 9)}.{rng.randint(0, 999)}", "10.0", "007", "0"])


def _out_num(rng):
    return rng.choice([str(rng.randint(11, 10**9)), "10.01", "9" * rng.randint(20, 400), "10.5"])


_BAD_NUMS = ["nan", "NaN", "inf", "-inf", "-3", "+4", "1e3", "", "seven", "٧", "7,5", "0x1", ".5", "1_0", "½"]


def build_grammar_case(grammar: VerdictGrammar, rng: random.Random):
    """(text, expected reason, expected scores) for a string built from the grammar."""
    n, style = grammar.n_scores, grammar.style
    kinds = [rng.choice(["good", "good", "out", "bad"]) for _ in range(n)]
    tokens = [{"good": _good_num, "out": _out_num, "bad": lambda r: r.choice(_BAD_NUMS)}[k](rng) for k in kinds]
    syntax_ok = all(k != "bad" for k in kinds)
    sp = lambda: rng.choice(["", " ", "  ", "\t"])  # noqa: E731
    if style == "scores":
        kw = rng.choice(["Score", "score", "SCORE"]) + ("s" if n == 2 else "")
        if n == 2:
            a, b = rng.choice([("A", "B"), ("a", "b")])
            core = f"{kw}{sp()}:{sp()}{a}{sp()}={sp()}{tokens[0]}{sp()},{sp()}{b}{sp()}={sp()}{tokens[1]}"
        else:
            core = f"{kw}{sp()}:{sp()}{tokens[0]}"
        core += rng.choice(["", "."])
        pre = rng.choice(["", "**", "*", "__", "`", "### ", "> "])
        post = rng.choice(["", "**", "*", "__", "`"])
        final = f"{sp()}{pre}{core}{post}{sp()}"
    else:
        inner = f"{tokens[0]}{sp()},{sp()}{tokens[1]}" if n == 2 else tokens[0]
        lead = rng.choice(["", "$", "$$", "\\[", "**Final:** "])
        tail = rng.choice(["", "$", "$$", "\\]", ".", " ", "**"])
        final = f"{_clean(_random_text(rng, 20, line_breaks=False))}{lead}\\boxed{{{sp()}{inner}{sp()}}}{tail}"

    extra_verdict = rng.random() < 0.25
    prefix = [_clean(_random_text(rng, 40)) for _ in range(rng.randint(0, 3))]
    if extra_verdict:
        decoy = ("Scores: A=1, B=2" if n == 2 else "Score: 3") if style == "scores" else (
            "\\boxed{1, 2}" if n == 2 else "\\boxed{3}")
        prefix.insert(rng.randint(0, len(prefix)), decoy)
    think = rng.choice(["none", "closed", "no_opener", "unclosed"])
    head = ""
    if think in ("closed", "no_opener"):
        decoys = "\nScores: A=9, B=1\n\\boxed{9, 1}\nScore: 9\n<think>nested</think>\n"
        body = _random_text(rng, 30) + rng.choice(["", decoys])
        head = ("<think>" if think == "closed" else "") + body + "</think>"
    trailing = rng.choice(["none", "blank", "text"])
    tail = rng.choice(["\n", "\n  \n", "\r\n\t", "\u2028 "]) if trailing == "blank" else ""
    if trailing == "text":
        tail = "\n" + _clean(_random_text(rng, 30)) + "\nx"
    if think == "unclosed":
        tail += "<think>" + _random_text(rng, 20)
    text = head + "\n".join(prefix + [final]) + tail

    # expected classification, from the construction (not from the parser's code)
    if think == "unclosed":
        return text, "unclosed_think", None
    if extra_verdict + syntax_ok > 1:
        return text, "multiple_verdicts", None
    if trailing == "text":
        return text, ("not_final" if extra_verdict or syntax_ok else "no_verdict"), None
    if not syntax_ok:
        return text, ("not_final" if extra_verdict else "malformed"), None
    values = tuple(float(t) for t in tokens)
    if not all(math.isfinite(v) and grammar.score_min <= v <= grammar.score_max for v in values):
        return text, "out_of_range", None
    if n == 2 and values[0] == values[1] and not grammar.allow_ties:
        return text, "tie_not_allowed", None
    return text, "ok", values


GRAMMARS = [
    VerdictGrammar(n_scores=n, style=style, allow_ties=ties)
    for n in (1, 2) for style in ("scores", "boxed") for ties in (True, False)
]
FAST = dict(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


# -- adversarial strings: never crash, invariants hold ---------------------------------------------
_FRAGMENTS = [
    "Scores: A=7, B=4", "Score: 5", "Scores:", "A=", ", B=", "\\boxed{", "}", "\\boxed{3, 3}", "<think>",
    "</think>", "\n", "\r\n", "\u2028", "nan", "inf", "1e309", "9" * 60, "-0", "**", "`", "$", "\\]", "٧",
    "\x00", "🙂", " ", "\nScores: A=10, B=0\n", "Score: 10.0", "\n\\boxed{2}\n",
]


def build_adversarial(rng: random.Random) -> str:
    parts = [rng.choice(_FRAGMENTS) if rng.random() < 0.5 else _random_text(rng, 12) for _ in range(rng.randint(0, 12))]
    text = "".join(parts)
    if rng.random() < 0.2:  # truncated output
        text = text[: rng.randint(0, len(text))]
    return text


@settings(**FAST)
@given(st.sampled_from(GRAMMARS), st.integers(0, 2**64 - 1))
def test_property_parser(grammar, seed):
    """10,000 examples x 2 strings: one built from the grammar (exact expected classification) and
    one adversarial (no crash, invariants). One test, because hypothesis' own per-example cost
    (~1.5-3 ms here) dominates."""
    rng = random.Random(seed)
    text, reason, scores = build_grammar_case(grammar, rng)
    parsed = parse_verdict(text, grammar)
    assert (parsed.reason, parsed.scores) == (reason, scores), repr(text)
    check_adversarial(build_adversarial(rng), grammar)


def check_adversarial(text: str, grammar: VerdictGrammar) -> None:
    parsed = parse_verdict(text, grammar)
    assert parsed.reason in REASONS
    assert parsed.valid == (parsed.scores is not None)
    if parsed.valid:
        assert len(parsed.scores) == grammar.n_scores
        assert all(math.isfinite(s) and grammar.score_min <= s <= grammar.score_max for s in parsed.scores)
        # the verdict is the last non-blank line after thinking, and parses alone to the same scores
        body = text[text.rfind("</think>") + len("</think>"):] if "</think>" in text else text
        last = [line for line in body.splitlines() if line.strip()][-1]
        assert parse_verdict(last, grammar).scores == parsed.scores
    # trailing whitespace never changes the classification; a closed thinking block before it neither
    assert parse_verdict(text + " \n\t\n", grammar) == parsed
    if "</think>" not in text and "<think>" not in text:
        assert parse_verdict("<think>Scores: A=1, B=2\n</think>" + text, grammar) == parsed


def test_generators_cover_every_reason():
    """The property tests exercise every classification (the generators are not accidentally narrow)."""
    rng = random.Random(0)
    seen = {build_grammar_case(g, rng)[1] for _ in range(300) for g in GRAMMARS}
    assert seen == REASONS - {"not_text", "empty"}
    seen = {parse_verdict(build_adversarial(rng), g).reason for _ in range(300) for g in GRAMMARS}
    assert {"ok", "no_verdict", "malformed", "multiple_verdicts", "unclosed_think"} <= seen
