"""`python -m kdiff_align.bench claims --quick` end to end, and the verdict rule on numbers with known outcomes."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdiff_align import bench, claims

ROOT = Path(__file__).resolve().parents[1]


def test_verdict_rule_follows_the_numbers():
    better = claims.Comparison('a', np.array([1.0, 1.1, 0.9]), np.array([2.0, 2.1, 1.9]))
    worse = claims.Comparison('b', np.array([2.0, 2.1, 1.9]), np.array([1.0, 1.1, 0.9]))
    tie = claims.Comparison('c', np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 1.0]))
    assert (better.outcome, worse.outcome, tie.outcome) == ('better', 'worse', 'tie')
    assert claims.verdict([better, better])[0] == 'held'
    assert claims.verdict([better, better, tie, worse]) == ('partly', {'better': 2, 'tie': 1, 'worse': 1})
    assert claims.verdict([better, worse])[0] == 'did not hold'
    assert claims.verdict([tie, tie])[0] == 'did not hold'


def test_matched_w_maps_effective_guidance():
    # (w_sample - w_train) / (1 + w_train) = w  (docs/design.md section 2)
    assert claims.matched_w(0., 1.) == 1. and claims.matched_w(1., 1.) == 3. and claims.matched_w(2., 2.) == 8.


@pytest.mark.parametrize('quick', [False, True])
def test_variants_are_the_shipped_configs_up_to_their_named_overrides(quick):
    from kdiff_align.config import load_config

    for b in claims.benches(quick).values():
        for variant in claims.variants():
            shipped = load_config(ROOT / 'configs' / f'{b.name}_{variant.config}.json')
            named = set(variant.overrides) | (set(claims.QUICK[b.name]) if quick else set())
            extra = claims.differences(claims.variant_config(b, variant), shipped) - named
            assert not extra, f'{b.name} {variant.name} differs from configs/{b.name}_{variant.config}.json ' \
                f'in {sorted(extra)}, which are not its named overrides'
    assert claims.differences({'a': {'b': 1, 'c': 2}}, {'a': {'b': 1, 'c': 3}, 'd': 0}) == {'a.c', 'd'}


def test_quick_claims_end_to_end_and_resume(tmp_path):
    out, work = tmp_path / 'claims', tmp_path / 'work'
    argv = ['claims', '--quick', '--out', str(out), '--work', str(work), '--workers', '1', '--no-progress',
            '--variants', 'baseline', 'aligned', 'baseline_equal_flops', 'aligned_stop_grad']
    bench.main(argv)
    report = (out / 'report.md').read_text()
    rows = list(csv.DictReader(open(out / 'results.csv')))
    run = json.loads((out / 'run.json').read_text())
    # Every claim x benchmark x reference has a verdict line, and the report states command, commit and seeds.
    for bench_name in ('toy', 'digits'):
        for claim in ('C1', 'C2', 'C1 (matched effective w)'):
            assert f'| {claim} | {bench_name} (' in report
    assert report.count('| standard CFG at equal FLOPs | **') == 4
    assert 'python -m kdiff_align.bench claims --quick' in report and 'Training seeds: [0, 1]' in report
    assert run['commit'] in report and '--quick run' in report
    # The grid: 2 samplers x 2 steps x 2 w per model, plus the aligned model's matched-w cells.
    per_model = {}
    for r in rows:
        per_model.setdefault((r['bench'], r['variant'], r['train_seed']), set()).add((r['sampler'], r['steps'], r['w']))
    assert len(per_model) == 2 * 4 * 2
    w_train = claims.benches(True)['toy'].config['align']['w_train']   # the shipped config's
    matched = {claims.matched_w(w, w_train) for w in (0., 2.)} - {0., 2.}
    assert len(per_model[('toy', 'baseline', '0')]) == 8
    assert len(per_model[('toy', 'aligned', '0')]) == 8 + 2 * 2 * len(matched)
    assert {r['train_steps'] for r in rows if r['variant'] == 'baseline_equal_flops' and r['bench'] == 'toy'} == \
        {str(round(40 * 1.9))}
    for name in ('toy_energy_vs_w.png', 'digits_fd_vs_steps.png', 'toy_samples_aligned-seed0.png'):
        assert (out / name).exists()
    # Verdicts in the report are the rule applied to the rows it wrote.
    table = [json.loads(json.dumps(r)) for r in json.loads((out / 'results.json').read_text())]
    comps = claims.claim_comparisons(table, 'toy', 'energy', 'aligned', 'baseline', steps_grid=[2, 4],
                                     ws=[0., 2.])
    expected, counts = claims.verdict(comps['C2'])
    assert f'| C2 | toy (energy) | standard CFG | **{expected}** | {counts["better"]} / {counts["tie"]} / ' \
           f'{counts["worse"]} |' in report
    # Every model was trained by kdiff_align.train from its variant's config.
    quick = claims.benches(True)
    for (bench_name, variant, seed) in per_model:
        run = work / bench_name / 'runs' / f'{variant}-seed{seed}'
        config = json.loads((run / 'config.json').read_text())
        expected = claims.variant_config(quick[bench_name], {v.name: v for v in claims.variants()}[variant])
        assert config == json.loads(json.dumps(expected)) and (run / f'{variant}-seed{seed}.safetensors').is_file()
    # A second run reuses every checkpoint and cell.
    bench.main(argv)
    again = json.loads((out / 'run.json').read_text())
    assert all(j['computed'] == 0 for j in again['jobs'])


def test_claims_rejects_bad_flags():
    proc = subprocess.run([sys.executable, '-m', 'kdiff_align.bench', 'claims', '--seeds', '1'],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and '--seeds must be >= 2' in proc.stderr
    with pytest.raises(SystemExit):
        claims.main(['--variants', 'aligned'])


def test_update_readme_rewrites_only_the_marked_verdict_block(tmp_path):
    begin, end = claims.README_BLOCK
    readme = tmp_path / 'README.md'
    readme.write_text(f'# title\n\nbefore\n{begin}\n| old | table |\n{end}\nafter\n')
    table = [{'claim': 'C1', 'bench': 'toy', 'metric': 'energy', 'reference': 'standard CFG', 'verdict': 'held',
              'better': 4, 'tie': 0, 'worse': 0, 'ratio': 0.5}]
    assert claims.update_readme(readme, table)
    text = readme.read_text()
    assert text.startswith('# title\n\nbefore\n' + begin + '\n| claim |') and text.endswith(end + '\nafter\n')
    assert '| C1 | toy (energy) | standard CFG | **held** | 4 / 0 / 0 | 0.50 |' in text and '| old |' not in text
    other = tmp_path / 'OTHER.md'
    other.write_text('no block here\n')
    assert not claims.update_readme(other, table) and other.read_text() == 'no block here\n'
