"""ComfyUI (../shared/hosts, extracted by `make test-hosts`) imported in-process on the CPU, and a tiny SD1.5 UNet."""

import sys

import pytest
import torch

from hosts import host_source

COMFYUI = host_source('comfyui', 'ComfyUI')
sys.path.insert(0, str(COMFYUI))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # what `main.py --cpu` sets, before model_management reads it

import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402

# SD1.5's UNet, cut to one level with one res block; context_dim 768 as SD1.5's text encoder gives.
UNET_CONFIG = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
               'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 64,
               'num_res_blocks': [1], 'transformer_depth': [1], 'channel_mult': [1], 'transformer_depth_middle': 1,
               'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 4,
               'transformer_depth_output': [1, 1], 'use_temporal_attention': False, 'use_temporal_resblock': False}


@pytest.fixture(scope='session')
def tiny_sd15():
    """A ModelPatcher around an SD15-shaped BaseModel with random weights (ComfyUI zero-inits the output)."""
    model = comfy.supported_models.SD15(dict(UNET_CONFIG)).get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    cpu = torch.device('cpu')
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope='session')
def conds():
    """Positive and negative CONDITIONING as a text encoder would give them: [[tokens [1, 77, 768], {}]]."""
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(1, 77, 768, generator=gen), {}]], [[torch.randn(1, 77, 768, generator=gen), {}]]
