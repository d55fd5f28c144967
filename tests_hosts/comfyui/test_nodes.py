"""The nodes inside the real ComfyUI: its node loader, KSampler, SamplerCustomAdvanced, CFGGuider and patch nodes."""

import asyncio
import logging
import shutil
import sys

import pytest
import torch

import comfy.samplers
import nodes
from comfy_extras import nodes_apg, nodes_custom_sampler, nodes_model_advanced, nodes_tcfg
from hosts import PACKAGE

LATENT = {'samples': torch.zeros(1, 4, 8, 8)}
STEPS = 3


def load_node_folder(path):
    """ComfyUI's own loader on one custom-node folder; the NODE_CLASS_MAPPINGS it registered."""
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(path)))
    added = {k: nodes.NODE_CLASS_MAPPINGS.pop(k) for k in set(nodes.NODE_CLASS_MAPPINGS) - before}
    return ok, added


@pytest.mark.parametrize('install', ['linked', 'copied'])
@pytest.mark.parametrize('name', ['kdiff_align_comfyui', 'kdiff_align'])
def test_node_loader_registers_the_nodes(tmp_path, install, name):
    folder = tmp_path / 'custom_nodes' / name
    folder.parent.mkdir()
    if install == 'linked':
        folder.symlink_to(PACKAGE / 'comfyui', target_is_directory=True)
    else:
        shutil.copytree(PACKAGE / 'comfyui', folder)
    ok, added = load_node_folder(folder)
    assert ok
    assert {'KDiffAlignGuider', 'KDiffAlignCFGPatch', 'KDiffAlignMetadata'} <= set(added)
    # The folder name does not hide the real package: ComfyUI registers the module under its full path.
    assert sys.modules['kdiff_align'].__file__.endswith('kdiff_align/__init__.py')


def test_copied_folder_without_kdiff_align_says_how_to_install(tmp_path, monkeypatch, caplog):
    folder = tmp_path / 'custom_nodes' / 'kdiff_align_comfyui'
    shutil.copytree(PACKAGE / 'comfyui', folder)
    for mod in [m for m in sys.modules if m == 'kdiff_align' or m.startswith('kdiff_align.')]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, 'kdiff_align', None)  # as if kdiff-align were not installed
    with caplog.at_level(logging.WARNING):
        ok, added = load_node_folder(folder)
    assert not ok and not added
    assert f'{sys.executable} -m pip install' in caplog.text


def ksampler(model, cfg, positive, negative):
    return nodes.KSampler().sample(model, 0, STEPS, cfg, 'euler', 'karras', positive, negative, LATENT)[0]['samples']


def custom_advanced(guider, model):
    sigmas = nodes_custom_sampler.BasicScheduler().get_sigmas(model, 'karras', STEPS, 1.0)[0]
    sampler = nodes_custom_sampler.KSamplerSelect().get_sampler('euler')[0]
    noise = nodes_custom_sampler.RandomNoise().get_noise(0)[0]
    return nodes_custom_sampler.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, LATENT)[0]['samples']


def aligned_guider(model, positive, negative, w, sigma_lo=0.0, sigma_hi=0.0):
    from kdiff_align.integrations.comfyui.nodes import KDiffAlignGuider
    return KDiffAlignGuider().get_guider(model, positive, negative, 'node', w, sigma_lo, sigma_hi, 'constant', 0.0,
                                         '(none)')[0]


def cfg_guider(model, positive, negative, cfg):
    return nodes_custom_sampler.CFGGuider().get_guider(model, positive, negative, cfg)[0]


def test_ksampler_patch_matches_ksampler_cfg(tiny_sd15, conds):
    from kdiff_align.integrations.comfyui.nodes import KDiffAlignCFGPatch
    patched = KDiffAlignCFGPatch().patch(tiny_sd15, 'node', 1.5, 0.0, 0.0, 'constant', 0.0, '(none)')[0]
    plain = ksampler(tiny_sd15, 2.5, *conds)
    torch.testing.assert_close(ksampler(patched, 1.0, *conds), plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ksampler(patched, 1.0, *conds), ksampler(tiny_sd15, 1.0, *conds))


def test_guider_matches_cfg_guider(tiny_sd15, conds):
    ours = custom_advanced(aligned_guider(tiny_sd15, *conds, 1.5), tiny_sd15)
    torch.testing.assert_close(ours, custom_advanced(cfg_guider(tiny_sd15, *conds, 2.5), tiny_sd15),
                               rtol=1e-4, atol=1e-4)


def rescale_cfg(model):
    return nodes_model_advanced.RescaleCFG().patch(model, 0.7)[0]


def apg(model):
    return nodes_apg.APG.execute(model, eta=0.0, norm_threshold=5.0, momentum=-0.5).args[0]


def tcfg(model):
    return nodes_tcfg.TCFG.execute(model).args[0]


@pytest.mark.parametrize('patch', [rescale_cfg, apg, tcfg], ids=['RescaleCFG', 'APG', 'TCFG'])
def test_guider_honours_patches_stacked_on_the_model(tiny_sd15, conds, patch):
    patched = patch(tiny_sd15)
    with_patch = custom_advanced(aligned_guider(patched, *conds, 1.5), patched)
    assert not torch.allclose(with_patch, custom_advanced(aligned_guider(tiny_sd15, *conds, 1.5), tiny_sd15))
    torch.testing.assert_close(with_patch, custom_advanced(cfg_guider(patched, *conds, 2.5), patched),
                               rtol=1e-4, atol=1e-4)


def test_guider_interval_skips_the_unconditional_pass_outside(tiny_sd15, conds):
    sigmas = nodes_custom_sampler.BasicScheduler().get_sigmas(tiny_sd15, 'karras', STEPS, 1.0)[0]
    lo, hi = float(sigmas[1]) * 0.9, float(sigmas[0]) * 1.1  # the first two steps are inside
    batches = []
    model = tiny_sd15.clone()
    model.set_model_unet_function_wrapper(lambda f, a: batches.append(a['input'].shape[0]) or f(a['input'],
                                                                                              a['timestep'], **a['c']))
    custom_advanced(aligned_guider(model, *conds, 1.5, lo, hi), model)
    assert batches == [2, 2, 1]


def export(path, sigma_interval, sigma_convention='k-diffusion'):
    """An aligned export as format_version 1 wrote it (before one-pass objectives): still read as two-pass."""
    import json

    from safetensors.torch import save_file
    meta = {'format_version': 1, 'objective': 'aligned-cfg', 'w_train': 2.0, 'w_sample': 1.5, 'cfg_scale': 2.5,
            'sigma_interval': sigma_interval, 'sigma_convention': sigma_convention}
    strings = {f'kdiff_align.{k}': json.dumps(v) for k, v in meta.items()}
    save_file({'x': torch.zeros(1)}, str(path), metadata={**strings, 'kdiff_align.convention': 'w is the paper\'s'})


def export_objective(path, objective):
    from kdiff_align.sd.tiny import objective_export

    return str(objective_export(path, objective))


def test_one_sigma_convention_per_model_family(tiny_sd15, conds, tmp_path):
    import folder_paths

    from kdiff_align.integrations.comfyui.nodes import KDiffAlignGuider, sigma_convention
    flow = nodes_model_advanced.ModelSamplingSD3().patch(tiny_sd15, 3.0)[0]  # ComfyUI's sigma = t in [0, 1]
    assert sigma_convention(tiny_sd15) == 'k-diffusion' and sigma_convention(flow) == 'flow'
    export(tmp_path / 'kdiff.safetensors', [0.3, 5.0])
    export(tmp_path / 'flow.safetensors', [0.2, 0.6], 'flow')
    folder_paths.add_model_folder_path('loras', str(tmp_path))
    node = KDiffAlignGuider()
    with pytest.raises(ValueError, match="this model samples in 'flow' noise levels, but this guidance's sigma "
                                         "interval is in 'k-diffusion' ones"):
        node.get_guider(flow, *conds, 'metadata', 1.0, 0.0, 0.0, 'constant', 0.0, 'loras/kdiff.safetensors')
    guider = node.get_guider(flow, *conds, 'metadata', 1.0, 0.0, 0.0, 'constant', 0.0, 'loras/flow.safetensors')[0]
    assert guider.guidance.sigma_interval == (0.2, 0.6) or list(guider.guidance.sigma_interval) == [0.2, 0.6]
    with pytest.raises(ValueError, match="'k-diffusion' noise levels, but this guidance's sigma interval is in 'flow'"):
        node.get_guider(tiny_sd15, *conds, 'metadata', 1.0, 0.0, 0.0, 'constant', 0.0, 'loras/flow.safetensors')
    # Widget intervals are in the model's own convention.
    assert node.get_guider(flow, *conds, 'node', 1.0, 0.2, 0.6, 'constant', 0.0, '(none)')[0] \
        .guidance.sigma_convention == 'flow'


def test_guider_refuses_a_model_through_the_ksampler_patch(tiny_sd15, conds):
    from kdiff_align.integrations.comfyui.nodes import KDiffAlignCFGPatch
    patched = KDiffAlignCFGPatch().patch(tiny_sd15, 'node', 1.5, 0.0, 0.0, 'constant', 0.0, '(none)')[0]
    with pytest.raises(ValueError, match=r'already went through Aligned CFG for KSampler \(KDiffAlignCFGPatch\)'):
        aligned_guider(patched, *conds, 1.5)


def counting(model):
    """A clone of model whose UNet calls append their batch size to the returned list."""
    batches = []
    model = model.clone()
    model.set_model_unet_function_wrapper(lambda f, a: batches.append(a['input'].shape[0]) or f(a['input'],
                                                                                              a['timestep'], **a['c']))
    return model, batches


@pytest.fixture
def lora_folder(tmp_path):
    import folder_paths
    folder_paths.add_model_folder_path('loras', str(tmp_path))
    return tmp_path


def test_mg_export_samples_at_cfg_1_without_the_unconditional_pass(tiny_sd15, conds, lora_folder):
    from kdiff_align.integrations.comfyui.nodes import KDiffAlignCFGPatch, KDiffAlignGuider, KDiffAlignMetadata
    export_objective(lora_folder / 'mg.safetensors', 'mg')
    file = 'loras/mg.safetensors'
    assert KDiffAlignMetadata().read(file)[:2] == (0.0, 1.0)
    # ComfyUI's own sampling at cfg 1 (sampling_function's cfg-1 shortcut) is what one-pass means.
    model, batches = counting(tiny_sd15)
    ref = ksampler(model, 1.0, *conds)
    assert batches == [1] * STEPS
    torch.testing.assert_close(custom_advanced(cfg_guider(tiny_sd15, *conds, 1.0), tiny_sd15), ref,
                               rtol=1e-5, atol=1e-5)

    model, batches = counting(tiny_sd15)
    guider = KDiffAlignGuider().get_guider(model, *conds, 'metadata', 3.0, 0.0, 0.0, 'constant', 0.0, file)[0]
    torch.testing.assert_close(custom_advanced(guider, model), ref, rtol=1e-5, atol=1e-5)
    assert batches == [1] * STEPS

    model, batches = counting(tiny_sd15)
    patched = KDiffAlignCFGPatch().patch(model, 'metadata', 3.0, 0.0, 0.0, 'constant', 0.0, file)[0]
    torch.testing.assert_close(ksampler(patched, 7.0, *conds), ref, rtol=1e-5, atol=1e-5)   # cfg 7 overridden
    assert batches == [1] * STEPS


@pytest.mark.parametrize('objective', ['gft', 'distill'])
def test_w_conditioned_export_is_refused_naming_the_file(tiny_sd15, conds, lora_folder, objective):
    from kdiff_align.integrations.comfyui.nodes import KDiffAlignCFGPatch, KDiffAlignGuider, KDiffAlignMetadata
    from kdiff_align.integrations.exports import HostCannotPassW
    export_objective(lora_folder / f'{objective}.safetensors', objective)
    file = f'loras/{objective}.safetensors'
    for call in (lambda: KDiffAlignCFGPatch().patch(tiny_sd15, 'metadata', 1.0, 0.0, 0.0, 'constant', 0.0, file),
                 lambda: KDiffAlignGuider().get_guider(tiny_sd15, *conds, 'metadata', 1.0, 0.0, 0.0, 'constant', 0.0,
                                                       file),
                 lambda: KDiffAlignMetadata().read(file)):
        with pytest.raises(HostCannotPassW, match=rf"'{file}' is a {objective} model told w through its UNet's "
                                                  r"guidance embedding .*, which ComfyUI cannot pass"):
            call()
