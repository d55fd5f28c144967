"""The package's error types and the one way a bad config value is reported (a leaf: imports nothing of ours).

Every CLI maps ConfigError, CheckpointError, DataError and MetadataError to exit status 2 (bad input) and
TrainingError to 1 (a failed run); each message is one line naming what was wrong and what would be right.
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A config value that is missing, of the wrong type or out of range."""


class CheckpointError(ValueError):
    """A checkpoint or export that is missing, unreadable or not from kdiff-align."""


class DataError(RuntimeError):
    """Training data that is missing or does not match the config."""


class MetadataError(ValueError):
    """kdiff_align metadata that is present but malformed."""


class TrainingError(RuntimeError):
    """Training cannot continue (a non-finite loss or gradient)."""


BAD_INPUT = (ConfigError, CheckpointError, DataError, MetadataError)   # exit status 2


def fail(key: str, value: Any, allowed: str) -> None:
    """Raises ConfigError for config key `key`."""
    raise ConfigError(f'config key {key!r}: got {value!r}; allowed: {allowed}')


def number(key: str, value: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           integer: bool = False) -> None:
    """Checks a finite number (or integer) in [lo, hi] ((lo, hi] when lo_open)."""
    kind = 'an integer' if integer else 'a number'
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    rng = f' in {"(" if lo_open else "["}{lo if lo is not None else "-inf"}, {hi if hi is not None else "inf"}]'
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        fail(key, value, kind + rng)
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        fail(key, value, kind + rng)


def choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Checks that value is one of choices."""
    if value not in choices:
        fail(key, value, 'one of ' + ', '.join(repr(c) for c in choices))
