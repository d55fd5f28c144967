"""`make demo` (kdiff_align.bench.demo): every phase shows a progress bar with an ETA, and the same scores as before."""

import re

import pytest

from kdiff_align.bench.demo import main


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_shows_progress_with_an_eta_in_every_phase(tmp_path, capsys):
    assert main(['--steps', '2', '--batch-size', '8', '--no-baseline', '--n', '1', '--eval-n', '1', '--w', '0', '2',
                 '--threads', '1', '--out-dir', str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith('== kdiff-align demo: trains 1 model(s) for 2 steps each, then samples and scores them; '
                          'each phase shows a progress bar with its ETA')
    eta = r'\[\d\d:\d\d<\d\d:\d\d'   # tqdm's [elapsed<remaining]
    assert re.search(r'digits_aligned: 100%.*2/2 ' + eta, err), err
    assert re.search(r'digits_aligned: sampling 10 per w to score: 100%.*2/2 ' + eta, err), err
    assert (tmp_path / 'grid.png').is_file() and 'aligned FD / acc' in out
