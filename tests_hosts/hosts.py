"""Where the extracted host sources are: $KDIFF_ALIGN_HOSTS (set by `make test-hosts`), else a skip reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'kdiff_align' / 'integrations'


def host_source(prefix: str, inner: str) -> Path:
    """<$KDIFF_ALIGN_HOSTS>/<prefix>-<commit>/<inner>, or skip the test saying what is missing."""
    src = os.environ.get('KDIFF_ALIGN_HOSTS')
    if not src:
        pytest.skip('the real-host tier runs through `make test-hosts`, which extracts ../shared/hosts and sets '
                    'KDIFF_ALIGN_HOSTS; it is not set here', allow_module_level=True)
    found = sorted(Path(src).glob(f'{prefix}-*/{inner}'))
    if not found:
        pytest.skip(f'{src} holds no {prefix}-*/{inner} (extract ../shared/hosts with `make test-hosts`)',
                    allow_module_level=True)
    return found[-1].resolve()
