"""The install story: constraints-lock.txt (known-good versions) agrees with pyproject.toml's ranges,
and the README's install lines are the ones .ci/run runs."""

import importlib.metadata
import re
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NOT_LOCKED = {"torch", "triton"}  # machine-dependent (CPU build here, the CUDA build on GPU machines)
GPU_ONLY_EXTRAS = {"vllm", "flash-attn"}  # cannot be installed on the CPU machine that writes the lock
LINUX = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux"}


def read_lock(path: Path = ROOT / "constraints-lock.txt") -> dict[str, Version]:
    """{canonical name: version} from `name==version` lines; anything else is an error."""
    lock = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and not req.marker and not req.extras, \
            f"constraints-lock.txt:{n}: expected name==version, got {line!r}"
        name = canonicalize_name(req.name)
        assert name not in lock, f"constraints-lock.txt:{n}: {name} is pinned twice"
        lock[name] = Version(specs[0].version)
    return lock


def declared(extras: set[str]) -> list[Requirement]:
    """pyproject's core requirements plus those of `extras`, for Linux."""
    lines = list(PYPROJECT["dependencies"])
    for extra in sorted(extras):
        lines += PYPROJECT["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(LINUX)]


def test_lock_is_pinned_and_leaves_torch_to_the_machine():
    lock = read_lock()
    assert len(lock) > 30
    machine = [n for n in lock if n in NOT_LOCKED or n.startswith("nvidia-") or n == "wz-engine"]
    assert not machine, f"constraints-lock.txt must not pin {machine}"


def test_every_locked_version_satisfies_pyprojects_range():
    lock = read_lock()
    extras = set(PYPROJECT["optional-dependencies"]) - GPU_ONLY_EXTRAS
    bad = [f"{r.name}: locked {lock[canonicalize_name(r.name)]}, pyproject says {r.specifier}"
           for r in declared(extras)
           if canonicalize_name(r.name) in lock and lock[canonicalize_name(r.name)] not in r.specifier]
    assert not bad, bad


def test_the_dev_install_is_fully_locked():
    lock = read_lock()
    missing = [r.name for r in declared({"dev"}) if canonicalize_name(r.name) not in lock | dict.fromkeys(NOT_LOCKED)]
    assert not missing, f"constraints-lock.txt lacks {missing}: regenerate it with .ci/update-lock"


def test_locked_packages_agree_with_each_other():
    """Each locked package's own requirements on other locked packages hold at the locked versions
    (read from the installed metadata of the packages installed at exactly their locked version)."""
    lock = read_lock()
    checked, bad = 0, []
    for name, version in lock.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != version:
            continue
        checked += 1
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**LINUX, "extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in lock and lock[dep] not in req.specifier:
                bad.append(f"{name} {version} requires {req}, locked {dep}=={lock[dep]}")
    if not checked:
        pytest.skip("no locked package is installed at its locked version")
    assert not bad, bad


def test_readme_install_lines_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for line in ("pip install -c constraints-cpu.txt torch==2.13.0", 'pip install -c constraints-cpu.txt -e ".[dev]"'):
        assert line in readme, line
    assert re.search(r'pip" install -q -c constraints-cpu\.txt torch==2\.13\.0', ci)
    assert re.search(r'pip" install -q -c constraints-cpu\.txt "\$\{locked\[@\]\}" -e "\.\[dev\]"', ci)
    assert "-c constraints-lock.txt" in readme and "--locked) locked=(-c constraints-lock.txt)" in ci
    assert "python -m pytest -q" in readme and ci.rstrip().endswith("python -m pytest -q")
