"""Faults: kill -9 then --resume equals an uninterrupted run; corrupt checkpoints; non-finite losses; bad outputs."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from helpers import kill_9_after_checkpoint, tiny_digits
from kdiff_align.storage import checkpoint as ckpt_lib
from kdiff_align.training.trainer import TrainingError, TrainOptions, main, train


def tiny_digits_file(tmp_path: Path) -> Path:
    path = tmp_path / 'tiny.json'
    path.write_text(json.dumps(tiny_digits()))
    return path


def flags(*args: str) -> list[str]:
    return ['--no-progress', '--demo-every', '0', '--sample-n', '0', '--batch-size', '8', '--seed', '7', *args]


def cli(*args: str) -> list[str]:
    return [sys.executable, '-m', 'kdiff_align.train', *flags(*args)]


ENV = {**os.environ, 'K_DIFFUSION_USE_COMPILE': '0', 'OMP_NUM_THREADS': '1'}


@pytest.mark.slow
@pytest.mark.e2e
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, one_thread):
    """A CLI run SIGKILLed after a checkpoint, then resumed: its final state is the uninterrupted run's bit for bit
    (weights, EMA, optimizer, schedules, data position). Only the killed run needs a process of its own."""
    config, end = tiny_digits_file(tmp_path), 60
    common = ['--out-dir', str(tmp_path), '--end-step', str(end), '--save-every', '5']
    run = tmp_path / 'killed'
    killed_at = kill_9_after_checkpoint(cli('--config', str(config), '--name', 'killed', *common), ENV, run, 10,
                                        timeout=120)
    assert 10 <= killed_at < end
    assert main(flags('--resume', str(run), '--name', 'killed', *common)) == 0
    assert main(flags('--config', str(config), '--name', 'full', *common)) == 0
    full, resumed = ckpt_lib.load_checkpoint(tmp_path / 'full'), ckpt_lib.load_checkpoint(run)
    assert full['step'] == resumed['step'] == end
    for key in ('model', 'model_ema'):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name} differs after kill -9 and resume'
    for sa, sb in zip(full['opt']['state'].values(), resumed['opt']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full['sched'] == resumed['sched'] and full['batches_seen'] == resumed['batches_seen']


@pytest.mark.slow
@pytest.mark.e2e
def test_corrupt_checkpoint_is_named_and_the_previous_one_still_loads(tmp_path, capsys):
    config = tiny_digits_file(tmp_path)
    assert main(flags('--config', str(config), '--out-dir', str(tmp_path), '--name', 'run', '--end-step', '4',
                      '--save-every', '2')) == 0
    run = tmp_path / 'run'
    latest = ckpt_lib.resolve_checkpoint(run)
    previous = run / 'checkpoints' / f'{2:08}.pth'
    assert latest.name == f'{4:08}.pth' and previous.exists()
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk or a copy cut short
    with pytest.raises(ckpt_lib.CheckpointError, match='cannot read checkpoint .*00000004.pth.*truncated'):
        ckpt_lib.load_checkpoint(run)
    assert ckpt_lib.load_checkpoint(previous)['step'] == 2

    capsys.readouterr()
    assert main(flags('--resume', str(run), '--out-dir', str(tmp_path), '--name', 'run', '--end-step', '6')) == 2
    err = capsys.readouterr().err
    assert 'cannot read checkpoint' in err and '00000004.pth' in err and 'Traceback' not in err
    # Garbage that is not even a zip file, and a pickle with an arbitrary object: both refused, nothing executed.
    latest.write_bytes(b'not a checkpoint')
    with pytest.raises(ckpt_lib.CheckpointError, match='cannot read checkpoint'):
        ckpt_lib.load_checkpoint(latest)
    torch.save({'format': 'kdiff-align-checkpoint', 'payload': Path('/')}, latest)
    with pytest.raises(ckpt_lib.CheckpointError, match='cannot read checkpoint') as info:
        ckpt_lib.load_checkpoint(latest)
    message = str(info.value)   # one line: the file, what it holds, what was expected; not torch's advice
    assert '\n' not in message and str(latest) in message and 'pathlib.PosixPath' in message
    assert 'expected a kdiff-align checkpoint' in message and 'weights_only' not in message
    # Resuming from the previous checkpoint continues.
    assert main(flags('--resume', str(previous), '--out-dir', str(tmp_path), '--name', 'run', '--end-step', '6')) == 0
    assert ckpt_lib.load_checkpoint(run)['step'] == 6


def test_non_finite_loss_stops_without_a_nan_checkpoint(tmp_path, monkeypatch):
    from kdiff_align.core.objective import AlignedDenoiser

    calls = {'n': 0}
    loss = AlignedDenoiser.loss

    def poisoned(self, *args, **kwargs):
        calls['n'] += 1
        out = loss(self, *args, **kwargs)
        return out * float('nan') if calls['n'] > 4 else out

    monkeypatch.setattr(AlignedDenoiser, 'loss', poisoned)
    options = TrainOptions(name='nan', out_dir=str(tmp_path), batch_size=8, seed=1, end_step=10, save_every=2,
                           demo_every=0, sample_n=0, progress=False)
    with pytest.raises(TrainingError, match=r'the loss is nan at step 5; stopped before the optimizer step.*'
                                            r'last good checkpoint: .*00000004.pth'):
        train(json.loads(tiny_digits_file(tmp_path).read_text()), options)
    ckpt = ckpt_lib.load_checkpoint(tmp_path / 'nan')
    assert ckpt['step'] == 4
    assert all(torch.isfinite(t).all() for t in ckpt['model'].values())
    assert sorted(p.name for p in (tmp_path / 'nan' / 'checkpoints').iterdir()) == ['00000002.pth', '00000004.pth']


def test_unwritable_output_folder_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / 'a-file'
    blocker.write_text('not a folder')
    assert main(flags('--config', str(tiny_digits_file(tmp_path)), '--out-dir', str(blocker / 'runs'),
                      '--end-step', '2')) == 2
    err = capsys.readouterr().err
    assert '--out-dir' in err and 'a-file' in err and 'Traceback' not in err
    assert not (tmp_path / 'a-file').is_dir()


@pytest.mark.e2e
def test_sigterm_saves_at_a_step_boundary_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    from kdiff_align.training.trainer import ImageLoss

    calls = {'n': 0}
    loss = ImageLoss.__call__

    def terminated_during_step_3(self, batch):
        calls['n'] += 1
        if calls['n'] == 3:
            signal.raise_signal(signal.SIGTERM)   # as from a scheduler's kill: the handler runs now
        return loss(self, batch)

    monkeypatch.setattr(ImageLoss, '__call__', terminated_during_step_3)
    argv = ['--config', str(tiny_digits_file(tmp_path)), '--out-dir', str(tmp_path), '--name', 'term', '--no-progress',
            '--demo-every', '0', '--sample-n', '0', '--batch-size', '8', '--seed', '7', '--end-step', '100000',
            '--save-every', '0', '--log-every', '1']
    assert main(argv) == 128 + signal.SIGTERM
    out, err = capsys.readouterr()
    assert 'SIGTERM: finishing this step and saving a checkpoint' in err and 'Done: step 3' in out
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # the handler is the CLI's only while it runs
    run = tmp_path / 'term'
    assert ckpt_lib.load_checkpoint(run)['step'] == 3
    assert [r.split(',')[0] for r in (run / 'metrics.csv').read_text().splitlines()[1:]] == ['1', '2', '3']
    assert main([*argv[:-6], '--end-step', '5']) == 0 and ckpt_lib.load_checkpoint(run)['step'] == 5
