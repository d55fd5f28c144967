"""kdiff_align.sampling.sample and exports: a checkpoint or a safetensors export alone is enough to sample."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from kdiff_align.storage.checkpoint import CheckpointError, load_for_inference
from kdiff_align.config import load_config
from kdiff_align.storage.metadata import read_metadata
from kdiff_align.sampling.sample import build_denoiser, main, sample_grid
from kdiff_align.training.trainer import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    config = json.loads((ROOT / 'configs' / 'digits_aligned.json').read_text())
    config['model'].update(mapping_out=16, depths=[1, 1], channels=[8, 16])
    config['align'].update(sample_steps=3, w_train=1.5, w_sample=None)  # w_sample follows w_train
    out = tmp_path_factory.mktemp('runs')
    return train(config, TrainOptions(name='s', out_dir=str(out), batch_size=8, end_step=2, demo_every=0,
                                      sample_n=0, seed=0, progress=False))


def test_export_carries_config_and_align_metadata_and_matches_the_ema_weights(run):
    with safe_open(str(run.export), 'pt') as f:
        meta = f.metadata()
    info = read_metadata(run.export)  # what host integrations read
    assert info['objective'] == 'aligned' and info['w_train'] == 1.5 and info['w_sample'] == 1.5
    assert info['cfg_scale'] == 2.5 and info['sigma_interval'] is None and meta['step'] == '2'
    config, state = load_for_inference(run.export)
    _, ckpt_state = load_for_inference(run.run_dir)  # the run folder's latest checkpoint, EMA weights
    assert config == json.loads(meta['config']) and state.keys() == ckpt_state.keys()
    assert all(torch.equal(state[k], ckpt_state[k]) for k in state)
    # Upstream's load_config reads the export's metadata too.
    import k_diffusion as K
    assert K.config.load_config(run.export)['model']['input_size'] == [8, 8]


def test_sample_grid_shares_noise_across_w_and_w0_is_the_conditional_model(run):
    config, state = load_for_inference(run.export)
    config = load_config(config)
    denoiser = build_denoiser(config, state)
    x = sample_grid(denoiser, config, [1, 7], [0., 0., 2.], n=2, steps=3, seed=4)
    assert x.shape == (2, 3, 2, 1, 8, 8)
    assert torch.equal(x[:, 0], x[:, 1])  # same noise, same w: same samples
    from kdiff_align.sampling.sample import sample
    noise = torch.randn(2, 2, 1, 8, 8, generator=torch.Generator().manual_seed(4)).view(4, 1, 8, 8)
    plain = sample(denoiser, config, noise, torch.tensor([1, 1, 7, 7]), 0., steps=3)
    assert torch.allclose(x[:, 0].reshape(4, 1, 8, 8), plain)


def test_cli_writes_grid_and_pngs_from_checkpoint_and_export(run, tmp_path, capsys):
    out = tmp_path / 'grid.png'
    assert main([str(run.run_dir), '--classes', '2', '5', '--w', '0', '1', '3', '--steps', '2', '--out', str(out),
                 '--png-dir', str(tmp_path / 'pngs'), '--sampler', 'euler']) == 0
    grid = Image.open(out)
    assert grid.width > grid.height  # 3 columns of w vs 2 rows of classes (plus labels)
    assert len(list((tmp_path / 'pngs').glob('class*_w*_*.png'))) == 6
    assert (tmp_path / 'pngs' / 'class5_w3_000.png').is_file()
    assert main([str(run.export), '--steps', '2', '--out', str(tmp_path / 'e.png')]) == 0
    assert "rows = classes [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], columns = w [0.0, 1.5]" in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    (['--classes', '10'], '--classes: got [10]; this model has classes 0..9'),
    (['--w', '-1'], "--w: got [-1.0]; allowed: numbers >= 0 (the paper's w"),
])
def test_cli_bad_input(run, argv, message, capsys):
    assert main([str(run.run_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_checkpoint_paths(tmp_path, capsys):
    assert main([str(tmp_path / 'missing.pth')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    with pytest.raises(CheckpointError, match='has no latest.json'):
        load_for_inference(tmp_path)
    (tmp_path / 'x.safetensors').write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match='cannot read safetensors export'):
        load_for_inference(tmp_path / 'x.safetensors')
