"""The training-time guidance family: GFT (coefficient form), MG and distillation (teacher-target form), the
zero-initialised w embedding and one-pass sampling (docs/design.md section 6)."""

import copy

import k_diffusion as K
import pytest
import torch
from helpers import NUM_CLASSES, SAMPLERS, CallCounter, randomize_

import kdiff_align
from kdiff_align.core.models import ClassConditionedModel
from kdiff_align.data.toy import ToyMLP

UNCOND = {'class_cond': NUM_CLASSES}


def toy_models(seed=0):
    """The same ToyMLP weights without and with a (zero-initialised) guidance embedding."""
    torch.manual_seed(seed)
    plain = randomize_(ToyMLP(NUM_CLASSES, width=32, depth=2), seed)
    told = ToyMLP(NUM_CLASSES, width=32, depth=2, guidance_embed=True)
    missing, _ = told.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith('guidance_embed.') for k in missing)
    return plain, told


@pytest.fixture
def toy_batch():
    gen = torch.Generator().manual_seed(2)
    x, noise = torch.randn(8, 2, generator=gen), torch.randn(8, 2, generator=gen)
    sigma = torch.exp(torch.randn(8, generator=gen))
    labels = torch.randint(0, NUM_CLASSES, (8,), generator=gen)
    return x, noise, sigma, labels


def test_zero_initialised_w_embedding_leaves_the_output_unchanged_bit_for_bit(toy_batch, image_model):
    x, _, sigma, labels = toy_batch
    plain, told = toy_models()
    w = torch.linspace(0, 4, 8)
    assert torch.equal(told(x, sigma, class_cond=labels, guidance_cond=w), plain(x, sigma, class_cond=labels))
    inner = image_model.inner_model
    with_w = ClassConditionedModel(inner, NUM_CLASSES, image_model.class_embed.embedding_dim, guidance_embed=True)
    with_w.class_embed.load_state_dict(image_model.class_embed.state_dict())
    xi, s = torch.randn(3, 1, 8, 8), torch.ones(3)
    c = torch.tensor([0, 4, NUM_CLASSES])
    assert torch.equal(with_w(xi, s, class_cond=c, guidance_cond=torch.tensor([0., 1., 3.])),
                       image_model(xi, s, class_cond=c))
    with pytest.raises(ValueError, match='without a guidance embedding'):
        plain(x, sigma, class_cond=labels, guidance_cond=w)
    with pytest.raises(ValueError, match='guidance_cond .w per row. is required'):
        told(x, sigma, class_cond=labels)


def test_gft_at_w0_equals_upstream_loss_exactly(toy_batch):
    x, noise, sigma, labels = toy_batch
    _, told = toy_models()
    zeros = torch.zeros(8)
    ours = kdiff_align.GFTDenoiser(told, sigma_data=0.5, guidance_scale=0., uncond=UNCOND, uncond_prob=0.)
    upstream = K.layers.Denoiser(told, sigma_data=0.5)
    assert torch.equal(ours.loss(x, noise, sigma, class_cond=labels),
                       upstream.loss(x, noise, sigma, class_cond=labels, guidance_cond=zeros))


def test_mg_at_w0_equals_upstream_loss_exactly(toy_batch):
    x, noise, sigma, labels = toy_batch
    plain, _ = toy_models()
    ours = kdiff_align.TeacherTargetDenoiser(plain, None, sigma_data=0.5, kind='mg', guidance_scale=0.,
                                             uncond=UNCOND, uncond_prob=0.)
    assert torch.equal(ours.loss(x, noise, sigma, class_cond=labels),
                       K.layers.Denoiser(plain, sigma_data=0.5).loss(x, noise, sigma, class_cond=labels))


def test_gft_is_the_coefficient_form_with_beta_one_over_one_plus_w(toy_batch):
    """Guided rows: (G(w)/(1+w) + w/(1+w) sg(F_u(w=0)) - T)^2; gradients never reach the null branch."""
    x, noise, sigma, labels = toy_batch
    _, told = toy_models()
    randomize_(told.guidance_embed, 5)   # so that the network's answer depends on w
    ours = kdiff_align.GFTDenoiser(told, sigma_data=0.5, uncond=UNCOND, uncond_prob=0.)
    torch.manual_seed(4)
    loss = ours.loss(x, noise, sigma, class_cond=labels)
    torch.manual_seed(4)
    w = ours.sample_guidance_scale(8, 'cpu')
    assert 0 < w.min() and w.max() < 4
    c_skip, c_out, c_in = [K.utils.append_dims(s, 2) for s in ours.get_scalings(sigma)]
    noised = x + noise * K.utils.append_dims(sigma, 2)
    target = (x - c_skip * noised) / c_out
    g = told(noised * c_in, sigma, class_cond=labels, guidance_cond=w)
    f_u = told(noised * c_in, sigma, class_cond=torch.full_like(labels, NUM_CLASSES),
               guidance_cond=torch.zeros(8)).detach()
    beta = K.utils.append_dims(1 / (1 + w), 2)
    ref = ((beta * g + (1 - beta) * f_u - target) ** 2).mean(1)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    params = list(told.parameters())
    for a, b in zip(torch.autograd.grad(loss.sum(), params, allow_unused=True),
                    torch.autograd.grad(ref.sum(), params, allow_unused=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_gft_anchor_rows_get_the_standard_loss_at_w0(toy_batch):
    x, noise, sigma, labels = toy_batch
    _, told = toy_models()
    ours = kdiff_align.GFTDenoiser(told, sigma_data=0.5, uncond=UNCOND, uncond_prob=1.)
    null = torch.full_like(labels, NUM_CLASSES)
    ref = K.layers.Denoiser(told, sigma_data=0.5).loss(x, noise, sigma, class_cond=null, guidance_cond=torch.zeros(8))
    assert torch.equal(ours.loss(x, noise, sigma, class_cond=labels), ref)


class Table(torch.nn.Module):
    """F(x, sigma, c, w) = A[c] + w B[c]: a lookup table (linear in w), whose least-squares optimum is known."""

    def __init__(self, told: bool):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(NUM_CLASSES + 1, 2))
        self.b = torch.nn.Parameter(torch.zeros(NUM_CLASSES + 1, 2)) if told else None

    def forward(self, input, sigma, class_cond, guidance_cond=None):
        out = self.a[class_cond]
        if self.b is not None:
            out = out + guidance_cond[:, None] * self.b[class_cond]
        return out


def fit(objective, x, noise, sigma, labels, steps):
    opt = torch.optim.Adam(objective.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        objective.loss(x, noise, sigma, class_cond=labels).mean().backward()
        opt.step()
        sched.step()


def table_problem(n=512):
    """A finite set with sigma = sigma_data = 1 (c_skip = 1/2): T = (x - noised / 2) / c_out."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % NUM_CLASSES
    x = torch.randn(n, 2, generator=gen) * 0.3 + torch.stack([labels.float(), -labels.float()], 1) / 5
    noise, sigma = torch.randn(n, 2, generator=gen), torch.ones(n)
    c_out = 2 ** -0.5
    target = (x - (x + noise) / 2) / c_out
    t_c = torch.stack([target[labels == c].mean(0) for c in range(NUM_CLASSES)])
    return x, noise, sigma, labels, t_c, target.mean(0)


def test_gft_optimum_is_cfg_at_the_told_w():
    """Trained with w ~ U[0, 4] drawn per row, G(c, w) = T_c + w (T_c - T_u) within 0.05 (the offsets
    T_c - T_u reach 0.75; the rest is the noise of the w and anchor draws after 600 Adam steps)."""
    x, noise, sigma, labels, t_c, t_u = table_problem(1024)
    model = Table(told=True)
    torch.manual_seed(0)
    fit(kdiff_align.GFTDenoiser(model, sigma_data=1., uncond=UNCOND, uncond_prob=0.2), x, noise, sigma, labels,
        steps=600)
    for w in (0., 1., 2.):
        got = model(None, None, torch.arange(NUM_CLASSES), torch.full((NUM_CLASSES,), w))
        torch.testing.assert_close(got, t_c + w * (t_c - t_u), rtol=0, atol=0.05)


def test_mg_fixed_point_is_cfg_at_w_over_one_minus_w():
    """MG at w = 0.45 with its own weights as teacher: F_c = T_c + (w / (1 - w)) (T_c - T_u) within 0.02."""
    x, noise, sigma, labels, t_c, t_u = table_problem()
    model = Table(told=False)
    torch.manual_seed(0)
    fit(kdiff_align.TeacherTargetDenoiser(model, None, sigma_data=1., kind='mg', guidance_scale=0.45,
                                          uncond=UNCOND, uncond_prob=0.2), x, noise, sigma, labels, steps=2500)
    w = 0.45 / (1 - 0.45)
    torch.testing.assert_close(model.a[:NUM_CLASSES].detach(), t_c + w * (t_c - t_u), rtol=0, atol=0.02)
    torch.testing.assert_close(model.a[NUM_CLASSES].detach(), t_u, rtol=0, atol=0.02)


def test_teacher_target_uses_the_teacher_without_gradient_and_keeps_it_out_of_the_student(toy_batch):
    x, noise, sigma, labels = toy_batch
    plain, _ = toy_models()
    ema = randomize_(copy.deepcopy(plain), 7)
    mg = kdiff_align.TeacherTargetDenoiser(plain, ema, sigma_data=0.5, kind='mg', guidance_scale=0.45,
                                           uncond=UNCOND, uncond_prob=0.)
    assert set(mg.state_dict()) == {f'inner_model.{k}' for k in plain.state_dict()}
    assert not any(p is q for p in mg.parameters() for q in ema.parameters())
    loss = mg.loss(x, noise, sigma, class_cond=labels)
    loss.sum().backward()
    assert all(p.grad is None for p in ema.parameters())
    # The target is T + w (F^ema_c - F^ema_u), with the EMA's outputs.
    c_skip, c_out, c_in = [K.utils.append_dims(s, 2) for s in mg.get_scalings(sigma)]
    noised = x + noise * K.utils.append_dims(sigma, 2)
    with torch.no_grad():
        target = (x - c_skip * noised) / c_out + 0.45 * (
            ema(noised * c_in, sigma, class_cond=labels)
            - ema(noised * c_in, sigma, class_cond=torch.full_like(labels, NUM_CLASSES)))
        ref = ((plain(noised * c_in, sigma, class_cond=labels) - target) ** 2).mean(1)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-7)


def test_distillation_target_is_the_teachers_cfg_at_the_students_w(toy_batch):
    x, noise, sigma, labels = toy_batch
    teacher, student = toy_models(3)
    teacher.requires_grad_(False)
    randomize_(student, 9)
    d = kdiff_align.TeacherTargetDenoiser(student, teacher, sigma_data=0.5, kind='distill',
                                          guidance_scale={'type': 'uniform', 'min_value': 0., 'max_value': 4.},
                                          uncond=UNCOND, uncond_prob=0.)
    torch.manual_seed(1)
    loss = d.loss(x, noise, sigma, class_cond=labels)
    torch.manual_seed(1)
    w = d.sample_guidance_scale(8, 'cpu')
    c_skip, c_out, c_in = [K.utils.append_dims(s, 2) for s in d.get_scalings(sigma)]
    xin = (x + noise * K.utils.append_dims(sigma, 2)) * c_in
    with torch.no_grad():
        t = kdiff_align.guide(teacher(xin, sigma, class_cond=labels),
                              teacher(xin, sigma, class_cond=torch.full_like(labels, NUM_CLASSES)), w)
        ref = ((student(xin, sigma, class_cond=labels, guidance_cond=w) - t) ** 2).mean(1)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('kwargs, message', [
    (dict(kind='mg', guidance_scale=1.), r'fixed w in \[0, 1\)'),
    (dict(kind='mg', guidance_scale={'type': 'uniform', 'min_value': 0., 'max_value': 0.5}), r'fixed w'),
    (dict(kind='cfg'), "kind must be one of"),
    (dict(kind='mg', sigma_range=(2., 1.)), r'must satisfy 0 <= sigma_lo <= sigma_hi'),
    (dict(kind='mg', warmup_steps=-1), r'warmup_steps must be an integer >= 0, got -1'),
    (dict(kind='mg', warmup_steps=5), r"warmup_steps needs steps_done, the training loop's count"),
])
def test_teacher_target_refuses_bad_settings(kwargs, message):
    plain, _ = toy_models()
    with pytest.raises(ValueError, match=message):
        kdiff_align.TeacherTargetDenoiser(plain, None, uncond=UNCOND, **kwargs)


def test_distillation_without_a_teacher_samples_but_refuses_to_train(toy_batch):
    x, noise, sigma, labels = toy_batch
    plain, _ = toy_models()
    d = kdiff_align.TeacherTargetDenoiser(plain, None, sigma_data=0.5, kind='distill', uncond=UNCOND)
    assert d(x, sigma, class_cond=labels).shape == x.shape
    with pytest.raises(ValueError, match='needs a teacher to train'):
        d.loss(x, noise, sigma, class_cond=labels)


def test_teacher_of_another_kind_is_refused():
    plain, _ = toy_models()
    ddpm = K.external.DiscreteEpsDDPMDenoiser(plain, torch.linspace(0.99, 0.01, 100), quantize=False)
    with pytest.raises(ValueError, match="the teacher predicts 'eps', the student 'karras'"):
        kdiff_align.TeacherTargetDenoiser(plain, ddpm, kind='distill', uncond=UNCOND)


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_one_pass_sampling_makes_one_inner_call_per_model_evaluation(sampler):
    _, told = toy_models()
    inner = CallCounter(told)
    one_pass = CallCounter(kdiff_align.OnePassDenoiser(K.layers.Denoiser(inner, sigma_data=0.5), w=2.))
    sigmas = K.sampling.get_sigmas_karras(6, 1e-2, 10.)
    labels = torch.arange(4)
    getattr(K.sampling, sampler)(one_pass, torch.randn(4, 2) * sigmas[0], sigmas,
                                 extra_args={'class_cond': labels}, disable=True)
    assert len(inner.calls) == len(one_pass.calls) > 0 and all(n == 4 for n, _ in inner.calls)


def test_one_pass_tells_the_model_w():
    _, told = toy_models()
    randomize_(told.guidance_embed, 5)
    den = K.layers.Denoiser(told, sigma_data=0.5)
    x, s, c = torch.randn(3, 2), torch.ones(3), torch.tensor([1, 2, 3])
    assert torch.equal(kdiff_align.OnePassDenoiser(den, w=1.5)(x, s, class_cond=c),
                       den(x, s, class_cond=c, guidance_cond=torch.full((3,), 1.5)))
    with pytest.raises(ValueError, match="w must be a number >= 0"):
        kdiff_align.OnePassDenoiser(den, w=-1.)
