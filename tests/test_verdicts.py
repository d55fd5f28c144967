"""The claims verdicts' statistics test themselves: on identical variants (different seeds) the rule says "no
difference" at about its stated 5% rate, on a planted difference it says "worse", and each check FAILS when the rule
is broken (an unpaired standard error, a 1-SE threshold); reproduction is an equivalence test at a stated margin
against another seed; every generated sentence agrees with the numbers it was generated from."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kdiff_align.bench import claims_report, verdicts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'docs' / 'claims' / 'results.json'
CELLS = 1000        # synthetic cells per check: the rate's binomial sd at 5% is 0.7%
SLACK = 0.025       # allowed above the stated 5%


def null_rate(seeds: int = 5, **rule) -> float:
    """The fraction of cells of two identical variants (different seeds) labelled better or worse."""
    cells = verdicts.synthetic_cells(np.random.default_rng(1), CELLS, seeds)
    rates = verdicts.label_rates(cells, **rule)
    return rates.get(verdicts.BETTER, 0.) + rates.get(verdicts.WORSE, 0.)


def planted_found(seeds: int = 5, shift: float = 2.5, **rule) -> float:
    """The fraction of cells labelled worse when the objective is shift model-sd worse at every seed."""
    cells = verdicts.synthetic_cells(np.random.default_rng(2), CELLS, seeds, shift=shift)
    return verdicts.label_rates(cells, **rule).get(verdicts.WORSE, 0.)


def null_check_passes(**rule) -> bool:
    return null_rate(**rule) <= verdicts.ALPHA + SLACK


def planted_check_passes(**rule) -> bool:
    return planted_found(**rule) >= 0.7


def test_identical_variants_give_no_difference_at_the_stated_rate():
    assert null_check_passes()
    assert null_rate(seeds=3) <= verdicts.ALPHA + SLACK    # the t quantile's n - 1 df, not a fixed 2 SE
    # Broken on purpose: a 1-SE threshold calls a third of identical pairs different; the check catches it.
    assert not null_check_passes(threshold=1.0)
    assert null_rate(seeds=3, threshold=2.0) > verdicts.ALPHA + SLACK   # the old rule's 2 SE at n = 3


def test_a_planted_difference_is_found_and_missed_without_pairing():
    assert planted_check_passes()
    # Broken on purpose: an unpaired (Welch) standard error drowns the difference in the seed effect that same-seed
    # models share (initialisation, data order); the check catches it.
    assert not planted_check_passes(paired=False)


def comparison(a, b):
    return verdicts.Comparison('c', np.array(a, float), np.array(b, float))


def test_labels_follow_the_interval_and_counts_are_description():
    b = np.array([1.0, 2.0, 1.5, 3.0, 2.5])
    lower = [comparison(b * f, b) for f in (0.8, 0.82, 0.79)]          # 20% lower in every seed: better
    e = verdicts.cell_test(lower)
    assert e.label == verdicts.BETTER and e.rel_hi < 0 and e.rel == pytest.approx(-0.19, abs=0.01)
    assert e.counts == {'better': 3, 'no_difference': 0, 'worse': 0} and (e.n, e.k) == (5, 3)
    assert verdicts.cell_test([comparison(b * 1.2, b)]).label == verdicts.WORSE
    noisy = comparison(b * [0.9, 1.1, 0.95, 1.05, 1.0], b)                # centred on no difference
    e = verdicts.cell_test([noisy])
    assert e.label == verdicts.NO_DIFFERENCE and e.rel_lo < 0 < e.rel_hi
    # Most comparisons better does not make a cell better: one test on the seed-level aggregate decides.
    mixed = [comparison(b * 0.99, b)] * 3 + [comparison(b * [1.5, 0.9, 1.4, 0.8, 1.6], b)]
    e = verdicts.cell_test(mixed)
    assert e.counts['better'] == 3 and e.label == verdicts.NO_DIFFERENCE
    # Unreached (infinite) statistics are counted by side and left out of the test; none reached: untested.
    inf = np.inf
    assert comparison([1.0, 2.0], [1.0, inf]).outcome == 'better'
    assert verdicts.cell_test([comparison([inf, 1.0], [inf, 2.0])]).label == verdicts.UNTESTED
    assert verdicts.claim_test(lower).label == verdicts.HELD and verdicts.verdict(lower)[0] == 'held'
    with pytest.raises(ValueError, match='same training seeds'):
        comparison([1.0, 2.0, 3.0], [1.0, 2.0])


def repro_rows(variant_reference_offset: int, seeds: int = 5, excess: float = 0.) -> list[dict]:
    rng = np.random.default_rng(3)
    rows = []
    for k in range(seeds):
        base = 1.0 + rng.normal(0, 0.1)
        for variant, ref_seed, d in (('baseline', (k + 1) % seeds, base),
                                     ('gft', (k + variant_reference_offset) % seeds, base * (1 + excess))):
            rows.append({'kind': 'reproduction', 'bench': 'toy', 'variant': variant, 'train_seed': k,
                         'reference_seed': ref_seed, 'w': 1.0, 'steps': 8, 'distance': d + rng.normal(0, 0.01)})
    return rows


def test_reproduction_is_an_equivalence_test_against_another_seed():
    cells = verdicts.synthetic_cells(np.random.default_rng(4), CELLS, 5, seed_sd=0.)
    assert verdicts.label_rates(cells, verdicts.reproduction_test).get(verdicts.REPRODUCES, 0.) >= 0.9
    at_margin = verdicts.synthetic_cells(np.random.default_rng(5), CELLS, 5, seed_sd=0.,
                                         shift=verdicts.REPRO_MARGIN / 0.05)
    assert verdicts.label_rates(at_margin, verdicts.reproduction_test).get(verdicts.REPRODUCES, 0.) <= \
        verdicts.ALPHA + SLACK
    # A tie is not "reproduces": a model 30% further than another seed, measured over few, noisy seeds.
    b = np.array([1.0, 1.3, 0.8])
    assert verdicts.reproduction_test([comparison(b * [1.3, 1.0, 1.6], b)]).label == verdicts.NOT_SHOWN
    assert verdicts.reproduction_test([comparison(b * 2, b)]).label == verdicts.DIFFERS
    # Against the next seed's standard model the rows are used; against the same seed's (the old, biased reference,
    # shared initialisation and teacher) they are not.
    assert len(verdicts.reproduction(repro_rows(1), 'toy', 'gft')) == 1
    assert verdicts.reproduction(repro_rows(0), 'toy', 'gft') == []
    assert verdicts.reproduction_test(verdicts.reproduction(repro_rows(1), 'toy', 'gft')).label == \
        verdicts.REPRODUCES
    assert verdicts.reproduction_test(verdicts.reproduction(repro_rows(1, excess=1.0), 'toy', 'gft')).label == \
        verdicts.DIFFERS


def cell_rows(variant: str, factors, seeds: int = 5) -> list[dict]:
    """Toy cells of one variant at one sampler and step count, w 1 and 2: seed k's metric is (1 + k / 10) x factor."""
    return [{'kind': 'cell', 'bench': 'toy', 'variant': variant, 'train_seed': k, 'sampler': 'euler', 'steps': 8,
             'w': w, 'w_target': w, 'nfe': 16, 'energy_w': w * (1 + k / 10) * f}
            for k, f in zip(range(seeds), factors) for w in (1.0, 2.0)]


COSTS_GRID = {'steps': [8], 'benches': {'toy': {'metric': 'energy', 'target_metric': 'energy_w', 'samplers': ['euler'],
                                                'compare_ws': [1.0, 2.0], 'mg_w': None}}}


def test_equal_flops_compares_each_objective_with_its_own_baseline():
    rows = cell_rows('gft', [1.0] * 5) + cell_rows('baseline_equal_flops', [0.5] * 5) + \
        cell_rows('baseline_flops_gft', [2.0] * 5)
    toy = COSTS_GRID['benches']['toy']

    def grid(equal_flops):
        return {**COSTS_GRID, 'benches': {'toy': {**toy, **equal_flops}}}

    own = grid({'equal_flops': {'gft': {'reference': 'baseline_flops_gft', 'ratio': 1.3}}})
    e = verdicts.cell_test(verdicts.need_comparisons(rows, own, 'toy', 'equal_flops', 'gft'))
    assert e.label == verdicts.BETTER and e.rel == pytest.approx(-0.5)          # against its own 1.3x baseline
    assert verdicts.flops_info(own, 'toy', 'gft') == {'reference': 'baseline_flops_gft', 'flop_ratio': 1.3}
    # No baseline of its own: not compared (never against another objective's FLOPs).
    only_aligned = grid({'equal_flops': {'aligned': {'reference': 'baseline_equal_flops', 'ratio': 1.9}}})
    assert verdicts.need_comparisons(rows, only_aligned, 'toy', 'equal_flops', 'gft') is None
    # Results written before the per-objective baselines keep their one baseline_equal_flops.
    old = verdicts.cell_test(verdicts.need_comparisons(rows, grid({}), 'toy', 'equal_flops', 'gft'))
    assert old.label == verdicts.WORSE and old.rel == pytest.approx(1.0)


def test_each_ablation_is_tested_against_its_shipped_setting():
    ones = [1.0] * 5
    rows = cell_rows('gft', ones) + cell_rows('gft_w2', [0.8, 0.82, 0.79, 0.81, 0.8]) + cell_rows('mg', ones) + \
        cell_rows('mg_w03', [1.2, 1.21, 1.19, 1.2, 1.22]) + cell_rows('distill', ones) + \
        cell_rows('distill_w2', [0.9, 1.1, 0.95, 1.05, 1.0])
    grid = {**COSTS_GRID, 'ablations': {'gft_w2': 'gft', 'mg_w03': 'mg', 'distill_w2': 'distill', 'aligned_w1': 'aligned'}}
    got = {t['variant']: t for t in verdicts.ablation_verdicts(rows, grid)}
    assert set(got) == {'gft_w2', 'mg_w03', 'distill_w2'}      # aligned_w1 was not run: no row
    assert {v: t['label'] for v, t in got.items()} == {'gft_w2': verdicts.BETTER, 'mg_w03': verdicts.WORSE,
                                                       'distill_w2': verdicts.NO_DIFFERENCE}
    assert got['gft_w2']['rel'] == pytest.approx(-0.196, abs=0.002) and got['gft_w2']['shipped'] == 'gft'
    assert got['mg_w03']['rel_lo'] > 0 and got['distill_w2']['rel_lo'] < 0 < got['distill_w2']['rel_hi']


def convergence_rows(excess: dict[str, float], seeds: int = 5) -> list[dict]:
    """Reproduction rows: the baseline's seed-to-seed distance and each variant's, excess[v] further, from the
    same reference seed k + 1."""
    rng = np.random.default_rng(6)
    rows = []
    for k in range(seeds):
        base = 1.0 + rng.normal(0, 0.1)
        for variant, x in {'baseline': 0.0, **excess}.items():
            rows.append({'kind': 'reproduction', 'bench': 'toy', 'variant': variant, 'train_seed': k,
                         'reference_seed': (k + 1) % seeds, 'w': 1.0, 'steps': 8,
                         'distance': base * (1 + x) + rng.normal(0, 0.01)})
    return rows


def test_training_needed_to_reproduce_follows_the_reproduction_tests():
    grid = {**COSTS_GRID, 'convergence': {'gft_x2': ['gft', 2.0], 'gft_x4': ['gft', 4.0], 'mg_x2': ['mg', 2.0]}}
    rows = convergence_rows({'gft': 1.0, 'gft_x2': 0.6, 'gft_x4': 0.0, 'mg': 1.5, 'mg_x2': 0.9, 'distill': 0.0})
    table = verdicts.convergence_verdicts(rows, grid)
    labels = {(t['objective'], t['factor']): t['label'] for t in table}
    # distill has no longer training: no curve; gft differs at x1 and x2, reproduces at x4; mg never.
    assert labels == {('gft', 1.0): verdicts.DIFFERS, ('gft', 2.0): verdicts.DIFFERS,
                      ('gft', 4.0): verdicts.REPRODUCES, ('mg', 1.0): verdicts.DIFFERS, ('mg', 2.0): verdicts.DIFFERS}
    assert [t['rel'] for t in table if t['objective'] == 'gft'] == pytest.approx([1.0, 0.6, 0.0], abs=0.03)
    assert verdicts.training_needed(table) == {('toy', 'gft'): 4.0, ('toy', 'mg'): None}
    # Reproducing at x1 but not at x2 is no stable length: needed only from where every longer length reproduces.
    flaky = verdicts.convergence_verdicts(convergence_rows({'gft': 0.0, 'gft_x2': 1.0, 'gft_x4': 0.0}), grid)
    assert [t['label'] for t in flaky] == [verdicts.REPRODUCES, verdicts.DIFFERS, verdicts.REPRODUCES]
    assert verdicts.training_needed(flaky) == {('toy', 'gft'): 4.0}
    assert verdicts.training_needed(flaky[:2]) == {('toy', 'gft'): None}
    lines = claims_report.costs_lines(rows, grid, {})
    assert '| toy | gft | **differs** +' in '\n'.join(lines) and lines[-2].endswith('| more than x2 |')
    assert any(x.startswith('| toy | gft |') and x.endswith('| x4 |') for x in lines)


def test_comparisons_refuse_unpaired_seeds():
    rows = [{'bench': 'toy', 'variant': v, 'train_seed': s, 'kind': 'cell'} for v, seeds in
            (('gft', (0, 1, 2)), ('baseline', (0, 1, 3))) for s in seeds]
    with pytest.raises(ValueError, match=r'gft has training seeds \[0, 1, 2\], baseline \[0, 1, 3\]'):
        verdicts.check_paired(rows, 'toy', 'gft', 'baseline')


def committed():
    if not isinstance(json.loads(RESULTS.read_text()), dict):
        pytest.skip('docs/claims/results.json predates the second-round benchmark')
    return claims_report.load_results(RESULTS)


def test_the_rule_on_the_committed_rows():
    # Standard CFG of seed k against seed k + 1 (identical variants): no difference; standard CFG at the grid's
    # fewest steps against the same models at its most (a planted difference): worse, on both benchmarks.
    rows, grid = committed()
    own = verdicts.rows_check(rows, grid)
    assert own['null'] and sum(e.label == verdicts.NO_DIFFERENCE for _, e in own['null']) >= 0.8 * len(own['null'])
    fewest = [(name, e) for name, e in own['planted'] if f', {min(grid["steps"])} against' in name]
    assert {name.split(',')[0] for name, _ in fewest} == set(grid['benches'])
    assert all(e.label == verdicts.WORSE for _, e in fewest), fewest


# ---------------------------------------------------------------------------------------------------------------
# Prose from numbers: parse the generated sentences back and compare them with the verdicts.

NUM = r'([+-]\d+(?:\.\d+)?(?:e[+-]\d+)?)%'


def close(printed: str, value: float) -> bool:
    """printed (percent, as claims_report.percent writes it) is value (a fraction) rounded."""
    return abs(float(printed) - 100 * value) <= (0.051 if abs(100 * value) >= 1 else 0.051 * abs(100 * value))
ITEM = re.compile(r'(aligned|gft|mg|distill|the guidance interval on standard CFG:[^;]*?|autoguidance \(sampling '
                  r'only, at equal counted NFE\):[^;]*?) ' + NUM + r' \[' + NUM
                  + ', ' + NUM + r'\]')


def sentence_disagreements(text: str, cells: dict) -> list[str]:
    """What a generated answer says that its cells' numbers do not: each 'name +x% [lo, hi]' must be the cell's
    effect, under the phrase of the cell's label; the headline must follow the labels."""
    out = []
    groups = text.split(' — ', 1)[1].split('; ')
    seen = set()
    for group in groups:
        for m in ITEM.finditer(group):
            name = 'baseline_interval' if m.group(1).startswith('the guidance') else \
                'autoguidance' if m.group(1).startswith('autoguidance') else m.group(1)
            t = cells[name]
            seen.add(name)
            for got, key in zip(m.groups()[1:], ('rel', 'rel_lo', 'rel_hi')):
                if not close(got, t[key]):
                    out.append(f'{name}: {key} {got}% vs {100 * t[key]:.3f}%')
            phrase = claims_report.PHRASES[t['label']].split(' {ref}')[0]
            if not re.sub(r'^(the guidance interval on standard CFG|autoguidance \([^)]*\)): ', '', group
                          ).startswith(phrase):
                out.append(f'{name}: label {t["label"]!r} but the sentence says {group!r}')
    if seen != set(cells):
        out.append(f'cells {sorted(set(cells) - seen)} not stated')
    head = text.split(' — ', 1)[0]
    labels = {t['label'] for v, t in cells.items() if v not in claims_report.SAMPLING_ONLY}
    if ('some' in head) != bool(labels & {verdicts.BETTER, verdicts.REPRODUCES}):
        out.append(f'headline {head!r} vs labels {sorted(labels)}')
    return out


def test_generated_answers_agree_with_the_numbers():
    rows, grid = committed()
    v = verdicts.verdicts(rows, grid)
    block = '\n'.join(claims_report.readme_block(rows, grid))
    checked = 0
    for key, what, _ in verdicts.NEEDS:
        for bench in grid['benches']:
            cells = {t['variant']: t for t in v['needs'] if t['need'] == key and t['bench'] == bench}
            if not cells:
                continue
            text = claims_report.answer(key, cells)
            assert sentence_disagreements(text, cells) == [], text
            assert f'- **{what}**, {bench}: {text}.' in block        # "how to read it" says the same
            checked += 1
            # A sentence that disagrees with the numbers is caught: a changed effect, a changed label.
            t0 = next(iter(cells.values()))
            wrong_number = text.replace(claims_report.effect_text(t0), '+99.9% [+99.0%, +99.9%]', 1)
            assert sentence_disagreements(wrong_number, cells)
            flipped = {k: {**t, 'label': verdicts.WORSE if t['label'] != verdicts.WORSE else verdicts.BETTER}
                       for k, t in cells.items()}
            assert sentence_disagreements(text, flipped) if key != 'reproduction' else True
    assert checked >= 4 * len(grid['benches'])   # every benchmark answers at least 4 needs
    # The claims table and statements carry each claim's label and effect.
    for t in v['claims']:
        assert f'**{t["label"]}** | {claims_report.effect_text(t)}' in block
    for line in claims_report.plain_statements(v['needs'], list(grid['benches'])):
        phrase = r'(better than|worse than|no difference detected from|reproduces|differs from|reproduction of CFG ' \
            r'not shown)[^"]*? '
        for m in re.finditer(phrase + NUM + r' \[' + NUM + ', ' + NUM + r'\] on "([^"]+)"', line):
            bench, name = re.match(r'- (\w+), ([^:]+):', line).groups()
            need = next(k for k, w, _ in verdicts.NEEDS if w == m.group(5))
            t = next(t for t in v['needs'] if t['bench'] == bench and t['need'] == need
                     and claims_report.NAMES[t['variant']] == name)
            assert claims_report.PHRASES[t['label']].split(' {ref}')[0] == m.group(1)
            assert close(m.group(2), t['rel'])


def test_the_rule_is_stated_with_its_numbers():
    text = '\n'.join(claims_report.rule_text(5))
    assert 'n = 5 training seeds' in text and '4 degrees of freedom, multiplier 2.78' in text
    assert f'+{verdicts.REPRO_MARGIN:.0%}' in text and 'no difference detected' in text


def test_generated_reproduction_answer_agrees_with_its_labels():
    def cell(label, rel):
        return {'label': label, 'rel': rel, 'rel_lo': rel - 0.1, 'rel_hi': rel + 0.1}

    cells = {'gft': cell(verdicts.NOT_SHOWN, 0.3), 'distill': cell(verdicts.REPRODUCES, 0.02),
             'mg': cell(verdicts.DIFFERS, 0.9)}
    text = claims_report.answer('reproduction', cells)
    assert text.startswith('some one-pass model reproduces CFG (margin: +50% over the distance between two CFG '
                           'seeds) — reproduces CFG: distill +2.0% [-8.0%, +12.0%]; ')
    assert sentence_disagreements(text, cells) == []
    assert sentence_disagreements(text, {**cells, 'distill': cell(verdicts.NOT_SHOWN, 0.02)})
    none = {'gft': cell(verdicts.NOT_SHOWN, 0.3)}
    assert claims_report.answer('reproduction', none).startswith('no one-pass model is shown to reproduce CFG')


def test_percentages_keep_small_effects_visible():
    assert claims_report.percent(-0.089) == '-8.9%' and claims_report.percent(0.0) == '+0.0%'
    assert claims_report.percent(-2.3e-5) == '-0.0023%' and close('-0.0023', -2.3e-5) and not close('-0.0030', -2.3e-5)


@pytest.mark.e2e
def test_the_statistics_import_no_torch_or_model_code():
    import subprocess
    import sys

    code = 'import sys, kdiff_align.bench.verdicts; print(sorted(m for m in ("torch", "k_diffusion") if m in sys.modules))'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == '[]', proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Sampling cost (issue 20 item 4): equal NFE by N, one-pass models and autoguidance against the guidance interval.

NFE_GRID = {'steps': [4, 8, 16], 'nfe_steps': [4, 8], 'variants': [],
            'benches': {'toy': {'ws': [0., 2.], 'samplers': ['s'], 'compare_ws': [2.], 'mg_w': None,
                                'metric': 'energy', 'claims_metric': 'energy', 'target_metric': 'energy_w'}}}


def nfe_rows(gft_gain: dict, ag_gain: float, iv_gain: float = 0.) -> list[dict]:
    """Synthetic toy cells of 5 seeds with a shared seed effect: standard CFG (2 NFE per step), the interval (1.5),
    gft (1), autoguidance (the interval's NFE, target p(x | c)). gft's energy to p_w at 2N steps is the CFG's at N
    times 1 + gft_gain[N]; at w = 2, autoguidance's energy to p(x | c) is the level at w = 0 (the same baseline model)
    times 1 + ag_gain, the interval's times 1 + iv_gain."""
    rows = []
    for s in range(5):
        u = 1 + 0.1 * [0.3, -0.5, 0.8, -0.2, 0.1][s]          # the seed effect (same-seed models)
        e = [0.004, -0.003, 0.002, -0.001, 0.0][s]             # per-model noise
        for steps in NFE_GRID['steps']:
            level = u * 8 / steps
            for w in (0., 2.):
                def row(variant, nfe, energy_w, energy, w_target=w, **extra):
                    rows.append({'bench': 'toy', 'variant': variant, 'train_seed': s, 'kind': 'cell', 'sampler': 's',
                                 'steps': steps, 'w': w, 'w_target': w_target, 'nfe': nfe, 'energy_w': energy_w,
                                 'energy': energy, **extra})
                row('baseline', steps * (2 if w else 1), level, level)
                iv = level * ((1 + iv_gain + e) if w else 1.)
                row('baseline_interval', steps * (1.5 if w else 1), level, iv)
                gain = gft_gain.get(steps // 2, 0.) + e
                row('gft', steps, 8 / (steps // 2) * u * (1 + gain), level)
                ag = level * ((1 + ag_gain + e) if w else 1.)
                row('autoguidance', steps * (1.5 if w else 1), ag, ag, w_target=0., guide_w=w)
    return rows


def test_equal_nfe_is_broken_down_by_n_with_its_counted_cost():
    # gft wins at N = 4 only: the pooled cell averages it away; one cell per N shows where (issue 20).
    rows = nfe_rows({4: -0.3, 8: 0.0}, 0.0)
    table = verdicts.nfe_verdicts(rows, NFE_GRID)
    by_n = {t['nfe_n']: t for t in table if t['family'] == 'equal_nfe_by_n' and t['variant'] == 'gft'}
    assert by_n[4]['label'] == verdicts.BETTER and by_n[4]['rel'] == pytest.approx(-0.3, abs=0.01)
    assert by_n[8]['label'] == verdicts.NO_DIFFERENCE
    # Both sides' steps and counted NFE are stated: one pass at 2N steps against CFG at N, the same total.
    assert (by_n[4]['steps'], by_n[4]['nfe'], by_n[4]['ref_steps'], by_n[4]['ref_nfe']) == (8, (8, 8), 4, (8, 8))
    assert claims_report.nfe_cell_text(by_n[4], NFE_GRID).endswith(
        '8 steps, 8 NFE (1 per step) vs CFG 4 steps, 8 NFE (2 per step)')
    # Against the interval: gft at 2N spends 2N, the interval at N counts 1.5 N (stated, never more than gft's).
    iv = {t['nfe_n']: t for t in table if t['family'] == 'vs_interval_nfe' and t['variant'] == 'gft'}
    assert iv[4]['label'] == verdicts.BETTER and iv[4]['ref_nfe'] == (6, 6) and iv[4]['nfe'] == (8, 8)
    # Labels follow the numbers: flip the planted gain and the label flips.
    flipped = verdicts.nfe_verdicts(nfe_rows({4: 0.3, 8: 0.0}, 0.0), NFE_GRID)
    assert [t['label'] for t in flipped if t['family'] == 'equal_nfe_by_n' and t['nfe_n'] == 4] == [verdicts.WORSE]


@pytest.mark.parametrize('gain, iv_gain, label', [(-0.2, 0., verdicts.BETTER), (0., -0.2, verdicts.WORSE),
                                                  (0.2, 0.2, verdicts.NO_DIFFERENCE)])
def test_autoguidance_against_the_interval_at_equal_nfe(gain, iv_gain, label):
    # Scored at each model's best w by the energy to p(x | c) (autoguidance does not aim at p_w), same steps and the
    # same counted NFE. Both grids hold w = 0, the same baseline model: when neither guidance improves on it, both
    # are at w = 0 and there is no difference; the one whose guidance gets closer to p(x | c) wins.
    table = verdicts.nfe_verdicts(nfe_rows({}, gain, iv_gain), NFE_GRID)
    ag = {t['nfe_n']: t for t in table if t['variant'] == 'autoguidance'}
    assert set(ag) == {4, 8} and all(t['family'] == 'vs_interval_nfe' for t in ag.values())
    assert all(t['label'] == label for t in ag.values())
    assert ag[4]['nfe'] == ag[4]['ref_nfe'] == (6, 6) and ag[4]['steps'] == ag[4]['ref_steps'] == 4
    if gain < 0:
        assert ag[4]['rel'] == pytest.approx(gain, abs=0.01)
    # Every generated sentence states its cell's label and effect.
    for line, t in zip(claims_report.nfe_statements(table), table):
        m = re.match(r'- toy, N = (\d+): (\S+) (.*) ' + NUM + r' \[' + NUM + ', ' + NUM + r'\] \((\d+) steps', line)
        assert m and int(m.group(1)) == t['nfe_n'] and m.group(2) == claims_report.NAMES[t['variant']], line
        assert m.group(3).startswith(claims_report.PHRASES[t['label']].split(' {ref}')[0]), line
        assert all(close(got, t[k]) for got, k in zip(m.groups()[3:6], ('rel', 'rel_lo', 'rel_hi'))), line
        assert int(m.group(7)) == t['steps']


def test_mg_is_said_to_be_one_pass_only_at_its_trained_w():
    t = {'label': verdicts.BETTER, 'rel': -0.1, 'rel_lo': -0.2, 'rel_hi': -0.05, 'better': 1, 'no_difference': 0,
         'worse': 0, 'reference': 'baseline', 'bench': 'toy', 'variant': 'mg', 'steps': 8, 'nfe': (8, 8),
         'ref_steps': 4, 'ref_nfe': (8, 8)}
    grid = {'benches': {'toy': {'mg_w': 0.45 / 0.55}}}
    assert 'mg only at its trained w = 0.818' in claims_report.nfe_cell_text(t, grid)
    assert 'trained w' not in claims_report.nfe_cell_text({**t, 'variant': 'gft'}, grid)


def test_autoguidance_stands_beside_the_interval_in_the_answer_not_among_the_objectives():
    def cell(label, rel):
        return {'label': label, 'rel': rel, 'rel_lo': rel - 0.05, 'rel_hi': rel + 0.05}

    cells = {'gft': cell(verdicts.WORSE, 0.2), 'autoguidance': cell(verdicts.BETTER, -0.3)}
    text = claims_report.answer('vs_interval', cells)
    assert text.startswith('the guidance interval is better than every objective — ')   # autoguidance is none
    assert text.endswith('; autoguidance (sampling only, at equal counted NFE): better than the guidance interval '
                         '-30.0% [-35.0%, -25.0%]')
    assert sentence_disagreements(text, cells) == []
    assert sentence_disagreements(text, {**cells, 'autoguidance': cell(verdicts.WORSE, -0.3)})
