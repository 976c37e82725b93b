"""The source folder `kernels/` is installed as `wz_kernels`; imported under its folder name (the
repository root on sys.path, as under pytest), it must alias wz_kernels and not run the ops' modules a
second time: transformers probes for Hugging Face's `kernels` package by importing that very name, and a
second definition of a torch.library op destroys the first one's registration (the ops then crash inside
the dispatcher, nondeterministically)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import torch._library.custom_ops as custom_ops
import wz_kernels
libs = dict(custom_ops.OPDEF_TO_LIB)
import kernels
from transformers.utils.import_utils import is_kernels_available
print(kernels is wz_kernels, is_kernels_available(),
      all(custom_ops.OPDEF_TO_LIB[name] is lib for name, lib in libs.items()), len(libs))
"""


def test_importing_the_folder_name_aliases_wz_kernels_and_keeps_every_op():
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the repository root first on sys.path, as pytest has it
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    alias, hf_kernels, same_registrations, ops = out.stdout.split()
    assert alias == "True" and hf_kernels == "False" and same_registrations == "True"
    assert int(ops) >= 8  # every wz op registered once: advantages, attention, logprob tiles, policy loss
