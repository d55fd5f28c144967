"""`pip install .` (not editable): the wheel ships the configs, and the demo and the CLI run from the install.

The wheel is built from a copy of the sources and installed without dependencies into a folder of its own
(the test environment has them), then run from outside the checkout with that folder first on PYTHONPATH:
the development environment's editable finder for kdiff_align must not be what gets imported.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ('pyproject.toml', 'README.md', 'kdiff_align', 'configs')

pytestmark = [pytest.mark.slow, pytest.mark.e2e]   # builds and installs a wheel, runs it in subprocesses


def run(args, cwd, env=None, check=True):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f'{args} failed:\n{proc.stdout}\n{proc.stderr}'
    return proc


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """The wheel that `pip install .` builds (offline: no build isolation, no index)."""
    root = tmp_path_factory.mktemp('wheel')
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / 'src' / name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            (root / 'src').mkdir(exist_ok=True)
            shutil.copy(source, root / 'src' / name)
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
         '-w', str(root / 'dist'), str(root / 'src')], cwd=root)
    (path,) = (root / 'dist').glob('kdiff_align-*.whl')
    return path


@pytest.fixture(scope='module')
def installed(wheel, tmp_path_factory):
    """(site folder, environment) of a non-editable install of the wheel, outside the checkout."""
    site = tmp_path_factory.mktemp('site')
    run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', '--target', str(site), str(wheel)],
        cwd=site)
    env = {**os.environ, 'PYTHONPATH': str(site), 'PYTHONNOUSERSITE': '1'}
    env.pop('K_DIFFUSION_USE_COMPILE', None)  # the entry points' own default applies
    return site, env


def test_the_wheel_ships_every_module_and_the_configs_from_the_top_level_folder(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / 'kdiff_align').rglob('*.py')}
    missing = sorted(modules - names)
    assert not missing, f'modules missing from the wheel (list their packages in pyproject.toml): {missing}'
    configs = sorted(p.name for p in (ROOT / 'configs').glob('*.json'))
    assert configs and sorted(n.split('/')[-1] for n in names if n.startswith('kdiff_align/configs/')) == configs
    for name in configs:  # the same bytes as the source of truth
        assert zipfile.ZipFile(wheel).read(f'kdiff_align/configs/{name}') == (ROOT / 'configs' / name).read_bytes()


def test_installed_package_is_imported_and_finds_its_configs(installed, tmp_path):
    site, env = installed
    out = run([sys.executable, '-c', 'import kdiff_align, kdiff_align.config.shipped as c; print(kdiff_align.__file__); '
               'print(c.CONFIGS); print(" ".join(c.shipped_configs()))'], cwd=tmp_path, env=env).stdout.split('\n')
    assert Path(out[0]).is_relative_to(site), f'kdiff_align was imported from {out[0]}, not from the install {site}'
    assert Path(out[1]) == site / 'kdiff_align' / 'configs'
    assert 'cifar_aligned' in out[2].split() and 'digits_aligned' in out[2].split()


def test_cli_and_demo_run_from_the_install_with_config_names(installed, tmp_path):
    site, env = installed
    train = run([sys.executable, '-m', 'kdiff_align.train', '--config', 'toy_aligned', '--end-step', '1',
                 '--batch-size', '8', '--out-dir', str(tmp_path / 'runs'), '--name', 'toy', '--no-progress'],
                cwd=tmp_path, env=env)
    assert 'Done: step 1' in train.stdout and (tmp_path / 'runs' / 'toy' / 'toy.safetensors').is_file()
    assert 'pkg_resources' not in train.stderr, train.stderr
    demo = run([sys.executable, '-m', 'kdiff_align.demo', '--steps', '1', '--batch-size', '8', '--no-baseline',
                '--eval-n', '0', '--n', '1', '--w', '0', '2', '--threads', '1', '--out-dir', str(tmp_path / 'demo')],
               cwd=tmp_path, env=env)
    assert 'Sample grid' in demo.stdout and (tmp_path / 'demo' / 'grid.png').is_file()


def test_the_readme_usage_examples_run_from_the_install(installed, tmp_path):
    # As a user who installed the wheel runs them: 'configs/digits_aligned.json' is the shipped config there,
    # and nothing but the examples' own output is printed (no pkg_resources warning).
    site, env = installed
    blocks = re.findall(r'<!-- example: .*? -->\n```python\n(.*?)```', (ROOT / 'README.md').read_text(), re.S)
    assert "load_config('configs/digits_aligned.json')" in blocks[0]
    # Both examples in one fresh process, each in its own namespace, their outputs separated by a marker.
    code = '\n'.join(f'exec({block!r}, {{}}); print("--- end of example ---")' for block in blocks)
    proc = run([sys.executable, '-c', code], cwd=tmp_path, env=env)
    outputs = [out.strip() for out in proc.stdout.split('--- end of example ---')[:-1]]
    assert outputs == ['torch.Size([4, 1, 8, 8]) 2.0', 'torch.Size([4, 2])\ntorch.Size([4, 2])'], proc.stdout
    assert proc.stderr == '', proc.stderr


def test_comfyui_and_a1111_glue_import_the_installed_package(installed, tmp_path):
    site, env = installed
    glue = site / 'kdiff_align' / 'integrations'
    # Installed as docs/integrations.md says: symlinks to the installed glue in the hosts' folders.
    comfyui, a1111 = tmp_path / 'custom_nodes' / 'kdiff_align_comfyui', tmp_path / 'extensions' / 'kdiff-align'
    for link, target in ((comfyui, glue / 'comfyui'), (a1111, glue / 'a1111')):
        link.parent.mkdir()
        link.symlink_to(target, target_is_directory=True)
    out = json.loads(run([sys.executable, str(ROOT / 'tests' / 'glue_loader.py'), str(comfyui / '__init__.py'),
                          str(a1111 / 'scripts' / 'kdiff_align_cfg.py')], cwd=tmp_path, env=env).stdout)
    assert Path(out['kdiff_align']).is_relative_to(site) and out['path_unchanged']
    assert 'KDiffAlignGuider' in out['nodes'] and 'KDiffAlignCFGPatch' in out['nodes'] and out['a1111_script']
