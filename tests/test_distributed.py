"""Two CPU processes (gloo, launched by torchrun): DDP equals single-process training on the same global batch,
and the training CLI writes its checkpoints once and resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_digits
from kdiff_align.storage import checkpoint as ckpt_lib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = {**os.environ, 'K_DIFFUSION_USE_COMPILE': '0', 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(HERE)}

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def torchrun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2',
                           '--standalone', *args], env=ENV, capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / 'tiny.json'
    path.write_text(json.dumps(tiny_digits()))
    return path


@pytest.mark.parametrize('stop_grad', [False, True])
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, tiny_config, stop_grad):
    import ddp_driver

    proc = torchrun(str(HERE / 'ddp_driver.py'), str(tiny_config), str(int(stop_grad)), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / 'result.json').read_text())
    assert result['world'] == 2
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    single, loss = ddp_driver.step(str(tiny_config), stop_grad)
    assert result['loss'] == pytest.approx(loss, rel=1e-5)
    moved = 0
    for name, tensor in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f'{name} differs between ranks'
        torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(tensor, ddp_driver.make_model(ddp_driver.load_config(str(tiny_config))).state_dict()[name])
    assert moved > 0


def test_training_cli_on_two_processes_saves_once_and_resumes(tmp_path, tiny_config):
    common = ['--no-progress', '--demo-every', '0', '--sample-n', '0', '--batch-size', '4', '--seed', '3',
              '--out-dir', str(tmp_path), '--name', 'ddp']
    proc = torchrun('-m', 'kdiff_align.train', '--config', str(tiny_config), '--end-step', '4', '--save-every', '2',
                    *common, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'process 0 of 2' in proc.stdout and 'process 1 of 2' not in proc.stdout
    assert proc.stdout.count('checkpoints/00000004.pth and') == 1, 'every checkpoint is written by one process'
    run = tmp_path / 'ddp'
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['00000002.pth', '00000004.pth']
    rows = (run / 'metrics.csv').read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith('4,')  # header + one row (log at the end step), not two
    ckpt = ckpt_lib.load_checkpoint(run)
    assert len(ckpt['rng']) == 2  # one RNG state per process, for an exact resume

    proc = torchrun('-m', 'kdiff_align.train', '--resume', str(run), '--end-step', '6', *common, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Resuming from' in proc.stdout and ckpt_lib.load_checkpoint(run)['step'] == 6
