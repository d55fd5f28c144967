"""docs/gpu.md: the GPU check's results (kdiff_align.bench.gpu_check) as Markdown."""

from __future__ import annotations

from typing import Any

from .speed import speed_table


def _f(value: Any, fmt: str = '.3g') -> str:
    return '' if value is None else format(value, fmt)


def _environment(env: dict[str, Any]) -> list[str]:
    lines = [f"- device: **{env.get('device')}**" + (
        f", {env['memory_gib']:.0f} GiB, {env['multiprocessors']} multiprocessors, compute capability "
        f"{env['capability']}, driver {env['driver']}" if 'memory_gib' in env else ''),
        f"- commit {env.get('commit')}, {env.get('date')}; Python {env.get('python')}, torch {env.get('torch')}"
        + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if 'cuda' in env else ''),
        '- packages: ' + ', '.join(f'{k} {env[k]}' for k in ('k-diffusion', 'accelerate', 'diffusers',
                                                                'transformers', 'peft', 'numpy') if k in env)]
    matmul = env.get('matmul')
    if matmul:
        peak = env.get('peak_bf16_tflops')
        lines.append(f"- a {matmul['n']}x{matmul['n']}x{matmul['n']} {matmul['dtype']} matrix product ran at "
                     f"**{matmul['tflops_per_s']:.3g} TFLOP/s**" + (
                         f" ({matmul['tflops_per_s'] / peak:.0%} of the assumed dense bf16 peak of {peak:g} TFLOP/s: "
                         f"{env['peak_source']})" if peak and matmul['dtype'] == 'bfloat16' else
                         f" (no peak assumed: {env.get('peak_source')})"))
    return lines


def _speed(speed: dict[str, Any], peak: float | None) -> list[str]:
    return [f"`python -m kdiff_align.bench speed {' '.join(speed.get('argv', []))}`: {speed.get('model')} model, "
            f"batch {speed.get('batch_size')}, {speed.get('dtype')}, w = {speed.get('w')} (paper's), "
            f"uncond_prob = {speed.get('uncond_prob')}. Ratios are against the first row of each bench, measured "
            'in the same process, interleaved; FLOPs counted by torch.utils.flop_counter on the same inputs.',
            ''] + speed_table(speed.get('rows', []), peak)


def _train(train: dict[str, Any]) -> list[str]:
    lines = ['| run | exit | logged steps | steps/s (after the first logged window) | s to first logged step | '
             'loss, first quarter -> last quarter | checkpoint at step |', '|---|---|---|---|---|---|---|']
    for name, label in (('eager', 'eager'), ('compiled', 'resumed with --compile')):
        run = train.get(name) or {}
        if not run:
            lines.append(f'| {label} | not run |  |  |  |  |  |')
            continue
        lines.append(f"| {label} | {run.get('returncode')} | {run.get('first_step')}-{run.get('last_step')} | "
                     f"{_f(run.get('steps_per_s'))} | {_f(run.get('seconds_to_first_row'), '.0f')} | "
                     f"{_f(run.get('first_loss'), '.4f')} -> {_f(run.get('last_loss'), '.4f')} | "
                     f"{run.get('checkpoint_step')} |")
    eager, compiled = train.get('eager') or {}, train.get('compiled') or {}
    if eager.get('steps_per_s') and compiled.get('steps_per_s'):
        lines += ['', f"--compile / eager steps/s: **{compiled['steps_per_s'] / eager['steps_per_s']:.2f}**"
                      + (' (TORCHDYNAMO_DISABLE=1 in this self-test: no compilation happened)'
                         if train.get('dynamo_disabled') else '')]
    bench = train.get('bench_aligned_step_seconds')
    if bench and eager.get('steps_per_s'):
        ratio = 1 / eager['steps_per_s'] / bench
        lines += ['', f"An eager CLI step (data loading, loss + backward, optimizer, EMA, logging) took "
                      f"{1 / eager['steps_per_s'] * 1e3:.1f} ms, {ratio:.2f}x the speed section's AlignedDenoiser "
                      f"loss + backward at the same batch ({bench * 1e3:.1f} ms)."]
    return lines


def _sd(sd: dict[str, Any]) -> list[str]:
    lines = ['| precision | train exit | losses | train s | sample exit | sample s | sample pixel std |',
             '|---|---|---|---|---|---|---|']
    for mp, run in sd.get('runs', {}).items():
        losses = ', '.join(f'{v:.4f}' for v in run.get('losses', []))
        lines.append(f"| {mp} | {run['train_returncode']} | {losses} | {run['train_seconds']:.1f} | "
                     f"{run['sample_returncode']} | {run['sample_seconds']:.1f} | {_f(run.get('sample_pixel_std'), '.1f')} |")
    return lines


def render(report: dict[str, Any]) -> str:
    """The Markdown of a gpu_check report."""
    sections = report['sections']
    env = sections.get('environment', {})
    args = report.get('args', {})
    on_gpu = 'cuda' in str(args.get('device', ''))
    lines = ['# GPU check', '']
    if not on_gpu:
        lines += ['**CPU self-test (`--device cpu --tiny`): nothing in this file was measured on a GPU.**', '']
    flags = ' '.join(f"--{k.replace('_', '-')} {v}" for k, v in args.items()
                     if k in ('device', 'train_seconds') and v not in ('None', 'False'))
    lines += [f"`python -m kdiff_align.bench gpu {flags}`{' --tiny' if args.get('tiny') == 'True' else ''}, "
              f"{report['seconds']:.0f} s in all.", '']
    lines += _environment(env) + ['', '| section | result | seconds |', '|---|---|---|']
    for name, section in sections.items():
        lines.append(f"| {name} | {'passed' if section['ok'] else '**FAILED**'} | {section['seconds']:.0f} |")
        for check, ok in section.get('checks', {}).items():
            lines.append(f"| {name}: {check} | {'yes' if ok else '**no**'} |  |")
    peak = env.get('peak_bf16_tflops') if on_gpu else None
    if 'speed' in sections and sections['speed'].get('rows'):
        lines += ['', '## Speed', ''] + _speed(sections['speed'], peak)
    if 'train' in sections and sections['train'].get('eager'):
        lines += ['', '## Training through `python -m kdiff_align.train`', '',
                  'configs/cifar_aligned.json (image_v1 U-Net, w_train = 2) with its dataset replaced by an '
                  "imagefolder-class of scikit-learn's 1,797 digits upscaled to 32x32 RGB PNGs, "
                  '`--mixed-precision bf16`, seed 0, batch 128 (8 in the self-test): trained until SIGINT a fixed '
                  'time after its first logged step (the CLI then saves a checkpoint and exits with 130), then '
                  'resumed from that checkpoint with `--compile` and stopped the same way.', ''] + _train(sections['train'])
    if 'sd' in sections and sections['sd'].get('runs'):
        lines += ['', '## Stable Diffusion (tiny random components, LoRA)', '',
                  'kdiff_align.sd.tiny components; two training steps through `python -m kdiff_align.train` '
                  '(batch 2), then 2 images of 4 dpmpp_2m steps through kdiff_align.sd.sample with weights in the '
                  'same precision.', ''] + _sd(sections['sd'])
    failures = [(name, s) for name, s in sections.items() if not s['ok']]
    if failures:
        lines += ['', '## What failed', '']
        for name, section in failures:
            lines.append(f'### {name}')
            if section.get('error'):
                lines += ['```', section['error'].strip()[-3000:], '```']
            for run, label in (('eager', 'eager'), ('compiled', 'resumed')):
                tail = (section.get(run) or {}).get('output_tail')
                bad = [c for c, ok in section.get('checks', {}).items() if c.startswith(label) and not ok]
                if tail and bad:
                    lines += [f'{run} output (last lines):', '```', tail.strip(), '```']
    return '\n'.join(lines) + '\n'
