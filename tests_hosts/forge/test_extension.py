"""The extension inside the real Forge: script loader, CFG callbacks, infotext paste, UnetPatcher, sampling function."""

import re
import shutil
import sys
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


def test_copied_extension_without_kdiff_align_says_how_to_install(tmp_path, monkeypatch):
    folder = tmp_path / 'extensions' / 'kdiff-align'
    shutil.copytree(PACKAGE / 'a1111', folder)
    monkeypatch.setitem(sys.modules, 'kdiff_align', None)  # as if kdiff-align were not installed
    with pytest.raises(ImportError, match=rf'install it with: {re.escape(sys.executable)} -m pip install'):
        script_loading.load_module(str(folder / SCRIPT))


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


class KDiffusionCFGDenoiser:
    """Forge's CFGDenoiser (sd_samplers_cfg_denoiser.py) with its inner model: forward() decides cond_scale
    (hires CFG, skip early CFG, NGMS) and calls the sampling function on p.sd_model.forge_objects.unet."""

    def __new__(cls, p):
        from modules import sd_samplers_cfg_denoiser

        class Denoiser(sd_samplers_cfg_denoiser.CFGDenoiser):
            @property
            def inner_model(self):
                return self.model_wrap

        den = Denoiser(SimpleNamespace(sampler_extra_args={}, last_latent=None))
        den.model_wrap = SimpleNamespace(inner_model=p.sd_model)
        den.p, den.total_steps = p, 10
        return den


class CountingUNet(TinyUNet):
    def __init__(self):
        super().__init__()
        self.batches = []

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        self.batches.append(x.shape[0])
        return super().apply_model(x, t, c_crossattn=c_crossattn, **kwargs)


def forge_forward(extension, monkeypatch, *, step=0, uncond=True, is_hr_pass=False, hr_cfg=7.0, skip_early_cond=0.0,
                  s_min_uncond=0.0, w=1.5, source='this panel', metadata_path='', unet=None, p=None):
    """One call of Forge's real CFGDenoiser.forward on the script-patched UNet: (denoised, cond pred, uncond pred).
    p: a p the script has already processed (the hires pass of the same generation)."""
    from modules import prompt_parser, shared

    cpu = torch.device('cpu')
    unet = unet or TinyUNet()
    if p is None:
        p = SimpleNamespace(cfg_scale=7.0, extra_generation_params={}, is_hr_pass=is_hr_pass, hr_cfg=hr_cfg,
                            seeds=[0], scripts=None, refiner_switch_at=None, refiner_checkpoint_info=None,
                            override_settings={}, sd_model=SimpleNamespace(
                                forge_objects=SimpleNamespace(unet=UnetPatcher(unet, cpu, cpu))))
        script = extension.Script()
        args = (True, source, w, 0.0, 0.0, 'constant', 0.0, metadata_path)
        script.before_process(p, *args)
        script.process(p, *args)
        script.process_before_every_sampling(p, *args)
    else:
        p.is_hr_pass, script = is_hr_pass, extension.Script()
    monkeypatch.setitem(shared.opts.data, 'skip_early_cond', skip_early_cond)
    den = KDiffusionCFGDenoiser(p)
    den.step = step
    gen = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 8, 8, generator=gen), torch.full((2,), 2.0)
    c, u = torch.randn(2, 77, 768, generator=gen), torch.randn(2, 77, 768, generator=gen)
    cond = prompt_parser.MulticondLearnedConditioning(shape=(2,), batch=[
        [prompt_parser.ComposableScheduledPromptConditioning([prompt_parser.ScheduledPromptConditioning(10, ci)])]
        for ci in c])
    unconds = [[prompt_parser.ScheduledPromptConditioning(10, ui)] for ui in u] if uncond else None
    with torch.no_grad():
        out = den(x, sigma, unconds, cond, p.cfg_scale, s_min_uncond, None)
        # the predictions themselves, not counted as UNet calls of the step
        pred_c, pred_u = (TinyUNet.apply_model(unet, x, sigma, c_crossattn=e) for e in (c, u))
    script.postprocess(p, None)
    return out, pred_c, pred_u, p


def test_forge_denoiser_guides_with_w(extension, monkeypatch):
    out, c, u, _ = forge_forward(extension, monkeypatch)
    torch.testing.assert_close(out, c + 1.5 * (c - u))


@pytest.mark.parametrize('case', ['hires CFG 1', 'skip early CFG', 'NGMS'])
def test_forge_denoiser_unguided_where_forge_asks(extension, monkeypatch, case):
    kwargs = {'hires CFG 1': dict(is_hr_pass=True, hr_cfg=1.0, uncond=False),
              'skip early CFG': dict(skip_early_cond=0.5),
              'NGMS': dict(step=1, s_min_uncond=100.0)}[case]
    out, c, u, _ = forge_forward(extension, monkeypatch, **kwargs)
    torch.testing.assert_close(out, c, rtol=0, atol=1e-6)


def sd_export(path, objective):
    from kdiff_align.sd.tiny import objective_export

    return str(objective_export(path, objective))


def test_mg_export_is_one_conditional_pass_in_forge(extension, monkeypatch, tmp_path):
    path, unet = sd_export(tmp_path / 'mg.safetensors', 'mg'), CountingUNet()
    out, c, u, p = forge_forward(extension, monkeypatch, source='metadata file', metadata_path=path, unet=unet)
    assert p.cfg_scale == 1.0 and p.hr_cfg == 1.0 and p.override_settings == {}
    assert not p.sd_model.forge_objects.unet.model_options.get('sampler_cfg_function')   # not patched
    # Forge's own CFGDenoiser at CFG scale 1: one UNet call on the conditional rows, even with an uncond given.
    assert unet.batches == [2] and not torch.allclose(c, u)
    torch.testing.assert_close(out, c, rtol=0, atol=1e-6)
    unet.batches.clear()
    out, c, _, _ = forge_forward(extension, monkeypatch, is_hr_pass=True, uncond=False, unet=unet, p=p)
    assert unet.batches == [2]   # the hires pass (Hires CFG Scale set to 1: Forge gives no uncond)
    torch.testing.assert_close(out, c, rtol=0, atol=1e-6)


@pytest.mark.parametrize('objective', ['gft', 'distill'])
def test_w_conditioned_export_is_refused_in_forge(extension, monkeypatch, tmp_path, objective):
    from kdiff_align.integrations.exports import HostCannotPassW
    path = sd_export(tmp_path / f'{objective}.safetensors', objective)
    with pytest.raises(HostCannotPassW, match=rf"'{objective}.safetensors' is a {objective} model told w through its "
                                              r"UNet's guidance embedding .*, which Forge cannot pass"):
        forge_forward(extension, monkeypatch, source='metadata file', metadata_path=path)
