"""Export metadata: built from a config, written as safetensors strings, parsed back exactly."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from kdiff_align.config import load_config
from kdiff_align.guidance import w_to_cfg_scale
from kdiff_align.metadata import (MetadataError, export_metadata, guidance_metadata, parse_metadata,
                                  read_header, read_metadata)


def test_aligned_config_round_trips_through_a_safetensors_file(tmp_path):
    config = load_config(tiny_config(w_train=2.0, w_sample=1.5, sigma_interval=[0.3, 5.0]))
    strings = export_metadata(config)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in strings.items())
    assert all(k.startswith('kdiff_align.') for k in strings)
    path = tmp_path / 'lora.safetensors'
    save_file({'w': torch.zeros(2)}, path, metadata={**strings, 'other': 'kept'})
    meta = read_metadata(path)
    assert meta == guidance_metadata(config)
    assert meta['objective'] == 'aligned-cfg'
    assert meta['w_train'] == 2.0 and meta['w_sample'] == 1.5
    assert meta['cfg_scale'] == w_to_cfg_scale(1.5) == 2.5
    assert meta['sigma_interval'] == [0.3, 5.0]
    assert 's = 1 + w' in meta['convention']
    assert read_header(path)['other'] == 'kept'
    assert torch.equal(load_file(path)['w'], torch.zeros(2))  # the tensors are untouched


def test_defaults_standard_objective_and_distributions():
    meta = guidance_metadata(load_config(tiny_config()))
    assert meta['objective'] == 'aligned-cfg' and meta['w_sample'] == meta['w_train'] == 2.0
    assert meta['sigma_interval'] is None
    assert guidance_metadata(load_config(tiny_config(mix=0.0)))['objective'] == 'standard-cfg'
    assert guidance_metadata(load_config(tiny_config(w_train=0.0)))['objective'] == 'standard-cfg'
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
        parse_metadata({**good, 'kdiff_align.objective': '"gft"'})
    with pytest.raises(MetadataError, match='sigma_interval'):
        parse_metadata({**good, 'kdiff_align.sigma_interval': '[5, 1]'})
    # cfg_scale is derived from w: a stale value in the file is not trusted.
    assert parse_metadata({**good, 'kdiff_align.cfg_scale': '9'})['cfg_scale'] == 3.0


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / 'x.safetensors'
    path.write_bytes(b'abc')
    with pytest.raises(MetadataError, match='not a safetensors file'):
        read_metadata(path)


def test_core_imports_no_host():
    code = ('import sys, kdiff_align, kdiff_align.guidance, kdiff_align.objective, kdiff_align.config, '
            'kdiff_align.metadata, kdiff_align.integrations\n'
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
