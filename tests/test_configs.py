"""The shipped configs: valid for kdiff-align and upstream, aligned vs baseline differ only in w_train, the
one-pass objectives' configs from aligned only in the align section."""

import json
from pathlib import Path

import k_diffusion as K
import pytest
import torch

from kdiff_align.config import load_config, make_denoiser_wrapper, make_model
from kdiff_align.training.trainer import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ('cifar', 'digits', 'toy')  # configs/sd_* belong to kdiff_align.sd and have their own tests
CONFIGS = sorted(p for p in (ROOT / 'configs').glob('*.json') if p.stem.split('_')[0] in PAIRS)


def test_every_pair_ships():
    names = {p.stem for p in CONFIGS}
    assert {f'{d}_{v}' for d in PAIRS for v in ('aligned', 'baseline')} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds(path):
    config = load_config(path)
    denoiser = make_denoiser_wrapper(config)(make_model(config))
    if config['model']['type'] != 'toy_mlp':
        # Upstream's own tools accept the same file (they ignore "align").
        upstream = K.config.load_config(path)
        assert upstream['model'] == config['model']
        K.config.make_model(upstream)
    if path.stem.endswith('baseline'):
        assert config['align']['w_train'] == 0  # standard CFG training, exactly upstream's loss
    assert denoiser.uncond['class_cond'] == config['dataset']['num_classes']


@pytest.mark.parametrize('dataset', PAIRS)
def test_aligned_and_baseline_differ_only_in_w_train(dataset):
    a = json.loads((ROOT / 'configs' / f'{dataset}_aligned.json').read_text())
    b = json.loads((ROOT / 'configs' / f'{dataset}_baseline.json').read_text())
    assert a['align'].pop('w_train') > 0 and b['align'].pop('w_train') == 0
    assert a == b


@pytest.mark.parametrize('path', [p for p in CONFIGS if p.stem.split('_')[1] in ('gft', 'mg', 'distill')],
                         ids=lambda p: p.stem)
def test_one_pass_configs_differ_from_aligned_only_in_the_align_section(path):
    one_pass = json.loads(path.read_text())
    aligned = json.loads((ROOT / 'configs' / f'{path.stem.split("_")[0]}_aligned.json').read_text())
    assert one_pass.pop('align')['objective'] == path.stem.split('_')[1]
    aligned.pop('align')
    assert one_pass == aligned


@pytest.mark.slow
def test_cifar_aligned_trains_on_torchvision_layout(tmp_path):
    from helpers import write_fake_cifar10

    write_fake_cifar10(tmp_path / 'data', per_batch=2)
    config = json.loads((ROOT / 'configs' / 'cifar_aligned.json').read_text())
    config['dataset'].update(location=str(tmp_path / 'data'), check_md5=False)
    result = train(config, TrainOptions(name='cifar', out_dir=str(tmp_path / 'runs'), batch_size=2, end_step=2,
                                        demo_every=0, sample_n=0, seed=0, progress=False, num_workers=0,
                                        save_final=False))
    assert result.step == 2 and result.loss is not None and torch.isfinite(torch.tensor(result.loss))
    assert (tmp_path / 'runs' / 'cifar' / 'metrics.csv').read_text().count('\n') == 2


@pytest.mark.parametrize('path', sorted((ROOT / 'configs').glob('*.json')), ids=lambda p: p.stem)
def test_every_shipped_config_loads_from_the_one_entry_point(path):
    config = load_config(path)   # Stable Diffusion configs included
    assert load_config(config) == config
    assert make_denoiser_wrapper(config, uncond={}).keywords['w_train'] == config['align']['w_train']
