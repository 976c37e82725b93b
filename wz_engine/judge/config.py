"""Configuration of the pairwise generative reward model (GenRM).

The GenRM renders a prompt template (a file under `wz_engine/judge/templates/` or any path), runs it
through a sampler (the `hf` sampler on the live policy, a LoRA adapter over its weights, or a separate
checkpoint), and parses a fixed final verdict line. See `wz_engine/judge/parser.py` for the grammar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pairwise", "reference", "pointwise"]
WeightSharing = Literal["self", "lora", "checkpoint"]
VerdictStyle = Literal["scores", "boxed", "choice"]
TiePolicy = Literal["tie", "invalid"]

MODES = ("pairwise", "reference", "pointwise")
WEIGHT_SHARING = ("self", "lora", "checkpoint")
VERDICT_STYLES = ("scores", "boxed", "choice")
TIE_POLICIES = ("tie", "invalid")

DEFAULT_TEMPLATES = {
    "pairwise": "writing_pairwise",
    "reference": "reference_pairwise",
    "pointwise": "pointwise",
}
"""The bundled template used for each mode when `template` is left empty."""


@dataclass
class GenRMConfig:
    mode: Mode = "pairwise"
    """"pairwise": reference-free comparison of two responses (BRPO); "reference": both responses are
    judged against a gold reference answer (`PairwiseRequest.reference`, required); "pointwise": each
    response is scored alone (0-10), so a pair costs two independent scores and has no position."""
    template: str = ""
    """Bundled template name (e.g. "writing_pairwise") or a path to a Jinja file; empty picks the
    mode's default from DEFAULT_TEMPLATES."""
    system_prompt: str | None = None
    """Optional system message placed before the rendered template in the chat."""
    verdict_style: VerdictStyle = "scores"
    """Final-line grammar the template asks for: "scores" -> `Scores: A=7, B=4` (pointwise
    `Score: 7`); "boxed" -> `\\boxed{7, 4}` (pointwise `\\boxed{7}`); "choice" -> the letter `A` or `B`
    alone (pairwise only; scored score_max / score_min; one token, for tiny judges)."""
    votes: int = 1
    """Independent judge samples per (pair, order), used by `GenRM.compare` (the eval CLI takes
    `--votes`). `GenRM.judge` always returns exactly one verdict per request: the trainer's BRPO
    assembly issues its own repeats (`algorithm.votes`), which the GenRM samples through `n`.
    In a training run this and `algorithm.votes` are one setting: set either (1 counts as unset);
    two different values above 1 are a config error."""
    both_orders: bool = True
    """`GenRM.compare` judges every pair as (A, B) and as (B, A) to cancel position bias (ignored in
    pointwise mode, where there is no order). BRPO always judges both orders."""
    temperature: float = 0.7
    """Judge sampling temperature; 0 is greedy (then votes > 1 repeat the same answer)."""
    top_p: float = 1.0
    """Nucleus sampling for the judge."""
    max_new_tokens: int = 1024
    """Budget for principles + critiques + verdict; a judge cut off before its final line is invalid."""
    max_prompt_tokens: int | None = None
    """Judge prompts longer than this are not generated and come back invalid ("prompt_too_long");
    None = no limit."""
    batch_size: int | None = None
    """At most this many judge prompts per generate call; None = all requests of a call at once."""
    seed: int | None = None
    """Seed passed to the sampler for judge calls (None: the sampler's own generator)."""
    score_min: float = 0.0
    """Lowest legal score. Scores outside [score_min, score_max] make the verdict invalid (never
    clamped)."""
    score_max: float = 10.0
    """Highest legal score."""
    tie_policy: TiePolicy = "tie"
    """Equal scores: "tie" = a valid verdict with no winner; "invalid" = no signal (for templates that
    forbid ties)."""
    weight_sharing: WeightSharing = "self"
    """Which weights judge on the hf backend: "self" = the live policy module (no extra memory);
    "lora" = a peft LoRA adapter (`lora_path`) injected into the policy's own base weights, enabled
    only while judging; "checkpoint" = a separate model loaded from `checkpoint_path`.
    With `rollout.sampler = "vllm"` this also picks the engine's judge mode (self -> self,
    lora -> lora, checkpoint -> swap); see `rollout.vllm.judge_mode`."""
    lora_path: str | None = None
    """Local directory of a peft LoRA adapter (weight_sharing="lora")."""
    checkpoint_path: str | None = None
    """Local HF model directory (weight_sharing="checkpoint")."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for `tokenizer.apply_chat_template` (e.g. {"enable_thinking": False})."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def template_name(self) -> str:
        """The template actually used: `template`, or the mode's default."""
        return self.template or DEFAULT_TEMPLATES[self.mode]

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _check_choice("mode", self.mode, MODES)
        _check_choice("verdict_style", self.verdict_style, VERDICT_STYLES)
        _check_choice("tie_policy", self.tie_policy, TIE_POLICIES)
        if self.verdict_style == "choice" and self.mode == "pointwise":
            raise ValueError('verdict_style "choice" names the better of two responses: it needs mode "pairwise" '
                             'or "reference", not "pointwise"')
        _check_choice("weight_sharing", self.weight_sharing, WEIGHT_SHARING)
        if not isinstance(self.votes, int) or self.votes < 1:
            raise ValueError(f"votes must be an integer >= 1, got {self.votes!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size!r}")
        if not (float(self.score_min) < float(self.score_max)):
            raise ValueError(f"score_min must be < score_max, got [{self.score_min}, {self.score_max}]")
        if self.weight_sharing == "lora" and not self.lora_path:
            raise ValueError('lora_path is required when weight_sharing="lora"')
        if self.weight_sharing == "checkpoint" and not self.checkpoint_path:
            raise ValueError('checkpoint_path is required when weight_sharing="checkpoint"')


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
