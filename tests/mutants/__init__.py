"""A curated mutation run: plausible single-point bugs, each applied to a temporary copy of the tree,
each expected to make a small, named test selection fail.

    python -m tests.mutants                 # the whole run (every mutant; exits non-zero on a miss)
    python -m tests.mutants --list          # the catalogue
    python -m tests.mutants --only NAME...  # some mutants
    python -m tests.mutants --check         # only check that every patch still applies

The catalogue is `tests/mutants/catalog.py`; the runner `tests/mutants/runner.py`. The working tree
is never touched. `tests/test_mutation_run.py` checks every patch on each test run and runs a
rotating subset of the mutants (the whole run is the command above).
"""
