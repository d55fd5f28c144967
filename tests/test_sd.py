"""Stable Diffusion fine-tuning end to end on tiny random components saved in diffusers' layout (offline)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('peft')

from kdiff_align.sd import tiny as sd_tiny  # noqa: E402
from helpers import kill_9_after_checkpoint  # noqa: E402

from kdiff_align.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('one_thread')   # the fixtures one_thread and tiny: conftest.py


@pytest.fixture(scope='module')
def lora_run(tiny):
    """A 4-step LoRA run with the aligned objective (shared by the export and sampling tests)."""
    from kdiff_align.sd.train import SDTrainOptions, train

    config = sd_tiny.sd_config(tiny['pipe'], tiny['data'])
    return train(config, SDTrainOptions(out_dir=str(tiny['root'] / 'runs'), name='lora', batch_size=2, end_step=4,
                                        seed=0, progress=False, log_every=1, save_every=0))


def _unet_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([10., 700.]),
            torch.randn(2, 77, 32, generator=gen))


@pytest.mark.e2e
def test_import_stays_light():
    code = ('import sys, kdiff_align, kdiff_align.sd, kdiff_align.config.sd; '
            'bad = [m for m in ("diffusers", "transformers", "peft") if m in sys.modules]; assert not bad, bad')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)


def test_shipped_configs_are_twins():
    from kdiff_align.storage.metadata import guidance_metadata
    from kdiff_align.config.sd import is_sd_config, load_config

    aligned, baseline = (load_config(ROOT / 'configs' / f'sd_{n}.json') for n in ('aligned', 'baseline'))
    assert is_sd_config(aligned) and is_sd_config(baseline)
    assert guidance_metadata(aligned)['objective'] == 'aligned' and guidance_metadata(aligned)['w_range'] != [0.0, 0.0]
    assert guidance_metadata(baseline)['objective'] == 'aligned' and guidance_metadata(baseline)['w_range'] == [0.0, 0.0]
    assert {k: v for k, v in aligned.items() if k != 'align'} == {k: v for k, v in baseline.items() if k != 'align'}


def test_metadata_jsonl_captions(tiny):
    from kdiff_align.config.sd import find_captioned_images

    folder = sd_tiny.make_captioned_folder(tiny['root'] / 'jsonl', layout='metadata.jsonl')
    items = find_captioned_images(folder, 'metadata.jsonl')
    assert [c for _, c in items] == list(sd_tiny.CAPTIONS)
    with open(folder / 'metadata.jsonl', 'a') as f:
        f.write('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(ConfigError, match=r"image 'gone.png' does not exist"):
        find_captioned_images(folder, 'metadata.jsonl')


# Bad inputs: each fails with a message that names the problem, before any model is loaded.

@pytest.fixture
def no_model_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('a model was loaded before the inputs were validated')
    monkeypatch.setattr('kdiff_align.sd.model.load_components', fail)


def _train_error(config, tmp_path):
    from kdiff_align.sd.train import SDTrainOptions, train

    with pytest.raises(ConfigError) as info:
        train(config, SDTrainOptions(out_dir=str(tmp_path), end_step=1, progress=False))
    return str(info.value)


def test_missing_weights_path(tiny, tmp_path, no_model_loading):
    config = sd_tiny.sd_config(tmp_path / 'no_such_model', tiny['data'])
    message = _train_error(config, tmp_path)
    assert "'model.pretrained'" in message and 'no_such_model' in message and 'does not exist' in message


def test_incomplete_weights_folder(tiny, tmp_path, no_model_loading):
    (tmp_path / 'half' / 'vae').mkdir(parents=True)
    message = _train_error(sd_tiny.sd_config(tmp_path / 'half', tiny['data']), tmp_path)
    assert 'not a diffusers Stable Diffusion folder' in message and 'unet/config.json' in message


def test_image_without_caption(tiny, tmp_path, no_model_loading):
    data = sd_tiny.make_captioned_folder(tmp_path / 'data', n=3)
    (data / 'img_1.txt').unlink()
    message = _train_error(sd_tiny.sd_config(tiny['pipe'], data), tmp_path)
    assert '1 image(s)' in message and 'img_1.png' in message and 'img_1.txt' in message


@pytest.mark.parametrize('resolution, expected', [
    (36, 'a multiple of 8'),                                       # not a multiple of the VAE factor
    (40, "not divisible by the UNet's downsampling factor 2"),     # 5x5 latents for a 2-level UNet
])
def test_wrong_resolution(tiny, tmp_path, no_model_loading, resolution, expected):
    config = sd_tiny.sd_config(tiny['pipe'], tiny['data'])
    config['model']['resolution'] = resolution
    message = _train_error(config, tmp_path)
    assert "'model.resolution'" in message and str(resolution) in message and expected in message


def test_prediction_mismatch(tiny, tmp_path, no_model_loading):
    message = _train_error(sd_tiny.sd_config(tiny['pipe'], tiny['data'], prediction='v_prediction'), tmp_path)
    assert "'model.prediction' is 'v_prediction'" in message and "prediction_type 'epsilon'" in message


def test_cli_reports_bad_input(tiny, tmp_path, capsys, no_model_loading):
    from kdiff_align.sd.train import main

    config = sd_tiny.sd_config(tiny['pipe'], tiny['data'])
    config['model']['lora']['target_modules'] = []
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(config))
    assert main(['--config', str(path), '--out-dir', str(tmp_path)]) == 2
    assert "error: config key 'model.lora.target_modules'" in capsys.readouterr().err
    # A resume target that holds no checkpoint is named before anything loads.
    assert main(['--config', str(path), '--resume', str(tmp_path), '--out-dir', str(tmp_path)]) == 2
    assert f"run folder '{tmp_path}' has no latest.json" in capsys.readouterr().err
    # The project's one training CLI dispatches Stable Diffusion configs here.
    from kdiff_align.training.trainer import main as train_main
    assert train_main(['--config', str(path), '--out-dir', str(tmp_path)]) == 2
    assert "error: config key 'model.lora.target_modules'" in capsys.readouterr().err


# The objective on the UNet.

def test_both_branches_in_one_unet_call(tiny):
    from kdiff_align.core.objective import AlignedDenoiser
    from kdiff_align.sd.model import load_components, make_denoiser, null_condition

    comps = load_components({'pretrained': str(tiny['pipe'])})
    uncond = null_condition(comps.tokenizer, comps.text_encoder)
    denoiser = make_denoiser(comps.unet, comps.alphas_cumprod, 'epsilon')
    model = AlignedDenoiser(denoiser, guidance_scale=2.0, uncond=uncond, uncond_prob=0.0)
    x, _, cond = _unet_inputs()
    noise = torch.randn_like(x)
    sigma = denoiser.sigmas[torch.tensor([10, 700])]
    calls = []
    handle = comps.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    loss = model.loss(x, noise, sigma, cond=cond)
    handle.remove()
    assert calls == [4]
    # Reference: eps_w = (1 + w) eps_c - w eps_u with the empty-prompt embedding, target the noise
    # (docs/design.md section 1).
    with torch.no_grad():
        c_in = (1 / (sigma ** 2 + 1) ** 0.5)[:, None, None, None]
        t = denoiser.sigma_to_t(sigma)
        eps_c = comps.unet((x + noise * sigma[:, None, None, None]) * c_in, t, encoder_hidden_states=cond).sample
        eps_u = comps.unet((x + noise * sigma[:, None, None, None]) * c_in, t,
                           encoder_hidden_states=uncond['cond'].expand(2, -1, -1)).sample
    expected = ((3 * eps_c - 2 * eps_u - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)


def test_loss_decreases_on_fixed_batch(tiny):
    from kdiff_align.core.objective import AlignedDenoiser
    from kdiff_align.sd.model import load_components, make_denoiser, null_condition
    from kdiff_align.sd.train import add_lora

    comps = load_components({'pretrained': str(tiny['pipe'])})
    uncond = null_condition(comps.tokenizer, comps.text_encoder)
    add_lora(comps.unet, {'rank': 4, 'alpha': 4, 'dropout': 0.0, 'target_modules': ['to_q', 'to_k', 'to_v',
                                                                                    'to_out.0']}, torch.float32)
    params = [p for p in comps.unet.parameters() if p.requires_grad]
    model = AlignedDenoiser(make_denoiser(comps.unet, comps.alphas_cumprod, 'epsilon'), guidance_scale=1.0,
                            uncond=uncond, uncond_prob=0.25)
    x, _, cond = _unet_inputs(1)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=gen)
    sigma = model.inner_model.sigmas[torch.tensor([300, 600])]
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)   # the same anchor rows every step
        loss = model.loss(x, noise, sigma, cond=cond).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# Training, export, reload, sampling.

def test_lora_run_outputs(lora_run):
    from kdiff_align.storage.metadata import read_metadata

    run = lora_run.run_dir
    assert lora_run.step == 4 and len(lora_run.losses) == 4 and all(map(torch.isfinite, torch.tensor(
        lora_run.losses)))
    assert lora_run.cache_built and lora_run.cache.is_file()
    rows = (run / 'metrics.csv').read_text().splitlines()
    assert rows[0].startswith('step,epoch,loss') and len(rows) == 5
    assert json.loads((run / 'config.json').read_text())['model']['prediction'] == 'epsilon'
    meta = read_metadata(lora_run.lora)
    assert meta['objective'] == 'aligned' and meta['w_train'] == 1.0 and meta['cfg_scale'] == 1 + meta['w_sample']


def test_lora_reloads_in_diffusers(tiny, lora_run):
    from diffusers import StableDiffusionPipeline

    def pipe_output(lora=None):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny['pipe']), local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        with torch.no_grad():
            return pipe.unet(*_unet_inputs()[:2], encoder_hidden_states=_unet_inputs()[2]).sample

    base, loaded, kohya = pipe_output(), pipe_output(lora_run.lora), pipe_output(lora_run.lora_kohya)
    trained = lora_run.unet.eval()
    with torch.no_grad():
        expected = trained(*_unet_inputs()[:2], encoder_hidden_states=_unet_inputs()[2]).sample
    assert (loaded - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kohya, expected, rtol=1e-4, atol=1e-5)


def test_project_lora_samples_in_diffusers_at_its_recommended_w(tiny, lora_run):
    from diffusers import StableDiffusionPipeline

    from kdiff_align.integrations.diffusers_guider import recommended_guidance_scale
    from kdiff_align.storage.metadata import read_metadata

    scale = recommended_guidance_scale(lora_run.lora)
    assert scale == 1 + read_metadata(lora_run.lora)['w_sample']  # hosts' convention, from the file alone

    def sample(lora=None):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny['pipe']), local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        with torch.no_grad():
            return pipe('a cat', guidance_scale=scale, num_inference_steps=2, height=sd_tiny.RESOLUTION,
                        width=sd_tiny.RESOLUTION, output_type='latent',
                        generator=torch.Generator().manual_seed(0)).images

    base, tuned = sample(), sample(lora_run.lora)
    assert torch.isfinite(tuned).all() and not torch.allclose(base, tuned)


def resume_lora_run(tiny, lora_run, name: str, end_step: int) -> int:
    """`python -m kdiff_align.sd.train --resume` of the shared LoRA run into runs/<name>, reusing its cache."""
    from kdiff_align.sd.train import main

    config = json.loads((lora_run.run_dir / 'config.json').read_text())
    config['dataset']['cache_dir'] = str(lora_run.cache.parent)
    path = tiny['root'] / f'{name}.json'
    path.write_text(json.dumps(config))
    return main(['--config', str(path), '--resume', str(lora_run.checkpoint), '--out-dir', str(tiny['root'] / 'runs'),
                 '--name', name, '--end-step', str(end_step), '--batch-size', '2', '--no-progress'])


def test_second_run_skips_vae_and_text_encoder(tiny, lora_run, monkeypatch):
    from kdiff_align.sd import data

    def no_encoding(*args, **kwargs):
        raise AssertionError('the cache was not reused')
    monkeypatch.setattr(data, 'load_image', no_encoding)
    monkeypatch.setattr('kdiff_align.sd.model.encode_prompts', lambda tok, te, prompts, device=None: (
        no_encoding() if prompts != [''] else torch.zeros(1, 77, 32)))
    # Resume the run for one more step through the CLI, with the first run's cache.
    assert resume_lora_run(tiny, lora_run, 'resumed', end_step=5) == 0
    assert (tiny['root'] / 'runs' / 'resumed' / 'resumed_lora.safetensors').is_file()
    assert json.loads((tiny['root'] / 'runs' / 'resumed' / 'latest.json').read_text())['latest_checkpoint'] \
        == 'checkpoints/00000005.pth'


def test_sd_trainer_prints_the_run_header_and_no_loss_none(tiny, lora_run, capsys):
    """The SD trainer's header is the main trainer's (train_cli.print_run_header); resuming a finished run says so."""
    assert resume_lora_run(tiny, lora_run, 'header', end_step=4) == 0
    out = capsys.readouterr().out
    assert f'Run folder: {tiny["root"] / "runs" / "header"}  (process 0 of 1 on cpu; trainable parameters: ' in out
    assert "Objective: aligned, w_train = " in out and "; the export recommends w = " in out
    assert 'loss None' not in out and 'no step trained (the run was already at --end-step 4' in out


def test_sample_cli(lora_run, tmp_path):
    from PIL import Image

    from kdiff_align.sd.sample import main

    out = tmp_path / 'cats.png'
    assert main(['--run', str(lora_run.run_dir), '--prompt', 'a cat', 'a dog', '--n', '2', '--steps', '3',
                 '--sampler', 'dpmpp_2m', '--out', str(out), '--device', 'cpu']) == 0
    width, height = Image.open(out).size   # 2 x 2 images, a prompt left of each row, a title above
    assert width > 2 * sd_tiny.RESOLUTION + 40 and height > 2 * sd_tiny.RESOLUTION + 14


@pytest.mark.slow
@pytest.mark.e2e
def test_train_and_sample_commands_print_no_loading_noise(tiny, tmp_path):
    # Every SD command printed transformers' "Loading weights" bar and diffusers' warning about an empty list of
    # float32 modules; the commands' own output is all that is left.
    path = tmp_path / 'sd.json'
    path.write_text(json.dumps(sd_tiny.sd_config(tiny['pipe'], tiny['data'])))
    train = ['--config', str(path), '--out-dir', str(tmp_path), '--name', 'quiet', '--end-step', '1',
             '--batch-size', '2', '--no-progress']
    sample = ['--run', str(tmp_path / 'quiet'), '--prompt', 'a cat', '--steps', '1', '--out', str(tmp_path / 'cat.png'),
              '--device', 'cpu']
    # Both commands in one fresh process (what a user's shell runs, less one interpreter start-up).
    code = ('import sys; from kdiff_align import train; from kdiff_align.sd import sample; '
            f'sys.exit(train.main({train!r}) or sample.main({sample!r}))')
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env={**SD_ENV, 'PYTHONPATH': str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'Loading weights' not in proc.stderr and 'float32' not in proc.stderr, proc.stderr
    assert (tmp_path / 'cat.png').is_file()


def test_only_that_warning_and_that_bar_are_hidden():
    import logging

    from transformers.utils import logging as hf_logging

    from kdiff_align.sd.model import no_loading_bar

    logger = logging.getLogger('diffusers.models.modeling_utils')

    def shown(message):
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None)))
    assert not shown('There are modules in UNet2DConditionModel that should be kept in float32: []. Casting ...')
    assert shown("There are modules in UNet2DConditionModel that should be kept in float32: ['norm']. Casting ...")
    with no_loading_bar():
        bars = [hf_logging.tqdm(range(1), desc=d, disable=False) for d in ('Loading weights', 'Downloading')]
    bars.append(hf_logging.tqdm(range(1), desc='Loading weights', disable=False))   # after it: shown again
    assert [bar.disable for bar in bars] == [True, False, False]
    for bar in bars:
        bar.close()


@pytest.mark.parametrize('sampler', ['euler_ancestral', 'heun'])
def test_generate_any_sampler_batched_guidance(tiny, sampler):
    from kdiff_align.sd.model import load_components
    from kdiff_align.sd.sample import generate

    comps = load_components({'pretrained': str(tiny['pipe'])})
    calls = []
    comps.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    images = generate(comps, ['a cat'], w=3.0, sampler=sampler, steps=3, resolution=sd_tiny.RESOLUTION)
    assert images.shape == (1, 3, sd_tiny.RESOLUTION, sd_tiny.RESOLUTION) and torch.isfinite(images).all()
    assert calls and set(calls) == {2}   # conditional + empty-prompt rows in one call per evaluation


def test_full_finetune_v_prediction(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    from kdiff_align.core.objective import AlignedDenoiser
    from kdiff_align.sd.sample import main as sample_main
    from kdiff_align.sd.train import SDTrainOptions, train

    pipe = sd_tiny.save_pipeline(tmp_path / 'pipe_v', prediction='v_prediction')
    config = sd_tiny.sd_config(pipe, tiny['data'], lora=False, prediction='v_prediction', stop_grad_uncond=True)
    config['model']['gradient_checkpointing'] = False
    config['ema_sched'] = {'type': 'inverse', 'power': 0.75, 'max_value': 0.999}
    config['optimizer']['lr'] = 1e-3
    seen = []
    original = AlignedDenoiser.loss

    def spy(self, *args, **kwargs):
        seen.append(self.parameterization)
        return original(self, *args, **kwargs)
    AlignedDenoiser.loss = spy
    try:
        result = train(config, SDTrainOptions(out_dir=str(tmp_path / 'runs'), name='full', batch_size=2, end_step=2,
                                              seed=0, progress=False, save_every=0))
    finally:
        AlignedDenoiser.loss = original
    assert seen == ['v', 'v']
    assert result.lora is None and (result.unet_dir / 'config.json').is_file()
    assert json.loads((result.unet_dir / 'kdiff_align.json').read_text())['prediction'] == 'v_prediction'
    tuned = UNet2DConditionModel.from_pretrained(str(result.unet_dir), local_files_only=True)
    base = UNet2DConditionModel.from_pretrained(str(pipe), subfolder='unet', local_files_only=True)
    x, t, cond = _unet_inputs()
    with torch.no_grad():
        assert (tuned(x, t, encoder_hidden_states=cond).sample - base(x, t, encoder_hidden_states=cond).sample
                ).abs().max() > 1e-4
    out = tmp_path / 'v.png'
    assert sample_main(['--run', str(result.run_dir), '--prompt', 'a dog', '--steps', '2', '--sampler', 'euler',
                        '--out', str(out), '--device', 'cpu']) == 0 and out.is_file()


def test_one_parser_for_both_trainers(capsys):
    """One parser holds both trainers' flags; omitted flags take the chosen trainer's defaults, and flags it lacks
    are reported, not refused."""
    from kdiff_align.training import trainer as ktrain
    from kdiff_align.training import cli as train_cli
    from kdiff_align.sd import train as sdtrain

    argv = ['--config', 'c.json', '--demo-every', '5', '--compile', '--batch-size', '3', '--end-step', '7']
    args = train_cli.make_parser().parse_args(argv)
    options = train_cli.options_from_args(args, sdtrain)
    assert 'warning: --demo-every, --compile do not apply to Stable Diffusion fine-tuning' in capsys.readouterr().err
    assert (options.batch_size, options.end_step, options.grad_clip) == (3, 7, sdtrain.SDTrainOptions().grad_clip)
    options = train_cli.options_from_args(train_cli.make_parser().parse_args(argv[:2]), ktrain)
    assert options == ktrain.TrainOptions(config_path='c.json') and not capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.make_parser().parse_args(['--cache-batch-size', '0'])
    assert '--cache-batch-size: must be an integer >= 1, got 0' in capsys.readouterr().err


# Checkpoints: the engine's exact resume, and nothing but tensors is unpickled.

SD_ENV = {**os.environ, 'K_DIFFUSION_USE_COMPILE': '0', 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}


@pytest.mark.slow
@pytest.mark.e2e
def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny, tmp_path, capsys):
    from kdiff_align.storage import checkpoint as ckpt_lib
    from kdiff_align.training.trainer import main

    config = sd_tiny.sd_config(tiny['pipe'], tiny['data'])
    config['ema_sched'] = {'type': 'inverse', 'power': 0.75, 'max_value': 0.999}
    config['dataset']['cache_dir'] = str(tmp_path / 'cache')
    path = tmp_path / 'sd.json'
    path.write_text(json.dumps(config))
    end = 12

    def argv(name):
        return ['--config', str(path), '--out-dir', str(tmp_path), '--name', name, '--batch-size', '2',
                '--grad-accum-steps', '2', '--seed', '5', '--end-step', str(end), '--save-every', '2',
                '--log-every', '1', '--no-progress']

    assert main(argv('full')) == 0   # in this process (one thread, like the CLI runs below)
    run = tmp_path / 'killed'
    killed_at = kill_9_after_checkpoint([sys.executable, '-m', 'kdiff_align.train', *argv('killed')], SD_ENV, run, 4)
    assert 4 <= killed_at < end
    capsys.readouterr()
    assert main(argv('killed')) == 0   # the run folder's latest checkpoint, as after any crash
    assert f'Resuming from {run / "checkpoints" / f"{killed_at:08}.pth"}' in capsys.readouterr().out
    full, again = ckpt_lib.load_checkpoint(tmp_path / 'full'), ckpt_lib.load_checkpoint(run)
    assert full['step'] == again['step'] == end and full['batches_seen'] == again['batches_seen'] == 2 * end
    assert full['model'] and set(full['model']) == set(full['model_ema'])   # the adapter only, and its EMA
    assert all('lora' in name for name in full['model'])
    for key in ('model', 'model_ema'):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, again[key][name]), f'{key}.{name} differs after kill -9 and resume'
    rows = [r.split(',')[0] for r in (run / 'metrics.csv').read_text().splitlines()[1:]]
    assert rows == [str(s) for s in range(1, end + 1)]


class _Exploit:
    """Unpickling this creates a folder: what a crafted checkpoint could do with any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_resume_refuses_a_crafted_pickle(tiny, tmp_path, capsys, no_model_loading):
    from kdiff_align.sd.train import main

    marker = tmp_path / 'code-ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'format': 'kdiff-align-checkpoint', 'step': 1, 'payload': _Exploit(marker)}, evil)
    path = tmp_path / 'sd.json'
    path.write_text(json.dumps(sd_tiny.sd_config(tiny['pipe'], tiny['data'])))
    assert main(['--config', str(path), '--resume', str(evil), '--out-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), 'the checkpoint\'s code ran'
    assert err.startswith(f"error: cannot read checkpoint '{evil}'") and 'posix.mkdir' in err
    assert 'expected a kdiff-align checkpoint' in err and '\n' not in err and 'weights_only' not in err
