"""Stable Diffusion told w: diffusers' time_cond_proj_dim guidance embedding, zero-initialised (issue: training-time
guidance methods), with the tiny offline components of kdiff_align.sd.tiny."""

import pytest
import torch

import kdiff_align
from kdiff_align.sd import tiny
from kdiff_align.sd.model import add_guidance_embedding, guidance_scale_embedding, make_denoiser


@pytest.fixture(scope='module')
def unet(tmp_path_factory):
    return tiny.build_pipeline(tmp_path_factory.mktemp('sd'), seed=0).unet.eval()


def test_zero_initialised_embedding_leaves_the_unet_unchanged_and_loads_in_diffusers(unet, tmp_path):
    from diffusers import UNet2DConditionModel

    told = add_guidance_embedding(unet, dim=32)
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=cond).sample
        out = told(x, t, encoder_hidden_states=cond,
                   timestep_cond=guidance_scale_embedding(torch.tensor([0., 3.]), 32)).sample
    assert torch.equal(out, base)
    told.save_pretrained(str(tmp_path / 'unet'))
    loaded = UNet2DConditionModel.from_pretrained(str(tmp_path / 'unet'))
    assert loaded.config.time_cond_proj_dim == 32
    with pytest.raises(ValueError, match='already has a guidance embedding'):
        add_guidance_embedding(told)


def test_gft_trains_a_ddpm_unet_told_w(unet):
    torch.manual_seed(0)
    told = add_guidance_embedding(unet, dim=32)
    denoiser = make_denoiser(told, (1 - torch.linspace(1e-4, 0.02, 1000)).cumprod(0), 'epsilon')  # DDPM's schedule
    null = {'cond': torch.zeros(1, 77, 32)}
    gft = kdiff_align.GFTDenoiser(denoiser, uncond=null, uncond_prob=0.25)
    x, noise = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    sigma = denoiser.sigmas[torch.tensor([5, 200, 600, 900])]
    loss = gft.loss(x, noise, sigma, cond=torch.randn(4, 77, 32))
    loss.mean().backward()
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert told.time_embedding.cond_proj.weight.grad.abs().sum() > 0   # w reaches the network and is trained
    one_pass = kdiff_align.OnePassDenoiser(denoiser, w=2.)
    with torch.no_grad():
        assert one_pass(x, sigma, cond=torch.randn(4, 77, 32)).shape == x.shape
    with pytest.raises(ValueError, match='pass both or neither'):
        denoiser(x, sigma, cond=torch.randn(4, 77, 32))
