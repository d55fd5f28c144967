"""Helpers shared by the test files: tiny configs and run options, imported as `from helpers import ...`.

Fixtures live in conftest.py; this module holds the plain functions and constants that tests call directly
(in parametrize lists or with arguments), so that no test imports conftest or another test file.
"""

import json
import pickle
from pathlib import Path

import numpy as np
import torch

from kdiff_align.training.trainer import TrainOptions

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
NUM_CLASSES = 10
SAMPLERS = ['sample_euler', 'sample_heun', 'sample_dpmpp_2m', 'sample_dpmpp_2m_sde', 'sample_lms']


def tiny_config(model_type: str = 'image_v1', **align) -> dict:
    """A tiny class-conditional 8x8 config in upstream's format plus an align section."""
    if model_type == 'image_v1':
        model = {'type': 'image_v1', 'input_channels': 1, 'input_size': [8, 8], 'mapping_out': 32,
                 'depths': [1, 1], 'channels': [16, 32], 'self_attn_depths': [False, False]}
    else:
        model = {'type': 'image_transformer_v1', 'input_channels': 1, 'input_size': [8, 8], 'patch_size': [2, 2],
                 'width': 64, 'depth': 2}
    model.update({'dropout_rate': 0.0, 'sigma_data': 0.5, 'sigma_min': 1e-2, 'sigma_max': 80.0,
                  'sigma_sample_density': {'type': 'lognormal', 'mean': -1.2, 'std': 1.2}})
    return {'model': model, 'dataset': {'type': 'digits', 'num_classes': NUM_CLASSES},
            'optimizer': {'type': 'adamw', 'lr': 1e-3}, 'align': align}


def tiny_digits(objective: str = 'aligned', **align) -> dict:
    """configs/digits_<objective>.json shrunk to a few-second model."""
    config = json.loads((CONFIGS / f'digits_{objective}.json').read_text())
    config['model'].update(mapping_out=16, depths=[1, 1], channels=[8, 16])
    config['align'].update(sample_steps=3, **align)
    return config


def toy(objective: str, **align) -> dict:
    """configs/toy_<objective>.json shrunk to a one-second model."""
    config = json.loads((CONFIGS / f'toy_{objective}.json').read_text())
    config['model'].update(width=16, depth=1)
    config['dataset']['size'] = 64
    config['align'].update(sample_steps=3, **align)
    return config


def opts(tmp_path, name: str = 'run', **kw) -> TrainOptions:
    """Training options for a quiet tiny run in tmp_path/name: no demos, no samples, no periodic checkpoints."""
    base = dict(name=name, out_dir=str(tmp_path), batch_size=8, demo_every=0, sample_n=0, save_every=0, seed=3,
                progress=False, log_every=1)
    return TrainOptions(**{**base, **kw})


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gives every parameter random values so that outputs depend on every input (upstream zero-inits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


class CallCounter(torch.nn.Module):
    """Wraps a module and records the batch size and grad mode of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, input, *args, **kwargs):
        self.calls.append((input.shape[0], torch.is_grad_enabled()))
        return self.inner(input, *args, **kwargs)


def write_fake_cifar10(root: Path, per_batch: int = 4) -> None:
    """torchvision's CIFAR-10 layout: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for name in names:
        entry = {'batch_label': name, 'labels': rng.integers(0, 10, per_batch).tolist(),
                 'data': rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 'filenames': [f'{name}_{i}.png' for i in range(per_batch)]}
        with open(folder / name, 'wb') as f:
            pickle.dump(entry, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                                     'ship', 'truck'], 'num_cases_per_batch': per_batch, 'num_vis': 3072}, f)


def kill_9_after_checkpoint(argv, env, run_dir, step: int, timeout: float = 300) -> int:
    """Starts a training CLI, SIGKILLs it once run_dir/latest.json reaches `step`; returns the step it holds."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = run_dir / 'latest.json', time.time() + timeout
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())['step'] >= step):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, 'the run finished before it could be killed'
    return json.loads(latest.read_text())['step']
