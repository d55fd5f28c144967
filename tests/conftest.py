import os

from kdiff_align.env import cli_defaults

cli_defaults()  # as every entry point does; subprocesses inherit K_DIFFUSION_USE_COMPILE
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'disabled')

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import NUM_CLASSES, randomize_, tiny_config  # noqa: E402


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
