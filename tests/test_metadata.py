"""Export metadata: built from a config, written as safetensors strings, parsed back exactly."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdiff_align.sd import tiny as sd_tiny
from helpers import tiny_config
from kdiff_align import config as kconfig
from kdiff_align.config import load_config, make_guided_denoiser
from kdiff_align.core.guidance import w_to_cfg_scale
from kdiff_align.core.guidance import GuidedDenoiser, OnePassDenoiser
from kdiff_align.storage.metadata import (FORMAT_VERSION, MetadataError, export_metadata, guidance_metadata,
                                          parse_metadata, read_header, read_metadata)
from kdiff_align.config import sd as sd_config


def test_aligned_config_round_trips_through_a_safetensors_file(tmp_path):
    config = load_config(tiny_config(w_train=2.0, w_sample=1.5, sigma_interval=[0.3, 5.0]))
    strings = export_metadata(config)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in strings.items())
    assert all(k.startswith('kdiff_align.') for k in strings)
    path = tmp_path / 'lora.safetensors'
    save_file({'w': torch.zeros(2)}, path, metadata={**strings, 'other': 'kept'})
    meta = read_metadata(path)
    assert meta == guidance_metadata(config)
    assert meta['objective'] == 'aligned'
    assert meta['w_train'] == 2.0 and meta['w_sample'] == 1.5
    assert meta['cfg_scale'] == w_to_cfg_scale(1.5) == 2.5
    assert meta['sigma_interval'] == [0.3, 5.0]
    assert 's = 1 + w' in meta['convention']
    assert read_header(path)['other'] == 'kept'
    assert torch.equal(load_file(path)['w'], torch.zeros(2))  # the tensors are untouched


def test_defaults_standard_objective_and_distributions():
    meta = guidance_metadata(load_config(tiny_config()))
    assert meta['objective'] == 'aligned' and meta['w_sample'] == meta['w_train'] == 2.0
    assert meta['sigma_interval'] is None and meta['w_range'] == [2.0, 2.0]
    for standard in (tiny_config(mix=0.0), tiny_config(w_train=0.0)):   # standard CFG: aligned, trained for w = 0
        meta = guidance_metadata(load_config(standard))
        assert meta['objective'] == 'aligned' and meta['w_range'] == [0.0, 0.0] and meta['passes'] == 2
    dist = {'type': 'uniform', 'min_value': 1.0, 'max_value': 3.0}
    meta = parse_metadata(export_metadata(load_config(tiny_config(w_train=dist))))
    assert meta['w_train'] == dist and meta['w_sample'] == 2.0  # the distribution's mean
    assert guidance_metadata(load_config(tiny_config()), w_sample=4.0)['cfg_scale'] == 5.0


def test_files_without_our_metadata_read_as_none(tmp_path):
    path = tmp_path / 'plain.safetensors'
    save_file({'w': torch.zeros(1)}, path, metadata={'ss_network_dim': '4'})
    assert read_metadata(path) is None
    save_file({'w': torch.zeros(1)}, path)
    assert read_metadata(path) is None
    assert parse_metadata(None) is None


def test_malformed_metadata_says_which_key():
    good = export_metadata(load_config(tiny_config()))
    with pytest.raises(MetadataError, match="lacks 'kdiff_align.w_sample'"):
        parse_metadata({k: v for k, v in good.items() if k != 'kdiff_align.w_sample'})
    with pytest.raises(MetadataError, match='w_sample must be a finite number'):
        parse_metadata({**good, 'kdiff_align.w_sample': '"high"'})
    with pytest.raises(MetadataError, match='not JSON'):
        parse_metadata({**good, 'kdiff_align.w_train': 'one'})
    with pytest.raises(MetadataError, match='objective'):
        parse_metadata({**good, 'kdiff_align.objective': '"cfg++"'})
    with pytest.raises(MetadataError, match='sigma_interval'):
        parse_metadata({**good, 'kdiff_align.sigma_interval': '[5, 1]'})
    # cfg_scale is derived from w: a stale value in the file is not trusted.
    assert parse_metadata({**good, 'kdiff_align.cfg_scale': '9'})['cfg_scale'] == 3.0


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / 'x.safetensors'
    path.write_bytes(b'abc')
    with pytest.raises(MetadataError, match='not a safetensors file'):
        read_metadata(path)


@pytest.mark.e2e
def test_core_imports_no_host():
    code = ('import sys, kdiff_align, kdiff_align.core.guidance, kdiff_align.core.objective, kdiff_align.config, '
            'kdiff_align.storage.metadata, kdiff_align.integrations\n'
            "hosts = ('comfy', 'folder_paths', 'modules', 'gradio', 'diffusers', 'wandb')\n"
            'print(sorted(m for m in sys.modules if m.split(".")[0] in hosts))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]', out.stdout


def test_sigma_convention_is_carried_and_defaults_for_older_exports():
    strings = export_metadata(load_config(tiny_config(sigma_interval=[0.3, 5.0])))
    assert parse_metadata(strings)['sigma_convention'] == 'k-diffusion'
    older = {k: v for k, v in strings.items() if k != 'kdiff_align.sigma_convention'}
    assert parse_metadata(older)['sigma_convention'] == 'k-diffusion'
    assert parse_metadata({**strings, 'kdiff_align.sigma_convention': '"flow"'})['sigma_convention'] == 'flow'
    with pytest.raises(MetadataError, match="sigma_convention is 'edm'; expected one of"):
        parse_metadata({**strings, 'kdiff_align.sigma_convention': '"edm"'})


MG_W = 0.45 / (1 - 0.45)   # the effective w of the MG paper's w_train 0.45
# config -> (objective, passes, cfg_scale, w_input, w_range, w_sample)
OBJECTIVE_CASES = {
    'digits_aligned': ('aligned', 2, 3.0, None, [2.0, 2.0], 2.0),
    'digits_baseline': ('aligned', 2, 3.0, None, [0.0, 0.0], 2.0),
    'toy_gft': ('gft', 1, 1.0, 'guidance_cond', [0.0, 4.0], 2.0),
    'toy_mg': ('mg', 1, 1.0, None, [MG_W, MG_W], MG_W),
    'toy_distill': ('distill', 1, 1.0, 'guidance_cond', [0.0, 4.0], 2.0),
    'sd gft': ('gft', 1, 1.0, 'timestep_cond', [0.0, 4.0], 2.0),
    'sd mg': ('mg', 1, 1.0, None, [MG_W, MG_W], MG_W),
    'sd distill': ('distill', 1, 1.0, 'timestep_cond', [0.0, 4.0], 2.0),
}


def config_of(name):
    if name.startswith('sd '):
        kind = name[3:]
        return sd_tiny.objective_config(kind)
    return load_config(name)   # a shipped config


@pytest.mark.parametrize('name', list(OBJECTIVE_CASES))
def test_each_objective_round_trips_with_passes_w_range_and_host_cfg(tmp_path, name):
    config = config_of(name)
    path = tmp_path / 'export.safetensors'
    save_file({'w': torch.zeros(1)}, path, metadata=export_metadata(config))
    meta = read_metadata(path)
    assert meta == guidance_metadata(config)
    objective, passes, cfg_scale, w_input, w_range, w_sample = OBJECTIVE_CASES[name]
    assert meta['format_version'] == FORMAT_VERSION == 3
    assert (meta['objective'], meta['passes'], meta['w_input']) == (objective, passes, w_input)
    assert meta['cfg_scale'] == pytest.approx(cfg_scale)
    assert meta['w_range'] == pytest.approx(w_range) and meta['w_sample'] == pytest.approx(w_sample)


@pytest.mark.parametrize('name', ['digits_aligned', 'toy_gft', 'toy_mg', 'toy_distill'])
def test_passes_and_cfg_scale_are_what_the_core_samples(name):
    """The metadata's passes and host CFG scale are those of make_guided_denoiser's sampling of the same config."""
    config = load_config(name)
    meta = guidance_metadata(config)
    denoiser = make_guided_denoiser(config, torch.nn.Identity())
    if meta['passes'] == 1:
        assert isinstance(denoiser, OnePassDenoiser) and meta['cfg_scale'] == 1.0
        assert denoiser.w == (meta['w_sample'] if meta['w_input'] else None)
    else:
        assert isinstance(denoiser, GuidedDenoiser) and meta['cfg_scale'] == 1 + denoiser.guidance_scale


def test_mg_at_another_w_is_cfg_on_top_with_the_cores_mapping():
    config = load_config('toy_mg')
    meta = parse_metadata(export_metadata(config, w_sample=2.0))
    core = make_guided_denoiser(config, torch.nn.Identity(), w=2.0)
    assert meta['passes'] == 2 and isinstance(core, GuidedDenoiser)
    assert meta['cfg_scale'] == pytest.approx(1 + core.guidance_scale)   # (1 + w) / (1 + w_mg)
    assert meta['cfg_scale'] == pytest.approx(3.0 / (1 + MG_W))
    assert meta['w_range'] == pytest.approx([kconfig.mg_effective_w(0.45)] * 2)


def test_w_conditioned_export_refuses_a_w_outside_its_range():
    with pytest.raises(MetadataError, match=r'w_sample: w 5 is outside the range \[0, 4\]'):
        guidance_metadata(load_config('toy_gft'), w_sample=5.0)


# What format_version 1 wrote (kdiff-align before one-pass objectives): no passes, w_range, w_input.
V1_CONVENTION = "w_train and w_sample are the paper's guidance weight w (Ho & Salimans 2022; ...)."


@pytest.mark.parametrize('objective, w_train, w_range', [
    ('aligned-cfg', '2.0', [2.0, 2.0]),
    ('aligned-cfg', '{"type": "uniform", "min_value": 1.0, "max_value": 3.0}', [1.0, 3.0]),
    ('standard-cfg', '0.0', [0.0, 0.0]),
    ('standard-cfg', '2.0', [0.0, 0.0])])   # mix 0: trained without guidance whatever its w_train
def test_version_1_exports_read_as_two_pass_models_not_told_w(tmp_path, objective, w_train, w_range):
    """Exports before format 3 named the objective 'aligned-cfg' / 'standard-cfg': they read as 'aligned'."""
    header = {'kdiff_align.format_version': '1', 'kdiff_align.objective': json_str(objective),
              'kdiff_align.w_train': w_train, 'kdiff_align.w_sample': '1.5', 'kdiff_align.cfg_scale': '2.5',
              'kdiff_align.sigma_interval': '[0.3, 5.0]', 'kdiff_align.convention': V1_CONVENTION}
    path = tmp_path / 'old.safetensors'
    save_file({'w': torch.zeros(1)}, path, metadata=header)
    meta = read_metadata(path)
    assert meta['format_version'] == 1 and meta['objective'] == 'aligned'
    assert meta['passes'] == 2 and meta['w_input'] is None and meta['w_range'] == w_range
    assert meta['cfg_scale'] == 2.5 and meta['sigma_interval'] == [0.3, 5.0]
    assert meta['sigma_convention'] == 'k-diffusion' and meta['convention'] == V1_CONVENTION


def json_str(text):
    return '"' + text + '"'


def test_inconsistent_one_pass_metadata_says_which_key():
    gft = export_metadata(load_config('toy_gft'))
    with pytest.raises(MetadataError, match="w_input is None; a gft model is told w"):
        parse_metadata({k: v for k, v in gft.items() if k != 'kdiff_align.w_input'})
    with pytest.raises(MetadataError, match="w_input is 'timestep_cond', but a mg model is not told w"):
        parse_metadata({**export_metadata(load_config('toy_mg')), 'kdiff_align.w_input': '"timestep_cond"'})
    with pytest.raises(MetadataError, match='passes is 2, but a gft model at w_sample 2 samples in 1'):
        parse_metadata({**gft, 'kdiff_align.passes': '2'})
    with pytest.raises(MetadataError, match='w_range must be'):
        parse_metadata({**gft, 'kdiff_align.w_range': '[4, 0]'})
    with pytest.raises(MetadataError, match='outside the trained w_range'):
        parse_metadata({**gft, 'kdiff_align.w_sample': '7'})
    with pytest.raises(MetadataError, match='format_version is 4: written by a newer kdiff-align'):
        parse_metadata({**gft, 'kdiff_align.format_version': '4'})
    # A one-pass model's host CFG scale is 1 whatever the file says: the host adds no guidance on top.
    assert parse_metadata({**gft, 'kdiff_align.cfg_scale': '3.0'})['cfg_scale'] == 1.0


@pytest.mark.parametrize('name', list(OBJECTIVE_CASES) + ['toy_aligned', 'cifar_mg'])
def test_metadata_resolves_w_like_the_config(name):
    """metadata reads configs without importing kdiff_align.config (no import cycle); its defaults are config's."""
    config = config_of(name)
    meta = guidance_metadata(config)
    assert meta['w_sample'] == kconfig.align_section(config)['w_sample']
    if meta['objective'] in ('gft', 'mg', 'distill'):
        assert meta['w_range'] == list(kconfig.w_range(config))
