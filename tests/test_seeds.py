"""Every random input in tests/ and bench/ comes from a seeded source, so a failure reproduces.

A call that draws from a global RNG (torch.rand*/randn*/randint*/randperm/normal/bernoulli/multinomial
without `generator=`, `np.random.<draw>`, `random.<draw>`) must sit in a function that seeds that
RNG itself (`torch.manual_seed`, `np.random.seed`, `random.seed`), or carry `# global RNG on purpose`.
Seeded generator objects (`torch.Generator().manual_seed(s)`, `np.random.default_rng(s)`,
`random.Random(s)`) are the usual way. String hashes (`hash("...")`) are salted per process: no seeds
from them either.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_DRAWS = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal",
               "bernoulli", "multinomial", "poisson"}
NP_OK = {"default_rng", "Generator", "PCG64", "SeedSequence", "seed", "get_state", "set_state", "RandomState"}
RANDOM_OK = {"Random", "seed", "getstate", "setstate", "SystemRandom"}
SEEDERS = ("manual_seed(", "np.random.seed(", "random.seed(")
ALLOW = "# global RNG on purpose"


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unseeded_draws(path: Path) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    seeded_spans = [(f.lineno, f.end_lineno) for f in ast.walk(tree)
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and any(s in (ast.get_source_segment(text, f) or "") for s in SEEDERS)]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, fn = name.rpartition(".")
        seeded_kw = any(k.arg == "generator" for k in node.keywords)
        bad = (head == "torch" and fn in TORCH_DRAWS and not seeded_kw) \
            or (head in ("np.random", "numpy.random") and fn not in NP_OK) \
            or (head == "random" and fn not in RANDOM_OK) \
            or (name == "hash" and bool(node.args)
                and isinstance(node.args[0], (ast.Name, ast.Constant, ast.JoinedStr)))
        if not bad or ALLOW in lines[node.lineno - 1]:
            continue
        if name != "hash" and any(a <= node.lineno <= b for a, b in seeded_spans):
            continue
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_no_unseeded_random_inputs_in_tests_and_bench():
    files = sorted(p for d in ("tests", "bench") for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unseeded_draws(f)]
    assert not found, "unseeded random inputs:\n" + "\n".join(found)


def test_the_scan_finds_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import random, torch, numpy as np\n"
                   "def f():\n    return torch.randn(3), np.random.rand(2), random.random(), hash('x') % 7\n"
                   "def g():\n    torch.manual_seed(0)\n    return torch.randn(3)\n"
                   "def h(g):\n    return torch.randn(3, generator=g), np.random.default_rng(1).random()\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        hits = unseeded_draws(bad)
    finally:
        ROOT = saved
    assert [h.split(": ", 1)[1] for h in hits] == ["torch.randn(3)", "np.random.rand(2)", "random.random()",
                                                   "hash('x')"]
