"""Stable Diffusion with the one-pass objectives: a model-guidance LoRA that samples in one UNet call per step,
a GFT full fine-tune told w through diffusers' time_cond_proj_dim, and the combinations that are refused."""

from pathlib import Path

import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('peft')

from kdiff_align.sd import tiny as sd_tiny  # noqa: E402

from kdiff_align.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMA = {'type': 'inverse', 'power': 0.75, 'max_value': 0.999}
pytestmark = pytest.mark.usefixtures('one_thread')   # the fixtures one_thread and tiny: conftest.py


def run(config, root, name, steps=3):
    from kdiff_align.sd.train import SDTrainOptions, train

    return train(config, SDTrainOptions(out_dir=str(root / 'runs'), name=name, batch_size=2, end_step=steps, seed=0,
                                        progress=False, log_every=1, save_every=0))


def unet_calls(unet):
    """Rows per UNet call, and the timestep_cond each call got."""
    calls = []
    unet.register_forward_hook(lambda m, args, kwargs, out: calls.append((args[0].shape[0],
                                                                          kwargs.get('timestep_cond'))),
                               with_kwargs=True)
    return calls


def test_shipped_sd_mg_config_is_the_aligned_config_with_mg():
    from kdiff_align.config.sd import load_config

    mg, aligned = (load_config(ROOT / 'configs' / f'sd_{n}.json') for n in ('mg', 'aligned'))
    assert mg['align']['objective'] == 'mg' and mg['align']['teacher'] == 'ema' and mg['model']['lora'] is not None
    assert {k: v for k, v in mg.items() if k != 'align'} == {k: v for k, v in aligned.items() if k != 'align'}


def test_mg_lora_trains_against_its_ema_and_samples_in_one_unet_call_per_step(tiny, tmp_path):
    from kdiff_align.storage.checkpoint import load_for_inference
    from kdiff_align.core.objective import GuidanceObjective   # the family's one loss body
    from kdiff_align.sd.model import load_components
    from kdiff_align.sd.sample import generate, load_lora, main as sample_main

    config = sd_tiny.sd_config(tiny['pipe'], tiny['data'], objective='mg', w_train=0.5, warmup_steps=1)
    config['ema_sched'] = EMA
    active, original = [], GuidanceObjective.loss

    def spy(self, *args, **kwargs):
        active.append((self.kind, self.active, self.teacher is not self.inner_model))
        return original(self, *args, **kwargs)
    GuidanceObjective.loss = spy
    try:
        result = run(config, tiny['root'], 'mg')
    finally:
        GuidanceObjective.loss = original
    assert active == [('mg', False, True), ('mg', True, True), ('mg', True, True)]   # warm-up, then the EMA teacher
    assert result.lora.is_file() and all(map(torch.isfinite, torch.tensor(result.losses)))

    comps = load_components({'pretrained': str(tiny['pipe'])})
    load_lora(comps.unet, load_for_inference(result.lora, need_config=False)[1])
    calls = unet_calls(comps.unet)
    generate(comps, ['a cat'], w=1.0, sampler='euler', steps=3, resolution=sd_tiny.RESOLUTION, objective='mg',
             w_range=[1.0, 1.0])
    assert [rows for rows, _ in calls] == [1, 1, 1]        # one pass at its trained guidance w / (1 - w) = 1
    calls.clear()
    generate(comps, ['a cat'], w=3.0, sampler='euler', steps=3, resolution=sd_tiny.RESOLUTION, objective='mg',
             w_range=[1.0, 1.0])
    assert [rows for rows, _ in calls] == [2, 2, 2]        # another w: CFG on top of it
    out = tmp_path / 'mg.png'
    assert sample_main(['--run', str(result.run_dir), '--prompt', 'a dog', '--steps', '2', '--sampler', 'euler',
                        '--out', str(out), '--device', 'cpu']) == 0 and out.is_file()


def test_gft_full_finetune_is_told_w_through_time_cond_proj_dim_and_loads_in_diffusers(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    from kdiff_align.sd.model import load_components
    from kdiff_align.sd.sample import generate, main as sample_main

    config = sd_tiny.sd_config(tiny['pipe'], tiny['data'], lora=False, objective='gft', w_train={
        'type': 'uniform', 'min_value': 0.0, 'max_value': 4.0})
    config['model']['gradient_checkpointing'] = False
    result = run(config, tmp_path, 'gft', steps=2)
    tuned = UNet2DConditionModel.from_pretrained(str(result.unet_dir), local_files_only=True)
    assert tuned.config.time_cond_proj_dim == 256
    assert tuned.time_embedding.cond_proj.weight.abs().max() > 0   # trained from its zero start

    comps = load_components({'pretrained': str(tiny['pipe'])}, unet_path=result.unet_dir)
    calls = unet_calls(comps.unet)
    generate(comps, ['a cat'], w=2.5, sampler='euler', steps=3, resolution=sd_tiny.RESOLUTION, objective='gft',
             w_range=[0.0, 4.0])
    assert [rows for rows, _ in calls] == [1, 1, 1] and all(cond is not None for _, cond in calls)
    assert sample_main(['--run', str(result.run_dir), '--prompt', 'a dog', '--w', '6', '--steps', '2',
                        '--out', str(tmp_path / 'x.png'), '--device', 'cpu']) == 2


def test_distill_full_finetune_learns_from_the_frozen_base_unet(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    from kdiff_align.core.objective import GuidanceObjective   # the family's one loss body

    config = sd_tiny.sd_config(tiny['pipe'], tiny['data'], lora=False, objective='distill', teacher='base',
                               w_train={'type': 'uniform', 'min_value': 0.0, 'max_value': 4.0})
    config['model']['gradient_checkpointing'] = False
    seen, original = [], GuidanceObjective.loss

    def spy(self, *args, **kwargs):
        teacher_unet = self.teacher.inner_model.unet
        student_unet = self.inner_model.inner_model.unet
        seen.append((teacher_unet is not student_unet, teacher_unet.config.time_cond_proj_dim,
                     any(p.requires_grad for p in teacher_unet.parameters())))
        return original(self, *args, **kwargs)
    GuidanceObjective.loss = spy
    try:
        result = run(config, tmp_path, 'distill', steps=2)
    finally:
        GuidanceObjective.loss = original
    assert seen == [(True, None, False)] * 2   # a separate, frozen base UNet without the embedding
    tuned = UNet2DConditionModel.from_pretrained(str(result.unet_dir), local_files_only=True)
    assert tuned.config.time_cond_proj_dim == 256
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert set(ckpt['model']) == set(tuned.state_dict())   # the student alone


@pytest.mark.parametrize('align, lora, message', [
    ({'objective': 'distill', 'teacher': 'runs/x'}, False, "config key 'align.teacher': got 'runs/x'; allowed: "
                                                          '"base" for Stable Diffusion'),
    ({'objective': 'distill', 'teacher': 'base'}, True, "config key 'align.objective': got 'distill'; allowed: "
                                                        "'aligned' or 'mg' with a LoRA"),
    ({'objective': 'gft'}, True, "config key 'align.objective': got 'gft'; allowed: 'aligned' or 'mg' with a LoRA"),
    ({'objective': 'mg', 'w_train': 1.5}, True, "config key 'align.w_train': got 1.5; allowed: a number in [0, 1)"),
])
def test_refused_sd_objectives_name_the_key(tiny, align, lora, message):
    from kdiff_align.config.sd import load_config

    with pytest.raises(ConfigError) as err:
        load_config(sd_tiny.sd_config(tiny['pipe'], tiny['data'], lora=lora, **align))
    assert message in str(err.value)


def test_mg_ema_teacher_needs_an_ema(tiny):
    config = sd_tiny.sd_config(tiny['pipe'], tiny['data'], objective='mg', w_train=0.5)
    with pytest.raises(ConfigError, match="config key 'align.teacher': got 'ema'; allowed: 'online' when the config "
                                          'has no ema_sched'):
        run(config, tiny['root'], 'mg_no_ema', steps=1)
