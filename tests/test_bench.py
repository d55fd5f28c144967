"""`python -m kdiff_align.bench speed` runs and reports every row it promises (ratios, not timings, are checked)."""

import json
import random

import pytest

from kdiff_align import bench


@pytest.mark.slow
@pytest.mark.e2e
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
    timed = [r for r in result['rows'] if r['bench'] != 'train_memory']
    assert all(r['rounds'] == 1 and r['ratio_iqr'] == [r['ratio'], r['ratio']] for r in timed)
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


def test_every_round_times_every_variant_once_in_rotating_order():
    from kdiff_align.bench.speed import interleaved

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in 'abc'}
    times = interleaved(fns, repeats=4, warmup=1, sync=lambda: None)
    assert calls == list('abc' 'abc' 'bca' 'cab' 'abc')   # the warm-up round, then one round each
    assert {name: len(t) for name, t in times.items()} == {'a': 4, 'b': 4, 'c': 4}


def test_the_per_round_ratio_recovers_a_planted_ratio_under_load_and_flags_noise(capsys):
    from kdiff_align.bench.speed import SPREAD_LIMIT, print_speed, round_ratio

    rng = random.Random(0)
    rounds = 12
    # Other processes come and go between rounds: each round runs at its own speed, the same for both variants
    # (up to 1% jitter). The true ratio is 1.9.
    load = [rng.choice([1., 1.5, 3.]) for _ in range(rounds)]
    upstream = [0.010 * s * rng.uniform(0.99, 1.01) for s in load]
    aligned = [0.019 * s * rng.uniform(0.99, 1.01) for s in load]
    clean = round_ratio(aligned, upstream)
    assert clean.rounds == rounds and abs(clean.median / 1.9 - 1) < 0.02 and not clean.wide
    assert clean.q1 <= clean.median <= clean.q3
    # A planted slowdown: another process takes the core during one variant's step in 2 of the 12 rounds.
    hit = [t * 3 if r in (2, 7) else t for r, t in enumerate(aligned)]
    hit_baseline = [t * 3 if r in (4, 9) else t for r, t in enumerate(upstream)]
    for times, baseline in ((hit, upstream), (aligned, hit_baseline)):
        planted = round_ratio(times, baseline)
        assert abs(planted.median / 1.9 - 1) < 0.02 and not planted.wide
    # Noise in half the rounds (either variant slowed up to 2.5x at random): the spread says not to trust it.
    noisy = round_ratio([t * rng.choice([1., 1., 1.6, 2.5]) for t in aligned],
                        [t * rng.choice([1., 1., 1.6, 2.5]) for t in upstream])
    assert noisy.wide and noisy.q3 - noisy.q1 > SPREAD_LIMIT * noisy.median
    # The report says which ratios not to trust, and only those.
    result = {'model': 'tiny', 'batch_size': 16, 'dtype': 'fp32', 'device': 'cpu', 'torch': '2', 'commit': 'x',
              'w': 2.0, 'uncond_prob': 0.1,
              'rows': [{'bench': 'train_step', 'variant': name, 'seconds': 0.01, **ratio.fields()}
                       for name, ratio in (('clean', clean), ('noisy', noisy))]}
    print_speed(result)
    out = capsys.readouterr().out
    assert f'| train_step | noisy | 10.00 ms | {noisy.median:.2f} [{noisy.q1:.2f}, {noisy.q3:.2f}] wide |' in out
    assert f'| train_step | clean | 10.00 ms | {clean.median:.2f} [{clean.q1:.2f}, {clean.q3:.2f}] |' in out
    assert 'warning: 1 ratio(s) too noisy to trust (per-round spread over 20%' in out
    assert out.rstrip().endswith(': train_step noisy. Rerun on an idle machine or with more --repeats.')
    # scale multiplies the ratio (the eval row compares steps forwards with one sampling run).
    assert round_ratio(aligned, upstream, scale=2.).median == 2 * clean.median


def test_speed_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(['speed', '--uncond-prob', '2'])
    assert exc.value.code == 2 and '--uncond-prob must lie in [0, 1], got 2.0' in capsys.readouterr().err
