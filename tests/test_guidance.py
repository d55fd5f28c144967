"""GuidedDenoiser: the CFG formula, shortcuts, guidance interval, schedules, conventions, real samplers."""

import k_diffusion as K
import pytest
import torch
from helpers import NUM_CLASSES, SAMPLERS, CallCounter

import kdiff_align
from kdiff_align import GuidedDenoiser, cfg_scale_to_w, w_to_cfg_scale

UNCOND = {'class_cond': NUM_CLASSES}


@pytest.fixture
def denoiser(image_model):
    return CallCounter(K.layers.Denoiser(image_model, sigma_data=0.5))


def branches(denoiser, x, sigma, labels):
    with torch.no_grad():
        return (denoiser(x, sigma, class_cond=labels),
                denoiser(x, sigma, class_cond=torch.full_like(labels, NUM_CLASSES)))


@pytest.mark.parametrize('w', [0.5, 3.])
def test_guided_equals_formula_in_one_call(denoiser, batch, w):
    x, _, sigma, labels = batch
    d_c, d_u = branches(denoiser, x, sigma, labels)
    denoiser.calls.clear()
    guided = GuidedDenoiser(denoiser, w, uncond=UNCOND)
    with torch.no_grad():
        out = guided(x, sigma, class_cond=labels)
    assert denoiser.calls == [(2 * x.shape[0], False)]
    torch.testing.assert_close(out, d_u + (1 + w) * (d_c - d_u), rtol=1e-5, atol=1e-5)
    # k-diffusion's / hosts' convention: uncond + (cond - uncond) * cfg_scale with cfg_scale = 1 + w.
    torch.testing.assert_close(out, d_u + (d_c - d_u) * w_to_cfg_scale(w), rtol=1e-5, atol=1e-5)


def test_w0_is_the_conditional_denoiser_with_one_call(denoiser, batch):
    x, _, sigma, labels = batch
    d_c, _ = branches(denoiser, x, sigma, labels)
    denoiser.calls.clear()
    with torch.no_grad():
        out = GuidedDenoiser(denoiser, 0., uncond=UNCOND)(x, sigma, class_cond=labels)
    assert denoiser.calls == [(x.shape[0], False)]
    assert torch.equal(out, d_c)


def test_guidance_interval_skips_the_unconditional_pass_outside(denoiser, batch):
    x, _, _, labels = batch
    w = 2.
    guided = GuidedDenoiser(denoiser, w, uncond=UNCOND, sigma_interval=[0.5, 5.])
    sigma_out = torch.full((x.shape[0],), 10.)
    d_c, _ = branches(denoiser, x, sigma_out, labels)
    denoiser.calls.clear()
    with torch.no_grad():
        assert torch.equal(guided(x, sigma_out, class_cond=labels), d_c)
    assert denoiser.calls == [(x.shape[0], False)]

    # Rows on either side of the interval in one batch: only the rows inside pay for the null branch.
    sigma_mixed = torch.tensor([0.1, 1., 2., 20., 4., 50.])
    inside = (sigma_mixed >= 0.5) & (sigma_mixed <= 5.)
    d_c, d_u = branches(denoiser, x, sigma_mixed, labels)
    denoiser.calls.clear()
    with torch.no_grad():
        out = guided(x, sigma_mixed, class_cond=labels)
    assert denoiser.calls == [(x.shape[0] + int(inside.sum()), False)]
    expected = torch.where(inside[:, None, None, None], d_u + (1 + w) * (d_c - d_u), d_c)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_schedule_of_w_over_sigma(denoiser, batch):
    x, _, sigma, labels = batch
    guided = GuidedDenoiser(denoiser, lambda s: (s > 1).float() * 4., uncond=UNCOND)
    d_c, d_u = branches(denoiser, x, sigma, labels)
    with torch.no_grad():
        out = guided(x, sigma, class_cond=labels)
    w = ((sigma > 1).float() * 4.)[:, None, None, None]
    torch.testing.assert_close(out, d_u + (1 + w) * (d_c - d_u), rtol=1e-5, atol=1e-5)
    assert guided.scale_at(torch.tensor([0.5, 2.])).tolist() == [0., 4.]


def test_text_style_null_condition_broadcasts():
    class Net(torch.nn.Module):
        def forward(self, x, sigma, cross_cond):
            return x + cross_cond.mean((1, 2))[:, None, None, None]

    x, sigma = torch.randn(3, 1, 4, 4), torch.ones(3)
    cond, empty = torch.randn(3, 5, 2), torch.zeros(1, 5, 2)
    out = GuidedDenoiser(Net(), 1., uncond={'cross_cond': empty})(x, sigma, cross_cond=cond)
    torch.testing.assert_close(out, x + 2 * cond.mean((1, 2))[:, None, None, None])


def test_conversion_is_one_documented_pair():
    assert w_to_cfg_scale(0.) == 1. and w_to_cfg_scale(6.5) == 7.5
    assert cfg_scale_to_w(7.5) == 6.5 and cfg_scale_to_w(w_to_cfg_scale(2.25)) == 2.25


@pytest.mark.parametrize('kwargs, message', [
    ({'guidance_scale': 2., 'uncond': None}, 'guidance needs the null condition'),
    ({'guidance_scale': '2'}, "w must be a number (the paper's w) or a callable"),
    ({'guidance_scale': 2., 'sigma_interval': [5., 1.]}, '0 <= sigma_lo <= sigma_hi, got [5.0, 1.0]'),
    ({'guidance_scale': 2., 'sigma_interval': [1.]}, 'sigma_interval must be two noise levels'),
])
def test_bad_arguments(denoiser, kwargs, message):
    kwargs = {'uncond': UNCOND, **kwargs}
    with pytest.raises((ValueError, TypeError)) as err:
        GuidedDenoiser(denoiser, kwargs.pop('guidance_scale'), **kwargs)
    assert message in str(err.value)


def test_mismatched_null_rows_name_the_argument(denoiser, batch):
    x, _, sigma, labels = batch
    with pytest.raises(ValueError, match=r"uncond\['class_cond'\] has 2 rows; expected 1"):
        GuidedDenoiser(denoiser, 1., uncond={'class_cond': torch.tensor([10, 10])})(x, sigma, class_cond=labels)


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_every_sampler_runs_guided(image_model, sampler):
    denoiser = kdiff_align.AlignedDenoiser(image_model, sigma_data=0.5, uncond=UNCOND)
    sigmas = K.sampling.get_sigmas_karras(6, 1e-2, 80.)
    labels = torch.arange(4)
    fn = getattr(K.sampling, sampler)

    def run(model):
        torch.manual_seed(0)
        x = torch.randn(4, 1, 8, 8) * sigmas[0]
        with torch.no_grad():
            return fn(model, x, sigmas, extra_args={'class_cond': labels}, disable=True)

    guided = run(GuidedDenoiser(denoiser, 3., uncond=UNCOND))
    assert guided.shape == (4, 1, 8, 8) and torch.isfinite(guided).all()
    # w = 0 through the wrapper is exactly the bare conditional denoiser's trajectory.
    assert torch.equal(run(GuidedDenoiser(denoiser, 0., uncond=UNCOND)), run(denoiser))
    assert not torch.allclose(guided, run(denoiser))
