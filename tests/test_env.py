"""kdiff_align.env: the entry points' process defaults, set in one place."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kdiff_align.env import COMPILE_ENV, cli_defaults

ROOT = Path(__file__).resolve().parents[1]
PKG_RESOURCES_MESSAGE = ('pkg_resources is deprecated as an API. See https://setuptools.pypa.io/en/latest/'
                         'pkg_resources.html.')


def test_compile_defaults_to_off_and_a_users_value_wins(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    cli_defaults()
    assert os.environ[COMPILE_ENV] == '0'
    monkeypatch.setenv(COMPILE_ENV, '1')
    cli_defaults()
    assert os.environ[COMPILE_ENV] == '1'


def test_only_the_pkg_resources_warning_is_filtered():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        cli_defaults()
        warnings.warn(PKG_RESOURCES_MESSAGE, UserWarning)
        warnings.warn('pkg_resources is fine, this is another warning', UserWarning)
        warnings.warn(PKG_RESOURCES_MESSAGE, DeprecationWarning)
    assert [(w.category, str(w.message)) for w in seen] == [
        (UserWarning, 'pkg_resources is fine, this is another warning'), (DeprecationWarning, PKG_RESOURCES_MESSAGE)]


@pytest.mark.slow
@pytest.mark.e2e
def test_an_entry_point_prints_no_pkg_resources_warning(tmp_path):
    # The training CLI imports k-diffusion, which imports clip, which imports pkg_resources.
    env = {k: v for k, v in os.environ.items() if k not in (COMPILE_ENV, 'PYTHONWARNINGS')}
    config = ROOT / 'configs' / 'toy_aligned.json'
    proc = subprocess.run([sys.executable, '-m', 'kdiff_align.train', '--config', str(config), '--end-step', '0',
                           '--out-dir', str(tmp_path), '--no-progress'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'Done: step 0' in proc.stdout
    assert 'pkg_resources' not in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_library_use_prints_no_pkg_resources_warning(tmp_path):
    # `import kdiff_align` stays silent even with every warning shown; then using it imports k-diffusion (and so
    # clip and pkg_resources), which printed the deprecation warning in library use, outside any entry point.
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
    env['PYTHONPATH'] = str(ROOT)
    for flags, code in ((['-W', 'default'], 'import kdiff_align'),
                        ([], 'import kdiff_align; kdiff_align.load_config("toy_aligned"); import k_diffusion')):
        proc = subprocess.run([sys.executable, *flags, '-c', code], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0 and proc.stderr == '', proc.stderr
