"""kdiff_align.training.trainer: the CLI trains, checkpoints, resumes exactly, and refuses bad input clearly."""

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import opts, tiny_digits, toy
from kdiff_align.storage import checkpoint as ckpt_lib
from kdiff_align.config import ConfigError, load_config
from kdiff_align.training.trainer import TrainingError, TrainOptions, main, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_trains_digits_and_writes_checkpoint_demo_metrics_export(tmp_path, capsys):
    rc = main(['--config', str(ROOT / 'configs' / 'digits_aligned.json'), '--end-step', '2', '--batch-size', '4',
               '--name', 'cli', '--out-dir', str(tmp_path), '--demo-every', '1', '--sample-n', '10', '--seed', '0',
               '--num-workers', '0', '--no-progress'])
    assert rc == 0
    run = tmp_path / 'cli'
    assert (run / 'checkpoints' / '00000002.pth').is_file()
    assert json.loads((run / 'latest.json').read_text())['latest_checkpoint'] == 'checkpoints/00000002.pth'
    assert (run / 'demo' / 'demo_00000001.png').is_file() and (run / 'demo' / 'demo_00000002.png').is_file()
    rows = list(csv.DictReader(open(run / 'metrics.csv')))
    assert [r['step'] for r in rows] == ['2'] and math.isfinite(float(rows[0]['loss']))
    assert (run / 'cli.safetensors').is_file()
    assert json.loads((run / 'config.json').read_text())['align']['w_train'] == 2.0
    out = capsys.readouterr().out
    assert 'Done: step 2' in out and str(run / 'cli.safetensors') in out


def resume_config(objective: str, tmp_path) -> dict:
    """Each objective's tiny config: aligned on digits (an image model, a random w per row, an LR schedule),
    the others on the toy mixture; MG's warm-up ends before the resume point, distill's teacher is a short run."""
    if objective == 'aligned':
        config = tiny_digits(w_train={'type': 'uniform', 'min_value': 0.5, 'max_value': 2})
        config['lr_sched'] = {'type': 'inverse', 'inv_gamma': 3.0, 'power': 0.5, 'warmup': 0.5}
        return config
    if objective == 'mg':
        return toy('mg', warmup_steps=2)
    if objective == 'distill':
        return toy('distill', teacher=str(train(toy('baseline'), opts(tmp_path, 'teacher', end_step=2)).run_dir))
    return toy(objective)


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['aligned', 'baseline', 'gft', 'mg', 'distill'])
def test_resume_equals_an_uninterrupted_run(objective, tmp_path):
    """Stop at step 3 (demos drawn meanwhile), resume from the run folder: the step-6 state is the uninterrupted
    run's bit for bit (weights, EMA, optimizer, schedules, data position)."""
    config = resume_config(objective, tmp_path)
    full = train(config, opts(tmp_path, 'full', end_step=6, grad_accum_steps=2))
    part = train(config, opts(tmp_path, 'part', end_step=3, grad_accum_steps=2, demo_every=1, sample_n=4))
    assert part.step == 3
    resumed = train(None, opts(tmp_path, 'resumed', end_step=6, grad_accum_steps=2, demo_every=2, sample_n=4,
                               resume=str(tmp_path / 'part'), seed=None))
    assert resumed.step == 6
    a, b = ckpt_lib.load_checkpoint(full.checkpoint), ckpt_lib.load_checkpoint(resumed.checkpoint)
    for key in ('model', 'model_ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name} differs after resume'
    assert a['opt']['state'].keys() == b['opt']['state'].keys()
    for sa, sb in zip(a['opt']['state'].values(), b['opt']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a['sched'] == b['sched'] and a['ema_sched'] == b['ema_sched'] and a['batches_seen'] == b['batches_seen'] == 12


def test_run_folder_auto_resumes_and_metrics_are_trimmed_to_the_checkpoint(tmp_path):
    config = tiny_digits()
    train(config, opts(tmp_path, end_step=4, save_every=2, log_every=1))
    # Simulate a crash after step 4's rows were logged but before its checkpoint: point latest at step 2.
    run = tmp_path / 'run'
    (run / 'latest.json').write_text(json.dumps({'latest_checkpoint': 'checkpoints/00000002.pth', 'step': 2}))
    result = train(config, opts(tmp_path, end_step=3, log_every=1))
    assert result.step == 3
    assert [r['step'] for r in csv.DictReader(open(run / 'metrics.csv'))] == ['1', '2', '3']


def test_checkpoint_write_is_atomic_and_keeps_the_previous_one(tmp_path, monkeypatch):
    config = tiny_digits()
    train(config, opts(tmp_path, end_step=1))
    run = tmp_path / 'run'

    def crash(obj, path):
        Path(path).write_bytes(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        train(config, opts(tmp_path, end_step=2))
    assert json.loads((run / 'latest.json').read_text())['step'] == 1
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['00000001.pth']
    assert ckpt_lib.load_checkpoint(run)['step'] == 1


@pytest.fixture
def nan_digits(monkeypatch):
    """Digits with NaN pixels: the first loss is NaN."""
    from kdiff_align.data import digits

    real = digits.load_digits
    monkeypatch.setattr(digits, 'load_digits', lambda split='train', test_fraction=0.25:
                        (real(split, test_fraction)[0] * float('nan'), real(split, test_fraction)[1]))


def test_nan_loss_stops_without_saving_a_nan_checkpoint(tmp_path, nan_digits):
    with pytest.raises(TrainingError, match=r'the loss is nan at step 1; stopped before the optimizer step'):
        train(tiny_digits(), opts(tmp_path, end_step=2))
    assert not (tmp_path / 'run' / 'latest.json').exists()
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_w_override_and_baseline_config(tmp_path):
    config = load_config(ROOT / 'configs' / 'digits_baseline.json')
    result = train(config, opts(tmp_path, end_step=0, w_train=2.5, sample_n=0))
    saved = json.loads((result.run_dir / 'config.json').read_text())
    assert saved['align']['w_train'] == 2.5 and saved['align']['w_sample'] == 2.0


@pytest.mark.parametrize('argv, message', [
    (['--batch-size', '0'], 'argument --batch-size: must be an integer >= 1, got 0'),
    (['--w-train', '-1'], 'argument --w-train: must be a finite number >= 0, got -1'),
    (['--mixed-precision', 'fp8'], "argument --mixed-precision: invalid choice: 'fp8'"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(['--config', str(ROOT / 'configs' / 'digits_aligned.json'), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_config_and_checkpoint_give_clear_errors(tmp_path, capsys):
    assert main(['--config', str(tmp_path / 'nope.json')]) == 2
    assert "config file" in capsys.readouterr().err
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    assert main(['--resume', str(bad), '--out-dir', str(tmp_path)]) == 2
    assert 'cannot read checkpoint' in capsys.readouterr().err
    assert main(['--out-dir', str(tmp_path)]) == 2
    assert 'no config: pass --config' in capsys.readouterr().err
    config = tiny_digits()
    train(config, opts(tmp_path, end_step=1))
    other = tiny_digits()
    other['model']['channels'] = [8, 32]
    with pytest.raises(ConfigError, match=r'model.channels: \[8, 16\] in the checkpoint, \[8, 32\] in the config'):
        train(other, opts(tmp_path, end_step=2))


def test_toy_config_trains(tmp_path):
    config = toy('aligned')
    result = train(config, opts(tmp_path, end_step=2, sample_n=8))
    assert result.demo.is_file() and result.loss is not None and math.isfinite(result.loss)


def test_schedules_match_upstream_formulas():
    from kdiff_align.training.schedulers import make_ema_sched, make_lr_scheduler
    cases = {
        'constant': ({'type': 'constant', 'warmup': 0.9}, lambda t: (1 - 0.9 ** (t + 1)) * 0.1),
        'inverse': ({'type': 'inverse', 'inv_gamma': 20., 'power': 0.5, 'warmup': 0.5, 'min_lr': 0.02},
                    lambda t: (1 - 0.5 ** (t + 1)) * max(0.02, 0.1 * (1 + t / 20.) ** -0.5)),
        'exponential': ({'type': 'exponential', 'num_steps': 10, 'decay': 0.5},
                        lambda t: max(0., 0.1 * (0.5 ** (1 / 10)) ** t)),
    }
    for name, (sched_config, formula) in cases.items():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make_lr_scheduler(opt, sched_config)
        for t in range(40):
            assert opt.param_groups[0]['lr'] == pytest.approx(formula(t), rel=1e-12), (name, t)
            opt.step()
            sched.step()
    ema = make_ema_sched({'type': 'inverse', 'power': 0.75, 'max_value': 0.999})
    for t in range(5):
        assert ema.get_value() == pytest.approx(min(0.999, 1 - (1 + t) ** -0.75))
        ema.step()
    with pytest.raises(ConfigError, match="'lr_sched.num_steps' is required"):
        make_lr_scheduler(opt, {'type': 'exponential'})


def test_stop_request_saves_at_a_step_boundary_and_resume_finishes(tmp_path):
    config = tiny_digits()
    calls = iter(range(100))
    stopped = train(config, opts(tmp_path, end_step=5), should_stop=lambda: next(calls) >= 2)
    assert stopped.interrupted and stopped.step == 2 and ckpt_lib.load_checkpoint(stopped.run_dir)['step'] == 2
    assert train(config, opts(tmp_path, end_step=5)).step == 5


def test_wandb_logging_runs_offline(tmp_path):
    assert os.environ.get('WANDB_MODE') == 'disabled'  # conftest: nothing leaves the machine
    result = train(tiny_digits(), opts(tmp_path, end_step=2, demo_every=1, sample_n=4,
                                        wandb_project='kdiff-align-test'))
    assert result.step == 2 and result.demo.is_file()


def _below_range(f):
    lo = f.metadata['lo']
    return lo if f.metadata['strict'] else lo - 1


def test_each_option_range_is_stated_once_and_checked_by_flag_and_library(capsys):
    """Every ranged option of both trainers: the library check (engine.check_options) and the CLI flag refuse the
    same value, naming the same flag."""
    import dataclasses

    from kdiff_align.training import engine, cli as train_cli
    from kdiff_align.config import ConfigError
    from kdiff_align.sd.train import SDTrainOptions

    parser = train_cli.make_parser()
    checked = set()
    for cls in (TrainOptions, SDTrainOptions):
        for flag, f in engine.option_flags(cls).items():
            if f.metadata['lo'] is None:
                continue
            bad = _below_range(f)
            with pytest.raises(ConfigError, match=f'^{flag}: got {bad!r}; allowed: an? '):
                engine.check_options(cls(**{f.name: bad}))
            with pytest.raises(SystemExit):
                parser.parse_args([flag, str(bad)])
            assert f'argument {flag}: must be' in capsys.readouterr().err
            checked.add(flag)
    assert {'--batch-size', '--lr', '--w-train', '--num-workers', '--cache-batch-size'} <= checked
