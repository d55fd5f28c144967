"""`python -m kdiff_align.bench speed` runs and reports every row it promises (ratios, not timings, are checked)."""

import json
import subprocess
import sys

import pytest

from kdiff_align import bench


def test_speed_writes_every_row(tmp_path):
    out = tmp_path / 'speed.json'
    bench.main(['speed', '--repeats', '1', '--warmup', '0', '--batch-size', '2', '--sample-steps', '2',
                '--uncond-prob', '0', '--out', str(out)])
    result = json.loads(out.read_text())
    variants = [(r['bench'], r['variant']) for r in result['rows']]
    assert [b for b, _ in variants].count('train_step') == 6
    assert [b for b, _ in variants].count('train_memory') == 6
    assert [b for b, _ in variants].count('guided_call') == 4
    assert [b for b, _ in variants].count('eval_throughput') == 2
    rows = {v: r for (b, v), r in zip(variants, result['rows'])}
    # Counted FLOPs without anchor rows: the full step runs 2B rows forward and backward; stop-gradient runs
    # B rows forward and backward plus B forward (a backward costs a little under two forwards: the input
    # layer computes no input gradient).
    assert rows['AlignedDenoiser (full)']['flop_ratio'] == pytest.approx(2.0, rel=1e-9)
    assert 4 / 3 <= rows['AlignedDenoiser (stop-gradient)']['flop_ratio'] < 1.36
    # GFT: the same passes as stop-gradient (plus its small w embedding); MG and distillation: B rows forward
    # and backward plus a no-grad teacher call on 2B rows.
    assert 4 / 3 <= rows['GFTDenoiser, w ~ U[0, 4]']['flop_ratio'] < 1.37
    for name in ('TeacherTargetDenoiser, model-guidance w = 0.45', 'TeacherTargetDenoiser, distillation w ~ U[0, 4]'):
        assert 5 / 3 <= rows[name]['flop_ratio'] < 1.73
    memory = [r for r in result['rows'] if r['bench'] == 'train_memory']
    # Saved activations are deterministic: aligned keeps both branches, stop-gradient only the conditional one.
    assert memory[1]['bytes'] > 1.5 * memory[0]['bytes']
    assert memory[0]['bytes'] <= memory[2]['bytes'] < 1.05 * memory[0]['bytes']


def test_speed_rejects_bad_flags():
    proc = subprocess.run([sys.executable, '-m', 'kdiff_align.bench', 'speed', '--uncond-prob', '2'],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and '--uncond-prob must lie in [0, 1], got 2.0' in proc.stderr
