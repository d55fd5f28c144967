"""The A1111/Forge extension, driven through A1111's script and CFG-callback contract, against the core.

A1111 is not installable from a registry, so modules.scripts, modules.script_callbacks, gradio and the
CFGDenoiser are stand-ins written to A1111's source (AUTOMATIC1111/stable-diffusion-webui:
modules/script_callbacks.py at 0411eced (CFGDenoiserParams, CFGDenoisedParams, AfterCFGCallbackParams and the
on_cfg_* registries), modules/sd_samplers_cfg_denoiser.py at 029adbe5 (CFGDenoiser.forward: x_in = [x, x],
the callbacks' order, the s_min_uncond skip with its fake uncond rows, combine_denoised; the skip_early_cond skip
as at 72632242),
modules/processing.py's process_images (before_process, then p.override_settings applied to shared.opts and
restored afterwards), modules/scripts.py (Script, AlwaysVisible, before_process / process / postprocess,
infotext_fields) and script_loading.load_module). Forge's path
(UnetPatcher, sampling function, script loader, infotext paste) runs in the real Forge: tests_hosts/forge.
"""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from k_diffusion import sampling as K_sampling
from safetensors.torch import save_file

from kdiff_align.sd import tiny as sd_tiny
from helpers import tiny_config
from kdiff_align.config import load_config
from kdiff_align.core.guidance import GuidedDenoiser
from kdiff_align.storage.metadata import export_metadata

SCRIPT = Path(__file__).resolve().parents[1] / 'kdiff_align' / 'integrations' / 'a1111' / 'scripts' / \
    'kdiff_align_cfg.py'
EMB = 8


# --- stand-ins for A1111's contract -----------------------------------------------------------------------

class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = \
            x, sampling_step, total_sampling_steps, inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


def make_script_callbacks():
    m = types.ModuleType('modules.script_callbacks')
    m.callback_map = {'callbacks_cfg_denoiser': [], 'callbacks_cfg_denoised': [], 'callbacks_cfg_after_cfg': []}
    m.CFGDenoiserParams, m.CFGDenoisedParams, m.AfterCFGCallbackParams = \
        CFGDenoiserParams, CFGDenoisedParams, AfterCFGCallbackParams

    def register(key):
        def on(callback, *, name=None):
            m.callback_map[key].append(callback)
        return on

    def run(key):
        def call(params):
            for c in m.callback_map[key]:
                c(params)
        return call

    m.on_cfg_denoiser, m.cfg_denoiser_callback = register('callbacks_cfg_denoiser'), run('callbacks_cfg_denoiser')
    m.on_cfg_denoised, m.cfg_denoised_callback = register('callbacks_cfg_denoised'), run('callbacks_cfg_denoised')
    m.on_cfg_after_cfg, m.cfg_after_cfg_callback = \
        register('callbacks_cfg_after_cfg'), run('callbacks_cfg_after_cfg')
    return m


class CFGDenoiser(torch.nn.Module):
    """A1111's CFGDenoiser.forward for one prompt per image (no AND), batch_cond_uncond on."""

    def __init__(self, inner_model, callbacks, opts=None):
        super().__init__()
        self.inner_model, self.cb, self.step, self.total_steps = inner_model, callbacks, 0, 8
        self.opts = opts or types.SimpleNamespace(skip_early_cond=0.0)

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        batch_size = x.shape[0]
        conds_list = [[(i, 1.0)] for i in range(batch_size)]
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        image_cond_in = torch.cat([image_cond, image_cond])
        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, self.step, self.total_steps, cond, uncond, self)
        self.cb.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        skip_uncond = False
        if self.opts.skip_early_cond != 0 and self.step / self.total_steps <= self.opts.skip_early_cond:
            skip_uncond = True   # (72632242's form; 029adbe5 lacked the != 0 test and skipped step 0 always)
        elif self.step % 2 and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
        cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
        x_out = self.inner_model(x_in, sigma_in, cond={'c_crossattn': [cond_in], 'c_concat': [image_cond_in]})
        if skip_uncond:
            x_out = torch.cat([x_out, x_out[:batch_size]])
        self.cb.cfg_denoised_callback(CFGDenoisedParams(x_out, self.step, self.total_steps, self.inner_model))
        denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0 if skip_uncond else cond_scale)
        after = AfterCFGCallbackParams(denoised, self.step, self.total_steps)
        self.cb.cfg_after_cfg_callback(after)
        self.step += 1
        return after.x


class TinyUNet(torch.nn.Module):
    """A k-diffusion-wrapped model: (x, sigma, cond={'c_crossattn': [emb]}) -> denoised."""

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(EMB, 2, generator=torch.Generator().manual_seed(0))

    def forward(self, x, sigma, cond):
        emb = cond['c_crossattn'][0]
        c_in = (1 / (sigma ** 2 + 1) ** 0.5)[:, None, None, None]
        f = torch.tanh(x * c_in + (emb.mean(1) @ self.proj)[:, :, None, None])
        return x / (sigma ** 2 + 1)[:, None, None, None] + (sigma / (sigma ** 2 + 1) ** 0.5)[:, None, None, None] * f


class Component:
    def __init__(self, *args, value=None, label=None, **kwargs):
        self.value, self.label = value, label

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def a1111(monkeypatch):
    callbacks = make_script_callbacks()
    scripts = types.ModuleType('modules.scripts')
    scripts.AlwaysVisible = object()
    scripts.Script = type('Script', (), {'infotext_fields': None, 'paste_field_names': None})
    modules = types.ModuleType('modules')
    modules.scripts, modules.script_callbacks = scripts, callbacks
    gradio = types.ModuleType('gradio')
    for name in ('Accordion', 'Row', 'Checkbox', 'Radio', 'Number', 'Textbox'):
        setattr(gradio, name, type(name, (Component,), {}))
    gradio.update = lambda **kw: kw
    shared = types.ModuleType('modules.shared')   # A1111's options: skip_early_cond (default 0) among them
    shared.opts = types.SimpleNamespace(skip_early_cond=0.0, data_labels={'skip_early_cond': 0.0})
    modules.shared = shared
    for name, module in (('modules', modules), ('modules.scripts', scripts), ('modules.shared', shared),
                         ('modules.script_callbacks', callbacks), ('gradio', gradio)):
        monkeypatch.setitem(sys.modules, name, module)
    # modules/script_loading.load_module(path)
    spec = importlib.util.spec_from_file_location(SCRIPT.name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return types.SimpleNamespace(module=module, callbacks=callbacks, scripts=scripts, opts=shared.opts)


def make_p(cfg_scale=7.0, checkpoint=None):
    sd_model = types.SimpleNamespace(sd_checkpoint_info=types.SimpleNamespace(filename=checkpoint))
    return types.SimpleNamespace(cfg_scale=cfg_scale, extra_generation_params={}, sd_model=sd_model)


SIGMAS = K_sampling.get_sigmas_karras(8, 0.05, 10.0)
NOISE = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
GEN = torch.Generator().manual_seed(5)
COND, UNCOND = torch.randn(2, 4, EMB, generator=GEN), torch.randn(2, 4, EMB, generator=GEN)


def sample_a1111(a1111, p, s_min_uncond=0.0, unet=None):
    unet = unet or TinyUNet()
    denoiser = CFGDenoiser(unet, a1111.callbacks, a1111.opts)
    extra = {'cond': COND, 'uncond': UNCOND, 'cond_scale': p.cfg_scale, 's_min_uncond': s_min_uncond,
             'image_cond': torch.zeros(2, 1, 4, 4)}
    return K_sampling.sample_euler(denoiser, NOISE * SIGMAS[0], SIGMAS, extra_args=extra, disable=True)


def sample_core(w, interval):
    unet = TinyUNet()
    inner = torch.nn.Module()
    inner.forward = lambda x, sigma, emb: unet(x, sigma, {'c_crossattn': [emb]})
    guided = GuidedDenoiser(inner, w, uncond={'emb': UNCOND}, sigma_interval=interval)
    return K_sampling.sample_euler(guided, NOISE * SIGMAS[0], SIGMAS, extra_args={'emb': COND}, disable=True)


ARGS = dict(w=1.0, sigma_lo=0.0, sigma_hi=0.0, schedule='constant', w_end=0.0, metadata_path='')


def run(a1111, p, **kwargs):
    args = {**ARGS, **kwargs}
    script = a1111.module.Script()
    assert script.show(False) is a1111.scripts.AlwaysVisible
    components = script.ui(False)
    assert len(components) == 8
    script.process(p, True, args.pop('source'), *args.values())
    out = sample_a1111(a1111, p)
    script.postprocess(p, None)
    return out, script


def test_callbacks_are_registered_once_on_load(a1111):
    assert len(a1111.callbacks.callback_map['callbacks_cfg_denoiser']) == 1
    assert len(a1111.callbacks.callback_map['callbacks_cfg_denoised']) == 1


@pytest.mark.parametrize('w, interval', [(2.0, None), (1.5, [0.3, 2.0]), (0.0, None)])
def test_panel_w_and_interval_match_core(a1111, w, interval):
    lo, hi = interval or (0.0, 0.0)
    p = make_p(cfg_scale=7.0)
    out, _ = run(a1111, p, source='this panel', w=w, sigma_lo=lo, sigma_hi=hi)
    assert p.cfg_scale == 1 + w  # A1111's CFG scale is set to s = 1 + w, and saved as such
    torch.testing.assert_close(out, sample_core(w, interval), rtol=1e-5, atol=1e-5)
    assert p.extra_generation_params['Aligned CFG w'] == w
    assert ('Aligned CFG sigma interval' in p.extra_generation_params) == (interval is not None)


def test_cfg_scale_source_keeps_a1111_scale(a1111):
    p = make_p(cfg_scale=3.0)
    out, _ = run(a1111, p, source='CFG scale', w=99.0, sigma_lo=0.3, sigma_hi=2.0)
    assert p.cfg_scale == 3.0
    torch.testing.assert_close(out, sample_core(2.0, [0.3, 2.0]), rtol=1e-5, atol=1e-5)


def test_disabled_is_plain_a1111_cfg(a1111):
    p = make_p(cfg_scale=3.0)
    script = a1111.module.Script()
    script.process(p, False, 'this panel', *list(ARGS.values()))
    assert p.extra_generation_params == {} and p.cfg_scale == 3.0
    torch.testing.assert_close(sample_a1111(a1111, p), sample_core(2.0, None), rtol=1e-5, atol=1e-5)


def test_checkpoint_metadata_source(a1111, tmp_path):
    config = load_config(tiny_config(w_train=2.0, w_sample=1.25, sigma_interval=[0.2, 3.0]))
    path = tmp_path / 'aligned.safetensors'
    save_file({'x': torch.zeros(1)}, path, metadata=export_metadata(config))
    p = make_p(cfg_scale=7.0, checkpoint=str(path))
    out, _ = run(a1111, p, source='checkpoint metadata')
    assert p.cfg_scale == 2.25
    assert p.extra_generation_params['Aligned CFG sigma interval'] == '0.2-3.0'
    torch.testing.assert_close(out, sample_core(1.25, [0.2, 3.0]), rtol=1e-5, atol=1e-5)
    plain = tmp_path / 'plain.safetensors'
    save_file({'x': torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match='carries no kdiff_align metadata'):
        a1111.module.Script().process(make_p(checkpoint=str(plain)), True, 'checkpoint metadata',
                                      *list(ARGS.values()))


def test_infotext_round_trip(a1111):
    p = make_p()
    _, script = run(a1111, p, source='this panel', w=1.5, sigma_lo=0.3, sigma_hi=2.0, schedule='log-linear',
                    w_end=0.5)
    # A1111 writes "key: value" pairs and pastes them back through infotext_fields.
    pasted = {k: str(v) for k, v in p.extra_generation_params.items()}
    fields = {c.label: (fn(pasted) if callable(fn) else pasted[fn]) for c, fn in script.infotext_fields}
    assert fields['Enable'] is True
    assert float(fields["w (the paper's; used when w from = this panel)"]) == 1.5
    assert fields['sigma_lo'] == 0.3 and fields['sigma_hi (0: guide at every step)'] == 2.0
    assert fields['w schedule'] == 'log-linear' and fields['w at sigma_lo (log-linear schedule)'] == 0.5


def test_a1111_skip_uncond_steps_stay_conditional(a1111):
    """A1111's own s_min_uncond skip (fake uncond rows, scale 1) is kept: same as plain A1111 at s = 1 + w."""
    p = make_p()
    script = a1111.module.Script()
    script.process(p, True, 'this panel', *{**ARGS, 'w': 2.0}.values())
    ours = sample_a1111(a1111, p, s_min_uncond=100.0)
    script.postprocess(p, None)
    plain = sample_a1111(a1111, make_p(cfg_scale=3.0), s_min_uncond=100.0)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, sample_core(2.0, None), rtol=1e-5, atol=1e-5)  # the skip did change it


def test_and_prompts_fall_back_to_plain_cfg(a1111, capsys):
    p = make_p()
    script = a1111.module.Script()
    script.process(p, True, 'this panel', *{**ARGS, 'w': 2.0}.values())
    # AND prompts: two conds for image 0, one for image 1, then 2 uncond rows: 5 rows, not 2 x 2.
    a1111.callbacks.cfg_denoiser_callback(CFGDenoiserParams(torch.randn(5, 2, 4, 4), None, torch.ones(5), 0, 8,
                                                            torch.randn(3, 4, EMB), UNCOND))
    x_out = torch.randn(5, 2, 4, 4)
    before = x_out.clone()
    a1111.callbacks.cfg_denoised_callback(CFGDenoisedParams(x_out, 0, 8, None))
    assert torch.equal(x_out, before) and 'AND' in capsys.readouterr().err


class CFGDenoiserTimesteps:
    """A1111's denoiser for DDIM, PLMS and UniPC (sd_samplers_timesteps.py): alphas = sd_model.alphas_cumprod, and
    the integer timestep t where other samplers pass sigma."""

    def __init__(self, alphas):
        self.alphas = alphas


def test_timestep_samplers_map_t_to_sigma(a1111):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD1.5's schedule
    alphas = torch.cumprod(1 - betas, 0)
    t = 401
    sigma = ((1 - alphas[t]) / alphas[t]).sqrt().item()
    assert 0.5 < sigma < 3  # about 1.17: inside the interval below, while t itself is far outside
    p = make_p()
    script = a1111.module.Script()
    script.process(p, True, 'this panel', *{**ARGS, 'w': 2.0, 'sigma_lo': 0.5, 'sigma_hi': 3.0}.values())
    x_in = torch.randn(4, 2, 4, 4, generator=GEN)
    a1111.callbacks.cfg_denoiser_callback(CFGDenoiserParams(x_in, None, torch.full((4,), float(t)), 0, 8, COND, UNCOND,
                                                            CFGDenoiserTimesteps(alphas.float())))
    x_out = torch.randn(4, 2, 4, 4, generator=GEN)
    c, u = x_out[:2].clone(), x_out[2:].clone()
    a1111.callbacks.cfg_denoised_callback(CFGDenoisedParams(x_out, 0, 8, None))
    script.postprocess(p, None)
    combined = x_out[2:] + p.cfg_scale * (c - x_out[2:])  # A1111's combine_denoised
    torch.testing.assert_close(combined, c + 2.0 * (c - u), rtol=1e-5, atol=1e-5)


# --- one-pass exports (objectives gft, mg, distill) ----------------------------------------------------------

class CountingUNet(TinyUNet):
    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, x, sigma, cond):
        self.rows.append(x.shape[0])
        return super().forward(x, sigma, cond)


def process_images(a1111, p, args):
    """modules/processing.py process_images: scripts' before_process, p.override_settings applied to shared.opts
    (and restored afterwards), process, the sampling, postprocess. Returns the samples and the UNet's rows."""
    p.override_settings = getattr(p, 'override_settings', {})
    script, unet = a1111.module.Script(), CountingUNet()
    script.before_process(p, True, *args)
    stored = {k: getattr(a1111.opts, k) for k in p.override_settings}
    try:
        for k, v in p.override_settings.items():
            setattr(a1111.opts, k, v)
        script.process(p, True, *args)
        out = sample_a1111(a1111, p, unet=unet)
        script.postprocess(p, None)
    finally:
        for k, v in stored.items():
            setattr(a1111.opts, k, v)
    return out, unet.rows


def sd_export(tmp_path, objective, **align):
    return sd_tiny.objective_export(tmp_path / f'{objective}_lora.safetensors', objective, **align)


def test_mg_export_is_one_conditional_pass_per_step_in_a1111(a1111, tmp_path):
    path = sd_export(tmp_path, 'mg')
    p = make_p(cfg_scale=7.0)
    args = ['metadata file', 1.0, 0.0, 0.0, 'constant', 0.0, str(path)]
    out, rows = process_images(a1111, p, args)
    assert p.cfg_scale == 1.0 and p.extra_generation_params['Aligned CFG w'] == 0.0
    assert rows == [NOISE.shape[0]] * (len(SIGMAS) - 1)   # A1111's skip: no unconditional rows at any step
    torch.testing.assert_close(out, sample_core(0.0, None), rtol=1e-5, atol=1e-5)   # the plain conditional model
    assert a1111.opts.skip_early_cond == 0.0   # restored after the generation


def test_mg_export_in_an_a1111_without_the_skip_option_still_samples_the_conditional(a1111, tmp_path, capsys):
    a1111.opts.data_labels = {}   # an A1111 before skip_early_cond
    out, rows = process_images(a1111, make_p(cfg_scale=7.0), ['metadata file', 1.0, 0.0, 0.0, 'constant', 0.0,
                                                               str(sd_export(tmp_path, 'mg'))])
    assert rows == [2 * NOISE.shape[0]] * (len(SIGMAS) - 1) and 'cannot skip the unconditional pass' in \
        capsys.readouterr().err
    torch.testing.assert_close(out, sample_core(0.0, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('objective', ['gft', 'distill'])
def test_w_conditioned_export_is_refused_in_one_line(a1111, tmp_path, objective):
    from kdiff_align.integrations.exports import HostCannotPassW
    path = sd_export(tmp_path, objective)
    with pytest.raises(HostCannotPassW) as err:
        process_images(a1111, make_p(cfg_scale=7.0), ['metadata file', 1.0, 0.0, 0.0, 'constant', 0.0, str(path)])
    message = str(err.value)
    assert '\n' not in message and 'which A1111 cannot pass' in message
    assert f"'{path.name}' is a {objective} model told w through its UNet's guidance embedding" in message
    assert 'diffusers' in message and 'guidance_scale 3' in message
