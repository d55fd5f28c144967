"""The configs that ship with kdiff-align, by name: `--config cifar_aligned` is configs/cifar_aligned.json.

The top-level configs/ folder is the only copy: a source checkout reads it in place, and the wheel maps it to the
package folder kdiff_align/configs/ (pyproject.toml), so names work outside a checkout too.
"""

from __future__ import annotations

from pathlib import Path


def _configs_dir() -> Path:
    here = Path(__file__).resolve().parents[1]
    installed, checkout = here / 'configs', here.parent / 'configs'
    return installed if installed.is_dir() or not checkout.is_dir() else checkout


CONFIGS = _configs_dir()


def shipped_configs() -> list[str]:
    """The names of the shipped configs, e.g. 'cifar_aligned' for configs/cifar_aligned.json."""
    return sorted(p.stem for p in CONFIGS.glob('*.json'))


def find_config(path_or_name: str | Path) -> Path | None:
    """path_or_name if it is a file, else the shipped config of that name ('cifar_aligned', 'cifar_aligned.json'
    or, as a checkout spells it, 'configs/cifar_aligned.json'), else None."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name.removesuffix('.json')
    in_configs = path.parent in (Path('.'), Path('configs'))
    return CONFIGS / f'{name}.json' if in_configs and name in shipped_configs() else None
