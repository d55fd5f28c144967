"""The claims benchmark: `python -m kdiff_align.bench claims [--quick] [--out docs/claims]`.

Ranks every training objective the package offers (aligned, gft, mg, distill; docs/design.md section 6) against
standard CFG on the toy 2-D mixture and on scikit-learn's digits, 5 training seeds each, every model trained from
a shipped config (configs/<bench>_<kind>.json) plus named overrides through kdiff_align.training.trainer. Variants:

- baseline: standard CFG (w_train = 0, condition dropout);
- baseline_interval: the baseline models sampled with a guidance interval (no retraining: the cheap fix);
- aligned, gft, mg, distill: the shipped objectives (distill's teacher: the baseline model of the same seed);
- baseline_equal_flops, baseline_flops_<objective>: standard CFG trained for each objective's counted training FLOPs
  (aligned's; gft's, mg's; distill's including its teacher's), one model per distinct ratio;
- aligned_w1, gft_w2, mg_w03, distill_w2 (toy): one ablation of each objective's own knob against its shipped setting;
- <objective>_x2, _x4 (toy): the one-pass objectives trained 2x and 4x longer (their reproduction of CFG only).
- autoguidance_guide: a guide per seed (standard CFG, half the width / channels, a quarter of the steps, same seed);
- autoguidance: the baseline models guided by the guide of the same seed (AutoGuidedDenoiser, 2 NFE per guided step,
  the guidance interval of baseline_interval), compared with the interval at equal counted NFE.

Every model is evaluated on w x steps x samplers (kdiff_align.evaluation.evaluate's resumable sweep: each cell's network
evaluations counted, each toy cell scored against the exact guided target p_w) and, for the one-pass models and the
baseline, at the reproduction step count with every sample kept. kdiff_align.bench.verdicts turns the rows into verdicts
with one pre-stated rule; kdiff_align.bench.claims_report writes docs/claims/report.md, comparisons.md, results.json and
the plots, and the verdict block of docs/evidence.md. Everything is deterministic given the seeds and the thread count.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..env import HelpFormatter, cli_defaults
cli_defaults()  # before k-diffusion is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..evaluation import evaluate
from ..core import registry  # noqa: E402
from ..storage.checkpoint import load_for_inference  # noqa: E402
from ..config import align_section, load_config, mg_effective_w, w_range  # noqa: E402
from ..config.shipped import CONFIGS  # noqa: E402
from .verdicts import Comparison, matched_w, verdict  # noqa: E402,F401 (re-exported)

W_GRID = (0., 0.5, 1., 2., 4., 8.)
DIGITS_W_GRID = (0., 0.5, 1., 2., 4.)   # digits: class accuracy saturates by w = 2 (first round)
COMPARE_WS = (0.5, 1., 2., 4.)      # guided targets every objective can sample (gft / distill: w in [0, 4])
STEPS_GRID = (4, 8, 16, 32)
NFE_STEPS = (4, 8, 16)              # equal NFE: one pass at 2N steps against CFG at N
REPRO_STEPS = 64
SAMPLERS = (evaluate.DETERMINISTIC_SAMPLER, evaluate.STOCHASTIC_SAMPLER)
DIGITS_STEPS = 4000   # standard CFG's FD at w = 0 changes by < 10% when steps double (docs/claims/convergence.md)
ACCURACY_LEVELS = (0.95, 0.98)      # digits: FD at matched class accuracy; at or below real data's 0.9888 (converge.py)
# A guidance interval for standard CFG: Kynkaenniemi et al. 2024's (0.28, 5.42] for EDM2 at sigma_data 0.5, in units
# of sigma_data, so that it covers the same part of the noise schedule on both benchmarks.
INTERVAL = (0.28 / 0.5, 5.42 / 0.5)

# Every variant's named overrides of its benchmark. The toy's classes overlap more than the shipped mixture's
# (std 0.5, not 0.25): at 0.25 neighbouring components are about 6 standard deviations apart, so the guided target
# p_w(x | c) hardly differs from p(x | c) (population energy distance below 1e-5 for w <= 4); at 0.5 it is 0.0013 at
# w = 0.5 and 0.015 at w = 4 (kdiff_align.evaluation.tilted.population_energy; the report says at which w that is
# distinguishable at the benchmark's n).
BENCH = {'toy': {'dataset.std': 0.5}, 'digits': {}}
# --quick's named overrides: smaller networks, nothing else.
QUICK = {'toy': {'model.width': 64},
         'digits': {'model.mapping_out': 16, 'model.depths': [1, 1], 'model.channels': [8, 16]}}


def bench_overrides(bench: str, quick: bool) -> dict[str, Any]:
    """The named overrides every variant of a benchmark has (BENCH, and QUICK's with --quick)."""
    return {**BENCH[bench], **(QUICK[bench] if quick else {})}


def override(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """config with {"section.key": value} overrides applied (a copy)."""
    config = copy.deepcopy(dict(config))
    for dotted, value in overrides.items():
        *path, key = dotted.split('.')
        node = config
        for part in path:
            node = node.setdefault(part, {})
        node[key] = copy.deepcopy(value)
    return config


def differences(a: Any, b: Any, prefix: str = '') -> set[str]:
    """The dotted keys whose values differ between two configs."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return {d for key in set(a) | set(b) for d in differences(a.get(key), b.get(key), f'{prefix}{key}.')}
    return set() if a == b else {prefix[:-1]}


def shipped_config(bench: str, kind: str, quick: bool = False) -> dict[str, Any]:
    """configs/<bench>_<kind>.json (kind: baseline | aligned | gft | mg | distill), with --quick's named overrides."""
    raw = json.loads((CONFIGS / f'{bench}_{kind}.json').read_text())
    return load_config(override(raw, bench_overrides(bench, quick)))


def toy_config(quick: bool = False) -> dict[str, Any]:
    return shipped_config('toy', 'aligned', quick)


def digits_config(quick: bool = False) -> dict[str, Any]:
    return shipped_config('digits', 'aligned', quick)


def flop_ratio(config: Mapping[str, Any]) -> float:
    """Training FLOPs per step relative to standard CFG at the same batch, at uncond_prob p (docs/design.md sections
    4 and 6): aligned 2 - p ((4 - p) / 3 with stop-gradient), gft (4 - p) / 3, mg and distill (5 - 2p) / 3."""
    align = align_section(config)
    return registry.of(align).flop_ratio(align)


@dataclass(frozen=True)
class Variant:
    name: str
    config: str                       # the shipped config it starts from: baseline | aligned | gft | mg | distill
    overrides: Mapping[str, Any]      # its named overrides, {"section.key": value}; '{teacher}' is filled per job
    role: str = 'ablation'            # baseline | interval | objective | equal_flops | ablation | convergence
    description: str = ''
    steps_factor: float = 1.0         # training steps relative to the bench's (equal_flops: from flops_of instead)
    model_of: str | None = None       # sample this variant's trained model (interval: 'baseline'); None: its own
    needs: tuple[str, ...] = ()       # variants of the same bench and seed that must finish first
    flops_of: str | None = None       # equal_flops: the objective whose counted training FLOPs it trains for
    ablates: str | None = None        # ablation: the shipped variant whose knob it changes
    benches: tuple[str, ...] = ('toy', 'digits')    # the benchmarks it runs on
    quick_benches: tuple[str, ...] | None = None     # with --quick (None: benches)

    def runs_on(self, bench: str, quick: bool) -> bool:
        return bench in (self.benches if not quick or self.quick_benches is None else self.quick_benches)


TEACHER = '{teacher}'   # distill's align.teacher: the export of the baseline model of the same bench and seed
HALF = '{half}'         # a guide's network size: half the bench's value of the key (a key the bench lacks: unset)
GUIDE_STEPS = 0.25      # the guide's training steps, as a fraction of the baseline's


def variants() -> list[Variant]:
    return [
        Variant('baseline', 'baseline', {}, 'baseline', 'standard CFG training: the shipped <bench>_baseline.json '
                '(w_train = 0, condition dropout 0.1)'),
        Variant('baseline_interval', 'baseline', {'align.sigma_interval': list(INTERVAL)}, 'interval',
                'the baseline models, sampled with guidance only for sigma / sigma_data in [0.56, 10.84] '
                '(Kynkäänniemi et al. 2024\'s interval; no retraining)', model_of='baseline', needs=('baseline',)),
        Variant('aligned', 'aligned', {}, 'objective', 'the shipped <bench>_aligned.json (w_train = 2, full '
                'gradient, anchor 0.1, mix 1; two-pass sampling)'),
        Variant('gft', 'gft', {}, 'objective', 'the shipped <bench>_gft.json (guidance-free training, w ~ U[0, 4] '
                'told to the network; one pass)'),
        Variant('mg', 'mg', {}, 'objective', 'the shipped <bench>_mg.json (model-guidance, w = 0.45 against the EMA '
                'teacher after 200 warm-up steps; one pass at w = 0.45 / 0.55 = 0.82, CFG on top elsewhere)'),
        Variant('distill', 'distill', {'align.teacher': TEACHER}, 'objective', 'the shipped <bench>_distill.json '
                '(guidance distillation, w ~ U[0, 4] told to the student; one pass) with the baseline model of the '
                'same seed as teacher', needs=('baseline',)),
        Variant('baseline_equal_flops', 'baseline', {}, 'equal_flops', 'standard CFG trained for aligned\'s '
                'training FLOPs (the most expensive per step)', flops_of='aligned'),
        Variant('aligned_w1', 'aligned', {'align.w_train': 1.0}, 'ablation', 'aligned with w_train = 1 (the '
                'first round\'s default; the ablation behind the shipped w_train = 2)', ablates='aligned',
                benches=ABLATION_BENCHES),
        # issue 20 items 1 and 4 (sampling cost): autoguidance as a baseline beside the guidance interval.
        Variant('autoguidance_guide', 'baseline', {'model.width': HALF, 'model.channels': HALF}, 'guide',
                'the autoguidance guide (Karras et al. 2024: a smaller, shorter-trained model of the same task): '
                'standard CFG training with half the width / channels for a quarter of the baseline\'s steps, same '
                'seed (the shipped lr and EMA schedules and the data order depend only on the step and the seed, '
                'not on the end step, so without the smaller network it would be the baseline run\'s EMA snapshot '
                'at that step); not evaluated on '
                'its own; its training FLOPs are this variant\'s', steps_factor=GUIDE_STEPS),
        Variant('autoguidance', 'baseline', {'align.sigma_interval': list(INTERVAL)}, 'autoguidance',
                'the baseline models guided by the guide of the same seed, D_main + w (D_main - D_guide) '
                '(AutoGuidedDenoiser), over the bench\'s w grid, with the guidance interval of baseline_interval '
                '(so that at equal steps its counted NFE equals the interval\'s: 2 per step inside the interval, '
                '1 outside); costs the guide\'s training besides', model_of='baseline',
                needs=('baseline', 'autoguidance_guide')),
        *costs_variants(),
    ]


def costs_variants() -> list[Variant]:
    """Issue 20 item 4 (costs) and item 6: a standard-CFG baseline at each objective's counted training FLOPs, one
    ablation of each objective's own knob (aligned's is aligned_w1), and the one-pass objectives trained 2x and 4x
    longer on the toy (the convergence of their reproduction of CFG)."""
    one_pass = [o for o in registry.names() if registry.get(o).one_pass]    # gft, mg, distill
    frozen = {o: registry.get(o).teacher == 'frozen' for o in one_pass}    # distill: the baseline as its teacher
    out = [Variant(f'baseline_flops_{o}', 'baseline', {}, 'equal_flops', f'standard CFG trained for {o}\'s '
                   'counted training FLOPs' + (' (its teacher\'s training included)' if frozen[o] else ''),
                   flops_of=o, benches=FLOPS_BENCHES, quick_benches=('toy',)) for o in one_pass]
    half = {'type': 'uniform', 'min_value': 0.0, 'max_value': 2.0}
    out += [Variant('gft_w2', 'gft', {'align.w_train': half}, 'ablation', 'gft with w ~ U[0, 2] (shipped: U[0, 4])',
                    ablates='gft', benches=ABLATION_BENCHES, quick_benches=()),
            Variant('mg_w03', 'mg', {'align.w_train': 0.3}, 'ablation', 'mg with w = 0.3 (shipped: 0.45; one pass '
                    'at 0.3 / 0.7 = 0.43)', ablates='mg', benches=ABLATION_BENCHES, quick_benches=()),
            Variant('distill_w2', 'distill', {'align.teacher': TEACHER, 'align.w_train': half}, 'ablation',
                    'distill with w ~ U[0, 2] (shipped: U[0, 4])', needs=('baseline',), ablates='distill',
                    benches=ABLATION_BENCHES, quick_benches=())]
    for i, o in enumerate(one_pass):   # --quick trains only the first one's x2 (the code path, cheaply)
        teacher = {'align.teacher': TEACHER} if frozen[o] else {}
        out += [Variant(f'{o}_x{f}', o, teacher, 'convergence', f'{o} trained {f}x the bench\'s steps (its '
                        'reproduction of CFG only)', steps_factor=float(f), needs=('baseline',) if teacher else (),
                        benches=('toy',), quick_benches=('toy',) if (i, f) == (0, 2) else ())
                for f in CONVERGENCE_FACTORS[1:]]
    return out


CONVERGENCE_FACTORS = (1, 2, 4)   # training lengths of the convergence curve, x the bench's steps
# The knob ablations run on the toy only: on digits they would add about 3 x 5 models of 200 s (training and
# evaluation) to the 120-minute budget; every objective gets the same one alternative on the same benchmark.
ABLATION_BENCHES = ('toy',)
# The per-objective equal-FLOPs baselines: the toy only. On digits at DIGITS_STEPS they would train 1.3 + 1.6 + 2.6 = 5.5
# baseline lengths more per seed (about 30 worker-minutes with their evaluations; 150 over 5 seeds), beyond the 2-core
# budget; digits keeps aligned's (baseline_equal_flops).
FLOPS_BENCHES = ('toy',)


def variant_by_name() -> dict[str, Variant]:
    return {v.name: v for v in variants()}


@dataclass(frozen=True)
class Bench:
    name: str
    quick: bool
    steps: int
    batch_size: int
    metric: str              # primary metric, lower is better
    n: int | None            # samples per cell (None: the task's default)
    ws: tuple = W_GRID       # the sampling w grid (aligned adds its matched w, mg its one-pass w)
    samplers: tuple = SAMPLERS

    @property
    def config(self) -> dict[str, Any]:
        """The aligned config (what the report describes)."""
        return shipped_config(self.name, 'aligned', self.quick)

    @property
    def overrides(self) -> dict[str, Any]:
        return bench_overrides(self.name, self.quick)


def benches(quick: bool) -> dict[str, Bench]:
    """The two benchmarks. The toy runs the whole grid; digits, whose shipped U-Net costs about 0.07 s per training
    step and 0.3 s per CFG sampling step of 445 images on one core, trains DIGITS_STEPS (the length `bench converge`
    chose by its criterion stated before the run, docs/claims/convergence.md) and is evaluated with dpmpp_2m on w <= 4.
    The full run's time on 2 CPU cores is measured in docs/evidence.md."""
    if quick:
        return {'toy': Bench('toy', True, 40, 64, 'energy', 200, (0., 2.)),
                'digits': Bench('digits', True, 10, 16, 'fd', None, (0., 2.))}
    return {'toy': Bench('toy', False, 2000, 256, 'energy', 2000),
            'digits': Bench('digits', False, DIGITS_STEPS, 64, 'fd', None, DIGITS_W_GRID, SAMPLERS[:1])}


def variant_config(bench: Bench, variant: Variant, teacher: str | None = None) -> dict[str, Any]:
    """The config a variant trains or samples: its shipped config, --quick's overrides and its own named overrides
    (teacher fills distill's '{teacher}')."""
    named = {k: ((teacher or 'runs/<bench>/baseline-seed<k>') if v == TEACHER else v)
             for k, v in variant.overrides.items()}
    config = shipped_config(bench.name, variant.config, bench.quick)
    named = {k: v if v != HALF else _half(config, k) for k, v in named.items()
             if v != HALF or _half(config, k) is not None}
    return load_config(override(config, named))


def _half(config: Mapping[str, Any], dotted: str) -> Any:
    """Half of config's value at a dotted key (a number, or each number of a list; at least 1); None if unset."""
    section, key = dotted.split('.')
    value = config.get(section, {}).get(key)
    if value is None:
        return None
    return [max(1, v // 2) for v in value] if isinstance(value, list) else max(1, value // 2)


def counted_flop_ratio(bench: Bench, objective: str) -> float:
    """An objective variant's training FLOPs relative to standard CFG trained for the bench's steps: its steps factor
    x its FLOPs per step, plus its teacher's training when it distils a baseline model (distill: 1 + (5 - 2p) / 3)."""
    v = variant_by_name()[objective]
    teacher = 1.0 if TEACHER in v.overrides.values() else 0.0
    return v.steps_factor * flop_ratio(variant_config(bench, v)) + teacher


def equal_flops_plan(bench: Bench, chosen: Sequence[str]) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """({objective: {'reference': the baseline it is compared with at equal training FLOPs, 'ratio': its counted FLOP
    ratio}}, {equal-FLOPs variant: the steps factor it trains for}): one model per distinct ratio, reused by every
    objective of that ratio (a ratio of 1 is the baseline itself)."""
    refs: dict[str, dict[str, Any]] = {}
    trained = {'baseline': 1.0}
    for v in variants():
        if v.role != 'equal_flops' or v.name not in chosen or v.flops_of not in chosen \
                or not v.runs_on(bench.name, bench.quick):
            continue
        ratio = round(counted_flop_ratio(bench, v.flops_of), 9)
        same = next((name for name, r in trained.items() if abs(r - ratio) < 1e-9), None)
        if same is None:
            trained[v.name] = ratio
        refs[v.flops_of] = {'reference': same or v.name, 'ratio': ratio}
    return refs, {k: r for k, r in trained.items() if k != 'baseline'}


# ---------------------------------------------------------------------------------------------------------------
# The evaluation plan.

@dataclass(frozen=True)
class Plan:
    """The grid of a run besides each Bench's ws and samplers (stored in results.json with them)."""
    steps: tuple
    nfe_steps: tuple
    repro_steps: int
    compare_ws: tuple
    accuracy_levels: tuple = ACCURACY_LEVELS
    mg_w: dict = field(default_factory=dict)       # bench -> mg's one-pass w (its effective guidance)


def make_plan(quick: bool, benchmarks: Sequence[str]) -> Plan:
    mg = {b: mg_effective_w(float(shipped_config(b, 'mg', quick)['align']['w_train'])) for b in benchmarks}
    if quick:   # tiny grid: w 0 and 2, steps 2 and 4 (equal NFE: one pass at 4 against CFG at 2), reproduction at 8;
        # accuracy levels that tiny models reach (0) and may not (0.15), so that both paths of the rule run
        return Plan((2, 4), (2,), 8, (2.,), accuracy_levels=(0.0, 0.15), mg_w=mg)
    return Plan(STEPS_GRID, NFE_STEPS, REPRO_STEPS, COMPARE_WS, mg_w=mg)


def eval_cells(plan: Plan, bench: Bench, variant: Variant, config: Mapping[str, Any]
               ) -> tuple[list[evaluate.Cell], list[evaluate.Cell]]:
    """(the grid cells, the reproduction cells) a variant is evaluated on."""
    sampling = registry.of(config).sampling
    mg_w = plan.mg_w.get(bench.name)
    ws = set(bench.ws)
    repro: set[float] = set()
    if variant.role == 'guide':   # trained for autoguidance only
        return [], []
    if variant.role == 'autoguidance':   # every w of the grid through AutoGuidedDenoiser: run_job's cells at w = 0
        return evaluate.make_cells([0.], plan.steps, bench.samplers), []
    if variant.role in ('baseline', 'interval', 'equal_flops'):
        ws |= {mg_w} if mg_w is not None else set()
        if variant.role == 'baseline':
            repro = set(plan.compare_ws) | ({mg_w} if mg_w is not None else set())
    elif sampling == 'cfg':   # aligned
        w_t = float(config['align']['w_train'])
        if variant.role in ('objective', 'ablation'):   # matched effective guidance
            ws |= {matched_w(w, w_t) for w in bench.ws}
    elif sampling == 'trained-w':   # mg: its one pass at its effective w
        ws |= {w_range(config)[1]}
        repro = {w_range(config)[1]}
    else:   # told w (gft, distill): the w range they were trained for
        lo, hi = w_range(config)
        ws = {w for w in ws if lo <= w <= hi}
        repro = {w for w in plan.compare_ws if lo <= w <= hi}
    samplers = bench.samplers
    cells = evaluate.make_cells(sorted(ws), plan.steps, samplers)
    if variant.role == 'convergence':   # costs: only its reproduction of CFG
        cells = []
    if variant.role == 'ablation':      # costs: compared with its shipped variant at equal steps only
        repro = set()
    return cells, evaluate.make_cells(sorted(repro), [plan.repro_steps], [evaluate.DETERMINISTIC_SAMPLER])


# ---------------------------------------------------------------------------------------------------------------
# Jobs: one model each (trained, or reused: the interval variant samples the baseline's).

@dataclass(frozen=True)
class Job:
    bench: str
    variant: str
    seed: int
    quick: bool
    work: str
    plan: Plan
    threads: int
    steps_factor: float

    @property
    def name(self) -> str:
        return f'{self.variant}-seed{self.seed}'

    @property
    def key(self) -> tuple[str, str, int]:
        return self.bench, self.variant, self.seed


def export_path(work: Path, bench: str, name: str) -> Path:
    return work / bench / 'runs' / name / f'{name}.safetensors'


def train_model(config: Mapping[str, Any], steps: int, batch_size: int, seed: int, work: Path, name: str
                ) -> tuple[Path, float]:
    """(the EMA export, training seconds) of a run of kdiff_align.training.trainer; a finished run is reused."""
    from ..training.trainer import TrainOptions, train

    run_dir = work / 'runs' / name
    export = run_dir / f'{name}.safetensors'
    if not export.exists():
        train(config, TrainOptions(name=name, out_dir=str(work / 'runs'), batch_size=batch_size, end_step=steps,
                                   seed=seed, demo_every=0, sample_n=0, save_every=0, num_workers=0,
                                   log_every=max(steps, 1), progress=False))
    with open(run_dir / 'metrics.csv') as f:
        last = list(csv.DictReader(f))[-1]
    return export, float(last['elapsed_s'])


def run_job(job: Job) -> dict[str, Any]:
    """Trains (or reloads) one model and evaluates it on its cells; returns its rows and timings."""
    started = time.time()
    torch.set_num_threads(job.threads)
    bench = benches(job.quick)[job.bench]
    variant = variant_by_name()[job.variant]
    work = Path(job.work)
    steps = round(bench.steps * job.steps_factor)
    teacher = str(export_path(work, job.bench, f'baseline-seed{job.seed}'))
    config = variant_config(bench, variant, teacher)
    trained, train_seconds = False, 0.0
    if variant.model_of is None:
        trained = not export_path(work, job.bench, job.name).exists()
        export, train_seconds = train_model(config, steps, bench.batch_size, job.seed, work / job.bench, job.name)
        stored, state = load_for_inference(export)   # the evaluation reads what a user would
        config = load_config(stored)
    else:
        _, state = load_for_inference(export_path(work, job.bench, f'{variant.model_of}-seed{job.seed}'))
        steps = 0
    denoiser = evaluate.build_denoiser(config, state)
    cells, repro = eval_cells(job.plan, bench, variant, config)
    task = evaluate.make_task(config, bench.n, seed=0)
    extra = {'bench': job.bench, 'variant': job.variant, 'train_seed': job.seed, 'train_steps': steps,
             'batch_size': bench.batch_size, 'kind': 'cell'}
    start = time.perf_counter()
    out = work / job.bench
    models = {job.name: (config, denoiser)}
    if variant.role == 'autoguidance':
        models = autoguided_models(job, bench, config, denoiser)
    result = evaluate.run_sweep(models, cells, task, out, seed=0, batch_size=1000, progress=False, extra=extra)
    if variant.role == 'autoguidance':
        result.rows[:] = [autoguided_row(r) for r in result.rows]
    kept = evaluate.run_sweep({job.name: (config, denoiser)}, repro, task, out, seed=0, batch_size=1000,
                              progress=False, preview=10 ** 9, extra={**extra, 'kind': 'repro_cell'})
    return {'job': {**asdict(job), 'plan': None}, 'rows': result.rows + kept.rows, 'train_seconds': train_seconds,
            'train_steps': steps, 'flop_ratio': flop_ratio(config) * size_ratio(bench, variant),
            'eval_seconds': time.perf_counter() - start,
            'computed': len(result.computed) + len(kept.computed), 'trained': trained,
            'skipped': len(result.skipped) + len(kept.skipped), 'name': job.name, 'started': started,
            'finished': time.time()}


AUTOGUIDED = '-ag'   # an autoguidance model's name: <job name>-ag<w>


def size_ratio(bench: Bench, variant: Variant) -> float:
    """A guide's parameters over the baseline model's (its training FLOPs per step relative to standard CFG, by
    parameter count); 1 for every other variant."""
    if variant.role != 'guide':
        return 1.0
    from ..config import make_model

    def params(config: Mapping[str, Any]) -> int:
        return sum(p.numel() for p in make_model(config).parameters())

    return params(variant_config(bench, variant)) / params(variant_config(bench, variant_by_name()['baseline']))


def autoguided_models(job: Job, bench: Bench, config: Mapping[str, Any], main: torch.nn.Module
                      ) -> dict[str, tuple[dict[str, Any], torch.nn.Module]]:
    """{<job>-ag<w>: (the baseline's config without an interval, AutoGuidedDenoiser(main, guide, w))} for every w of
    the bench's grid, the guide being the autoguidance_guide export of the same bench and seed (check_guide'd).
    Sampled at the cell's w = 0, the sweep's guided denoiser is the AutoGuidedDenoiser itself, and its NFE counter
    sees both models' calls (sampling.nfe.CountingDenoiser counts the guide's rows too)."""
    from ..sampling.autoguidance import AutoGuidedDenoiser, check_guide

    guide_config, guide_state = load_for_inference(export_path(Path(job.work), job.bench,
                                                               f'autoguidance_guide-seed{job.seed}'))
    guide_config = load_config(guide_config)
    check_guide(config, guide_config)
    guide = evaluate.build_denoiser(guide_config, guide_state)
    plain = override(config, {'align.sigma_interval': None})
    return {f'{job.name}{AUTOGUIDED}{w:g}': (plain, AutoGuidedDenoiser(main, guide, w, sigma_interval=config[
        'align']['sigma_interval'])) for w in bench.ws}


def autoguided_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An autoguidance cell's row (sampled at the sweep's w = 0) with its autoguidance w: w and guide_w = the
    AutoGuidedDenoiser's w; w_target stays 0 (autoguidance aims at p(x | c), not at CFG's p_w); passes 2 per guided
    step (main and guide; the counted NFE is the sweep's)."""
    w = float(row['model'].rsplit(AUTOGUIDED, 1)[1])
    return {**row, 'w': w, 'guide_w': w, 'passes': 2 if w > 0 else 1}


def make_jobs(args: argparse.Namespace, plan: Plan, work: Path) -> list[Job]:
    all_benches = benches(args.quick)
    jobs = []
    for b in args.benchmarks:
        _, flops = equal_flops_plan(all_benches[b], args.variants)
        for v in variants():
            if v.name in args.variants and v.runs_on(b, args.quick) and (v.role != 'equal_flops' or v.name in flops):
                jobs += [Job(b, v.name, seed, args.quick, str(work), plan, args.threads,
                             flops.get(v.name, v.steps_factor)) for seed in range(args.seeds)]
    return jobs


def job_cost(job: Job) -> float:
    """A rough cost for ordering (longest first): digits over toy, training FLOPs, two-pass sampling."""
    v = variant_by_name()[job.variant]
    cost = {'digits': 20., 'toy': 1.}[job.bench]
    one_pass = v.config in registry.names() and registry.get(v.config).one_pass
    return cost * (job.steps_factor + (0.3 if one_pass else 0.5))


def run_jobs(jobs: list[Job], workers: int, progress: bool) -> list[dict]:
    """Runs the jobs, each once those it needs have finished, on `workers` processes: the jobs others need first,
    then longest first."""
    from tqdm.auto import tqdm

    by_key = {j.key: j for j in jobs}
    needs = {j.key: {(j.bench, n, j.seed) for n in variant_by_name()[j.variant].needs} & set(by_key) for j in jobs}
    needed = set().union(*needs.values())
    pending = sorted(jobs, key=lambda j: (j.key not in needed, -job_cost(j)))
    done: set = set()
    results = []
    bar = tqdm(total=len(jobs), desc='claims', unit='model', disable=not progress, file=sys.stderr)

    def ready() -> list[Job]:
        return [j for j in pending if needs[j.key] <= done]

    if workers <= 1:
        while pending:
            job = ready()[0]
            pending.remove(job)
            results.append(run_job(job))
            done.add(job.key)
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(workers, mp_context=mp.get_context('spawn')) as pool:
            running = {}
            while pending or running:
                for job in ready()[:max(0, workers - len(running))]:
                    pending.remove(job)
                    running[pool.submit(run_job, job)] = job
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    results.append(future.result())
                    done.add(job.key)
                    bar.update()
                    bar.set_postfix_str(f'{job.bench} {job.name}')
    bar.close()
    return results


# ---------------------------------------------------------------------------------------------------------------
# Reproduction of guidance: distances between kept sample sets.

def sample_distance(bench: str, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """toy: the energy distance between the two sets, per class, averaged; digits: the Fréchet distance between
    their classifier features. Both sets were drawn for the same labels."""
    from ..evaluation import metrics

    if not torch.equal(a['labels'], b['labels']):
        raise ValueError('reproduction: the two sample sets were drawn for different labels')
    if bench == 'toy':
        return float(np.mean([metrics.energy_distance(a['samples'][a['labels'] == c].double(),
                                                      b['samples'][b['labels'] == c].double())
                              for c in a['labels'].unique()]))
    clf = metrics.digits_classifier(0)
    with torch.no_grad():
        fa, fb = clf.features(a['samples'].float()), clf.features(b['samples'].float())
    return metrics.frechet_distance_features(fa, fb)


def reproduction_rows(work: Path, rows: Sequence[Mapping[str, Any]], seeds: int) -> list[dict[str, Any]]:
    """For every kept (reproduction) cell: its distance to the baseline of the NEXT seed at the same w (for the
    baseline's: the spread of training seeds; for a one-pass model's: a reference that shares neither its
    initialisation nor distill's teacher)."""
    kept = [r for r in rows if r.get('kind') == 'repro_cell']
    index = {(r['bench'], r['variant'], r['train_seed'], r['w']): r for r in kept}

    def load(r: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        cell = evaluate.Cell(r['sampler'], r['steps'], r['w'])
        return torch.load(evaluate.cell_path(work / r['bench'], r['model'], cell).with_suffix('.pt'),
                          weights_only=True)

    out = []
    for r in kept:
        ref = index.get((r['bench'], 'baseline', (r['train_seed'] + 1) % seeds, r['w']))
        if ref is None:
            continue
        out.append({'kind': 'reproduction', 'bench': r['bench'], 'variant': r['variant'], 'train_seed': r['train_seed'],
                    'reference_seed': ref['train_seed'], 'w': r['w'], 'steps': r['steps'], 'sampler': r['sampler'],
                    'n': r['n'], 'distance': sample_distance(r['bench'], load(r), load(ref)),
                    'metric': 'energy' if r['bench'] == 'toy' else 'fd'})
    return sorted(out, key=lambda r: (r['bench'], r['variant'], r['w'], r['train_seed']))


# ---------------------------------------------------------------------------------------------------------------
# The run's grid and provenance.

def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=root,
                              check=True).stdout.strip()
        # Untracked files count inside the package and its configs: the code that made the report must be in it.
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=normal', '--', 'kdiff_align',
                                'configs', 'pyproject.toml'], capture_output=True, text=True, cwd=root,
                               check=True).stdout
        return head + (' (with uncommitted changes to ' + ', '.join(sorted({line[3:] for line in dirty.splitlines()}))
                       + ')' if dirty.strip() else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def make_grid(plan: Plan, chosen: Sequence[str], benchmarks: Sequence[str], quick: bool) -> dict[str, Any]:
    """What kdiff_align.bench.verdicts needs besides the rows (stored in results.json)."""
    all_benches = benches(quick)
    grid: dict[str, Any] = {'steps': list(plan.steps), 'nfe_steps': list(plan.nfe_steps),
                            'repro_steps': plan.repro_steps, 'variants': list(chosen), 'benches': {}}
    for b in benchmarks:
        trained_w = [v for v in chosen if v in registry.names() and registry.get(v).sampling == 'trained-w']
        mg_w = plan.mg_w.get(b) if trained_w else None
        bench = all_benches[b]
        info = {'ws': list(bench.ws), 'samplers': list(bench.samplers), 'train_steps': bench.steps,
                'w_train': float(bench.config['align']['w_train']), 'compare_ws': list(plan.compare_ws), 'mg_w': mg_w}
        if b == 'toy':
            info.update(metric='energy', claims_metric='energy', target_metric='energy_w')
        else:
            info.update(metric='fd', claims_metric='fd', accuracy_levels=list(plan.accuracy_levels),
                        fd_targets=sorted(set(bench.ws) | ({mg_w} if mg_w is not None else set())))
        info['equal_flops'] = equal_flops_plan(bench, chosen)[0]
        grid['benches'][b] = info
    grid.update(costs_grid(chosen))
    return grid


def costs_grid(chosen: Sequence[str]) -> dict[str, Any]:
    """The costs families' grid (results.json): 'ablations' {variant: the shipped variant it ablates} and
    'convergence' {variant: [objective, training-length factor]}."""
    by_name = variant_by_name()
    return {'ablations': {v: by_name[v].ablates for v in chosen if by_name[v].ablates},
            'convergence': {v: [by_name[v].config, by_name[v].steps_factor] for v in chosen
                            if by_name[v].role == 'convergence'}}


VERDICT_DOC = Path('docs/evidence.md')   # the page whose marked block a full run into docs/claims rewrites


def verdict_doc(doc: Path | None, out: Path, quick: bool) -> Path | None:
    """The page whose verdict block this run rewrites: `doc` if given, else VERDICT_DOC for a full run into
    docs/claims, else none (a --quick or elsewhere-written run leaves the committed verdicts alone)."""
    if doc is not None:
        return doc
    return VERDICT_DOC if not quick and out.resolve() == Path('docs/claims').resolve() else None


def bench_parser(command: str, doc: str, quick_help: str, out_help: str) -> argparse.ArgumentParser:
    """The parser of a resumable bench command: --quick, --out (default docs/claims) and --work (work_dir)."""
    p = argparse.ArgumentParser(prog=f'python -m kdiff_align.bench {command}', description=doc.split('\n\n')[0],
                                formatter_class=HelpFormatter)
    p.add_argument('--quick', action='store_true', help=quick_help)
    p.add_argument('--out', type=Path, default=Path('docs/claims'), help=out_help)
    p.add_argument('--work', type=Path, default=None, help='checkpoints and finished cells (resumable); default '
                   f'runs/{command} (runs/{command}-quick with --quick)')
    return p


def work_dir(args: argparse.Namespace, command: str) -> Path:
    """--work, else runs/<command> (runs/<command>-quick with --quick)."""
    return args.work or Path(f'runs/{command}-quick' if args.quick else f'runs/{command}')


def main(argv: Sequence[str] | None = None) -> int:
    from . import claims_report

    p = bench_parser('claims', __doc__, 'tiny models, 2 seeds and a small grid (for tests)',
                     'report, results and plots')
    p.add_argument('--seeds', type=int, default=None, help='training seeds per variant (default 5; --quick 2)')
    p.add_argument('--workers', type=int, default=2, help='worker processes (one model each)')
    p.add_argument('--threads', type=int, default=1, help='torch threads per worker')
    p.add_argument('--benchmarks', nargs='+', choices=['toy', 'digits'], default=['toy', 'digits'])
    p.add_argument('--variants', nargs='+', default=None, help='subset of variants (default: all)')
    p.add_argument('--doc', '--readme', dest='doc', type=Path, default=None, help='the page whose verdict block to '
                   f'rewrite (default: {VERDICT_DOC} when --out is docs/claims and not --quick)')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    all_variants = [v.name for v in variants()]
    args.seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if args.seeds < 2:
        p.error(f'--seeds must be >= 2 (the verdicts need a spread over seeds), got {args.seeds}')
    if args.workers < 1 or args.threads < 1:
        p.error(f'--workers and --threads must be >= 1, got {args.workers} and {args.threads}')
    chosen = args.variants or all_variants
    unknown = [v for v in chosen if v not in all_variants]
    if unknown:
        p.error(f'--variants: unknown {unknown}; allowed: {", ".join(all_variants)}')
    for v in chosen:
        for needed in ('baseline',) + variant_by_name()[v].needs:
            if needed not in chosen:
                p.error(f'--variants must include {needed!r} (every verdict compares with standard CFG; {v} needs it)')
    args.variants = [v for v in all_variants if v in chosen]
    work = work_dir(args, 'claims')
    plan = make_plan(args.quick, args.benchmarks)
    start = time.time()
    results = run_jobs(make_jobs(args, plan, work), args.workers, not args.no_progress)
    rows = [r for res in results for r in res['rows']]
    rows.sort(key=lambda r: (r['bench'], all_variants.index(r['variant']), r['train_seed'], r['kind'], r['sampler'],
                             r['steps'], r['w']))
    rows += reproduction_rows(work, rows, args.seeds)
    grid = make_grid(plan, args.variants, args.benchmarks, args.quick)

    wall = (time.time() - start) / 60
    compute = (sum(r['train_seconds'] for r in results) + sum(r.get('seconds', 0) for r in rows)) / 60
    wall_file = work / 'wall.json'
    if any(r['trained'] or r['computed'] for r in results) or not wall_file.exists():
        wall_file.parent.mkdir(parents=True, exist_ok=True)
        wall_file.write_text(json.dumps({'wall_minutes': wall, 'workers': args.workers, 'threads': args.threads}))
        wall_text = f'wall time {wall:.1f} min'
    else:  # everything was read back: report the run that computed it
        wall_text = (f'wall time {json.loads(wall_file.read_text())["wall_minutes"]:.1f} min when computed '
                     f'(this invocation re-read the finished results in {wall:.1f} min)')
    meta = {'command': 'python -m kdiff_align.bench claims ' + ' '.join(argv if argv is not None else sys.argv[2:]),
            'commit': git_commit(), 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'machine': f'{platform.machine()} CPU, torch {torch.__version__}', 'wall_minutes': wall,
            'workers': args.workers, 'threads': args.threads, 'seeds': list(range(args.seeds)), 'quick': args.quick,
            'wall_text': wall_text, 'compute_minutes': compute}
    jobs_info = [{k: v for k, v in r.items() if k != 'rows'} for r in results]
    report = claims_report.write_all(args.out, work, rows, grid, meta, jobs_info, benches(args.quick),
                                     variant_by_name())
    doc = verdict_doc(args.doc, args.out, args.quick)
    if doc is not None and doc.is_file() and claims_report.update_readme(doc, rows, grid):
        print(f'claims verdicts written into {doc}')
    print(f'claims report: {report} ({len(rows)} rows, {wall:.1f} min; commit {meta["commit"]})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
