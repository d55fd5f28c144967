"""What the CLIs print and refuse (issue 18): mg at the w the tools print, the evaluation summary, and small UX."""

import contextlib
import importlib.util
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import randomize_
from kdiff_align.evaluation import evaluate
from kdiff_align.sampling import sample
from kdiff_align.training import trainer as train_cli
from kdiff_align.config import load_config, make_guided_denoiser, make_model
from kdiff_align.core.guidance import OnePassDenoiser, check_w, sampling_passes

ROOT = Path(__file__).resolve().parents[1]
W_MG = 0.45 / (1 - 0.45)   # configs/toy_mg.json's trained effective guidance, printed as 0.818182


@pytest.fixture
def mg_ckpt(tmp_path):
    """A toy mg checkpoint (random weights) of configs/toy_mg.json."""
    config = load_config(ROOT / 'configs' / 'toy_mg.json')
    torch.manual_seed(0)
    model = randomize_(make_model(config))
    path = tmp_path / 'toy_mg.pth'
    torch.save({'config': json.dumps(config), 'model_ema': model.state_dict()}, path)
    return path


# Item 3: mg at the w the tools print.

def test_mg_at_its_printed_w_is_one_pass(mg_ckpt):
    config = load_config(ROOT / 'configs' / 'toy_mg.json')
    printed = float(f'{W_MG:g}')
    assert printed == 0.818182 and sampling_passes('mg', printed, (W_MG, W_MG)) == 1
    assert isinstance(make_guided_denoiser(config, torch.nn.Identity(), w=printed), OnePassDenoiser)
    assert sampling_passes('mg', 0.82, (W_MG, W_MG)) == 2   # another w is still CFG on top
    check_w('gft', float(f'{1 / 3:g}'), (0., 1 / 3))       # a printed range end is inside the range


def test_sample_without_w_or_with_trained_samples_mg_in_one_pass(mg_ckpt, tmp_path, capsys):
    assert sample.main([str(mg_ckpt), '--steps', '2', '--out', str(tmp_path / 'a.png')]) == 0
    out = capsys.readouterr().out
    assert f'columns = w [{W_MG!r}]' in out and 'network passes per step: 1 at w = 0.818182' in out
    assert sample.main([str(mg_ckpt), '--w', '0', 'trained', '--steps', '2', '--out', str(tmp_path / 'b.png')]) == 0
    assert 'network passes per step: 2 at w = 0, 1 at w = 0.818182' in capsys.readouterr().out


def test_evaluate_default_grid_holds_the_mg_models_one_pass_w(mg_ckpt):
    config = load_config(ROOT / 'configs' / 'toy_mg.json')
    ws = evaluate.default_ws([(config, None)])
    assert W_MG in ws and set(evaluate.DEFAULT_WS) <= set(ws)


# Item 9: the evaluation summary.

@pytest.mark.slow
@pytest.mark.e2e
def test_evaluate_summary_shows_energy_w_passes_and_the_rounded_n(mg_ckpt, tmp_path, capsys):
    argv = [str(mg_ckpt), '--out', str(tmp_path / 'eval'), '--w', '0', '0.818182', '--steps', '1', '--samplers',
            'euler', '--n', '50', '--no-progress']
    assert evaluate.main(argv) == 0
    captured = capsys.readouterr()
    assert 'note: --n 50 rounded to 48 (12 samples per class x 4 classes)' in captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith('toy_mg euler')]
    assert len(lines) == 2
    assert re.search(r'w=0: energy = \S+, energy_w = \S+ \(to the guided target p_w at w_target 0\), 2 passes/step',
                     lines[0])
    assert re.search(r'w=0.818182: .*energy_w = .*, 1 pass/step \(n = 48 samples', lines[1])


def test_digits_summary_shows_accuracy_beside_fd():
    row = {'model': 'm', 'sampler': 'euler', 'steps': 4, 'w': 1.0, 'w_target': 1.0, 'fd': 12.5, 'accuracy': 0.875,
           'n': 445, 'reference': 'digits train split'}
    assert 'FD = 12.5, accuracy = 0.875 (class accuracy) (n = 445' in evaluate.describe(row, 'fd')


# Item 10: small UX.

def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # the config's data location, 'data', is empty here
    out = tmp_path / 'new' / 'runs'
    assert train_cli.main(['--config', str(ROOT / 'configs' / 'cifar_aligned.json'), '--out-dir', str(out),
                           '--name', 'c']) == 2
    assert 'CIFAR-10 not found' in capsys.readouterr().err
    assert not (tmp_path / 'new').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='fp16 is allowed on a GPU')
def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path, capsys):
    assert train_cli.main(['--config', str(ROOT / 'configs' / 'toy_baseline.json'), '--out-dir', str(tmp_path),
                           '--name', 'h', '--mixed-precision', 'fp16', '--end-step', '1', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--mixed-precision fp16 needs a GPU' in err
    assert not (tmp_path / 'h').exists()


@pytest.fixture(scope='module')
def baseline_run(tmp_path_factory):
    """configs/toy_baseline.json trained for one step through the CLI; (run folder, its stdout)."""
    out = tmp_path_factory.mktemp('runs')
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert train_cli.main(['--config', str(ROOT / 'configs' / 'toy_baseline.json'), '--out-dir', str(out),
                               '--name', 'base', '--end-step', '1', '--batch-size', '16', '--sample-n', '0',
                               '--seed', '0', '--no-progress']) == 0
    return out / 'base', stdout.getvalue()


def test_a_baseline_run_is_announced_as_standard_cfg(baseline_run):
    _, out = baseline_run
    assert 'Objective: standard CFG (w_train = 0), uncond_prob = 0.1; demos at w = 2' in out
    assert 'aligned, w_train = 0.0' not in out


def test_resuming_a_finished_run_says_no_step_was_trained(baseline_run, capsys):
    run_dir, _ = baseline_run
    assert train_cli.main(['--resume', str(run_dir), '--out-dir', str(run_dir.parent), '--name', 'base',
                           '--end-step', '1', '--sample-n', '0', '--no-progress']) == 0
    out = capsys.readouterr().out
    assert 'loss None' not in out and 'Done: step 1, no step trained (the run was already at --end-step 1' in out


def _help(main, argv=('--help',)):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(list(argv))
    return ' '.join(out.getvalue().split())


@pytest.mark.parametrize('module', ['kdiff_align.sampling.sample', 'kdiff_align.evaluation.evaluate',
                                    'kdiff_align.training.trainer', 'kdiff_align.sd.train',
                                    'kdiff_align.bench.claims'])
def test_help_states_each_default_once(module):
    from importlib import import_module

    text = _help(import_module(module).main)
    assert '(default:' in text or module == 'kdiff_align.sampling.sample'
    assert not re.search(r'default[^()]*\) \(default', text), text
    assert '(default: None)' not in text


def test_sample_refuses_to_overwrite_a_grid(mg_ckpt, tmp_path, capsys):
    grid = tmp_path / 'toy_mg_grid.png'   # the default name, next to the checkpoint
    grid.write_bytes(b'mine')
    assert sample.main([str(mg_ckpt), '--steps', '2']) == 2
    assert capsys.readouterr().err == f'error: {grid} exists; pass another --out, or --force to overwrite it\n'
    assert grid.read_bytes() == b'mine'
    assert sample.main([str(mg_ckpt), '--steps', '2', '--force']) == 0 and grid.read_bytes() != b'mine'


def test_a_copied_comfyui_node_says_pip_install_no_deps(tmp_path, monkeypatch):
    copy = tmp_path / 'custom_nodes' / 'kdiff_align_nodes'
    shutil.copytree(ROOT / 'kdiff_align' / 'integrations' / 'comfyui', copy)
    monkeypatch.setitem(sys.modules, 'kdiff_align', None)   # not installed in ComfyUI's Python
    spec = importlib.util.spec_from_file_location('kdiff_align_nodes', copy / '__init__.py',
                                                  submodule_search_locations=[str(copy)])
    with pytest.raises(ImportError, match=r'-m pip install --no-deps /path/to/kdiff-align'):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
