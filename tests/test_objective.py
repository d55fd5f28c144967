"""AlignedDenoiser: identities with upstream's Denoiser, eq. A, stop-gradient, anchor rows, DDPM wrappers."""

import k_diffusion as K
import pytest
import torch
from helpers import NUM_CLASSES, CallCounter, randomize_, tiny_config

import kdiff_align
from kdiff_align.config import load_config, make_model
from kdiff_align.core.objective import ScaleDistribution

UNCOND = {'class_cond': NUM_CLASSES}
WEIGHTINGS = ['karras', 'soft-min-snr', 'snr']


def reference_aligned(denoiser, x, noise, sigma, labels, w, detach_uncond=False):
    """lambda(sigma) mean(((1 + w) F_c - w F_u - T)^2), with F_c and F_u from separate calls."""
    c_skip, c_out, c_in = [K.utils.append_dims(s, x.ndim) for s in denoiser.get_scalings(sigma)]
    noised = x + noise * K.utils.append_dims(sigma, x.ndim)
    f_c = denoiser.inner_model(noised * c_in, sigma, class_cond=labels)
    f_u = denoiser.inner_model(noised * c_in, sigma, class_cond=torch.full_like(labels, NUM_CLASSES))
    if detach_uncond:
        f_u = f_u.detach()
    w = K.utils.append_dims(torch.as_tensor(w, dtype=x.dtype).expand(x.shape[0]), x.ndim)
    target = (x - c_skip * noised) / c_out
    return (((1 + w) * f_c - w * f_u - target) ** 2).flatten(1).mean(1) * denoiser.weighting(sigma)


@pytest.mark.parametrize('weighting', WEIGHTINGS)
@pytest.mark.parametrize('model_type', ['image_v1', 'image_transformer_v1'])
def test_w0_no_anchor_equals_upstream_loss_exactly(model_type, weighting, batch):
    x, noise, sigma, labels = batch
    config = load_config(tiny_config(model_type))
    config['model']['dropout_rate'] = 0.2
    torch.manual_seed(0)
    model = randomize_(make_model(config)).train()  # dropout on: the RNG streams must match too
    upstream = K.layers.Denoiser(model, sigma_data=0.5, weighting=weighting)
    ours = kdiff_align.AlignedDenoiser(model, sigma_data=0.5, weighting=weighting, guidance_scale=0.,
                                       uncond=UNCOND, uncond_prob=0.)
    torch.manual_seed(3)
    expected = upstream.loss(x, noise, sigma, class_cond=labels)
    torch.manual_seed(3)
    actual = ours.loss(x, noise, sigma, class_cond=labels)
    assert torch.equal(actual, expected)
    torch.manual_seed(4)
    expected = upstream(x, sigma, class_cond=labels)
    torch.manual_seed(4)
    assert torch.equal(ours(x, sigma, class_cond=labels), expected)


def test_mix0_equals_upstream_loss_exactly(image_model, batch):
    x, noise, sigma, labels = batch
    upstream = K.layers.Denoiser(image_model, sigma_data=0.5)
    ours = kdiff_align.AlignedDenoiser(image_model, sigma_data=0.5, guidance_scale=3., uncond=UNCOND,
                                       uncond_prob=0., mix=0.)
    assert torch.equal(ours.loss(x, noise, sigma, class_cond=labels),
                       upstream.loss(x, noise, sigma, class_cond=labels))


@pytest.mark.parametrize('weighting', WEIGHTINGS)
@pytest.mark.parametrize('w', [0.5, 2., 7.])
def test_aligned_loss_equals_equation(image_model, batch, weighting, w):
    x, noise, sigma, labels = batch
    ours = kdiff_align.AlignedDenoiser(image_model, sigma_data=0.5, weighting=weighting, guidance_scale=w,
                                       uncond=UNCOND, uncond_prob=0.)
    expected = reference_aligned(ours, x, noise, sigma, labels, w)
    torch.testing.assert_close(ours.loss(x, noise, sigma, class_cond=labels), expected, rtol=1e-5, atol=1e-6)
    upstream = K.layers.Denoiser(image_model, sigma_data=0.5, weighting=weighting)
    assert not torch.allclose(upstream.loss(x, noise, sigma, class_cond=labels), expected)


@pytest.mark.parametrize('kind', ['uniform', 'log-uniform'])
def test_sampled_w_is_drawn_per_row_and_used_in_the_equation(image_model, batch, kind):
    x, noise, sigma, labels = batch
    dist = ScaleDistribution(kind, 0.5, 4.)
    ours = kdiff_align.AlignedDenoiser(image_model, sigma_data=0.5,
                                       guidance_scale={'type': kind, 'min_value': 0.5, 'max_value': 4.},
                                       uncond=UNCOND, uncond_prob=0.)
    torch.manual_seed(5)
    actual = ours.loss(x, noise, sigma, class_cond=labels)
    torch.manual_seed(5)
    w = dist(x.shape[0])
    assert w.min() >= 0.5 and w.max() <= 4. and w.unique().numel() == x.shape[0]
    torch.testing.assert_close(actual, reference_aligned(ours, x, noise, sigma, labels, w), rtol=1e-5, atol=1e-6)


def test_scale_distribution_ranges_and_means():
    torch.manual_seed(0)
    u = ScaleDistribution('uniform', 1., 3.)(20000)
    lu = ScaleDistribution('log-uniform', 1., 8.)(20000)
    assert 1 <= u.min() and u.max() <= 3 and abs(u.mean() - 2.) < 0.02
    assert 1 <= lu.min() and lu.max() <= 8 and abs(lu.log().mean() - torch.tensor(8.).log() / 2) < 0.02
    assert abs(lu.mean().item() - ScaleDistribution('log-uniform', 1., 8.).mean) < 0.05


def test_both_branches_run_in_one_batched_call(batch):
    x, noise, sigma, labels = batch
    config = load_config(tiny_config())
    counter = CallCounter(randomize_(make_model(config)))
    ours = kdiff_align.AlignedDenoiser(counter, sigma_data=0.5, guidance_scale=2., uncond=UNCOND, uncond_prob=0.)
    ours.loss(x, noise, sigma, class_cond=labels)
    assert counter.calls == [(2 * x.shape[0], True)]
    counter.calls.clear()
    kdiff_align.AlignedDenoiser(counter, sigma_data=0.5, guidance_scale=0., uncond=UNCOND,
                                uncond_prob=0.).loss(x, noise, sigma, class_cond=labels)
    assert counter.calls == [(x.shape[0], True)]


def test_stop_gradient_blocks_only_the_unconditional_branch(batch):
    x, noise, sigma, labels = batch
    config = load_config(tiny_config())
    torch.manual_seed(0)
    counter = CallCounter(randomize_(make_model(config)))
    ours = kdiff_align.AlignedDenoiser(counter, sigma_data=0.5, guidance_scale=2., uncond=UNCOND, uncond_prob=0.,
                                       stop_grad_uncond=True)
    loss = ours.loss(x, noise, sigma, class_cond=labels)
    # The unconditional half runs without autograd.
    assert counter.calls == [(x.shape[0], True), (x.shape[0], False)]
    params = list(counter.parameters())
    grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    ref = reference_aligned(ours, x, noise, sigma, labels, 2., detach_uncond=True)
    ref_grads = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # The null label's embedding gets no gradient with stop-gradient, and does without it.
    embed = counter.inner.class_embed.weight
    g_stop, = torch.autograd.grad(ours.loss(x, noise, sigma, class_cond=labels).sum(), [embed])
    ours.stop_grad_uncond = False
    g_full, = torch.autograd.grad(ours.loss(x, noise, sigma, class_cond=labels).sum(), [embed])
    assert not g_stop[NUM_CLASSES].any() and g_full[NUM_CLASSES].abs().sum() > 0
    torch.testing.assert_close(g_stop[labels.unique()].abs().sum() > 0, torch.tensor(True))


def test_anchor_rows_get_the_standard_loss_on_the_null_condition(image_model, batch):
    x, noise, sigma, labels = batch
    upstream = K.layers.Denoiser(image_model, sigma_data=0.5)
    null = torch.full_like(labels, NUM_CLASSES)
    all_anchor = kdiff_align.AlignedDenoiser(image_model, sigma_data=0.5, guidance_scale=2., uncond=UNCOND,
                                             uncond_prob=1.)
    torch.testing.assert_close(all_anchor.loss(x, noise, sigma, class_cond=labels),
                               upstream.loss(x, noise, sigma, class_cond=null), rtol=1e-5, atol=1e-6)

    half = kdiff_align.AlignedDenoiser(image_model, sigma_data=0.5, guidance_scale=2., uncond=UNCOND,
                                       uncond_prob=0.5)
    torch.manual_seed(11)
    actual = half.loss(x, noise, sigma, class_cond=labels)
    torch.manual_seed(11)
    anchor = torch.rand(x.shape[0]) < 0.5
    assert 0 < anchor.sum() < x.shape[0]
    expected = torch.where(anchor, upstream.loss(x, noise, sigma, class_cond=null),
                           reference_aligned(half, x, noise, sigma, labels, 2.))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_mix_interpolates_aligned_and_standard(image_model, batch):
    x, noise, sigma, labels = batch
    upstream = K.layers.Denoiser(image_model, sigma_data=0.5).loss(x, noise, sigma, class_cond=labels)
    ours = kdiff_align.AlignedDenoiser(image_model, sigma_data=0.5, guidance_scale=2., uncond=UNCOND,
                                       uncond_prob=0., mix=0.25)
    expected = 0.25 * reference_aligned(ours, x, noise, sigma, labels, 2.) + 0.75 * upstream
    torch.testing.assert_close(ours.loss(x, noise, sigma, class_cond=labels), expected, rtol=1e-5, atol=1e-6)


class TinyUNet(torch.nn.Module):
    """An eps / v network with a text-like condition: F(x, t, cond) with cond [B, L, D]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x, t, cond):
        bias = self.proj(cond.mean(1))[:, :, None, None]
        return self.conv(x) * (1 + t[:, None, None, None] / 1000) + bias


@pytest.mark.parametrize('wrapper', ['eps', 'v'])
def test_ddpm_wrappers(wrapper):
    torch.manual_seed(0)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)
    cls = K.external.DiscreteEpsDDPMDenoiser if wrapper == 'eps' else K.external.DiscreteVDDPMDenoiser
    net = TinyUNet()
    ddpm = cls(net, alphas_cumprod, quantize=False)
    x, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    sigma = ddpm.sigmas[torch.tensor([10, 200, 500, 900])]
    cond, empty = torch.randn(4, 7, 8), torch.randn(1, 7, 8)
    ours = kdiff_align.AlignedDenoiser(ddpm, guidance_scale=0., uncond={'cond': empty}, uncond_prob=0.)
    assert ours.parameterization == wrapper
    assert torch.equal(ours.loss(x, noise, sigma, cond=cond), ddpm.loss(x, noise, sigma, cond=cond))
    assert torch.equal(ours(x, sigma, cond=cond), ddpm(x, sigma, cond=cond))

    w = 3.
    ours = kdiff_align.AlignedDenoiser(ddpm, guidance_scale=w, uncond={'cond': empty}, uncond_prob=0.)
    c_skip, c_out, c_in = [K.utils.append_dims(s, 4) for s in ours.get_scalings(sigma)]
    noised = x + noise * K.utils.append_dims(sigma, 4)
    t = ddpm.sigma_to_t(sigma)
    f_c, f_u = net(noised * c_in, t, cond), net(noised * c_in, t, empty.expand(4, -1, -1))
    target = noise if wrapper == 'eps' else (x - c_skip * noised) / c_out
    expected = (((1 + w) * f_c - w * f_u - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(ours.loss(x, noise, sigma, cond=cond), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs, message', [
    ({'weighting': 'min-snr'}, "weighting must be one of ('karras', 'soft-min-snr', 'snr')"),
    ({'uncond_prob': 1.5}, 'uncond_prob must lie in [0, 1], got 1.5'),
    ({'mix': -0.1}, 'mix must lie in [0, 1], got -0.1'),
    ({'guidance_scale': -1.}, "w_train (the paper's w) must be a finite number >= 0, got -1.0"),
    ({'guidance_scale': {'type': 'normal', 'min_value': 0, 'max_value': 1}}, "a w distribution's type must be one of"),
    ({'guidance_scale': {'type': 'log-uniform', 'min_value': 0, 'max_value': 1}}, 'needs min_value > 0'),
    ({'guidance_scale': {'type': 'uniform', 'min_value': 3, 'max_value': 1}}, 'min_value <= max_value'),
    ({'guidance_scale': {'type': 'uniform', 'low': 0, 'high': 1}}, 'needs exactly the keys type, min_value'),
    ({'uncond': None}, 'uncond (the null condition) is required'),
    ({'uncond': {'class_cond': 'null'}}, "uncond['class_cond'] must be a number or a tensor"),
])
def test_bad_arguments_name_what_is_wrong(image_model, kwargs, message):
    with pytest.raises((ValueError, TypeError)) as err:
        kdiff_align.AlignedDenoiser(image_model, **{'uncond': UNCOND, **kwargs})
    assert message in str(err.value)


@pytest.mark.parametrize('stop_grad', [False, True])
def test_fixed_rows_give_the_same_loss_with_one_row_count(batch, stop_grad):
    """fixed_rows evaluates F_u for every row (2B rows, or B + B), whatever the anchor draw; same loss, grads."""
    x, noise, sigma, labels = batch
    config = load_config(tiny_config())
    counter = CallCounter(randomize_(make_model(config)).eval())
    params = list(counter.parameters())
    results = {}
    for fixed in (False, True):
        ours = kdiff_align.AlignedDenoiser(counter, sigma_data=0.5, guidance_scale=2., uncond=UNCOND,
                                           uncond_prob=0.3, stop_grad_uncond=stop_grad, fixed_rows=fixed)
        counter.calls.clear()
        torch.manual_seed(3)  # the same anchor rows both times
        loss = ours.loss(x, noise, sigma, class_cond=labels)
        results[fixed] = loss, torch.autograd.grad(loss.sum(), params, allow_unused=True), list(counter.calls)
    (loss_var, grads_var, calls_var), (loss_fix, grads_fix, calls_fix) = results[False], results[True]
    b = x.shape[0]
    assert calls_fix == ([(b, True), (b, False)] if stop_grad else [(2 * b, True)])
    assert sum(n for n, _ in calls_var) < sum(n for n, _ in calls_fix)  # the draw had anchor rows
    torch.testing.assert_close(loss_fix, loss_var, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads_fix, grads_var):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
