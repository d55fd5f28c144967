"""The prepared GPU check: `python -m kdiff_align.bench gpu` (about 6 minutes on one GPU).

Sections, each timed and isolated (a failure is recorded with its traceback and the next section runs):

1. environment: device, torch / CUDA / cuDNN and package versions, commit, and the bf16 matrix-product rate
   measured here next to the datasheet peak assumed for the device (PEAK_BF16);
2. speed: `bench speed` on configs/cifar_aligned.json's U-Net in bf16 at batch 128 (training-step ratios to
   upstream's Denoiser.loss next to counted FLOP ratios and TFLOP/s, peak memory, one- vs two-pass sampling,
   guided images/s);
3. train: `python -m kdiff_align.train` on configs/cifar_aligned.json with its dataset replaced by an
   imagefolder-class of scikit-learn's digits upscaled to 32x32 (no download), `--mixed-precision bf16`,
   stopped by SIGINT after a fixed time (the CLI saves a checkpoint), resumed for a fixed number of steps,
   then trained again with `--compile`;
4. sd: the tiny Stable Diffusion components of kdiff_align.sd.tiny with LoRA, one training step through
   `python -m kdiff_align.train` and one sample through kdiff_align.sd.sample, in fp16 and in bf16.

The Markdown report (docs/gpu.md by default) and its JSON are rewritten after every section, so a run cut
short still leaves what it measured. `--device cpu --tiny` runs every section on a CPU in under a minute with
a small model (the test suite does; compilation is then disabled with TORCHDYNAMO_DISABLE=1).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .speed import commit, device_name
from .gpu_report import render
from ..config.shipped import CONFIGS

ROOT = Path(__file__).resolve().parents[2]
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor's datasheets: the sparsity figures halved.
PEAK_BF16 = (
    ('H200', 989.4, 'NVIDIA H200 datasheet (SXM): 1,979 TFLOP/s bf16 with sparsity'),
    ('H100 PCIe', 756.5, 'NVIDIA H100 datasheet (PCIe): 1,513 TFLOP/s bf16 with sparsity'),
    ('H100', 989.4, 'NVIDIA H100 datasheet (SXM): 1,979 TFLOP/s bf16 with sparsity'),
    ('A100', 312.0, 'NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense'),
)
TINY_MODEL = {'mapping_out': 32, 'depths': [1, 1], 'channels': [16, 32], 'self_attn_depths': [False, True]}
PACKAGES = ('k-diffusion', 'accelerate', 'diffusers', 'transformers', 'peft', 'numpy')


def peak_bf16(name: str) -> tuple[float | None, str]:
    """The assumed dense bf16 peak of a device (TFLOP/s) and its source; None when the device is not listed."""
    for key, peak, source in PEAK_BF16:
        if key in name:
            return peak, source
    return None, 'not listed in kdiff_align.bench.gpu_check.PEAK_BF16'


class Check:
    """Runs the sections, records their results and rewrites the report after each."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        self.work = args.work_dir
        for folder in ('runs', 'sd', 'digits32'):  # this check's own outputs from an earlier run
            shutil.rmtree(self.work / folder, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.sections: dict[str, dict[str, Any]] = {}
        self.start = time.time()

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f'[gpu check] {name} ...', flush=True)
        start = time.time()
        try:
            result, error = fn(), None
        except Exception:  # noqa: BLE001 - the check records every failure and goes on
            result, error = {}, traceback.format_exc(limit=-6)
            print(error, file=sys.stderr, flush=True)
        failed = [k for k, v in result.get('checks', {}).items() if not v]
        self.sections[name] = {**result, 'seconds': time.time() - start, 'error': error,
                               'ok': error is None and not failed}
        print(f'[gpu check] {name}: {"ok" if self.sections[name]["ok"] else "FAILED"} '
              f'({time.time() - start:.0f} s)', flush=True)
        self.write()

    def write(self) -> None:
        report = {'sections': self.sections, 'seconds': time.time() - self.start, 'args': {
            k: str(v) for k, v in vars(self.args).items()}}
        out = self.args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix('.json').write_text(json.dumps(report, indent=1, default=str) + '\n')
        out.write_text(render(report))

    # Sections.

    def environment(self) -> dict[str, Any]:
        name = device_name(self.device)
        info: dict[str, Any] = {'device': name, 'torch': torch.__version__, 'python': platform.python_version(),
                                'commit': commit(), 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
        for package in PACKAGES:
            try:
                info[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                info[package] = 'not installed'
        if self.device.type == 'cuda':
            props = torch.cuda.get_device_properties(self.device)
            info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                        memory_gib=props.total_memory / 2 ** 30, multiprocessors=props.multi_processor_count,
                        capability=f'{props.major}.{props.minor}', driver=_driver())
        n = 256 if self.args.tiny else 8192
        dtype = torch.bfloat16 if self.device.type == 'cuda' else torch.float32
        a, b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
        seconds = _timed(lambda: a @ b, self.device, repeats=10, warmup=3)
        info['matmul'] = {'n': n, 'dtype': str(dtype).removeprefix('torch.'),
                          'tflops_per_s': 2 * n ** 3 / seconds / 1e12}
        info['peak_bf16_tflops'], info['peak_source'] = peak_bf16(name)
        return info

    def speed(self) -> dict[str, Any]:
        from . import speed

        tiny = self.args.tiny
        argv = ['--device', self.args.device, '--model', 'tiny' if tiny else 'cifar', '--dtype',
                'fp32' if self.device.type == 'cpu' else 'bf16', '--batch-size', str(4 if tiny else 128),
                '--repeats', str(1 if tiny else 10), '--warmup', str(0 if tiny else 2),
                '--sample-steps', str(2 if tiny else 8)]
        result = speed.speed(speed.speed_args(speed.speed_parser(), argv))
        result['argv'] = argv
        return result

    def train(self) -> dict[str, Any]:
        tiny, work = self.args.tiny, self.work
        data = write_digits_folder(work / 'digits32', per_class=20 if tiny else None)
        config = json.loads((CONFIGS / 'cifar_aligned.json').read_text())
        config['dataset'] = {'type': 'imagefolder-class', 'location': str(data), 'num_classes': 10}
        if tiny:
            config['model'].update(TINY_MODEL)
        config_path = work / 'cifar_digits.json'
        config_path.write_text(json.dumps(config, indent=2))
        env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
        if tiny:  # --compile's code path without minutes of CPU compilation; one thread copes with a busy CPU
            env.update(TORCHDYNAMO_DISABLE='1', OMP_NUM_THREADS='1')
        # The self-test trains in fp32 on the main process: CPU bf16 autocast and worker start-up cost seconds.
        common = ['--config', str(config_path), '--out-dir', str(work / 'runs'),
                  *(['--mixed-precision', 'no', '--num-workers', '0'] if tiny else ['--mixed-precision', 'bf16']),
                  '--batch-size', str(8 if tiny else 128), '--seed', '0', '--no-progress', '--save-every', '0',
                  '--demo-every', '0', '--sample-n', str(10 if tiny else 100)]
        run_dir, seconds, log_every = work / 'runs' / 'cifar_digits', self.args.train_seconds, 1 if tiny else 10
        common += ['--name', run_dir.name, '--end-step', str(10 ** 9), '--log-every', str(log_every)]
        eager = _train_run(common, run_dir, seconds, env, warmup_cap=90.)
        start = eager['checkpoint_step']
        compiled = _train_run(common + ['--resume', str(run_dir), '--compile'], run_dir, seconds, env, from_step=start,
                              warmup_cap=self.args.compile_cap) if start else {}
        bench_step = {r['variant']: r.get('seconds') for r in self.sections.get('speed', {}).get('rows', [])}.get(
            'AlignedDenoiser (full)')
        checks = {
            'eager: stopped by SIGINT with exit 130': eager['returncode'] == 130,
            'eager: loss finite': eager['finite'],
            **({} if tiny else {'eager: loss falling': eager['falling']}),  # a few tiny steps need not fall
            'eager: checkpoint written': bool(start),
            'resumed with --compile: continued from the checkpoint': bool(compiled) and f'at step {start}' in
            compiled['output'] and start < (compiled['first_step'] or 0) <= start + log_every,
            'resumed with --compile: stopped by SIGINT with exit 130': compiled.get('returncode') == 130,
            'resumed with --compile: loss finite': bool(compiled.get('finite')),
            'resumed with --compile: checkpoint written': (compiled.get('checkpoint_step') or 0) > (start or 0),
        }
        for run in (eager, compiled):
            run.pop('output', None)
        return {'config': config, 'eager': eager, 'compiled': compiled, 'checks': checks,
                'bench_aligned_step_seconds': None if tiny else bench_step, 'dynamo_disabled': tiny}

    def sd(self) -> dict[str, Any]:
        from accelerate.state import AcceleratorState

        from ..sd import sample as sd_sample
        from ..sd import tiny
        from ..training.trainer import main as train_main

        work = self.work / 'sd'
        pipe = tiny.save_pipeline(work / 'pipe')
        data = tiny.make_captioned_folder(work / 'data')
        config_path = work / 'sd_tiny.json'
        config_path.write_text(json.dumps(tiny.sd_config(pipe, data), indent=2))
        results, checks = {}, {}
        # fp16 needs a GPU (the trainer refuses it on the CPU): the CPU self-test trains bf16 only.
        precisions = (('fp16', 'float16'), ('bf16', 'bfloat16')) if self.args.device != 'cpu' else (('bf16', 'bfloat16'),)
        for mp, dtype in precisions:
            run = work / 'runs' / mp
            start = time.time()
            AcceleratorState._reset_state(True)  # accelerate keeps one mixed precision per process
            try:
                rc = train_main(['--config', str(config_path), '--out-dir', str(work / 'runs'), '--name', mp,
                                 '--mixed-precision', mp, '--end-step', '2', '--batch-size', '2', '--seed', '0',
                                 '--no-progress', '--log-every', '1'])
            finally:
                AcceleratorState._reset_state(True)  # leave the process as it was for later callers
            train_s = time.time() - start
            rows = _metrics(run / 'metrics.csv')
            png = work / f'sample_{mp}.png'
            start = time.time()
            rc_sample = sd_sample.main(['--run', str(run), '--prompt', 'a cat', 'a dog', '--steps', '4', '--seed', '0',
                                        '--device', self.args.device, '--dtype', dtype, '--out', str(png)])
            sample_s = time.time() - start
            pixels = _png_stats(png)
            results[mp] = {'train_returncode': rc, 'train_seconds': train_s, 'losses': [r['loss'] for r in rows],
                           'sample_returncode': rc_sample, 'sample_seconds': sample_s, 'sample_png': str(png),
                           'sample_pixel_std': pixels}
            checks[f'{mp}: one LoRA training step'] = rc == 0 and bool(rows) and all(
                math.isfinite(r['loss']) for r in rows)
            checks[f'{mp}: one sample, not blank'] = rc_sample == 0 and pixels is not None and pixels > 0
        return {'runs': results, 'checks': checks}


def write_digits_folder(root: Path, per_class: int | None = None, size: int = 32) -> Path:
    """scikit-learn's digits as an imagefolder-class of size x size RGB PNGs (root/<digit>/<index>.png)."""
    from PIL import Image

    from ..data.digits import load_digits

    images, labels = load_digits('all')
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    counts = [0] * 10
    for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
        if per_class is not None and counts[label] >= per_class:
            continue
        counts[label] += 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((size, size), Image.BICUBIC).convert('RGB').save(folder / f'{i:04}.png')
    return root


def _train_run(argv: list[str], run_dir: Path, seconds: float, env: dict[str, str], *, from_step: int = 0,
               warmup_cap: float, grace: float = 90.) -> dict[str, Any]:
    """Runs `python -m kdiff_align.train argv` and sends SIGINT `seconds` after its first metrics row past
    from_step (or warmup_cap + seconds after its start, whichever comes first); the CLI then saves and exits,
    or is killed `grace` seconds later. Returns its exit status and what metrics.csv says of the steps after
    from_step."""
    start = time.time()
    log = run_dir.parent / f'{run_dir.name}_{int(start)}.log'
    log.parent.mkdir(parents=True, exist_ok=True)
    first_row = None
    with open(log, 'w') as f:
        proc = subprocess.Popen([sys.executable, '-m', 'kdiff_align.train', *argv], stdout=f,
                                stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            if first_row is None and _metrics(run_dir / 'metrics.csv', from_step):
                first_row = time.time()
            if (first_row and time.time() - first_row >= seconds) or time.time() - start >= warmup_cap + seconds:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.2)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    output = log.read_text()
    rows = _metrics(run_dir / 'metrics.csv', from_step)
    losses = [r['loss'] for r in rows]
    quarter = max(1, len(losses) // 4)
    steady = rows[1:] if len(rows) > 2 else rows
    steps_per_s = None
    if len(steady) >= 2 and steady[-1]['elapsed_s'] > steady[0]['elapsed_s']:
        steps_per_s = (steady[-1]['step'] - steady[0]['step']) / (steady[-1]['elapsed_s'] - steady[0]['elapsed_s'])
    latest = run_dir / 'latest.json'
    checkpoint_step = json.loads(latest.read_text()).get('step') if latest.exists() else None
    return {'argv': argv, 'returncode': proc.returncode, 'wall_seconds': time.time() - start,
            'seconds_to_first_row': None if first_row is None else first_row - start,
            'first_step': rows[0]['step'] if rows else None, 'last_step': rows[-1]['step'] if rows else None,
            'steps_per_s': steps_per_s, 'first_loss': sum(losses[:quarter]) / quarter if losses else None,
            'last_loss': sum(losses[-quarter:]) / quarter if losses else None,
            'finite': bool(losses) and all(math.isfinite(v) for v in losses),
            'falling': len(losses) >= 2 and sum(losses[-quarter:]) < sum(losses[:quarter]),
            'checkpoint_step': checkpoint_step, 'log': str(log), 'output_tail': output[-1500:], 'output': output}


def _metrics(path: Path, from_step: int = 0) -> list[dict[str, float]]:
    """metrics.csv's rows after from_step, as numbers ([] when there is no file)."""
    if not path.exists():
        return []
    with open(path, newline='') as f:
        rows = [{k: float(v) if k != 'step' else int(v) for k, v in row.items() if v not in ('', None)}
                for row in csv.DictReader(f)]
    return [row for row in rows if row['step'] > from_step]


def _png_stats(path: Path) -> float | None:
    """The standard deviation of a PNG's pixel values (0 for a blank image; None when there is no file)."""
    if not path.exists():
        return None
    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(path), dtype=np.float64).std())


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def _driver() -> str:
    try:
        return subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                              capture_output=True, text=True, timeout=20).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def main(argv: list[str] | None = None) -> int:
    """`python -m kdiff_align.bench gpu`; returns 0 when every section passed, 1 otherwise."""
    p = argparse.ArgumentParser(prog='python -m kdiff_align.bench gpu', description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda', help='cuda (default) or cpu (with --tiny: the self-test)')
    p.add_argument('--tiny', action='store_true', help='a small model and short runs (the CPU self-test)')
    p.add_argument('--out', type=Path, default=Path('docs') / 'gpu.md', help='the Markdown report (+ .json)')
    p.add_argument('--work-dir', type=Path, default=Path('runs') / 'gpu_check', help='runs, data and logs')
    p.add_argument('--sections', nargs='+', choices=('speed', 'train', 'sd'), default=['speed', 'sd', 'train'])
    p.add_argument('--train-seconds', type=float, default=None,
                   help='training time of each of the two runs after its first logged step (default 60; --tiny 2)')
    p.add_argument("--compile-cap", type=float, default=180.,
                   help='seconds before the --compile run is stopped even if compilation has not finished')
    args = p.parse_args(argv)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device is available; on a CPU run --device cpu --tiny (the self-test)')
    if args.device == 'cpu' and not args.tiny:
        p.error('--device cpu needs --tiny: the full check trains the CIFAR-10 U-Net, which needs a GPU')
    if args.train_seconds is None:
        args.train_seconds = 2. if args.tiny else 60.
    if args.train_seconds <= 0:
        p.error(f'--train-seconds must be > 0, got {args.train_seconds}')
    check = Check(args)
    check.run('environment', check.environment)
    for name in args.sections:
        check.run(name, getattr(check, name))
    failed = [name for name, s in check.sections.items() if not s['ok']]
    print(f'[gpu check] done in {time.time() - check.start:.0f} s; report: {args.out}'
          + (f'; FAILED: {", ".join(failed)}' if failed else '; every section passed'))
    return 1 if failed else 0
