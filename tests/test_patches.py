"""patches/: the LR-scheduler fix applied to the installed k-diffusion wheel and run on this torch.

The wheel (0.1.1.post1) ships k_diffusion/utils.py byte-identical to the upstream tag v0.1.1.post1, the fix's
stated target. The train.py patch targets upstream master, which no wheel ships: it is checked with
`git apply --check` against that commit's file (patches/README.md), and here only for its form.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PATCHES = Path(__file__).resolve().parents[1] / 'patches'
LR_PATCH = PATCHES / 'k-diffusion-v0.1.1.post1-lr-scheduler-torch27.diff'
TRAIN_PATCH = PATCHES / 'k-diffusion-master-4601bf0-train-aligned.diff'

RUN_SCHEDULERS = r'''
import math, sys, torch
import k_diffusion
assert k_diffusion.__file__.startswith(sys.argv[1]), k_diffusion.__file__
from k_diffusion import utils

def lrs(make, steps=5):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out

inv = lrs(lambda o: utils.InverseLR(o, inv_gamma=2.0, power=1.0, warmup=0.5))
exp = lrs(lambda o: utils.ExponentialLR(o, num_steps=2, decay=0.5))
const = lrs(lambda o: utils.ConstantLRWithWarmup(o, warmup=0.5))
for t in range(5):
    assert math.isclose(inv[t], (1 - 0.5 ** (t + 1)) * (1 + t / 2.0) ** -1.0), inv
    assert math.isclose(exp[t], 0.5 ** (t / 2)), exp
    assert math.isclose(const[t], 1 - 0.5 ** (t + 1)), const
print('ok', torch.__version__)
'''


def installed_k_diffusion() -> Path:
    spec = __import__('importlib.util').util.find_spec('k_diffusion')
    return Path(spec.origin).parent


def run_schedulers(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': str(root), 'K_DIFFUSION_USE_COMPILE': '0'}
    return subprocess.run([sys.executable, '-W', 'ignore', '-c', RUN_SCHEDULERS, str(root)], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture(scope='module')
def copies(tmp_path_factory):
    """Two copies of the installed k_diffusion package: as shipped, and with the LR patch applied."""
    out = {}
    for name in ('shipped', 'patched'):
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(installed_k_diffusion(), root / 'k_diffusion',
                        ignore=shutil.ignore_patterns('__pycache__'))
        out[name] = root
    command = (['patch', '-p1', '--forward', '--batch', '-i', str(LR_PATCH)] if shutil.which('patch')
               else ['git', 'apply', str(LR_PATCH)])
    result = subprocess.run(command, cwd=out['patched'], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.slow
@pytest.mark.e2e
def test_lr_patch_fixes_the_installed_wheel_on_this_torch(copies):
    import torch
    major, minor = (int(x) for x in torch.__version__.split('.')[:2])
    shipped = run_schedulers(copies['shipped'])
    if (major, minor) >= (2, 7):  # the bug the patch fixes is present on this torch
        assert shipped.returncode != 0 and 'positional argument' in shipped.stderr, shipped.stderr
    patched = run_schedulers(copies['patched'])
    assert patched.returncode == 0, patched.stderr
    assert patched.stdout.startswith('ok')


@pytest.mark.e2e
def test_lr_patch_applies_with_git_apply_too(copies, tmp_path):
    root = tmp_path / 'repo'
    shutil.copytree(copies['shipped'], root)
    result = subprocess.run(['git', 'apply', '--check', str(LR_PATCH)], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Only the three `super().__init__(optimizer, last_epoch, verbose)` calls and their docstrings change.
    text = LR_PATCH.read_text()
    assert text.count('-        super().__init__(optimizer, last_epoch, verbose)') == 3
    assert text.count('+        super().__init__(optimizer, last_epoch)') == 3


def test_train_patch_is_a_well_formed_diff_of_train_py():
    text = TRAIN_PATCH.read_text()
    assert text.startswith('--- a/train.py\n+++ b/train.py\n')
    for hunk in re.finditer(r'^@@ -(\d+),(\d+) \+(\d+),(\d+) @@\n((?:[ +\-].*\n)*)', text, re.M):
        lines = hunk.group(5).splitlines()
        assert sum(1 for ln in lines if ln[0] in ' -') == int(hunk.group(2))
        assert sum(1 for ln in lines if ln[0] in ' +') == int(hunk.group(4))
    for name in ('kdiff_align.load_config', 'kdiff_align.make_model', 'kdiff_align.make_denoiser_wrapper',
                 'kdiff_align.make_guided_denoiser'):
        assert name in text
    import kdiff_align
    for name in ('load_config', 'make_model', 'make_denoiser_wrapper', 'make_guided_denoiser'):
        assert callable(getattr(kdiff_align, name))  # the names the patched train.py calls exist
