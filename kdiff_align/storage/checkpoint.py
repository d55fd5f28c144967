"""Training checkpoints (exact resume) and inference exports (safetensors), both carrying their config.

A checkpoint is a torch.save of plain tensors, numbers and strings, read back with weights_only=True:

    {'format': 'kdiff-align-checkpoint', 'version': 1, 'config': <JSON string>, 'args': <JSON string>,
     'model', 'model_ema', 'opt', 'sched', 'ema_sched', 'scaler': state dicts,
     'step', 'epoch', 'batches_seen': ints, 'rng': RNG states (torch, cuda, numpy, python), one per process,
     and with a config "guide" section: 'guide_step' (int) and 'model_guide' (the EMA weights at that step, None
     before it)}

(kdiff_align.training.engine writes them; 'model_ema' and 'ema_sched' are None without EMA, and a LoRA run's 'model'
holds the adapter only.) Writes are atomic (atomic_write: a temporary file in the same folder, fsync,
os.replace), and the run folder's latest.json pointer moves only after the new file is complete, so a crash
leaves the previous checkpoint. load_for_inference is the one reader of everything kdiff-align samples from.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError  # noqa: F401 (re-exported)

FORMAT = 'kdiff-align-checkpoint'
VERSION = 1
LATEST = 'latest.json'
REQUIRED_KEYS = ('config', 'model', 'model_ema', 'opt', 'sched', 'ema_sched', 'step', 'epoch', 'batches_seen',
                 'rng')


def _umask() -> int:
    """The process's umask: read from /proc where it can be (setting it to read it races with other threads)."""
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Calls write(tmp_path) for a temporary file next to path, then renames it over path. The file gets the
    mode the umask gives any new file (0644 under umask 022), not mkstemp's 0600, so that a UI running as
    another user (ComfyUI, A1111, a diffusers service) can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def get_rng_state() -> dict[str, Any]:
    """torch, cuda, numpy and python RNG states as tensors and numbers (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                  'cached_gaussian': float(cached)},
        'python': {'version': version, 'state': torch.tensor(py_state, dtype=torch.int64), 'gauss': gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores the states of get_rng_state."""
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['state'].tolist()), p['gauss']))


def save_checkpoint(run_dir: str | Path, step: int, state: Mapping[str, Any]) -> Path:
    """Writes run_dir/checkpoints/<step>.pth atomically, then points run_dir/latest.json at it."""
    run_dir = Path(run_dir)
    path = run_dir / 'checkpoints' / f'{step:08}.pth'
    obj = {'format': FORMAT, 'version': VERSION, **state, 'step': step}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    pointer = json.dumps({'latest_checkpoint': str(path.relative_to(run_dir)), 'step': step}, indent=1)
    atomic_write(run_dir / LATEST, lambda tmp: Path(tmp).write_text(pointer + '\n'))
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder / latest.json -> the checkpoint it points at."""
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
        if not path.exists():
            raise CheckpointError(f'run folder {str(path.parent)!r} has no {LATEST}: no checkpoint was saved '
                                  'there yet; pass a .pth checkpoint or a .safetensors export')
    if path.name == LATEST or path.suffix == '.json':
        try:
            pointer = json.loads(path.read_text())
            return path.parent / pointer['latest_checkpoint']
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f'{str(path)!r} is not a latest-checkpoint pointer '
                                  f'{{"latest_checkpoint": "checkpoints/<step>.pth"}}: {err}') from None
    if not path.is_file():
        raise CheckpointError(f'checkpoint {str(path)!r} does not exist; pass a .pth checkpoint, a run folder '
                              'with latest.json, or a .safetensors export')
    return path


@contextlib.contextmanager
def quiet_pickle_warnings() -> Iterator[None]:
    """Silences torch's weights-only unpickler notices (e.g. "Detected pickle protocol 4 in the checkpoint"),
    which would otherwise print in front of the one-line error about the same file."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'(?s).*(pickle protocol|weights_only)')
        yield


def read_torch_file(path: Path, what: str, expected: str | None = None) -> Any:
    """torch.load(path, weights_only=True); a file it refuses or cannot read is a one-line CheckpointError that
    names the file and what was expected (default: a kdiff-align <what>), never torch's advice to retry with
    weights_only=False."""
    try:
        with quiet_pickle_warnings():
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        found = re.search(r'(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)', str(err))
        if found:
            reason = (f'it holds a Python object ({found.group(1)}) besides tensors, numbers and strings, which '
                      'is not loaded because unpickling it could run code')
        else:
            reason = f'it is truncated, or not a torch.save file ({type(err).__name__})'
        expected = expected or f'a kdiff-align {what}'
        raise CheckpointError(f'cannot read {what} {str(path)!r}: {reason}; expected {expected} (a torch.save file '
                              'of tensors, numbers and strings)') from None


def _previous_checkpoint(path: Path) -> Path | None:
    """The checkpoint saved before path in its checkpoints folder (<step>.pth names), if any."""
    if not path.stem.isdigit():
        return None
    earlier = sorted(p for p in path.parent.glob('*.pth') if p.stem.isdigit() and int(p.stem) < int(path.stem))
    return earlier[-1] if earlier else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a training checkpoint with weights_only=True and checks that it is kdiff-align's."""
    path = resolve_checkpoint(path)
    try:
        ckpt = read_torch_file(path, 'checkpoint')
    except CheckpointError as err:
        previous = _previous_checkpoint(path)
        if previous is None:
            raise
        raise CheckpointError(f'{err}; the previous checkpoint is {previous}: pass it to --resume') from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise CheckpointError(f'{str(path)!r} is not a kdiff-align training checkpoint (no format '
                              f'{FORMAT!r}); upstream k-diffusion checkpoints cannot be resumed here')
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f'checkpoint {str(path)!r} lacks {", ".join(missing)}')
    ckpt['config'] = json.loads(ckpt['config'])
    ckpt['args'] = json.loads(ckpt.get('args', '{}'))
    ckpt['path'] = str(path)
    return ckpt


def export_metadata(config: Mapping[str, Any], step: int | None = None, *, guide: bool = False) -> dict[str, str]:
    """The safetensors metadata: the config (upstream reads its 'config' key) and the sampling metadata of
    kdiff_align.storage.metadata (objective, w_train, recommended w_sample and cfg_scale, sigma_interval).
    guide: a run's guide snapshot for autoguidance (the EMA weights at `step`), marked 'guide_snapshot': 'ema'."""
    from . import metadata

    meta = {'config': json.dumps(config), 'format': 'kdiff-align-export', **metadata.export_metadata(config)}
    if step is not None:
        meta['step'] = str(step)
    if guide:
        meta['guide_snapshot'] = 'ema'
    return meta


def save_export(path: str | Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                step: int | None = None, *, guide: bool = False) -> Path:
    """Writes inference weights (the EMA model; guide: a guide snapshot, export_metadata) as safetensors with the
    config in its metadata, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in state_dict.items()}
    meta = export_metadata(config, step, guide=guide)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_for_inference(path: str | Path, *, ema: bool = True, need_config: bool = True
                       ) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(config, weights) of anything kdiff-align samples from: a training checkpoint (.pth, or its run folder;
    EMA weights unless ema=False), a .pth dict with "config" and "model_ema" or "model" (upstream's layout), a
    .safetensors export with its config in the metadata, or a LoRA .safetensors (Stable Diffusion; its config
    may be None when need_config is False). Every failure is a CheckpointError naming the file."""
    path = Path(path)
    if path.suffix == '.safetensors':
        if not path.is_file():
            raise CheckpointError(f'export {str(path)!r} does not exist; pass a .safetensors export, a .pth '
                                  'checkpoint or a run folder')
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), 'pt') as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f'cannot read safetensors export {str(path)!r} ({type(err).__name__}: '
                                  f'{str(err).splitlines()[0] if str(err) else ""}); expected a kdiff-align export '
                                  'or a LoRA') from None
        if 'config' not in meta and need_config:
            raise CheckpointError(f'export {str(path)!r} has no "config" in its metadata; it was not written by '
                                  'kdiff-align or k-diffusion (export it with its config to sample or evaluate it)')
        return (json.loads(meta['config']) if 'config' in meta else None), state
    if path.is_dir() or path.suffix == '.json':
        ckpt = load_checkpoint(path)
    else:
        if not path.is_file():
            raise CheckpointError(f'checkpoint {str(path)!r} does not exist; pass a .pth checkpoint, a run folder '
                                  'with latest.json, or a .safetensors export')
        ckpt = read_torch_file(path, 'checkpoint')
        if not isinstance(ckpt, dict) or 'config' not in ckpt or not ({'model_ema', 'model'} & set(ckpt)):
            keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f'checkpoint {str(path)!r} needs the keys "config" and "model_ema" (or "model"); '
                                  f'got {keys}')
    config = json.loads(ckpt['config']) if isinstance(ckpt['config'], str) else ckpt['config']
    key = 'model_ema' if ema and ckpt.get('model_ema') is not None else 'model'
    if ckpt.get(key) is None:
        raise CheckpointError(f'checkpoint {str(path)!r} holds no weights under {key!r}')
    return config, ckpt[key]
