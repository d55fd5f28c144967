"""Conditional and null-conditional keyword arguments, batched row by row.

The null condition is data (docs/design.md section 3): a dict of keyword arguments that replace the conditional
ones for the unconditional branch. A value may be a number, a tensor with one row (both broadcast to every
row) or a tensor with one row per batch row. Keyword arguments it does not name are shared by both branches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Kwargs = dict[str, Any]


def check_uncond(uncond: Mapping[str, Any] | None) -> Kwargs:
    """Validates a null condition and returns it as a plain dict."""
    if uncond is None:
        return {}
    if not isinstance(uncond, Mapping):
        raise TypeError(f'uncond must be a dict of keyword arguments (e.g. {{"class_cond": 10}}), '
                        f'got {type(uncond).__name__}')
    for key, value in uncond.items():
        if not isinstance(key, str):
            raise TypeError(f'uncond keys must be keyword-argument names, got {key!r}')
        if value is None or not isinstance(value, (bool, int, float, torch.Tensor)):
            raise TypeError(f'uncond[{key!r}] must be a number or a tensor, got {type(value).__name__}; '
                            'the null condition is data that replaces the conditional value')
    return dict(uncond)


def _is_batched(value: Any, batch_size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size


def take_rows(kwargs: Mapping[str, Any], index: torch.Tensor, batch_size: int) -> Kwargs:
    """Selects rows of every batched tensor in kwargs; everything else is shared."""
    return {k: v[index] if _is_batched(v, batch_size) else v for k, v in kwargs.items()}


def _broadcast(key: str, value: Any, like: Any, n: int, batch_size: int, index: torch.Tensor,
               device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        if isinstance(like, torch.Tensor):
            value = value.to(like.dtype)
        if value.ndim == 0:
            return value.expand(n)
        if value.shape[0] == 1:
            return value.expand(n, *value.shape[1:])
        if value.shape[0] == batch_size:
            return value[index]
        raise ValueError(f'uncond[{key!r}] has {value.shape[0]} rows; expected 1 (broadcast) or the batch '
                         f'size {batch_size}')
    if isinstance(like, torch.Tensor):
        shape = (n, *like.shape[1:]) if _is_batched(like, batch_size) else like.shape
        return torch.full(shape, value, dtype=like.dtype, device=device)
    dtype = torch.long if isinstance(value, int) and not isinstance(value, bool) else torch.get_default_dtype()
    return torch.full((n,), value, dtype=dtype, device=device)


def null_rows(kwargs: Mapping[str, Any], uncond: Mapping[str, Any], index: torch.Tensor,
              batch_size: int, device: torch.device) -> Kwargs:
    """The keyword arguments of the unconditional branch for the rows `index` of a batch."""
    out = take_rows(kwargs, index, batch_size)
    n = index.shape[0]
    for key, value in uncond.items():
        out[key] = _broadcast(key, value, kwargs.get(key), n, batch_size, index, device)
    return out


def where_rows(mask: torch.Tensor, if_true: Mapping[str, Any], if_false: Mapping[str, Any]) -> Kwargs:
    """Row-wise choice between two keyword-argument dicts of the same batch size."""
    batch_size = mask.shape[0]
    out = {}
    for key in if_false.keys() | if_true.keys():
        a, b = if_true.get(key), if_false.get(key)
        if _is_batched(a, batch_size) and _is_batched(b, batch_size):
            out[key] = torch.where(mask.view(-1, *[1] * (a.ndim - 1)), a, b.to(a.dtype))
        else:
            out[key] = b if key in if_false else a
    return out


def cat_rows(first: Mapping[str, Any], second: Mapping[str, Any], n_first: int, n_second: int) -> Kwargs:
    """Concatenates two keyword-argument dicts along the batch dimension, for one batched model call."""
    if first.keys() != second.keys():
        raise ValueError(f'conditional and unconditional keyword arguments differ in names '
                         f'({sorted(first)} vs {sorted(second)}); both branches must take the same arguments')
    out = {}
    for key, a in first.items():
        b = second[key]
        if _is_batched(a, n_first) and _is_batched(b, n_second):
            out[key] = torch.cat([a, b.to(a.dtype)])
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and torch.equal(a, b)):
                raise ValueError(f'keyword argument {key!r} is not batched ({_shape(a)} for {n_first} rows, '
                                 f'{_shape(b)} for {n_second} rows) and differs between the branches')
            out[key] = a
        else:
            if a != b:
                raise ValueError(f'keyword argument {key!r} differs between the branches ({a!r} vs {b!r})')
            out[key] = a
    return out


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
