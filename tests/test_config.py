"""kdiff_align.config: upstream's format plus "align", eager validation, the make_* factories."""

import json
from pathlib import Path

import k_diffusion as K
import pytest
import torch
from helpers import NUM_CLASSES, tiny_config

from kdiff_align import AlignedDenoiser, GuidedDenoiser
from kdiff_align.config import (ALIGN_DEFAULTS, ConfigError, load_config, make_denoiser_wrapper,
                                make_guided_denoiser, make_model)


def test_defaults_are_merged_and_upstream_sections_stay_upstream(tmp_path):
    path = tmp_path / 'config.json'
    path.write_text(json.dumps(tiny_config(w_train=2.)))
    config = load_config(path)
    assert config['align'] == {**ALIGN_DEFAULTS, 'w_train': 2.}
    assert config['optimizer']['betas'] == [0.95, 0.999]  # upstream's image_v1 defaults
    # Upstream's own tools read the same file (they ignore "align").
    upstream = K.config.load_config(path)
    assert upstream['model'] == config['model'] and upstream['dataset'] == config['dataset']


def test_make_denoiser_wrapper_resolves_the_align_section():
    config = load_config(tiny_config(w_train={'type': 'log-uniform', 'min_value': 1, 'max_value': 4},
                                     stop_grad_uncond=True, mix=0.5))
    config['dataset']['cond_dropout_rate'] = 0.2
    model = make_model(config)
    denoiser = make_denoiser_wrapper(config)(model)
    assert isinstance(denoiser, AlignedDenoiser)
    assert denoiser.inner_model is model and denoiser.sigma_data == 0.5
    assert denoiser.uncond == {'class_cond': NUM_CLASSES}
    assert denoiser.uncond_prob == 0.2  # null: upstream's dataset.cond_dropout_rate
    assert denoiser.stop_grad_uncond and denoiser.mix == 0.5
    assert denoiser.guidance_scale.type == 'log-uniform'
    guided = make_guided_denoiser(config, denoiser)
    assert isinstance(guided, GuidedDenoiser)
    assert guided.guidance_scale == pytest.approx(3 / torch.log(torch.tensor(4.)).item())  # log-uniform mean
    assert make_guided_denoiser(config, denoiser, w=0.5).guidance_scale == 0.5


def test_image_v1_gets_class_conditioning_without_editing_k_diffusion():
    config = load_config(tiny_config())
    model = make_model(config)
    x, sigma = torch.randn(2, 1, 8, 8), torch.ones(2)
    out = model(x, sigma, class_cond=torch.tensor([3, NUM_CLASSES]))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match='class_cond is required: labels in 0..9, or 10 for the null'):
        model(x, sigma)
    # Upstream's make_model accepts the same config (unconditional U-Net).
    assert isinstance(K.config.make_model(config), K.augmentation.KarrasAugmentWrapper)


def _with(path, value):
    config = tiny_config()
    *parents, key = path.split('.')
    node = config
    for p in parents:
        node = node.setdefault(p, {})
    node[key] = value
    return config


@pytest.mark.parametrize('path, value, message', [
    ('align.w_tran', 1., "config key 'align.w_tran' is unknown (did you mean 'align.w_train'?); allowed keys in "
     "\"align\": objective, w_train"),
    ('align.w_train', -1., "config key 'align.w_train': got -1.0; w_train (the paper's w) must be"),
    ('align.w_train', 'high', "config key 'align.w_train': got 'high'"),
    ('align.uncond_prob', 1.5, "config key 'align.uncond_prob': got 1.5; allowed: a number in [0, 1]"),
    ('align.mix', True, "config key 'align.mix': got True; allowed: a number in [0, 1]"),
    ('align.stop_grad_uncond', 'yes', "config key 'align.stop_grad_uncond': got 'yes'; allowed: true or false"),
    ('align.sampler', 'ddim', "config key 'align.sampler': got 'ddim'; allowed: one of 'euler'"),
    ('align.sample_steps', 0, "config key 'align.sample_steps': got 0; allowed: an integer in [1, inf]"),
    ('align.sigma_interval', [3, 1], "config key 'align.sigma_interval': got [3, 1]"),
    ('align.w_sample', -2, "config key 'align.w_sample': got -2"),
    ('model.loss_weighting', 'min-snr', "config key 'model.loss_weighting': got 'min-snr'; allowed: one of 'karras'"),
    ('model.type', 'image_v2', "config key 'model.type': got 'image_v2'; allowed: one of 'image_v1'"),
    ('model.input_size', [8], "config key 'model.input_size': got [8]; allowed: a list of two positive"),
    ('model.sigma_max', 0.001, "config key 'model.sigma_max': got 0.001; allowed: a number in (0.01, inf]"),
    ('dataset.num_classes', -1, "config key 'dataset.num_classes': got -1"),
    ('dataset.type', 'mnist', "config key 'dataset.type': got 'mnist'; allowed: one of 'cifar10'"),
    ('optimizer.lr', 0, "config key 'optimizer.lr': got 0; allowed: a number in (0, inf]"),
    ('lr_sched.type', 'cosine', "config key 'lr_sched.type': got 'cosine'; allowed: one of 'constant'"),
    ('model.loss_config', 'simple', "config key 'model.loss_config': got 'simple'; allowed: one of 'karras'"),
    ('aligned.w', 1, "config section 'aligned' is unknown; allowed sections: model, dataset"),
])
def test_bad_values_name_key_value_and_allowed(path, value, message):
    with pytest.raises(ConfigError) as err:
        load_config(_with(path, value))
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*missing.json' does not exist"):
        load_config(tmp_path / 'missing.json')
    bad = tmp_path / 'bad.json'
    bad.write_text('{"model": ')
    with pytest.raises(ConfigError, match="config file '.*bad.json' is not valid JSON"):
        load_config(bad)
    bad.write_text('[1, 2]')
    with pytest.raises(ConfigError, match='a config is a JSON object'):
        load_config(bad)


def test_a_shipped_configs_name_loads_it_from_anywhere(tmp_path, monkeypatch):
    from kdiff_align.config import config_path
    from kdiff_align.config.shipped import CONFIGS, shipped_configs

    monkeypatch.chdir(tmp_path)  # no configs/ here
    names = shipped_configs()
    assert {'cifar_aligned', 'digits_aligned', 'sd_aligned', 'toy_baseline'} <= set(names)
    # The README's spelling 'configs/NAME.json' (a checkout's path) names the shipped config outside a checkout too.
    assert config_path('digits_aligned') == config_path('digits_aligned.json') == CONFIGS / 'digits_aligned.json'
    assert config_path('configs/digits_aligned.json') == CONFIGS / 'digits_aligned.json'
    assert load_config('digits_aligned') == load_config(CONFIGS / 'digits_aligned.json')
    assert load_config('configs/digits_aligned.json') == load_config(CONFIGS / 'digits_aligned.json')
    (tmp_path / 'digits_aligned').write_text('{}')  # a file of that name wins: a path is always a path
    assert config_path('digits_aligned') == Path('digits_aligned')
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'digits_aligned.json').write_text('{}')
    assert config_path('configs/digits_aligned.json') == Path('configs/digits_aligned.json')
    for wrong in ('cifar_alligned', 'elsewhere/cifar_aligned.json', 'configs/cifar_alligned.json',
                  'configs/sub/cifar_aligned.json'):
        with pytest.raises(ConfigError) as err:
            load_config(wrong)
        assert f"config file '{wrong}' does not exist and is not the name of a shipped config" in str(err.value)
        assert 'one of the shipped names: ' + ', '.join(names) in str(err.value)


def test_the_training_cli_takes_a_shipped_stable_diffusion_configs_name(tmp_path, monkeypatch, capsys):
    from kdiff_align.config.sd import load_config as load_sd_config
    from kdiff_align.training.trainer import main

    monkeypatch.chdir(tmp_path)
    assert load_sd_config('sd_aligned')['model']['type'] == 'stable_diffusion'
    # Dispatched to the Stable Diffusion path, which then names the missing weights of the shipped config.
    for name in ('sd_aligned', 'configs/sd_aligned.json'):
        assert main(['--config', name, '--out-dir', str(tmp_path), '--end-step', '1']) == 2
        assert "'model.pretrained': 'models/stable-diffusion-v1-5' does not exist" in capsys.readouterr().err
    assert main(['--config', 'configs/sd_alligned.json', '--out-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file 'configs/sd_alligned.json' does not exist and is not the name of a "
                          'shipped config; pass the path of a JSON config or one of the shipped names: ')
    assert err.count('\n') == 1 and 'sd_aligned, sd_baseline' in err
