"""align.objective from config to samples: each objective built from its config, trained through the engine,
its teacher handled as the issue asks, sampled in one network evaluation per step, and bad input refused."""

import json

import k_diffusion as K
import pytest
import torch

from kdiff_align.storage import checkpoint as ckpt_lib
from kdiff_align.core import objective
from kdiff_align.config import (ConfigError, load_config, make_denoiser_wrapper, make_guided_denoiser, make_model,
                                mg_effective_w)
from kdiff_align.training.teachers import make_teacher
from kdiff_align.training.engine import EMA
from kdiff_align.core.guidance import GuidedDenoiser, OnePassDenoiser, guided_denoiser
from kdiff_align.training.trainer import train

from helpers import opts, randomize_, tiny_config, toy


@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
    """A standard CFG toy model: the distillation teacher."""
    tmp = tmp_path_factory.mktemp('teacher')
    return train(toy('baseline'), opts(tmp, 'teacher', end_step=2)).run_dir


# ---------------------------------------------------------------------------------------------------------------
# Building each objective from its config.

@pytest.mark.parametrize('kind, told', [('aligned', False), ('gft', True), ('mg', False), ('distill', True)])
def test_each_objective_is_built_from_its_config(kind, told):
    """One class for the family (the loss body reads the objective's registry Spec)."""
    config = load_config(toy(kind))
    model = make_model(config)
    denoiser = make_denoiser_wrapper(config)(model)
    assert type(denoiser) is objective.GuidanceObjective is objective.AlignedDenoiser
    assert (model.guidance_embed is not None) == told == denoiser.spec.tells_w
    assert denoiser.objective == kind


def test_default_objective_is_aligned_unchanged():
    raw = toy('aligned')
    config = load_config(raw)
    assert config['align']['objective'] == 'aligned' and config['align']['w_train'] == 2.0
    explicit = dict(raw, align={**raw['align'], 'objective': 'aligned'})
    assert load_config(explicit) == config


@pytest.mark.parametrize('kind, w_train', [('gft', {'type': 'uniform', 'min_value': 0.0, 'max_value': 4.0}),
                                           ('mg', 0.45), ('distill', {'type': 'uniform', 'min_value': 0.0,
                                                                        'max_value': 4.0})])
def test_each_objective_has_its_default_w_train(kind, w_train):
    raw = toy(kind)
    del raw['align']['w_train']
    raw['align'].pop('w_sample', None)
    config = load_config(raw)
    assert config['align']['w_train'] == w_train
    model = make_model(config)
    guided = make_guided_denoiser(config, make_denoiser_wrapper(config)(model))
    assert isinstance(guided, OnePassDenoiser)
    assert guided.w == (None if kind == 'mg' else 2.0)   # mg: its trained guidance, gft / distill: the range's mean


@pytest.mark.parametrize('model_type', ['image_v1', 'image_transformer_v1'])
def test_image_models_are_told_w_with_an_embedding_that_starts_at_zero(model_type):
    config = load_config(tiny_config(model_type, objective='gft'))
    model = randomize_(make_model(config)).eval()   # upstream zero-inits its output layer
    embedding = model.guidance_embed if model_type == 'image_v1' else model.inner_model.class_emb.guidance_embed
    torch.nn.init.zeros_(embedding.mlp[-1].weight)
    torch.nn.init.zeros_(embedding.mlp[-1].bias)
    x, sigma = torch.randn(3, 1, 8, 8), torch.ones(3)
    labels = torch.tensor([0, 4, 10])
    outputs = [model(x, sigma, class_cond=labels, guidance_cond=torch.full((3,), w)) for w in (0., 1.5, 4.)]
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    torch.nn.init.normal_(embedding.mlp[-1].weight)
    assert not torch.equal(model(x, sigma, class_cond=labels, guidance_cond=torch.full((3,), 4.)), outputs[0])
    plain = make_model(load_config(tiny_config(model_type)))
    with pytest.raises(TypeError if model_type == 'image_transformer_v1' else ValueError):
        plain(x, sigma, class_cond=labels, guidance_cond=torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------------
# Sampling: one network evaluation per step for gft, mg and distill; two for aligned.

class Counting(torch.nn.Module):
    """Counts calls to the inner network and the rows it sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.rows, self.told = inner, 0, 0, []

    def forward(self, x, sigma, **kwargs):
        self.calls += 1
        self.rows += x.shape[0]
        self.told.append(kwargs.get('guidance_cond'))
        return self.inner(x, sigma, **kwargs)


@pytest.mark.parametrize('sampler', ['euler', 'heun', 'dpmpp_2m', 'dpmpp_2s_ancestral', 'dpmpp_3m_sde'])
@pytest.mark.parametrize('kind', ['aligned', 'gft', 'mg', 'distill'])
def test_sampling_costs_one_evaluation_per_step_for_one_pass_objectives(kind, sampler):
    config = load_config(toy(kind))
    inner = Counting(make_model(config))
    denoiser = make_denoiser_wrapper(config)(inner)
    guided = make_guided_denoiser(config, denoiser)
    evaluations = []
    counted = lambda x, s, **kw: (evaluations.append(1), guided(x, s, **kw))[1]  # noqa: E731
    sigmas = K.sampling.get_sigmas_karras(6, 0.01, 80., device='cpu')
    getattr(K.sampling, f'sample_{sampler}')(counted, torch.randn(5, 2) * 80, sigmas, disable=True,
                                             extra_args={'class_cond': torch.arange(5) % 4})
    passes = 2 if kind == 'aligned' else 1
    assert inner.calls == len(evaluations) and inner.rows == passes * 5 * len(evaluations)
    if kind in ('gft', 'distill'):
        assert all(torch.equal(w, torch.full((5,), 2.)) for w in inner.told)
    else:
        assert all(w is None for w in inner.told)


def test_mg_at_another_w_is_cfg_on_top_with_the_stated_mapping():
    config = load_config(toy('mg'))
    model = make_model(config)
    denoiser = make_denoiser_wrapper(config)(model)
    w_mg = mg_effective_w(0.45)
    assert config['align']['w_train'] == 0.45 and abs(w_mg - 0.45 / 0.55) < 1e-15
    for w in (0., 1., 3.):
        guided = make_guided_denoiser(config, denoiser, w=w)
        assert isinstance(guided, GuidedDenoiser)
        w_top = guided.guidance_scale
        assert abs((1 + w_top) * (1 + w_mg) - 1 - w) < 1e-12    # the effective guidance is the asked w
    assert isinstance(make_guided_denoiser(config, denoiser, w=w_mg), OnePassDenoiser)


def test_one_pass_models_refuse_a_w_outside_their_trained_range():
    config = load_config(toy('gft'))
    denoiser = make_denoiser_wrapper(config)(make_model(config))
    with pytest.raises(ConfigError, match=r'w 5 is outside the range \[0, 4\] that this gft model was trained'):
        make_guided_denoiser(config, denoiser, w=5.)


def test_sample_cli_refuses_a_w_outside_the_range_before_sampling(tmp_path, capsys):
    from kdiff_align.sampling.sample import main as sample_main

    run = train(toy('gft'), opts(tmp_path, 'gft', end_step=1)).run_dir
    assert sample_main([str(run), '--w', '1', '6', '--out', str(tmp_path / 'grid.png')]) == 2
    assert 'w 6 is outside the range [0, 4]' in capsys.readouterr().err and not (tmp_path / 'grid.png').exists()
    assert sample_main([str(run), '--w', '0', '4', '--out', str(tmp_path / 'grid.png')]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Teachers: MG's is the EMA model, distill's a frozen model of the same architecture and data.

def test_ema_view_follows_the_averaged_weights_without_copies():
    model = make_model(load_config(toy('mg')))
    ema = EMA(model, {'type': 'inverse', 'power': 0.75, 'max_value': 0.999})
    view = ema.view()
    assert all(not p.requires_grad for p in view.parameters())
    ema.update()   # the warm-up's first decay is 0: averaged = the weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.)
    ema.update()
    x, sigma, labels = torch.randn(4, 2), torch.ones(4), torch.arange(4)
    with ema.swapped_in():
        expected = model(x, sigma, class_cond=labels)
    assert torch.equal(view(x, sigma, class_cond=labels), expected)
    assert not torch.equal(model(x, sigma, class_cond=labels), expected)
    for name, p in view.named_parameters():
        assert p.data_ptr() == ema.averaged[name].data_ptr()


def test_mg_warmup_trains_with_the_standard_loss(tmp_path):
    """With warm-up longer than the run, MG's steps are upstream CFG training's steps exactly."""
    mg = train(toy('mg', warmup_steps=100), opts(tmp_path, 'mg', end_step=3))
    standard = train(toy('baseline'), opts(tmp_path, 'standard', end_step=3))
    a, b = ckpt_lib.load_checkpoint(mg.checkpoint), ckpt_lib.load_checkpoint(standard.checkpoint)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_distill_trains_from_its_teacher_and_does_not_save_it(tmp_path, teacher_run):
    config = toy('distill', teacher=str(teacher_run))
    teacher = make_teacher(load_config(config))
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = train(config, opts(tmp_path, 'student', end_step=2))
    ckpt = ckpt_lib.load_checkpoint(result.checkpoint)
    student_keys = set(make_model(load_config(config)).state_dict())
    assert set(ckpt['model']) == student_keys and set(ckpt['model_ema']) == student_keys
    assert not any('teacher' in k for k in ckpt['model'])
    assert len(ckpt['opt']['param_groups'][0]['params']) + sum(
        len(g['params']) for g in ckpt['opt']['param_groups'][1:]) == len(
        [p for p in make_model(load_config(config)).parameters()])
    after = make_teacher(load_config(config)).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_distill_refuses_a_teacher_of_another_architecture(tmp_path, teacher_run):
    config = toy('distill', teacher=str(teacher_run))
    config['model']['width'] = 32
    with pytest.raises(ConfigError, match=r"config key 'align.teacher'.*differs in model.width \(e.g. model.width: "
                                          r"teacher 16, student 32\)"):
        make_teacher(load_config(config))


def test_distill_refuses_a_teacher_of_other_data(tmp_path):
    other = toy('baseline')
    other['dataset']['num_classes'] = 3
    run = train(other, opts(tmp_path, 'other', end_step=1)).run_dir
    with pytest.raises(ConfigError, match=r'differs in dataset.num_classes'):
        make_teacher(load_config(toy('distill', teacher=str(run))))


def test_distill_refuses_a_one_pass_teacher(tmp_path):
    run = train(toy('gft'), opts(tmp_path, 'gft', end_step=1)).run_dir
    with pytest.raises(ConfigError, match=r"differs in .*align.objective \('gft'; a teacher samples with CFG"):
        make_teacher(load_config(toy('distill', teacher=str(run))))


def test_distill_with_a_missing_teacher_file_names_it(tmp_path, capsys):
    from kdiff_align.training.trainer import main

    config = toy('distill', teacher=str(tmp_path / 'nowhere.safetensors'))
    path = tmp_path / 'distill.json'
    path.write_text(json.dumps(config))
    rc = main(['--config', str(path), '--end-step', '1', '--out-dir', str(tmp_path), '--no-progress'])
    assert rc == 2
    assert f"export '{tmp_path / 'nowhere.safetensors'}' does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Bad input: the key, the value and what is allowed.

@pytest.mark.parametrize('kind, align, message', [
    ('aligned', {'objective': 'cfg++'}, "config key 'align.objective': got 'cfg++'; allowed: one of 'aligned', "
                                        "'gft', 'mg', 'distill'"),
    ('mg', {'w_train': 1.0}, "config key 'align.w_train': got 1.0; allowed: a number in [0, 1) for objective "
                             '"mg"'),
    ('mg', {'w_train': -0.1}, "config key 'align.w_train': got -0.1; w_train (the paper's w) must be a finite "
                              'number >= 0'),
    ('mg', {'w_train': {'type': 'uniform', 'min_value': 0, 'max_value': 0.5}}, "allowed: a number in [0, 1)"),
    ('gft', {'w_train': {'type': 'uniform', 'min_value': 3, 'max_value': 1}},
     "config key 'align.w_train': got {'type': 'uniform', 'min_value': 3, 'max_value': 1}; a w distribution needs "
     "0 <= min_value <= max_value"),
    ('distill', {'w_train': {'type': 'uniform', 'min_value': -1, 'max_value': 1}}, 'needs 0 <= min_value'),
    ('distill', {'teacher': None}, "config key 'align.teacher': got None; allowed: for objective \"distill\", the "
                                   'path of the teacher'),
    ('mg', {'teacher': 'best'}, "config key 'align.teacher': got 'best'; allowed: one of 'ema', 'online'"),
    ('gft', {'teacher': 'ema'}, "config key 'align.teacher': got 'ema'; allowed: null for objective 'gft'"),
    ('gft', {'warmup_steps': 10}, "config key 'align.warmup_steps': got 10; allowed: 0 for objective 'gft'"),
    ('mg', {'warmup_steps': -1}, "config key 'align.warmup_steps': got -1; allowed: an integer in [0, inf]"),
    ('gft', {'mix': 0.5}, "config key 'align.mix': got 0.5; allowed: 1.0 (the default) for objective 'gft'"),
    ('aligned', {'target_sigma_range': [0.1, 1]}, "config key 'align.target_sigma_range': got [0.1, 1]; allowed: "
                                                  "null for objective 'aligned'"),
    ('mg', {'target_sigma_range': [2, 1]}, "config key 'align.target_sigma_range': got [2, 1]"),
])
def test_bad_objective_settings_name_key_value_and_allowed(kind, align, message):
    config = toy(kind)
    config['align'].update(align)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert message in str(err.value)


def test_one_pass_objective_on_an_unconditional_model_is_refused():
    config = tiny_config(objective='gft')
    config['dataset']['num_classes'] = 0
    with pytest.raises(ConfigError, match="config key 'align.objective': got 'gft'; allowed: \"aligned\" for an "
                                          r'unconditional model \(dataset.num_classes 0\)'):
        load_config(config)


@pytest.mark.parametrize('kind', ['gft', 'mg'])
def test_image_transformer_trains_with_one_pass_objectives(tmp_path, kind):
    config = tiny_config('image_transformer_v1', objective=kind, sample_steps=2)
    result = train(config, opts(tmp_path, kind, end_step=2, sample_n=2))
    assert result.step == 2 and result.demo.is_file() and torch.isfinite(torch.tensor(result.loss))


@pytest.mark.slow
@pytest.mark.e2e
def test_evaluate_cli_keeps_one_pass_models_in_their_trained_range(tmp_path, capsys):
    import json as json_lib

    from kdiff_align.evaluation import evaluate

    run = train(toy('gft'), opts(tmp_path, 'gft', end_step=1)).run_dir
    args = [str(run / 'gft.safetensors'), '--n', '40', '--steps', '2', '--samplers', 'euler', '--no-progress']
    assert evaluate.main(args + ['--out', str(tmp_path / 'a'), '--w', '8']) == 2
    assert 'w 8 is outside the range [0, 4]' in capsys.readouterr().err
    assert evaluate.main(args + ['--out', str(tmp_path / 'b')]) == 0
    assert 'note: w 8 left out of the default grid' in capsys.readouterr().err
    rows = json_lib.loads((tmp_path / 'b' / 'results.json').read_text())
    assert sorted({r['w'] for r in rows}) == [0., 0.5, 1., 2., 4.] and {r['nfe'] for r in rows} == {2.}


def test_distill_refuses_a_teacher_whose_weights_do_not_fit_its_config(tmp_path, teacher_run):
    config = load_config(toy('baseline'))
    wider = load_config(toy('baseline'))
    wider['model']['width'] = 32
    path = ckpt_lib.save_export(tmp_path / 'bad.safetensors', make_model(wider).state_dict(), config)
    with pytest.raises(ConfigError, match=r"config key 'align.teacher'.*allowed: weights that fit the model of its own "
                                          r'config \(Error\(s\) in loading state_dict'):
        make_teacher(load_config(toy('distill', teacher=str(path))))


@pytest.mark.parametrize('call, message', [
    (lambda d: OnePassDenoiser(d, None, sigma_interval=[0.1, 1.]), 'a guidance interval needs a model told w'),
    (lambda d: guided_denoiser(d, 'cfg', 1.), "objective must be one of 'aligned', 'gft', 'mg', 'distill'; got 'cfg'"),
    (lambda d: guided_denoiser(d, 'gft', 1.), 'a gft model needs the w range it was trained for'),
])
def test_sampling_refuses_what_it_cannot_do(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.nn.Identity())


def test_a_transformer_without_classes_cannot_be_told_w():
    from kdiff_align.core.models import GuidanceToldTransformer

    config = tiny_config('image_transformer_v1')
    config['dataset']['num_classes'] = 0
    with pytest.raises(ValueError, match=r'a transformer told w needs its class embedding \(dataset.num_classes > 0\)'):
        GuidanceToldTransformer(make_model(load_config(config)))
