import os

from kdiff_align.env import cli_defaults

cli_defaults()  # as every entry point does; subprocesses inherit K_DIFFUSION_USE_COMPILE
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'disabled')

import pytest  # noqa: E402
import torch  # noqa: E402

NUM_CLASSES = 10


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


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gives every parameter random values so that outputs depend on every input (upstream zero-inits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Nothing downloads during tests: clean-fid's Inception fetch fails as it does offline."""
    from cleanfid import downloads_helper

    def refuse(*args, **kwargs):
        raise OSError('the tests never download')

    monkeypatch.setattr(downloads_helper, 'check_download_inception', refuse)


@pytest.fixture
def image_model():
    from kdiff_align.config import load_config, make_model
    torch.manual_seed(0)
    return randomize_(make_model(load_config(tiny_config()))).eval()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    noise = torch.randn(6, 1, 8, 8, generator=gen)
    sigma = torch.exp(torch.randn(6, generator=gen))
    labels = torch.randint(0, NUM_CLASSES, (6,), generator=gen)
    return x, noise, sigma, labels


class CallCounter(torch.nn.Module):
    """Wraps a module and records the batch size and grad mode of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, input, *args, **kwargs):
        self.calls.append((input.shape[0], torch.is_grad_enabled()))
        return self.inner(input, *args, **kwargs)


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread: tiny convolutions on 2 shared cores run ~10x faster without threading."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """Tiny random Stable Diffusion components in diffusers' layout, and a captioned image folder."""
    from kdiff_align.sd import tiny as sd_tiny

    root = tmp_path_factory.mktemp('sd')
    return {'root': root, 'pipe': sd_tiny.save_pipeline(root / 'pipe'),
            'data': sd_tiny.make_captioned_folder(root / 'data')}


def kill_9_after_checkpoint(argv, env, run_dir, step: int, timeout: float = 300) -> int:
    """Starts a training CLI, SIGKILLs it once run_dir/latest.json reaches `step`; returns the step it holds."""
    import json
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
