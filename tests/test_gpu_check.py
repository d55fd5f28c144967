"""`python -m kdiff_align.bench gpu --device cpu --tiny`: the GPU check's own self-test on every commit."""

import json

import pytest
import torch

from kdiff_align import bench


@pytest.mark.slow
@pytest.mark.e2e
def test_tiny_check_runs_every_section_and_writes_the_report(tmp_path):
    out = tmp_path / 'gpu.md'
    status = bench.main(['gpu', '--device', 'cpu', '--tiny', '--out', str(out), '--work-dir', str(tmp_path / 'work')])
    report = json.loads(out.with_suffix('.json').read_text())
    sections = report['sections']
    assert list(sections) == ['environment', 'speed', 'sd', 'train']
    assert status == 0, {name: (s['error'], s.get('checks')) for name, s in sections.items() if not s['ok']}
    text = out.read_text()
    assert 'nothing in this file was measured on a GPU' in text and '**FAILED**' not in text
    # Training: stopped by SIGINT (exit 130) after a checkpoint, resumed with --compile from that step.
    train = sections['train']
    eager, compiled = train['eager'], train['compiled']
    assert eager['returncode'] == compiled['returncode'] == 130
    assert eager['checkpoint_step'] == eager['last_step'] < compiled['first_step'] <= compiled['last_step']
    assert compiled['checkpoint_step'] == compiled['last_step']
    assert train['config']['dataset']['type'] == 'imagefolder-class'
    assert len(list((tmp_path / 'work' / 'digits32').rglob('*.png'))) == 200
    # Speed: counted FLOP ratios and every row; SD: bf16 trained and sampled (fp16 is refused on the CPU).
    variants = [row['variant'] for row in sections['speed']['rows']]
    assert len(variants) == 18 and all(row['flop_ratio'] > 1 for row in sections['speed']['rows'][1:6])
    assert sorted(sections['sd']['runs']) == ['bf16']
    assert all(len(run['losses']) == 2 and run['sample_pixel_std'] > 0 for run in sections['sd']['runs'].values())


@pytest.mark.parametrize('flags, message', [
    (['--device', 'cpu'], '--device cpu needs --tiny'),
    (['--device', 'cpu', '--tiny', '--train-seconds', '0'], '--train-seconds must be > 0, got 0.0'),
    pytest.param(['--device', 'cuda'], '--device cuda: no CUDA device is available',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA device is available')),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(['gpu', *flags, '--out', str(tmp_path / 'gpu.md'), '--work-dir', str(tmp_path / 'work')])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / 'gpu.md').exists() and not (tmp_path / 'work').exists()

