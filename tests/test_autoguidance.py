"""Autoguidance (Karras et al. 2024): D_main + w·(D_main − D_guide) at every call of real k-diffusion samplers,
w = 0 as the unguided main model bit for bit, the guidance interval, and guides that cannot guide refused."""

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import randomize_, tiny_config

from kdiff_align.sampling.autoguidance import AutoGuidedDenoiser, check_guide, load_guided
from kdiff_align.storage.checkpoint import save_export
from kdiff_align.config import ConfigError, load_config
from kdiff_align.sampling.sample import build_denoiser

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
STEPS = 8
SIGMA = ("σ convention (sigma_data, sigma_min, sigma_max and loss_config, its preconditioning)")


def shipped_toy(name: str = 'baseline', **changes) -> dict:
    """configs/toy_<name>.json as a dict, with 'section.key' changes."""
    config = json.loads((CONFIGS / f'toy_{name}.json').read_text())
    for key, value in changes.items():
        section, field = key.split('.')
        config[section][field] = value
    return config


SMALL = {'model.width': 32, 'model.depth': 2}   # a smaller config of the same family


class Recorder(torch.nn.Module):
    """A denoiser that records the input, sigma, extra_args and output of every call."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner_model, self.calls = inner, []

    def forward(self, input, sigma, **extra_args):
        out = self.inner_model(input, sigma, **extra_args)
        self.calls.append((input.clone(), sigma.clone(), dict(extra_args), out.clone()))
        return out


def denoiser(config: dict, seed: int) -> torch.nn.Module:
    """The config's sampling denoiser (sample.build_denoiser) with random weights."""
    return randomize_(build_denoiser(load_config(config)), seed)


@pytest.fixture
def models():
    return Recorder(denoiser(shipped_toy(), 0)), Recorder(denoiser(shipped_toy(**SMALL), 1))


def run(sampler: str, model: torch.nn.Module, seed: int = 0, callback=None) -> torch.Tensor:
    import k_diffusion as K

    config = load_config(shipped_toy())['model']
    sigmas = K.sampling.get_sigmas_karras(STEPS, config['sigma_min'], config['sigma_max'], rho=7.)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, generator=gen) * sigmas[0]
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(seed)   # ancestral samplers' fresh noise
    with torch.no_grad():
        return getattr(K.sampling, f'sample_{sampler}')(model, x, sigmas, extra_args={'class_cond': labels},
                                                         callback=callback, disable=True)


@pytest.mark.parametrize('sampler, calls', [('euler', STEPS), ('dpmpp_2m', STEPS), ('heun', 2 * STEPS - 1)])
def test_every_call_is_main_plus_w_times_main_minus_guide(models, sampler, calls):
    main, guide = models
    guided = Recorder(AutoGuidedDenoiser(main, guide, 2.0))
    steps = []
    run(sampler, guided, callback=lambda info: steps.append(info['denoised'].clone()))
    assert len(guided.calls) == len(main.calls) == len(guide.calls) == calls   # one call of each per evaluation
    for (x, sigma, extra, out), (xm, sm, em, d_main), (xg, sg, eg, d_guide) in zip(guided.calls, main.calls,
                                                                                    guide.calls):
        for seen_x, seen_sigma, seen_extra in ((xm, sm, em), (xg, sg, eg)):   # same rows, sigma, condition
            assert torch.equal(seen_x, x) and torch.equal(seen_sigma, sigma)
            assert torch.equal(seen_extra['class_cond'], extra['class_cond'])
        torch.testing.assert_close(out, d_main + 2.0 * (d_main - d_guide))
        assert not torch.allclose(out, d_main)   # the guide moved it
    if calls == STEPS:   # the sampler stepped with the guided outputs
        assert all(torch.equal(d, call[3]) for d, call in zip(steps, guided.calls, strict=True))


@pytest.mark.parametrize('sampler', ['euler', 'dpmpp_2m', 'euler_ancestral'])
def test_w_0_is_the_main_models_sample_bit_for_bit_without_the_guide(models, sampler):
    main, guide = models
    expected = run(sampler, main)
    assert torch.equal(run(sampler, AutoGuidedDenoiser(main, guide, 0)), expected)
    assert guide.calls == [] and len(main.calls) == 2 * STEPS


def test_outside_the_interval_only_the_main_model_runs(models):
    main, guide = models
    interval = (0.3, 5.0)
    guided = Recorder(AutoGuidedDenoiser(main, guide, 1.5, sigma_interval=interval))
    run('euler', guided)
    inside = [bool(interval[0] <= call[1][0] <= interval[1]) for call in guided.calls]
    assert 0 < sum(inside) < STEPS and len(guided.calls) == len(main.calls) == STEPS
    assert len(guide.calls) == sum(inside)
    d_guides = iter(call[3] for call in guide.calls)
    for is_inside, (_, _, _, out), (_, _, _, d_main) in zip(inside, guided.calls, main.calls):
        if is_inside:
            torch.testing.assert_close(out, d_main + 1.5 * (d_main - next(d_guides)))
        else:
            assert torch.equal(out, d_main)


def test_rows_outside_the_interval_get_the_main_model_and_the_guide_gets_the_whole_batch():
    torch.manual_seed(0)
    small = tiny_config()
    small['model'].update(channels=[8, 16])
    main = Recorder(randomize_(build_denoiser(load_config(tiny_config())), 0))
    guide = Recorder(randomize_(build_denoiser(load_config(small)), 1))
    x, sigma, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = AutoGuidedDenoiser(main, guide, 3.0, sigma_interval=[0.3, 5.0])(x, sigma, class_cond=labels)
    assert [call[0].shape[0] for call in guide.calls] == [3] and len(main.calls) == 1
    d_main, d_guide = main.calls[0][3], guide.calls[0][3]
    assert torch.equal(out[0], d_main[0]) and torch.equal(out[2], d_main[2])
    torch.testing.assert_close(out[1], d_main[1] + 3.0 * (d_main[1] - d_guide[1]))
    assert not torch.allclose(out[1], d_main[1])


@pytest.mark.parametrize('main, guide, message', [
    (shipped_toy(), json.loads((CONFIGS / 'digits_baseline.json').read_text()),
     "config key 'model.type': guide 'image_v1', main 'toy_mlp'; a guide must be of the main model's architecture "
     'family (a smaller config of it, fewer channels or depths, is allowed)'),
    (shipped_toy(), shipped_toy(**SMALL, **{'dataset.num_classes': 3}),
     "config key 'dataset.num_classes': guide 3, main 4; a guide must match the main model's class count (both "
     'models see the same condition)'),
    (shipped_toy(), shipped_toy(**{'model.sigma_data': 1.0}),
     f"config key 'model.sigma_data': guide 1.0, main 1.5; a guide must match the main model's {SIGMA}"),
    (shipped_toy(), shipped_toy(**{'model.sigma_max': 160}),
     f"config key 'model.sigma_max': guide 160, main 80; a guide must match the main model's {SIGMA}"),
    (shipped_toy(), shipped_toy(**{'dataset.radius': 3.0}),
     "config key 'dataset.radius': guide 3.0, main 2.0; a guide must match the main model's data"),
    (shipped_toy(), shipped_toy('gft'),
     "guide config key 'align.objective': got 'gft'; autoguidance takes standard or aligned models ('aligned'): "
     "a gft or distill network is told w and an mg model's one pass samples its trained guidance, so neither is "
     'the plain conditional denoiser autoguidance extrapolates from'),
    (shipped_toy('mg'), shipped_toy(),
     "main config key 'align.objective': got 'mg'; autoguidance takes standard or aligned models ('aligned'): "
     "a gft or distill network is told w and an mg model's one pass samples its trained guidance, so neither is "
     'the plain conditional denoiser autoguidance extrapolates from'),
])
def test_a_guide_of_another_family_data_classes_sigma_or_objective_is_refused_in_one_line(main, guide, message):
    with pytest.raises(ConfigError) as err:
        check_guide(main, guide)
    assert str(err.value) == message


def test_a_smaller_config_of_the_same_family_and_task_is_a_valid_guide():
    other = shipped_toy(**SMALL, **{'dataset.seed': 1, 'model.loss_weighting': 'snr'})
    assert check_guide(shipped_toy(), other) is None
    digits = json.loads((CONFIGS / 'digits_baseline.json').read_text())
    smaller = copy.deepcopy(digits)
    smaller['model'].update(channels=[16, 32], depths=[1, 1], mapping_out=32)
    assert check_guide(CONFIGS / 'digits_baseline.json', smaller) is None
    assert check_guide(shipped_toy(), shipped_toy('aligned')) is None


def test_the_main_model_is_not_its_own_guide_and_w_is_checked(models):
    main, guide = models
    for same in (main, Recorder(main.inner_model)):
        with pytest.raises(ValueError, match=r'^the guide is the main model itself \(the same weights\): '
                                             r'autoguidance needs a weaker model'):
            AutoGuidedDenoiser(main, same, 1.0)
    for w in (-1, float('nan'), True, '2'):
        with pytest.raises(ValueError, match=r"^w must be a number >= 0 \(the paper's w; autoguidance's s = 1 \+ w\)"):
            AutoGuidedDenoiser(main, guide, w)


def test_load_guided_builds_it_from_two_exports_and_checks_the_guide(tmp_path, models):
    main, guide = models
    save_export(tmp_path / 'main.safetensors', main.inner_model.inner_model.state_dict(),
                load_config(shipped_toy()))
    save_export(tmp_path / 'guide.safetensors', guide.inner_model.inner_model.state_dict(),
                load_config(shipped_toy(**SMALL)))
    config, guided = load_guided(tmp_path / 'main.safetensors', tmp_path / 'guide.safetensors', 2.0)
    assert config['model']['width'] == 128 and isinstance(guided, AutoGuidedDenoiser)
    x, sigma, labels = torch.randn(4, 2), torch.full((4,), 2.0), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        d_main, d_guide = main(x, sigma, class_cond=labels), guide(x, sigma, class_cond=labels)
        torch.testing.assert_close(guided(x, sigma, class_cond=labels), d_main + 2.0 * (d_main - d_guide))
    other = load_config(shipped_toy(**{'dataset.num_classes': 3}))
    save_export(tmp_path / 'other.safetensors', denoiser(other, 2).inner_model.state_dict(), other)
    with pytest.raises(ConfigError, match=r"^config key 'dataset.num_classes': guide 3, main 4;"):
        load_guided(tmp_path / 'main.safetensors', tmp_path / 'other.safetensors', 2.0)
