"""Loading is data, never code, and every bad file is one line: checkpoints never choose a custom dataset hook,
written files get the umask's mode, and bad LoRA / SD weights / Inception / checkpoint files give exit 2 with
one line naming the file (never torch's advice to retry with weights_only=False)."""

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from kdiff_align.storage import checkpoint as ckpt_lib

ROOT = Path(__file__).resolve().parents[1]

HOOK = '''
import pathlib
pathlib.Path(__file__).with_name('imported').open('a').write('x')   # counts the imports
from PIL import Image
class Items:
    def __init__(self, transform): self.transform = transform
    def __len__(self): return 16
    def __getitem__(self, i): return self.transform(Image.new('L', (8, 8), 16 * i)), i % 10
def get_dataset(config, transform): return Items(transform)
'''


class _Exploit:
    """Unpickling this creates a folder: what a crafted weights file could do with any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def state(config: dict) -> dict:
    """The fields of a checkpoint that load_checkpoint requires (the values are never used: loading stops first)."""
    return {'config': json.dumps(config), 'args': '{}', 'model': {}, 'model_ema': None, 'opt': {}, 'sched': {},
            'ema_sched': None, 'epoch': 0, 'batches_seen': 1, 'rng': {}}


def one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
    assert 'weights_only' not in err, err
    return err


def test_resume_never_imports_a_custom_dataset_hook_named_by_a_checkpoint(tmp_path, monkeypatch, capsys):
    from kdiff_align.training.trainer import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / 'hook.py').write_text(HOOK)
    config = json.loads((ROOT / 'configs' / 'toy_aligned.json').read_text())   # the audit's crafted config
    config['dataset'] = {'type': 'custom', 'location': 'hook.py', 'num_classes': 4}
    crafted = ckpt_lib.save_checkpoint(tmp_path / 'crafted', 1, state(config))
    assert main(['--resume', str(crafted), '--out-dir', str(tmp_path / 'out'), '--no-progress']) == 2
    err = one_line(capsys.readouterr().err)
    assert not (tmp_path / 'imported').exists(), 'the checkpoint made training import hook.py'
    assert f"the checkpoint '{crafted}' was trained on a custom dataset hook ('hook.py')" in err
    assert 'pass --config with the config that names it' in err
    # The user's own config naming the hook, with toy_mlp (no input_size): refused by name before any import.
    (tmp_path / 'mine.json').write_text(json.dumps(config))
    assert main(['--config', 'mine.json', '--resume', str(crafted), '--out-dir', 'out', '--no-progress']) == 2
    err = one_line(capsys.readouterr().err)
    assert "config key 'model.type': got 'toy_mlp'" in err and "for dataset type 'custom'" in err
    assert 'model.input_size' in err and not (tmp_path / 'imported').exists()


def test_resume_never_unpickles_cifar_files_a_checkpoint_exempts_from_their_checksums(tmp_path, capsys):
    from kdiff_align.data import CIFAR10_FILES
    from kdiff_align.training.trainer import main

    folder = tmp_path / 'planted' / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    for name in CIFAR10_FILES:
        (folder / name).write_bytes(pickle.dumps(_Exploit(tmp_path / 'code-ran')))
    config = tiny_config()
    config['model'].update(input_channels=3, input_size=[32, 32])
    config['dataset'] = {'type': 'cifar10', 'num_classes': 10, 'location': str(folder.parent), 'check_md5': False}
    crafted = ckpt_lib.save_checkpoint(tmp_path / 'crafted', 1, state(config))
    assert main(['--resume', str(crafted), '--out-dir', str(tmp_path / 'out'), '--no-progress']) == 2
    err = one_line(capsys.readouterr().err)
    assert not (tmp_path / 'code-ran').exists(), 'the checkpoint made training unpickle the planted files'
    assert 'CIFAR-10 pickle files read without their checksums' in err and 'pass --config' in err


def test_a_custom_dataset_run_resumes_only_with_the_users_config(tmp_path, capsys, one_thread):
    from kdiff_align.training.trainer import main

    (tmp_path / 'hook.py').write_text(HOOK)
    config = tiny_config()
    config['model'].update(mapping_out=16, depths=[1, 1], channels=[8, 16])
    config['dataset'] = {'type': 'custom', 'location': 'hook.py', 'num_classes': 10}
    config['align'] = {'sample_steps': 2}
    (tmp_path / 'custom.json').write_text(json.dumps(config))
    common = ['--out-dir', str(tmp_path), '--name', 'run', '--batch-size', '8', '--demo-every', '0', '--sample-n',
              '0', '--no-progress', '--seed', '0']
    assert main(['--config', str(tmp_path / 'custom.json'), '--end-step', '1', *common]) == 0
    assert (tmp_path / 'imported').read_text() == 'x'
    capsys.readouterr()
    assert main(['--resume', str(tmp_path / 'run'), '--end-step', '2', *common]) == 2
    assert 'pass --config with the config that names it' in one_line(capsys.readouterr().err)
    assert (tmp_path / 'imported').read_text() == 'x'
    assert main(['--config', str(tmp_path / 'custom.json'), '--resume', str(tmp_path / 'run'), '--end-step', '2',
                 *common]) == 0
    assert ckpt_lib.load_checkpoint(tmp_path / 'run')['step'] == 2 and (tmp_path / 'imported').read_text() == 'xx'


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_pointers_and_exports_get_the_mode_of_the_umask(tmp_path, umask, mode):
    from kdiff_align.config import load_config

    config = load_config(tiny_config())
    old = os.umask(umask)
    try:
        ckpt = ckpt_lib.save_checkpoint(tmp_path / 'run', 1, state(config))
        export = ckpt_lib.save_export(tmp_path / 'run' / 'run.safetensors', {'w': torch.zeros(2)}, config, 1)
    finally:
        os.umask(old)
    for path in (ckpt, tmp_path / 'run' / ckpt_lib.LATEST, export):
        assert path.stat().st_mode & 0o777 == mode, f'{path.name}: {oct(path.stat().st_mode & 0o777)}'


def test_a_truncated_latest_checkpoint_names_the_previous_one(tmp_path, capsys):
    from kdiff_align.config import load_config
    from kdiff_align.training.trainer import main

    run = tmp_path / 'run'
    config = load_config(tiny_config())
    previous = ckpt_lib.save_checkpoint(run, 100, state(config))
    latest = ckpt_lib.save_checkpoint(run, 200, state(config))
    latest.write_bytes(latest.read_bytes()[:300])
    assert main(['--resume', str(run), '--out-dir', str(tmp_path), '--no-progress']) == 2
    err = one_line(capsys.readouterr().err)
    assert f"cannot read checkpoint '{latest}': it is truncated" in err
    assert err.endswith(f'the previous checkpoint is {previous}: pass it to --resume')
    # A plain pickle (protocol 4): refused in one line, without torch's protocol notice in front of it.
    latest.write_bytes(pickle.dumps({'format': ckpt_lib.FORMAT}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert main(['--resume', str(latest), '--out-dir', str(tmp_path), '--no-progress']) == 2
    assert str(latest) in one_line(capsys.readouterr().err)
    assert not [w for w in caught if 'pickle protocol' in str(w.message)]


@pytest.fixture
def bad_files(tmp_path, tiny):
    """A text file, a truncated safetensors file and a folder, each passed where a weights file belongs."""
    (tmp_path / 'notes.txt').write_text('not weights\n')
    real = (tiny['pipe'] / 'unet' / 'diffusion_pytorch_model.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(real[:200])
    (tmp_path / 'folder.safetensors').mkdir()
    return tmp_path


@pytest.mark.parametrize('name, message', [
    ('notes.txt', 'is not a .safetensors file; pass a LoRA .safetensors'),
    ('cut.safetensors', 'cannot read safetensors export'),
    ('folder.safetensors', 'is not a .safetensors file; pass a LoRA .safetensors'),
])
def test_sd_sample_refuses_a_bad_lora_in_one_line(tiny, bad_files, name, message, capsys):
    from kdiff_align.sd.sample import main

    path = bad_files / name
    assert main(['--pretrained', str(tiny['pipe']), '--lora', str(path), '--prompt', 'x', '--resolution', '32',
                 '--steps', '1', '--out', str(bad_files / 'x.png')]) == 2
    err = one_line(capsys.readouterr().err)
    assert repr(str(path)) in err and message in err


@pytest.mark.parametrize('content', ['truncated', 'object', 'pickle4'])
def test_sd_weights_folder_with_a_bad_bin_is_one_line(tiny, tmp_path, content, capsys):
    from kdiff_align.sd.sample import main

    pipe = Path(shutil.copytree(tiny['pipe'], tmp_path / 'pipe'))
    unet = pipe / 'unet' / 'diffusion_pytorch_model.safetensors'
    from safetensors.torch import load_file
    weights = load_file(unet)
    unet.unlink()
    bad = pipe / 'unet' / 'diffusion_pytorch_model.bin'
    if content == 'truncated':
        torch.save(weights, bad)
        bad.write_bytes(bad.read_bytes()[:1000])
    elif content == 'object':
        torch.save({**weights, 'x': _Exploit(tmp_path / 'code-ran')}, bad)
    else:
        bad.write_bytes(pickle.dumps(weights, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert main(['--pretrained', str(pipe), '--prompt', 'x', '--resolution', '32', '--steps', '1',
                     '--out', str(tmp_path / 'x.png')]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"cannot read weights '{bad}'" in err and 'expected diffusers or transformers weights' in err
    assert not (tmp_path / 'code-ran').exists()
    assert ('posix.mkdir' in err) == (content == 'object')
    assert not [w for w in caught if 'pickle protocol' in str(w.message) or 'weights_only' in str(w.message)]


def test_compare_inception_refuses_bad_files_in_one_line(tmp_path, capsys):
    from kdiff_align.evaluation.evaluate import main

    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(os.urandom(1000))
    script = tmp_path / 'linear.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # torch.jit.script's deprecation notice
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(script))
    cut = tmp_path / 'cut.pt'
    cut.write_bytes(script.read_bytes()[:300])
    for path, message in ((garbage, 'is not a TorchScript file'), (cut, 'is not a TorchScript file'),
                          (script, 'without the Inception "layers" submodule'),
                          (tmp_path / 'missing.pt', 'Inception weights not found')):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            assert main(['--compare-inception', str(path), str(path)]) == 2
        err = one_line(capsys.readouterr().err)
        assert str(path) in err and message in err
        assert not [w for w in caught if 'jit.load' in str(w.message)]
