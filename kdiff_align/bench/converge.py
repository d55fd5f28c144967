"""Digits' training length, by a criterion stated before the run: `python -m kdiff_align.bench converge
[--quick] [--out docs/claims]`.

The criterion (fixed before any number was seen; docs/evidence.md, "Digits' training length"): the training length
L is the shortest of LENGTHS whose standard CFG model (configs/digits_baseline.json, the claims benchmark's batch
of 64) has a Fréchet distance at w = 0 (dpmpp_2m, 32 steps, the claims evaluation's n: the 445 held-out labels,
noise seed 0) that changes by less than FRACTION (10%) of its value when the training steps double (L -> 2L),
for the mean over SEEDS (2) training seeds. No such L among the lengths tried: "not converged within the lengths
tried". w = 1 and the class accuracy are reported for context only.

Each seed is one run, trained to the longest length and stopped at each doubling (the engine's exact resume,
tests/test_train.py::test_resume_equals_an_uninterrupted_run): its checkpoint at L IS a separate run of L steps,
because nothing in training depends on the end step (the LR schedule is a function of the step alone,
kdiff_align.training.schedulers.lr_multiplier; EMAWarmup's decay of its own step count; the data order of the seed
and the batches seen, kdiff_align.data.batches; --end-step only stops the loop). tests/test_converge.py checks it.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..env import cli_defaults
cli_defaults()  # before k-diffusion is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..evaluation import evaluate  # noqa: E402
from . import claims  # noqa: E402

# The criterion, written before the run.
FRACTION = 0.10                     # |FD(2L) - FD(L)| / FD(L) below this: converged at L
LENGTHS = (1000, 2000, 4000, 8000)  # 1000 x 2^k training steps
SEEDS = 2                           # training seeds; the criterion uses their mean FD
CELL = evaluate.Cell(evaluate.DETERMINISTIC_SAMPLER, 32, 0.)
CONTEXT_WS = (1.,)                  # also evaluated, for context (not part of the criterion)
NOT_CONVERGED = 'not converged within the lengths tried'
# --quick: tiny models (claims' QUICK overrides), few steps; exercises every path, says nothing about digits.
QUICK_LENGTHS = (10, 20, 40)
QUICK_CELL = evaluate.Cell(evaluate.DETERMINISTIC_SAMPLER, 4, 0.)


def choose_length(lengths: Sequence[int], fd: Sequence[float], fraction: float = FRACTION) -> dict[str, Any]:
    """The criterion applied to the mean FD per length: the shortest L whose FD changes by less than `fraction`
    when the steps double (2L must be among the lengths). Returns {'chosen': L or None, 'changes': [{length,
    doubled, change}], 'verdict': a sentence}."""
    if len(lengths) != len(fd) or not lengths:
        raise ValueError(f'choose_length: {len(lengths)} lengths and {len(fd)} FD values; need one FD per length')
    at = dict(zip(lengths, fd))
    changes = [{'length': L, 'doubled': 2 * L, 'change': (at[2 * L] - at[L]) / at[L]}
               for L in lengths if 2 * L in at]
    chosen = next((c['length'] for c in changes if abs(c['change']) < fraction), None)
    if chosen is None:
        verdict = (f'{NOT_CONVERGED} ({", ".join(map(str, lengths))}): FD at w = 0 still changes by '
                   f'{fraction:.0%} or more at every doubling')
    else:
        change = next(c['change'] for c in changes if c['length'] == chosen)
        verdict = (f'converged at {chosen} steps: FD at w = 0 changes by {change:+.1%} from {chosen} to '
                   f'{2 * chosen} steps (|change| < {fraction:.0%})')
    return {'chosen': chosen, 'changes': changes, 'verdict': verdict}


def doublings(lengths: Sequence[int]) -> str | None:
    """None when lengths are increasing and each is twice the one before; else what is wrong."""
    if len(lengths) < 2 or any(b != 2 * a for a, b in zip(lengths, lengths[1:])) or lengths[0] < 1:
        return f'--lengths must be >= 2 positive step counts, each twice the one before (e.g. 1000 2000 4000), got ' \
               f'{" ".join(map(str, lengths))}'
    return None


def train_stage(config: Mapping[str, Any], length: int, batch_size: int, seed: int, work: Path) -> dict[str, Any]:
    """The seed's one run, trained on to `length` (resumed from its run folder, then stopped: checkpoint + EMA
    export), its export copied to runs/<name>/at/<length>.safetensors; a length already exported is reused.
    train_seconds: the run's training seconds up to `length` (its stages summed)."""
    from ..training.trainer import TrainOptions, train

    name = f'baseline-seed{seed}'
    run_dir = work / 'runs' / name
    kept = run_dir / 'at' / f'{length}.safetensors'
    if not kept.exists():
        result = train(config, claims_options(TrainOptions, name, work, batch_size, length, seed))
        if result.step != length:
            raise RuntimeError(f'{run_dir} is at step {result.step}, not {length}: use a fresh --work')
        kept.parent.mkdir(exist_ok=True)
        shutil.copyfile(run_dir / f'{name}.safetensors', kept)
        kept.with_suffix('.json').write_text(json.dumps({'seconds': result.seconds, 'step': result.step}))
    timings = [json.loads(f.read_text()) for f in (run_dir / 'at').glob('*.json')]
    total = sum(t['seconds'] for t in timings if t['step'] <= length)
    return {'seed': seed, 'length': length, 'export': kept, 'train_seconds': total}


def claims_options(cls: type, name: str, work: Path, batch_size: int, end_step: int, seed: int) -> Any:
    """The TrainOptions of the claims benchmark's runs (claims.train_model), to end_step."""
    return cls(name=name, out_dir=str(work / 'runs'), batch_size=batch_size, end_step=end_step, seed=seed,
               demo_every=0, sample_n=0, save_every=0, num_workers=0, log_every=end_step, progress=False)


COMMITTED = Path(__file__).resolve().parents[2] / 'docs' / 'claims'   # the committed full claims run


def implied_claims_minutes(length: int, seeds: int = 5, workers: int = 2, run_dir: Path = COMMITTED
                           ) -> dict[str, float] | None:
    """The full claims run's wall minutes if digits trained `length` steps, scaled from the committed run
    (docs/claims/run.json + results.json: its compute seconds per part, digits training in proportion to its steps,
    everything in proportion to the seeds, divided over the workers). None if the committed run is absent."""
    try:
        run = json.loads((run_dir / 'run.json').read_text())
        rows = json.loads((run_dir / 'results.json').read_text())['rows']
    except (OSError, ValueError, KeyError):
        return None
    digits_train = sum(j['train_seconds'] for j in run['jobs'] if j['job']['bench'] == 'digits')
    digits_steps = max(j['train_steps'] for j in run['jobs'] if j['job']['bench'] == 'digits' and
                       j['job']['variant'] == 'baseline')
    rest = sum(j['train_seconds'] for j in run['jobs'] if j['job']['bench'] != 'digits') + \
        sum(r.get('seconds', 0) for r in rows)
    scale = seeds / len(run['seeds'])
    return {'minutes': (digits_train * length / digits_steps + rest) * scale / workers / 60,
            'committed_seeds': len(run['seeds']), 'committed_digits_steps': digits_steps,
            'committed_wall_minutes': float(run['wall_text'].split('wall time ')[1].split(' min')[0])
            if 'wall time ' in run.get('wall_text', '') else run['wall_minutes']}


def measure(quick: bool, lengths: Sequence[int], seeds: int, work: Path) -> dict[str, Any]:
    """Trains the stages of every seed and evaluates each at CELL and the context ws; returns the rows."""
    from ..storage.checkpoint import load_for_inference
    from ..config import load_config

    bench = claims.benches(quick)['digits']
    config = claims.variant_config(bench, claims.variant_by_name()['baseline'])
    cell = QUICK_CELL if quick else CELL
    cells = [cell] + [evaluate.Cell(cell.sampler, cell.steps, w) for w in CONTEXT_WS]
    task = evaluate.make_task(config, None, seed=0)
    rows = []
    for length in lengths:   # every seed at one length before the next: a stopped run has whole lengths
        for seed in range(seeds):
            stage = train_stage(config, length, bench.batch_size, seed, work)
            stored, state = load_for_inference(stage['export'])
            stored = load_config(stored)
            name = f'baseline-seed{seed}-{stage["length"]}'
            result = evaluate.run_sweep({name: (stored, evaluate.build_denoiser(stored, state))}, cells, task, work,
                                        seed=0, batch_size=1000, progress=False)
            for r in result.rows:
                rows.append({'seed': seed, 'length': stage['length'], 'w': r['w'], 'fd': r['fd'],
                             'accuracy': r['accuracy'], 'fd_floor': r['fd_floor'],
                             'accuracy_real': r['accuracy_real'], 'sampler': r['sampler'], 'steps': r['steps'],
                             'n': r['n'], 'train_seconds': stage['train_seconds'], 'eval_seconds': r['seconds']})
    return {'rows': rows, 'cell': cell, 'batch_size': bench.batch_size, 'config': config}


def summarise(rows: Sequence[Mapping[str, Any]], lengths: Sequence[int], cell: evaluate.Cell) -> list[dict[str, Any]]:
    """Per length: the mean (and per-seed values) of FD and accuracy at each w, and training seconds per model."""
    out = []
    for L in lengths:
        at = [r for r in rows if r['length'] == L]
        entry: dict[str, Any] = {'length': L, 'train_seconds': float(np.mean([r['train_seconds'] for r in at
                                                                               if r['w'] == cell.w]))}
        for w in sorted({r['w'] for r in at}):
            sel = sorted((r for r in at if r['w'] == w), key=lambda r: r['seed'])
            entry[f'w{w:g}'] = {'fd': float(np.mean([r['fd'] for r in sel])), 'fd_seeds': [r['fd'] for r in sel],
                                'accuracy': float(np.mean([r['accuracy'] for r in sel]))}
        out.append(entry)
    return out


def markdown(result: Mapping[str, Any]) -> str:
    """convergence.md: the criterion, the table, the choice and what it costs."""
    c, meta = result['criterion'], result['meta']
    ws = sorted({k for s in result['lengths'] for k in s if k.startswith('w')}, key=lambda k: float(k[1:]))
    lines = [
        "# Digits' training length (standard CFG, FD at w = 0 over training length)", '',
        f'Criterion (stated before the run; `kdiff_align/bench/converge.py`): {c["text"]}', '',
        f'Command: `{meta["command"]}`; commit {meta["commit"]}; seeds {meta["seeds"]}; batch {result["batch_size"]}; '
        f'{meta["machine"]}, {meta["threads"]} thread; training and evaluation {meta["compute_minutes"]:.1f} min '
        f'(measured per stage and cell; this invocation\'s wall time {meta["wall_minutes"]:.1f} min, reusing finished '
        f'stages and cells in the work folder). Real data with the '
        f'same classifier (the held-out split, n = {result["real"]["n_test"]}): accuracy '
        f'{result["real"]["accuracy_real"]:.4f}, FD floor {result["real"]["fd_floor"]:.3f}.', '',
        '| training steps | ' + ' | '.join(f'FD at w = {k[1:]} (mean; per seed) | accuracy at w = {k[1:]}' for k in ws)
        + ' | FD change to 2x steps | training s per model |',
        '|---|' + '---|---|' * len(ws) + '---|---|']
    changes = {ch['length']: ch['change'] for ch in result['choice']['changes']}
    for s in result['lengths']:
        cells = ' | '.join(f'{s[k]["fd"]:.3f} ({", ".join(f"{v:.3f}" for v in s[k]["fd_seeds"])}) | '
                           f'{s[k]["accuracy"]:.4f}' for k in ws)
        change = f'{changes[s["length"]]:+.1%}' if s['length'] in changes else '–'
        lines.append(f'| {s["length"]} | {cells} | {change} | {s["train_seconds"]:.0f} |')
    lines += ['', f'**Result: {result["choice"]["verdict"]}.**', '']
    if meta['quick']:
        lines += ['--quick: tiny models and lengths; this exercises the command and says nothing about digits.', '']
    for cost in result['costs']:
        implied = cost['implied']
        text = f'- At {cost["length"]} steps: {cost["train_seconds"]:.0f} s of training per digits model (1 thread)'
        if implied:
            text += (f'; the full claims run at 5 seeds on 2 cores would take about {implied["minutes"]:.0f} min '
                     f'(scaled from the committed run: {implied["committed_wall_minutes"]:.1f} min at '
                     f'{implied["committed_seeds"]} seeds with digits at {implied["committed_digits_steps"]} steps, '
                     'its variants; digits training in proportion to its steps)')
        lines.append(text + '.')
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
    from ..evaluation import metrics

    p = claims.bench_parser('converge', __doc__, 'tiny models and lengths (for tests)',
                            'where convergence.json and .md go')
    p.add_argument('--lengths', type=int, nargs='+', default=None, help=f'training lengths, each twice the one '
                   f'before (default {" ".join(map(str, LENGTHS))}; --quick {" ".join(map(str, QUICK_LENGTHS))})')
    p.add_argument('--seeds', type=int, default=SEEDS, help='training seeds')
    p.add_argument('--threads', type=int, default=1, help='torch threads')
    args = p.parse_args(argv)
    lengths = args.lengths or list(QUICK_LENGTHS if args.quick else LENGTHS)
    problem = doublings(lengths)
    if problem:
        p.error(problem)
    if args.seeds < 1 or args.threads < 1:
        p.error(f'--seeds and --threads must be >= 1, got {args.seeds} and {args.threads}')
    work = claims.work_dir(args, 'converge')
    torch.set_num_threads(args.threads)
    commit = claims.git_commit()   # the code that runs (taken before, not after)
    start = time.time()
    measured = measure(args.quick, lengths, args.seeds, work)
    cell = measured['cell']
    summary = summarise(measured['rows'], lengths, cell)
    choice = choose_length(lengths, [s[f'w{cell.w:g}']['fd'] for s in summary])
    ref = metrics.digits_reference(0)
    text = (f'the training length L is the shortest of {", ".join(map(str, lengths))} for which standard CFG\'s FD '
            f'at w = {cell.w:g} ({cell.sampler}, {cell.steps} steps, n = {measured["rows"][0]["n"]} held-out labels) '
            f'changes by less than {FRACTION:.0%} when the steps double, for the mean over {args.seeds} seeds; '
            f'otherwise "{NOT_CONVERGED}".')
    by_length = {s['length']: s for s in summary}
    shown = [choice['chosen']] if choice['chosen'] is not None else []
    shown += [L for L in lengths if L not in shown]
    costs = [{'length': L, 'train_seconds': by_length[L]['train_seconds'],
              'implied': None if args.quick else implied_claims_minutes(L)} for L in shown]
    meta = {'command': 'python -m kdiff_align.bench converge ' + ' '.join(argv if argv is not None else sys.argv[2:]),
            'commit': commit, 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'machine': f'{platform.machine()} CPU, torch {torch.__version__}', 'threads': args.threads,
            'seeds': list(range(args.seeds)), 'quick': args.quick, 'wall_minutes': (time.time() - start) / 60,
            'compute_minutes': (sum(by_length[lengths[-1]]['train_seconds'] for _ in range(args.seeds))
                                + sum(r['eval_seconds'] for r in measured['rows'])) / 60}
    result = {'criterion': {'fraction': FRACTION, 'lengths': lengths, 'cell': cell.key, 'seeds': args.seeds,
                            'text': text},
              'real': {k: ref[k] for k in ('accuracy_real', 'fd_floor', 'n_test', 'n_train')},
              'batch_size': measured['batch_size'], 'lengths': summary, 'choice': choice, 'costs': costs,
              'rows': measured['rows'], 'meta': meta}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'convergence.json').write_text(json.dumps(result, indent=1) + '\n')
    (args.out / 'convergence.md').write_text(markdown(result))
    print(f'{choice["verdict"]}; wrote {args.out / "convergence.md"} ({meta["wall_minutes"]:.1f} min)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
