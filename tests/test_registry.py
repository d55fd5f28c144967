"""The objective registry: an objective registered from outside the package (here, in this file) trains,
samples and exports through the unchanged modules; the built-in Specs state the family's rules."""

import json
from pathlib import Path

import k_diffusion as K
import pytest
import torch
from safetensors.torch import save_file

from kdiff_align.core import registry
from kdiff_align.config import ConfigError, load_config, make_denoiser_wrapper, make_guided_denoiser, make_model
from kdiff_align.core.guidance import GuidedDenoiser, OnePassDenoiser
from kdiff_align.storage.metadata import export_metadata, read_metadata
from kdiff_align.sampling.sample import sample
from kdiff_align.training.trainer import TrainOptions, train

from helpers import randomize_

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4   # the toy config's

# GFT's coefficients with the gradient through F_u (a variant the package does not ship): told w, one pass.
GFT_GRAD = registry.Spec(
    'gft-grad', "GFT's beta = 1 / (1 + w) with gradient through F_u",
    coefficients=lambda w: (1 / (1 + w), w / (1 + w)), uncond='grad', target='T', tells_w=True,
    sampling='told-w', w_train_default={'type': 'uniform', 'min_value': 0.0, 'max_value': 3.0},
    flop_ratio=lambda align: 2 - float(align['uncond_prob']))


@pytest.fixture
def gft_grad():
    registry.register(GFT_GRAD)
    yield GFT_GRAD
    registry.unregister(GFT_GRAD.name)


def toy(objective: str, **align) -> dict:
    """configs/toy_gft.json shrunk to a one-second model, with another objective."""
    config = json.loads((ROOT / 'configs' / 'toy_gft.json').read_text())
    config['model'].update(width=16, depth=1)
    config['dataset']['size'] = 64
    config['align'].update(objective=objective, w_train=None, w_sample=None, sample_steps=3, **align)
    return config


def test_an_objective_registered_outside_the_package_trains_samples_and_exports(gft_grad, tmp_path):
    config = load_config(toy('gft-grad'))
    assert config['align']['w_train'] == gft_grad.w_train_default
    assert make_model(config).guidance_embed is not None   # told w: the model gets its w embedding

    # Its loss is the family's equation with its Spec's coefficients, F_u with gradient.
    model = randomize_(make_model(config))   # so that the output depends on w
    denoiser = make_denoiser_wrapper(config, uncond_prob=0.)(model)
    x, noise = torch.randn(8, 2), torch.randn(8, 2)
    sigma, labels = torch.rand(8) + 0.2, torch.arange(8) % NUM_CLASSES
    torch.manual_seed(1)
    loss = denoiser.loss(x, noise, sigma, class_cond=labels)
    torch.manual_seed(1)
    w = denoiser.sample_guidance_scale(8, 'cpu')
    c_skip, c_out, c_in = [K.utils.append_dims(s, 2) for s in denoiser.get_scalings(sigma)]
    noised = x + noise * K.utils.append_dims(sigma, 2)
    f_c = model(noised * c_in, sigma, class_cond=labels, guidance_cond=w)
    f_u = model(noised * c_in, sigma, class_cond=torch.full_like(labels, NUM_CLASSES), guidance_cond=torch.zeros(8))
    beta = K.utils.append_dims(1 / (1 + w), 2)
    ref = ((beta * f_c + (1 - beta) * f_u - (x - c_skip * noised) / c_out) ** 2).mean(1)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    g, = torch.autograd.grad(loss.sum(), [model.class_embed.weight])
    assert g[NUM_CLASSES].abs().sum() > 0   # the gradient reaches the null branch (uncond 'grad')

    # Trains through the engine, samples in one pass, exports with its name.
    result = train(toy('gft-grad'), TrainOptions(name='outside', out_dir=str(tmp_path), batch_size=8, end_step=2,
                                                 demo_every=0, sample_n=0, seed=0, progress=False))
    assert result.step == 2 and result.export.is_file()
    meta = read_metadata(result.export)
    assert (meta['objective'], meta['passes'], meta['w_input'], meta['w_range']) == \
        ('gft-grad', 1, 'guidance_cond', [0.0, 3.0])
    guided = make_guided_denoiser(config, denoiser)
    assert isinstance(guided, OnePassDenoiser) and guided.w == 1.5
    out = sample(denoiser, config, torch.randn(4, 2), torch.arange(4) % NUM_CLASSES, 1.0)
    assert out.shape == (4, 2) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match=r'w 3.5 is outside the range \[0, 3\]'):
        make_guided_denoiser(config, denoiser, w=3.5)

    # Unregistered, the name is refused everywhere with the registered names.
    registry.unregister('gft-grad')
    with pytest.raises(ConfigError, match="config key 'align.objective': got 'gft-grad'; allowed: one of 'aligned'"):
        load_config(toy('gft-grad'))
    registry.register(GFT_GRAD)


def test_a_spec_that_contradicts_itself_is_refused():
    with pytest.raises(ValueError, match="Spec 'x': the coefficient form evaluates F_u itself"):
        registry.Spec('x', '', coefficients=None, uncond='grad')
    with pytest.raises(ValueError, match="Spec 'x': sampling must be one of"):
        registry.Spec('x', '', coefficients=lambda w: (1 + w, -w), sampling='three-pass')
    with pytest.raises(ValueError, match="objective 'aligned' is already registered"):
        registry.register(registry.get('aligned'))


@pytest.mark.parametrize('name, passes_at_trained_w, tells_w, teacher', [
    ('aligned', 2, False, None), ('gft', 1, True, None), ('mg', 1, False, 'ema'), ('distill', 1, True, 'frozen')])
def test_the_family_as_specs(name, passes_at_trained_w, tells_w, teacher):
    spec = registry.get(name)
    w_range = spec.w_range(spec.w_train_default)
    assert spec.passes(w_range[1], w_range) == passes_at_trained_w
    assert (spec.tells_w, spec.teacher) == (tells_w, teacher)
    if spec.coefficients is not None:   # a + b = 1: the guided prediction is an affine combination
        a, b = spec.coefficients(torch.tensor([0., 0.5, 3.]))
        torch.testing.assert_close(a + b, torch.ones(3))


def test_older_export_names_read_as_aligned(tmp_path):
    config = load_config('digits_baseline')
    header = {**export_metadata(config), 'kdiff_align.format_version': '2',
              'kdiff_align.objective': '"standard-cfg"'}
    save_file({'w': torch.zeros(1)}, tmp_path / 'old.safetensors', metadata=header)
    meta = read_metadata(tmp_path / 'old.safetensors')
    assert meta['objective'] == 'aligned' and meta['w_range'] == [0.0, 0.0] and meta['passes'] == 2
    assert isinstance(make_guided_denoiser(config, torch.nn.Identity()), GuidedDenoiser)
