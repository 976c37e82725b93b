"""Apply one mutant to a temporary copy of the tree, run its test selection, report caught / missed.

A copy holds the files git knows about (tracked, plus untracked ones that are not ignored) and a
`wz_kernels -> kernels` link, so both packages import from the copy whatever is installed (the copy
comes first on PYTHONPATH; `run_mutant` checks where they were imported from).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.mutants.catalog import Mutant

REPO = Path(__file__).resolve().parents[2]

CAUGHT, MISSED, STALE, TIMEOUT, BROKEN = "caught", "missed", "stale", "timeout", "broken"


class StalePatch(Exception):
    """The mutant's old text is not found exactly once: the code moved on (refresh the catalogue)."""


@dataclass
class Result:
    mutant: Mutant
    status: str
    """caught | missed | stale (patch no longer applies) | timeout | broken (the harness failed)."""
    seconds: float = 0.0
    caught_by: str = ""
    """The first failing test (pytest node id), when caught."""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == CAUGHT


def tree_files(root: Path = REPO) -> list[str]:
    """Paths (relative) of the files git knows about: tracked and untracked-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (root / p).is_file()})


def copy_tree(dest: Path, root: Path = REPO, files: list[str] | None = None) -> Path:
    for rel in files if files is not None else tree_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    (dest / "wz_kernels").symlink_to("kernels", target_is_directory=True)
    return dest


def patched_text(mutant: Mutant, root: Path = REPO) -> str:
    """The mutated file's text; raises StalePatch unless the old text occurs exactly once."""
    path = root / mutant.file
    text = path.read_text() if path.is_file() else ""
    count = text.count(mutant.old)
    if count != 1:
        raise StalePatch(f"patch no longer applies: {mutant.file} {mutant.description} "
                         f"(old text found {count} times, expected once)")
    new_text = text.replace(mutant.old, mutant.new)
    if mutant.file.endswith(".py"):
        compile(new_text, mutant.file, "exec")  # a mutant must be a bug, not a syntax error
    return new_text


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


_IMPORT_CHECK = "import wz_engine, wz_kernels; print(wz_engine.__file__); print(wz_kernels.__file__)"


def _check_imports_from(copy: Path, env: dict) -> None:
    out = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], cwd=copy, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    files = out.stdout.split()
    if out.returncode != 0 or len(files) != 2 or not all(Path(f).resolve().is_relative_to(copy.resolve())
                                                         for f in files):
        raise RuntimeError(f"the copy's packages are not the ones imported: {out.stdout} "
                           f"{out.stderr[-2000:]}")


_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.MULTILINE)


def run_selection(copy: Path, tests: tuple[str, ...], timeout: float, env: dict) -> tuple[int | None, str]:
    """pytest -x on `tests` in `copy`; (return code or None on timeout, output)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    # own process group, so that a timeout kills torchrun's children too
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def run_mutant(mutant: Mutant, timeout: float = 300.0, root: Path = REPO,
               files: list[str] | None = None) -> Result:
    t0 = time.perf_counter()
    try:
        new_text = patched_text(mutant, root)
    except StalePatch as e:
        return Result(mutant, STALE, detail=str(e))
    except SyntaxError as e:
        return Result(mutant, BROKEN, detail=f"the patched {mutant.file} does not compile: {e}")
    with tempfile.TemporaryDirectory(prefix="wz-mutant-") as tmp:
        copy = copy_tree(Path(tmp), root, files)
        (copy / mutant.file).write_text(new_text)
        env = _env(copy)
        try:
            _check_imports_from(copy, env)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return Result(mutant, BROKEN, time.perf_counter() - t0, detail=str(e))
        code, out = run_selection(copy, mutant.tests, timeout, env)
    seconds = time.perf_counter() - t0
    if code is None:
        return Result(mutant, TIMEOUT, seconds, detail=f"selection ran past {timeout:.0f} s\n{out[-2000:]}")
    if code == 0:
        return Result(mutant, MISSED, seconds, detail=out[-2000:])
    if code != 1:  # 2: interrupted / collection error, 4: usage error, 5: no tests collected
        return Result(mutant, BROKEN, seconds, detail=f"pytest exited {code}\n{out[-3000:]}")
    failed = _FAILED.findall(out)
    return Result(mutant, CAUGHT, seconds, caught_by=failed[0] if failed else "?", detail=out[-2000:])


def run_mutants(mutants: list[Mutant], jobs: int = 2, timeout: float = 300.0, root: Path = REPO,
                on_result=None) -> list[Result]:
    """Run every mutant (in parallel, `jobs` at a time); results in catalogue order."""
    files = tree_files(root)

    def one(m: Mutant) -> Result:
        r = run_mutant(m, timeout, root, files)
        if on_result is not None:
            on_result(r)
        return r

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        return list(pool.map(one, mutants))


def run_baseline(mutants: list[Mutant], timeout: float, root: Path = REPO) -> tuple[bool, str]:
    """The union of the selections on the unmutated copy: every selection must pass as it is, or a
    'caught' would mean nothing."""
    tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="wz-mutant-base-") as tmp:
        copy = copy_tree(Path(tmp), root)
        env = _env(copy)
        _check_imports_from(copy, env)
        code, out = run_selection(copy, tests, timeout, env)
    return code == 0, out


def format_result(r: Result) -> str:
    head = f"{r.status.upper():8s} {r.mutant.name:38s} {r.seconds:6.1f}s  {r.mutant.description}"
    if r.status == CAUGHT:
        return f"{head}\n{'':8s} caught by {r.caught_by}"
    if r.status == STALE:
        return f"{head}\n{'':8s} {r.detail}"
    if r.status in (MISSED, TIMEOUT, BROKEN):
        tail = "\n".join(f"{'':8s} | {line}" for line in r.detail.strip().splitlines()[-12:])
        return f"{head}\n{'':8s} selection: {' '.join(r.mutant.tests)}\n{tail}"
    return head
