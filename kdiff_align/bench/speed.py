"""The speed benchmark, `python -m kdiff_align.bench speed`.

It measures, in one process and interleaved, ratios against a baseline run on the same model and batch:
training step (loss + backward) of AlignedDenoiser vs upstream's Denoiser, next to the ratio of their FLOPs
as counted by torch.utils.flop_counter on the same inputs (and the achieved TFLOP/s), guided sampling vs a
minimal hand-written batched CFG function, the w = 0 and outside-interval shortcuts, a one-pass
(conditional only) vs a two-pass (CFG) sampling step, evaluation (sampling) throughput vs raw forward
throughput, and the memory of a training step. `python -m kdiff_align.bench gpu` (kdiff_align.bench.gpu_check)
runs it on a GPU among other checks.

Each ratio is the median of per-round ratios (every round times every variant once, round_ratio), with their
interquartile range; one wider than SPREAD_LIMIT of the median is flagged as too noisy to trust (a busy machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.shipped import CONFIGS

MODELS = {
    # A small image_v1 for CPUs, and upstream's CIFAR-10 U-Net (configs/cifar_aligned.json) for GPUs.
    'tiny': dict(input_channels=3, input_size=[16, 16], mapping_out=128, depths=[2, 2], channels=[64, 128],
                 self_attn_depths=[False, True]),
    'cifar': None,  # configs/cifar_aligned.json's model section
}


def bench_config(model: str, w: float, **align) -> dict:
    if MODELS[model] is None:
        section = json.loads((CONFIGS / f'{model}_aligned.json').read_text())['model']
    else:
        section = {'type': 'image_v1', **MODELS[model], 'sigma_data': 0.5, 'sigma_min': 1e-2, 'sigma_max': 80.,
                   'sigma_sample_density': {'type': 'lognormal', 'mean': -1.2, 'std': 1.2}}
    return {'model': section,
            'dataset': {'type': 'cifar10', 'num_classes': 10, 'location': 'unused'},
            'optimizer': {'type': 'adamw', 'lr': 1e-4},
            'align': {'w_train': w, **align}}


SPREAD_LIMIT = 0.2   # a ratio is too noisy to trust when its per-round interquartile range exceeds 20% of it


@dataclass(frozen=True)
class RoundRatio:
    """The per-round ratios of one variant to its baseline: their median, quartiles and count."""
    median: float
    q1: float
    q3: float
    rounds: int

    @property
    def wide(self) -> bool:
        """Whether the middle half of the per-round ratios spans more than SPREAD_LIMIT of the median."""
        return self.q3 - self.q1 > SPREAD_LIMIT * self.median

    def fields(self) -> dict:
        """The row fields of a ratio: ratio (the median), ratio_iqr, rounds, wide_spread."""
        return {'ratio': self.median, 'ratio_iqr': [self.q1, self.q3], 'rounds': self.rounds,
                'wide_spread': self.wide}


def round_ratio(times: Sequence[float], baseline: Sequence[float], scale: float = 1.0) -> RoundRatio:
    """The median and quartiles of scale * times[r] / baseline[r] over the rounds r. Both were timed in the same
    round, so load from other processes that lasts a round cancels, and the rounds it hits unevenly are outvoted."""
    if len(times) != len(baseline) or not times:
        raise ValueError(f'need the same number (>= 1) of rounds, got {len(times)} and {len(baseline)}')
    ratios = sorted(scale * t / b for t, b in zip(times, baseline))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method='inclusive') if len(ratios) > 1 else ratios * 3
    return RoundRatio(statistics.median(ratios), q1, q3, len(ratios))


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, sync: Callable[[], None]
                ) -> dict[str, list[float]]:
    """Seconds of each call of each function, per round: every round calls every function once, starting one
    further along each round (so that no function always runs right after another)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward during fn (a device-independent memory measure)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return total


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of fn (matmuls, convolutions, attention; forward and backward) by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def speed(args: argparse.Namespace) -> dict:
    import k_diffusion as K

    from ..config import load_config, make_denoiser_wrapper, make_model
    from ..core.guidance import GuidedDenoiser
    from ..core.models import with_guidance_embedding
    from ..core.objective import GFTDenoiser, TeacherTargetDenoiser

    device = torch.device(args.device)
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    torch.manual_seed(0)
    config = load_config(bench_config(args.model, args.w, uncond_prob=args.uncond_prob))
    model = make_model(config).to(device)
    size = config['model']['input_size']
    b = args.batch_size
    x = torch.randn(b, config['model']['input_channels'], *size, device=device)
    noise = torch.randn_like(x)
    sigma = K.utils.rand_log_normal([b], -1.2, 1.2, device=device)
    labels = torch.randint(0, 10, (b,), device=device)
    p, null_label = args.uncond_prob, {'class_cond': 10}
    told = with_guidance_embedding(model)   # the same network told w, for GFT and distillation
    teacher = copy.deepcopy(model).eval().requires_grad_(False)   # stands for MG's EMA / a distillation teacher
    objectives = {
        'upstream': ('upstream Denoiser.loss+backward', K.layers.Denoiser(model, sigma_data=0.5)),
        'aligned': ('AlignedDenoiser (full)', make_denoiser_wrapper(config)(model)),
        'aligned_stop_grad': ('AlignedDenoiser (stop-gradient)',
                              make_denoiser_wrapper(config, stop_grad_uncond=True)(model)),
        'gft': ('GFTDenoiser, w ~ U[0, 4]', GFTDenoiser(told, sigma_data=0.5, uncond=null_label, uncond_prob=p)),
        'mg': ('TeacherTargetDenoiser, model-guidance w = 0.45',
               TeacherTargetDenoiser(model, teacher, sigma_data=0.5, objective='mg', w_train=0.45,
                                     uncond=null_label, uncond_prob=p)),
        'distill': ('TeacherTargetDenoiser, distillation w ~ U[0, 4]',
                    TeacherTargetDenoiser(told, teacher, sigma_data=0.5, objective='distill', uncond=null_label,
                                          uncond_prob=p, w_train={'type': 'uniform', 'min_value': 0.,
                                                                   'max_value': 4.})),
    }

    def step(denoiser):
        def fn():
            told.zero_grad(set_to_none=True)
            with autocast:
                loss = denoiser.loss(x, noise, sigma, class_cond=labels).mean()
            loss.backward()
        return fn

    steps_by_name = {name: step(denoiser) for name, (_, denoiser) in objectives.items()}
    train = interleaved(steps_by_name, args.repeats, args.warmup, sync)
    flops = {}
    for name, fn in steps_by_name.items():
        torch.manual_seed(1)  # the same anchor rows for every objective
        flops[name] = counted_flops(fn)
    rows = []
    for name, (label, _) in objectives.items():
        seconds = statistics.median(train[name])
        rows.append({'bench': 'train_step', 'variant': label, 'seconds': seconds,
                     **round_ratio(train[name], train['upstream']).fields(), 'flops': flops[name],
                     'flop_ratio': flops[name] / flops['upstream'], 'tflops_per_s': flops[name] / seconds / 1e12})

    # Memory of one training step.
    def loss_of(denoiser):
        return lambda: denoiser.loss(x, noise, sigma, class_cond=labels).mean()

    mem = {}
    for name, (_, denoiser) in objectives.items():
        told.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with autocast:
                loss_of(denoiser)().backward()
            mem[name] = torch.cuda.max_memory_allocated() - base
        else:
            with autocast:
                mem[name] = saved_activation_bytes(loss_of(denoiser))
    kind = 'peak allocated (CUDA)' if device.type == 'cuda' else 'activations saved for backward'
    for name in mem:
        rows.append({'bench': 'train_memory', 'variant': f'{name}: {kind}', 'bytes': mem[name],
                     'ratio': mem[name] / mem['upstream']})

    # Guided sampling: one denoiser call vs a minimal hand-written batched CFG function.
    denoiser = K.layers.Denoiser(model, sigma_data=0.5).eval()
    null = torch.full_like(labels, 10)
    sig = torch.full((b,), 2., device=device)

    def hand_cfg():
        d = denoiser(torch.cat([x, x]), torch.cat([sig, sig]), class_cond=torch.cat([labels, null]))
        d_c, d_u = d.chunk(2)
        return d_u + (d_c - d_u) * (1 + args.w)

    guided = GuidedDenoiser(denoiser, args.w, uncond={'class_cond': 10})
    unguided = GuidedDenoiser(denoiser, 0., uncond={'class_cond': 10})
    outside = GuidedDenoiser(denoiser, args.w, uncond={'class_cond': 10}, sigma_interval=[0.1, 1.])

    def call(fn):
        def run():
            with torch.no_grad(), autocast:
                fn()
        return run

    samp = interleaved({'hand': call(hand_cfg), 'guided': call(lambda: guided(x, sig, class_cond=labels)),
                        'w0': call(lambda: unguided(x, sig, class_cond=labels)),
                        'outside': call(lambda: outside(x, sig, class_cond=labels)),
                        'one_pass': call(lambda: denoiser(x, sig, class_cond=labels))},
                       args.repeats, args.warmup, sync)
    for name, label in (('guided', 'GuidedDenoiser'), ('w0', 'GuidedDenoiser, w = 0 shortcut'),
                        ('outside', 'GuidedDenoiser, sigma outside interval'),
                        ('one_pass', 'one-pass step (conditional only, B rows)')):
        rows.append({'bench': 'guided_call', 'variant': f'{label} vs hand-written batched CFG (2B rows)',
                     'seconds': statistics.median(samp[name]), **round_ratio(samp[name], samp['hand']).fields()})

    # Evaluation throughput: guided sampling vs raw forward passes of the same model.
    steps = args.sample_steps
    sigmas = K.sampling.get_sigmas_karras(steps, 1e-2, 80., device=device)

    def sampler(model):
        def run():
            with torch.no_grad(), autocast:
                K.sampling.sample_dpmpp_2m(model, torch.randn_like(x) * 80., sigmas,
                                           extra_args={'class_cond': labels}, disable=True)
        return run

    xx, ss, ll = torch.cat([x, x]), torch.cat([sig, sig]), torch.cat([labels, null])

    def forward():
        with torch.no_grad(), autocast:
            denoiser(xx, ss, class_cond=ll)

    ev = interleaved({'sample': sampler(guided), 'one_pass': sampler(denoiser), 'forward': forward},
                     min(args.repeats, max(3, args.repeats // 4)), 1, sync)
    forward_flops = counted_flops(forward)
    # dpmpp_2m makes one guided evaluation (one forward of 2B rows) per step.
    sample, one_pass, fwd = (statistics.median(ev[k]) for k in ('sample', 'one_pass', 'forward'))
    rows.append({'bench': 'eval_throughput', 'variant': f'dpmpp_2m {steps} steps guided (two-pass), images/s',
                 'images_per_s': b / sample, 'raw_forward_images_per_s': b / (steps * fwd),
                 **round_ratio(ev['forward'], ev['sample'], scale=steps).fields(),
                 'tflops_per_s': steps * forward_flops / sample / 1e12})
    rows.append({'bench': 'eval_throughput', 'variant': f'dpmpp_2m {steps} steps one-pass, images/s vs two-pass',
                 'images_per_s': b / one_pass, **round_ratio(ev['sample'], ev['one_pass']).fields()})
    return {'device': device_name(device), 'dtype': args.dtype, 'model': args.model, 'batch_size': b, 'w': args.w,
            'uncond_prob': p, 'torch': torch.__version__, 'commit': commit(), 'rows': rows}


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads'


def commit() -> str:
    """$KDIFF_ALIGN_COMMIT if set (a copy without its .git), else the checkout's commit (-dirty: local changes)."""
    if os.environ.get('KDIFF_ALIGN_COMMIT'):
        return os.environ['KDIFF_ALIGN_COMMIT']
    try:
        return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def speed_table(rows: list[dict], peak_tflops: float | None = None) -> list[str]:
    """`bench speed` rows as a Markdown table; with a peak, each TFLOP/s also as its share of it."""
    lines = ['| bench | variant | measured | ratio | FLOP ratio (counted) | TFLOP/s |' + (' of bf16 peak |' if peak_tflops
                                                                                      else ''),
             '|---|---|---|---|---|---|' + ('---|' if peak_tflops else '')]
    for row in rows:
        if 'seconds' in row:
            measured = f"{row['seconds'] * 1e3:.2f} ms"
        elif 'bytes' in row:
            measured = f"{row['bytes'] / 2 ** 20:.1f} MiB"
        else:
            measured = f"{row['images_per_s']:.1f} img/s"
            if 'raw_forward_images_per_s' in row:
                measured += f" (raw forward {row['raw_forward_images_per_s']:.1f} img/s)"
        flops = f"{row['flop_ratio']:.2f}" if 'flop_ratio' in row else ''
        tflops = row.get('tflops_per_s')
        ratio = f"{row['ratio']:.2f}"
        if 'ratio_iqr' in row:   # the per-round spread (rows from before it was recorded have none)
            low, high = row['ratio_iqr']
            ratio += f' [{low:.2f}, {high:.2f}]' + (' wide' if row['wide_spread'] else '')
        line = f"| {row['bench']} | {row['variant']} | {measured} | {ratio} | {flops} | " \
               f"{'' if tflops is None else format(tflops, '.3g')} |"
        if peak_tflops:
            line += f" {'' if tflops is None else format(tflops / peak_tflops, '.1%')} |"
        lines.append(line)
    return lines


def print_speed(result: dict) -> None:
    print(f"# speed: {result['model']} model, batch {result['batch_size']}, {result['dtype']}, "
          f"{result['device']}, torch {result['torch']}, commit {result['commit']}, w = {result['w']} (paper's), "
          f"uncond_prob = {result['uncond_prob']}")
    print('\n'.join(speed_table(result['rows'])))
    timed = [r for r in result['rows'] if 'rounds' in r]
    rounds = min((r['rounds'] for r in timed), default=0)
    print(f'ratio: the median over the rounds (at least {rounds}; each round times every variant once) of the '
          'per-round ratio to the bench\'s first row, [its interquartile range]; "wide": that range exceeds '
          f'{SPREAD_LIMIT:.0%} of the median. '
          'FLOP ratio: counted by torch.utils.flop_counter on the same inputs (one draw of the anchor rows). '
          'eval_throughput: raw forward img/s = the rate if sampling were nothing but its forward passes '
          '(steps x one 2B-row forward); ratio = measured / that (1.0 = no overhead beyond the network); '
          'one-pass ratio = two-pass time / one-pass time.')
    wide = [f"{r['bench']} {r['variant']}" for r in timed if r['wide_spread']]
    if wide:
        print(f'warning: {len(wide)} ratio(s) too noisy to trust (per-round spread over {SPREAD_LIMIT:.0%}, other load '
              f'on the machine?): {"; ".join(wide)}. Rerun on an idle machine or with more --repeats.')
    elif rounds < 3:
        print(f'note: {rounds} round(s) cannot show a spread; use --repeats 3 or more to judge the ratios.')


def speed_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The flags of `bench speed` (on parser, or on a new one)."""
    p = parser or argparse.ArgumentParser(prog='python -m kdiff_align.bench speed')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--model', choices=sorted(MODELS), default=None,
                   help='tiny (CPU default) or cifar (GPU default: configs/cifar_aligned.json\'s U-Net)')
    p.add_argument('--dtype', choices=['fp32', 'bf16'], default=None, help='fp32 (CPU default), bf16 (GPU)')
    p.add_argument('--batch-size', type=int, default=None)
    p.add_argument('--w', type=float, default=2., help="the paper's w (cfg scale = 1 + w)")
    p.add_argument('--uncond-prob', type=float, default=0.1)
    p.add_argument('--repeats', type=int, default=10,
                   help='rounds; each times every variant once, and a ratio is the median of its per-round ratios')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--sample-steps', type=int, default=8)
    p.add_argument('--out', type=Path, default=None, help='also write the rows as JSON here')
    return p


def speed_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parsed `bench speed` flags with the device-dependent defaults filled in; bad values exit with status 2."""
    args = parser.parse_args(argv)
    gpu = args.device.startswith('cuda')
    if gpu and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available; use --device cpu')
    args.model = args.model or ('cifar' if gpu else 'tiny')
    args.dtype = args.dtype or ('bf16' if gpu else 'fp32')
    args.batch_size = args.batch_size or (128 if gpu else 16)
    for name in ('batch_size', 'repeats', 'sample_steps'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if not 0 <= args.uncond_prob <= 1:
        parser.error(f'--uncond-prob must lie in [0, 1], got {args.uncond_prob}')
    return args
