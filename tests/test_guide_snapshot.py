"""The engine's guide snapshot (config section "guide"): the EMA weights at a stated step, kept in checkpoints,
exported as <name>_guide.safetensors, exact across SIGKILL + resume, and usable as an autoguidance guide."""

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

from helpers import kill_9_after_checkpoint, opts, tiny_digits, toy
from kdiff_align.config import ConfigError, load_config
from kdiff_align.sampling.autoguidance import AutoGuidedDenoiser, check_guide, load_guided
from kdiff_align.storage import checkpoint as ckpt_lib
from kdiff_align.training.trainer import main, train


def export_of(path):
    """(tensors, metadata) of a .safetensors export."""
    with safe_open(str(path), 'pt') as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f'{what}: {name} differs'


def test_guide_is_the_ema_at_its_step_and_a_resumed_run_keeps_the_step(tmp_path):
    """The guide export equals the EMA export of the same run stopped at the snapshot step, bit for bit; a run
    resumed with another --end-step keeps the step its fraction gave at the start; the guide is a valid guide."""
    stopped = train(toy('aligned'), opts(tmp_path, 'stopped', end_step=4))
    config = {**toy('aligned'), 'guide': {'ema_at_fraction': 0.5}}
    first = train(config, opts(tmp_path, 'guided', end_step=8))   # 0.5 of --end-step 8: step 4
    assert first.guide_export == tmp_path / 'guided' / 'guided_guide.safetensors'
    resumed = train(None, opts(tmp_path, 'guided', end_step=20))   # 0.5 of 20 would be step 10
    assert resumed.step == 20 and resumed.guide_export == first.guide_export

    ema_at_4, _ = export_of(stopped.export)
    guide, meta = export_of(resumed.guide_export)
    assert_same_tensors(guide, ema_at_4, 'guide export vs the EMA at step 4')
    assert meta['step'] == '4' and meta['guide_snapshot'] == 'ema'
    assert json.loads(meta['config'])['guide'] == {'ema_at_fraction': 0.5}
    main_weights, main_meta = export_of(resumed.export)
    assert main_meta['step'] == '20' and 'guide_snapshot' not in main_meta
    assert not all(torch.equal(guide[k], main_weights[k]) for k in guide)   # a weaker model, not the main one
    ckpt = ckpt_lib.load_checkpoint(tmp_path / 'guided')
    assert ckpt['guide_step'] == 4
    assert_same_tensors(ckpt['model_guide'], ema_at_4, 'the checkpoint\'s guide')

    # The export reads like any export, and autoguides the main export.
    guide_config, _ = ckpt_lib.load_for_inference(resumed.guide_export)
    check_guide(load_config(guide_config), ckpt['config'])
    main_config, denoiser = load_guided(resumed.export, resumed.guide_export, 1.5)
    assert isinstance(denoiser, AutoGuidedDenoiser) and main_config['guide'] == {'ema_at_fraction': 0.5}
    x, sigma = torch.randn(4, 2), torch.full((4,), 1.)
    labels = torch.arange(4) % main_config['dataset']['num_classes']
    with torch.no_grad():
        d_main = denoiser.inner_model(x, sigma, class_cond=labels)
        d_guide = denoiser.guide_model(x, sigma, class_cond=labels)
        assert torch.allclose(denoiser(x, sigma, class_cond=labels), d_main + 1.5 * (d_main - d_guide))
    assert not torch.equal(d_main, d_guide)


def test_a_checkpoint_without_a_guide_section_resumes_as_before(tmp_path):
    """Checkpoints from runs without the section (like every older one) hold no guide keys and keep resuming;
    adding a guide section on resume is refused in one line (the step is fixed when the run starts)."""
    train(toy('aligned'), opts(tmp_path, 'plain', end_step=3))
    ckpt = ckpt_lib.load_checkpoint(tmp_path / 'plain')
    assert 'guide_step' not in ckpt and 'model_guide' not in ckpt and 'guide' not in ckpt['config']
    assert train(None, opts(tmp_path, 'plain', end_step=5)).guide_export is None
    with pytest.raises(ConfigError) as info:
        train({**toy('aligned'), 'guide': {'ema_at_step': 8}}, opts(tmp_path, 'plain', end_step=10))
    path = tmp_path / 'plain' / 'checkpoints' / '00000005.pth'
    assert str(info.value) == (f"the config does not match the checkpoint {str(path)!r} (guide: None in the "
                               "checkpoint, {'ema_at_step': 8} in the config); resume with the same guide section, "
                               "or omit --config to use the checkpoint's")


CLI_ENV = {**os.environ, 'K_DIFFUSION_USE_COMPILE': '0', 'OMP_NUM_THREADS': '1'}


def flags(*args: str) -> list[str]:
    return ['--no-progress', '--demo-every', '0', '--sample-n', '0', '--batch-size', '8', '--seed', '7', *args]


@pytest.mark.slow
@pytest.mark.e2e
def test_kill_9_before_and_after_the_snapshot_then_resume_equals_an_uninterrupted_run(tmp_path, one_thread):
    """SIGKILLed before the snapshot step (the resumed run takes it) and after it (the checkpoint restores it),
    each resumed run's guide export and main export are the uninterrupted run's, bit for bit."""
    path = tmp_path / 'guided.json'
    path.write_text(json.dumps({**tiny_digits(), 'guide': {'ema_at_fraction': 0.4}}))   # step 16 of 40
    common = ['--out-dir', str(tmp_path), '--end-step', '40', '--save-every', '4']
    assert main(flags('--config', str(path), '--name', 'full', *common)) == 0
    full = tmp_path / 'full'
    for name, kill_after in (('before', 4), ('after', 20)):
        run = tmp_path / name
        argv = [sys.executable, '-m', 'kdiff_align.train', *flags('--config', str(path), '--name', name, *common)]
        killed_at = kill_9_after_checkpoint(argv, CLI_ENV, run, kill_after, timeout=120)
        assert (killed_at < 16) if name == 'before' else (16 < killed_at < 40), killed_at
        killed = ckpt_lib.load_checkpoint(run)
        assert killed['guide_step'] == 16 and (killed['model_guide'] is None) == (name == 'before')
        assert main(flags('--resume', str(run), '--name', name, *common)) == 0
        for suffix in ('_guide.safetensors', '.safetensors'):   # (safetensors orders its metadata at random)
            (tensors, meta), (expected, expected_meta) = export_of(run / f'{name}{suffix}'), \
                export_of(full / f'full{suffix}')
            assert_same_tensors(tensors, expected, f'{name}{suffix} vs the uninterrupted run\'s')
            assert meta == expected_meta
        resumed, uninterrupted = ckpt_lib.load_checkpoint(run), ckpt_lib.load_checkpoint(full)
        assert resumed['guide_step'] == uninterrupted['guide_step'] == 16
        assert_same_tensors(resumed['model_guide'], uninterrupted['model_guide'], f'{name}: model_guide')
        assert_same_tensors(resumed['model_ema'], uninterrupted['model_ema'], f'{name}: model_ema')


SD_BASE = {'model': {'type': 'stable_diffusion'}}
ALLOWED = 'exactly one of "ema_at_step" (a step >= 1) or "ema_at_fraction" (a fraction of --end-step in (0, 1])'


@pytest.mark.parametrize('config, message', [
    ({'guide': {'ema_at_step': 0}}, "config key 'guide.ema_at_step': got 0; allowed: an integer in [1, inf]"),
    ({'guide': {'ema_at_step': 2.5}}, "config key 'guide.ema_at_step': got 2.5; allowed: an integer in [1, inf]"),
    ({'guide': {'ema_at_fraction': 1.5}},
     "config key 'guide.ema_at_fraction': got 1.5; allowed: a number in (0, 1]"),
    ({'guide': {'ema_at_fraction': 0}}, "config key 'guide.ema_at_fraction': got 0; allowed: a number in (0, 1]"),
    ({'guide': {'ema_at_steps': 500}}, "config key 'guide.ema_at_steps' is unknown (did you mean "
     "'guide.ema_at_step'?); allowed keys in \"guide\": ema_at_step, ema_at_fraction"),
    ({'guide': {'ema_at_step': 5, 'ema_at_fraction': 0.5}},
     f"config key 'guide': got {{'ema_at_step': 5, 'ema_at_fraction': 0.5}}; allowed: {ALLOWED}"),
    ({'guide': {}}, f"config key 'guide': got {{}}; allowed: {ALLOWED}"),
    ({'guide': 500}, f"config key 'guide': got 500; allowed: an object with {ALLOWED}"),
    ({'guide': {'ema_at_step': 5}, 'objective': 'gft'},
     "config key 'guide': got {'ema_at_step': 5}; allowed: no guide section for objective 'gft': autoguidance "
     "takes standard or aligned models, and a one-pass (gft, mg, distill) model is no plain conditional denoiser"),
    ({**SD_BASE, 'guide': {'ema_at_step': 5}},
     "config key 'guide': got {'ema_at_step': 5}; allowed: no guide section for a Stable Diffusion config: the "
     "guide snapshot is a feature of the k-diffusion trainer (autoguidance does not take Stable Diffusion "
     "models yet)"),
])
def test_bad_guide_sections_are_refused_in_one_line(config, message):
    objective = config.pop('objective', 'aligned')
    base = SD_BASE if 'model' in config else toy(objective)
    with pytest.raises(ConfigError) as info:
        load_config({**base, **config})
    assert str(info.value) == message


def test_a_fraction_without_end_step_is_refused_before_training(tmp_path, capsys):
    path = tmp_path / 'guided.json'
    path.write_text(json.dumps({**toy('aligned'), 'guide': {'ema_at_fraction': 0.25}}))
    assert main(flags('--config', str(path), '--out-dir', str(tmp_path), '--name', 'nofrac')) == 2
    err = capsys.readouterr().err
    assert ("config key 'guide.ema_at_fraction': got 0.25, a fraction of --end-step, which this run does not "
            "have; pass --end-step or use guide.ema_at_step") in err
    assert 'Traceback' not in err and not (tmp_path / 'nofrac').exists()
