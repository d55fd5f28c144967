"""The extension inside the real Forge: script loader, CFG callbacks, infotext paste, UnetPatcher, sampling function."""

import math
import shutil
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from backend.patcher.unet import UnetPatcher
from backend.sampling.condition import compile_conditions
from backend.sampling.sampling_function import sampling_function_inner
from hosts import PACKAGE
from modules import infotext_utils, script_callbacks, script_loading

SCRIPT = 'scripts/kdiff_align_cfg.py'


@pytest.fixture(params=['linked', 'copied'])
def extension(request, tmp_path):
    """The extension folder installed as the docs say, loaded by Forge's script_loading.load_module."""
    folder = tmp_path / 'extensions' / 'kdiff-align'
    folder.parent.mkdir()
    if request.param == 'linked':
        folder.symlink_to(PACKAGE / 'a1111', target_is_directory=True)
    else:
        shutil.copytree(PACKAGE / 'a1111', folder)
    return script_loading.load_module(str(folder / SCRIPT))


def test_loader_registers_script_and_cfg_callbacks(extension):
    assert extension.Script().title() == 'kdiff-align CFG'
    for kind in ('callbacks_cfg_denoiser', 'callbacks_cfg_denoised'):
        assert any(c.script.endswith('kdiff_align_cfg.py') for c in script_callbacks.callback_map[kind])


class TinyUNet(torch.nn.Module):
    """The network behind Forge's UnetPatcher (a KModel there); its contract here is apply_model."""

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        return x / (1 + t[:, None, None, None] ** 2) + c_crossattn.mean(dim=(1, 2))[:, None, None, None]

    def memory_required(self, input_shape):
        return 0


def forge_step(extension, cond_scale, uncond_present=True, w=1.5, interval=(0.0, 0.0)):
    """One Forge sampling step, patched by the script as Forge calls it: denoised, cond, uncond predictions."""
    cpu = torch.device('cpu')
    p = SimpleNamespace(cfg_scale=7.0, extra_generation_params={},
                        sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(TinyUNet(), cpu, cpu))))
    script = extension.Script()
    script.process(p, True, 'this panel', w, *interval, 'constant', 0.0, '')
    script.process_before_every_sampling(p, True, 'this panel', w, *interval, 'constant', 0.0, '')
    unet = p.sd_model.forge_objects.unet
    gen = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 8, 8, generator=gen), torch.full((2,), 2.0)
    cond = compile_conditions(torch.randn(2, 77, 768, generator=gen))
    uncond = compile_conditions(torch.randn(2, 77, 768, generator=gen)) if uncond_present else None
    out = sampling_function_inner(unet.model, x, sigma, uncond, cond, cond_scale, unet.model_options, return_full=True)
    script.postprocess(p, None)
    return out, p


def test_forge_patch_is_cfg_at_one_plus_w(extension):
    (denoised, c, u), p = forge_step(extension, cond_scale=2.5)
    assert p.cfg_scale == 2.5 and p.extra_generation_params['Aligned CFG w'] == 1.5
    torch.testing.assert_close(denoised, u + 2.5 * (c - u))


def test_hires_pass_without_unconditional_passes_through(extension):
    # Hires CFG Scale = 1: Forge sets the hires pass's unconditional to None (processing.py).
    (denoised, c, u), _ = forge_step(extension, cond_scale=1.0, uncond_present=False)
    torch.testing.assert_close(denoised, c, rtol=0, atol=1e-6)  # x - (x - c)
    (denoised, c, u), _ = forge_step(extension, cond_scale=7.0, uncond_present=False)
    torch.testing.assert_close(denoised, c, rtol=0, atol=1e-6)  # x - (x - c)


def test_forge_skips_asking_cfg_one_pass_through(extension):
    # Skip early CFG and NGMS set cond_scale = 1.0 for the step (sd_samplers_cfg_denoiser.py).
    (denoised, c, u), _ = forge_step(extension, cond_scale=1.0)
    torch.testing.assert_close(denoised, c, rtol=0, atol=1e-6)  # x - (x - c)


def test_interval_outside_is_conditional(extension):
    (denoised, c, u), _ = forge_step(extension, cond_scale=2.5, interval=(0.5, 1.5))  # sigma 2 is outside
    torch.testing.assert_close(denoised, c, rtol=0, atol=1e-6)  # x - (x - c)


@pytest.mark.parametrize('interval', [(1e-05, 5.0), (0.123456789, 14.6), (0.5, 3.0)])
def test_infotext_round_trips_any_float(extension, interval):
    p = SimpleNamespace(cfg_scale=7.0, extra_generation_params={}, sd_model=SimpleNamespace())
    script = extension.Script()
    script.process(p, True, 'this panel', 1.5, *interval, 'constant', 0.0, '')
    text = 'a cat\nSteps: 20, Sampler: Euler, CFG scale: 2.5, ' + ', '.join(
        f'{k}: {v}' for k, v in p.extra_generation_params.items())
    params = infotext_utils.parse_generation_parameters(text)
    with gr.Blocks():
        script.ui(False)
    pasted = {}
    for component, field in script.infotext_fields:
        pasted[component.label] = field(params) if callable(field) else params.get(field)
    assert pasted['sigma_lo'] == interval[0] and pasted['sigma_hi (0: guide at every step)'] == interval[1]
    assert float(pasted["w (the paper's; used when w from = this panel)"]) == 1.5
    script.postprocess(p, None)
