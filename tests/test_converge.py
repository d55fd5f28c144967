"""`python -m kdiff_align.bench converge`: digits' training length by its pre-stated criterion (fed numbers with
known answers), a doubling's checkpoint equal to a separate shorter run, --quick end to end, bad input, and the
claims benchmark's accuracy levels at or below real data's."""

import json

import pytest
import torch

from helpers import ROOT
from kdiff_align.bench import claims, converge
from kdiff_align.evaluation import metrics
from kdiff_align.storage.checkpoint import load_for_inference

LENGTHS = [1000, 2000, 4000, 8000]


def test_a_curve_that_stops_changing_picks_the_first_length_within_the_fraction():
    # The reviewer's 6.46 at 1000 steps, falling, then flat from 4000: 4000 -> 8000 changes by -1.7% (< 10%).
    choice = converge.choose_length(LENGTHS, [6.46, 4.0, 3.0, 2.95])
    assert choice['chosen'] == 4000
    assert [round(c['change'], 3) for c in choice['changes']] == [-0.381, -0.25, -0.017]
    assert choice['verdict'].startswith('converged at 4000 steps')
    # A null: FD does not change with training at all -> the shortest length.
    assert converge.choose_length(LENGTHS, [3.0, 3.05, 2.98, 3.01])['chosen'] == 1000
    # A rise counts like a fall (|change|).
    assert converge.choose_length([1, 2, 4], [2.0, 2.6, 2.5])['chosen'] == 2
    assert converge.choose_length([1, 2], [2.0, 2.25])['chosen'] is None   # +12.5%


def test_a_still_falling_curve_is_not_converged_within_the_lengths_tried():
    choice = converge.choose_length(LENGTHS, [8.0, 6.0, 4.5, 3.4])
    assert choice['chosen'] is None
    assert converge.NOT_CONVERGED in choice['verdict'] and choice['verdict'].startswith(converge.NOT_CONVERGED)
    # The longest length cannot be judged: its doubling was not tried.
    assert converge.choose_length([1000, 2000], [3.0, 2.0])['chosen'] is None


def test_a_doublings_checkpoint_equals_a_separate_shorter_run(tmp_path, one_thread):
    """The converge runs stop at each doubling and resume; nothing in training depends on the end step, so the
    staged run's export at 4 steps equals a run of 4 steps, and its export at 8 equals a run straight to 8."""
    from kdiff_align.training.trainer import TrainOptions, train

    bench = claims.benches(True)['digits']
    config = claims.variant_config(bench, claims.variant_by_name()['baseline'])
    staged = [converge.train_stage(config, n, 8, 0, tmp_path / 'staged') for n in (4, 8)]
    # One run straight to 8 steps, checkpointed at 4 on the way.
    options = converge.claims_options(TrainOptions, 'long', tmp_path / 'long', 8, 8, 0)
    options.save_every = 4
    long = train(config, options)
    at4 = long.run_dir / 'checkpoints' / '00000004.pth'
    for stage, other in zip(staged, (at4, long.export)):
        _, a = load_for_inference(stage['export'])
        _, b = load_for_inference(other)
        assert a.keys() == b.keys() and len(a) > 10
        assert all(torch.equal(a[k], b[k]) for k in a), f'{stage["length"]} steps: staged != separate run'
    # And the lr schedule really matters here: the step-4 and step-8 weights differ.
    _, a4 = load_for_inference(staged[0]['export'])
    _, a8 = load_for_inference(staged[1]['export'])
    assert any(not torch.equal(a4[k], a8[k]) for k in a4)
    assert staged[1]['train_seconds'] >= staged[0]['train_seconds'] > 0


def test_quick_writes_the_criterion_the_table_and_the_choice(tmp_path, one_thread, capsys):
    out = tmp_path / 'out'
    assert converge.main(['--quick', '--out', str(out), '--work', str(tmp_path / 'work')]) == 0
    result = json.loads((out / 'convergence.json').read_text())
    lengths = list(converge.QUICK_LENGTHS)
    assert result['criterion']['lengths'] == lengths and result['criterion']['fraction'] == converge.FRACTION
    assert [s['length'] for s in result['lengths']] == lengths
    # Every length x seed x w evaluated once, on the claims evaluation's n (the held-out labels).
    assert sorted((r['length'], r['seed'], r['w']) for r in result['rows']) == \
        sorted((n, s, w) for n in lengths for s in range(converge.SEEDS) for w in (0., 1.))
    assert {r['n'] for r in result['rows']} == {result['real']['n_test']} == {445}
    # The choice is the criterion applied to the table's means.
    means = [s['w0']['fd'] for s in result['lengths']]
    assert result['choice'] == converge.choose_length(lengths, means)
    md = (out / 'convergence.md').read_text()
    assert 'Criterion (stated before the run' in md and result['choice']['verdict'] in md
    assert f'accuracy {result["real"]["accuracy_real"]:.4f}' in md
    assert result['choice']['verdict'] in capsys.readouterr().out


@pytest.mark.parametrize('flags', [['--lengths', '1000', '3000'], ['--lengths', '1000'], ['--seeds', '0']])
def test_bad_input_is_one_line_and_exit_2(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        converge.main(flags + ['--out', str(tmp_path), '--work', str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'Traceback' not in err and ('--lengths' in err or '--seeds' in err)
    assert not (tmp_path / 'convergence.json').exists()


def test_accuracy_levels_are_at_or_below_real_datas():
    """FD at matched accuracy compares models at levels real digits reach: the same classifier on the held-out
    real split (0.9888); 0.99 was above it."""
    real = metrics.digits_reference(0)['accuracy_real']
    assert 0.98 < real < 0.99
    assert all(level <= real for level in claims.ACCURACY_LEVELS)
    assert claims.make_plan(False, ['digits']).accuracy_levels == claims.ACCURACY_LEVELS


def test_the_claims_benchmark_trains_digits_for_the_committed_chosen_length():
    """claims.DIGITS_STEPS is the length the committed `bench converge` run chose by its criterion."""
    chosen = json.loads((ROOT / 'docs' / 'claims' / 'convergence.json').read_text())['choice']['chosen']
    assert claims.DIGITS_STEPS == chosen == claims.benches(False)['digits'].steps
