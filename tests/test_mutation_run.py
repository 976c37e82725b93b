"""The curated mutation run in CI (tests/mutants): every patch still applies, the runner tells caught
from missed, and a rotating subset of the mutants runs and must be caught.

The whole run is `python -m tests.mutants` (every mutant). Here `WZ_MUTANTS_PER_RUN` mutants (default 3)
run per test session, the shard chosen by the date (so the whole catalogue is covered every few days,
and a given day's selection is reproducible); `WZ_MUTANTS_SHARD=i/n` picks a shard explicitly.
"""

from __future__ import annotations

import datetime
import math
import os

import pytest

from tests.mutants.__main__ import select
from tests.mutants.catalog import MUTANTS, Mutant
from tests.mutants.runner import (
    CAUGHT,
    MISSED,
    REPO,
    STALE,
    format_result,
    patched_text,
    run_mutant,
    run_mutants,
)

# One mutant per bug class the catalogue must cover (issue 15's list).
REQUIRED = {
    "masks off by one": "pack-loss-mask-off-by-one",
    "sign of KL terms": "loss-kl-sign-reversed",
    "temperature dropped in a backward": "logprob-temperature-dropped-in-backward-kernel",
    "clip bounds swapped": "loss-clip-bounds-swapped",
    "aggregation normalisers": "loss-seq-count-includes-empty-slots",
    "singleton-group rules": "adv-rloo-singleton-keeps-reward",
    "BRPO reference indexing": "brpo-ref-flag-without-group-offset",
    "BRPO invalid rule": "brpo-invalid-only-if-all",
    "BRPO inconsistent rule": "brpo-inconsistent-counts-as-tie",
    "skew filter direction": "brpo-skew-filter-direction",
    "packing offsets": "pack-gather-responses-offset",
    "position ids": "pack-position-ids-do-not-restart",
    "loss mask lets prompt tokens in": "pack-loss-mask-lets-prompt-in",
    "gradient-accumulation normalisers": "update-grad-accum-tokens-per-micro-batch",
    "RNG state left out of checkpoints": "ckpt-numpy-rng-not-restored",
    "weight-sync bucket offsets": "sync-bucket-size-forgets-alignment-padding",
    "judge parser accepting a second final line": "parser-accepts-a-second-final-line",
    "GiGPO anchor grouping across episode groups": "gigpo-anchor-groups-cross-episode-groups",
}


def test_catalogue_is_large_distinct_and_covers_every_bug_class():
    names = [m.name for m in MUTANTS]
    assert len(MUTANTS) >= 30 and len(set(names)) == len(names)
    missing = {k: v for k, v in REQUIRED.items() if v not in names}
    assert not missing, missing
    for m in MUTANTS:
        assert m.old != m.new and m.description and "\n" not in m.description, m.name
        assert (REPO / m.file).is_file(), m.name
        assert m.tests and all((REPO / t.split("::")[0]).is_file() for t in m.tests), m.name
        assert not any(t.split("::")[0].startswith("tests/test_mutation_run") for t in m.tests), m.name


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_patch_applies_exactly_once(mutant):
    patched_text(mutant)  # raises "patch no longer applies: <file> <description>" when stale


def test_a_stale_patch_is_reported_not_run():
    stale = Mutant("self-test-stale", "wz_engine/rewards/dapo.py", "text that is not in the file", "x",
                   "a patch whose context moved", ("tests/engine/test_rewards.py",))
    r = run_mutant(stale)
    assert r.status == STALE
    assert "patch no longer applies: wz_engine/rewards/dapo.py a patch whose context moved" in r.detail


# A change no test can see: the runner must call it missed (it does not count every run as caught).
HARMLESS = Mutant("self-test-harmless", "wz_engine/rewards/dapo.py",
                  '"""DAPO options: overlong reward shaping and the dynamic-sampling group filter."""',
                  '"""DAPO options: the dynamic-sampling group filter and overlong reward shaping."""',
                  "a docstring reworded", ("tests/engine/test_rewards.py::test_overlong_penalty_by_hand",))


def rotating_subset() -> tuple[str, list[Mutant]]:
    shard = os.environ.get("WZ_MUTANTS_SHARD")
    if not shard:
        per_run = int(os.environ.get("WZ_MUTANTS_PER_RUN", "3"))
        n = math.ceil(len(MUTANTS) / max(per_run, 1))
        shard = f"{datetime.date.today().toordinal() % n}/{n}"
    return shard, select(shard=shard)


@pytest.mark.slow
def test_rotating_subset_of_mutants_is_caught():
    shard, chosen = rotating_subset()
    touched = {m.file: (REPO / m.file).read_bytes() for m in (HARMLESS, *chosen)}
    results = run_mutants([HARMLESS, *chosen], jobs=2, timeout=300.0)
    assert {f: (REPO / f).read_bytes() for f in touched} == touched  # the working tree is never patched
    harmless, results = results[0], results[1:]
    assert harmless.status == MISSED, format_result(harmless)
    bad = [r for r in results if r.status != CAUGHT]
    assert not bad, f"shard {shard} (python -m tests.mutants --shard {shard}):\n" + \
        "\n".join(format_result(r) for r in bad)

