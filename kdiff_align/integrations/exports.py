"""What a host does with an export's objective (kdiff_align.storage.metadata): the one-pass rules every integration
shares.

- Two-pass models (aligned, i.e. also standard CFG, and CFG on top of an mg model): the host's CFG at the export's
  cfg_scale, with its guidance interval.
- One-pass models not told w (mg at its trained w): cfg 1 and no unconditional pass; the guidance is in the
  network, and the host must add none.
- One-pass models told w (gft, distill): the w must reach the network through its w_input. Hosts that can pass it
  (diffusers: timestep_cond) sample at cfg 1 and pass w their own way; the others refuse with one line naming the
  model and where to sample it (HostCannotPassW).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ..core.guidance import w_to_cfg_scale

__all__ = ['HostCannotPassW', 'check_w_input', 'describe']

_WHERE = {
    # w_input -> where such a model is sampled in one pass
    'timestep_cond': ('its UNet\'s guidance embedding (diffusers time_cond_proj_dim / timestep_cond)',
                      'sample it with diffusers, which passes w as timestep_cond: a pipeline with the exported UNet '
                      'at guidance_scale {scale:g}, or kdiff_align.integrations.diffusers_guider'),
    'guidance_cond': ('a k-diffusion guidance embedding (keyword guidance_cond)',
                      'sample it with kdiff-align: python -m kdiff_align.sample --w {w:g}'),
}


class HostCannotPassW(ValueError):
    """A w-conditioned export (gft, distill) in a host that cannot tell the network w."""


def check_w_input(meta: Mapping[str, Any], *, host: str, model: str, w_inputs: Collection[str] = ()) -> None:
    """Raises HostCannotPassW, one line naming the model and what to do, for a model told w through a w_input that
    `host` cannot pass (w_inputs: the ones it can)."""
    w_input = meta.get('w_input')
    if w_input is None or w_input in w_inputs:
        return
    how, todo = _WHERE.get(w_input, (repr(w_input), 'sample it where that input is passed'))
    w = meta['w_sample']
    raise HostCannotPassW(f'kdiff-align: {model} is a {meta["objective"]} model told w through {how}, which {host} '
                          f'cannot pass, so it would sample a w it was not trained for; '
                          + todo.format(w=w, scale=w_to_cfg_scale(w)))


def describe(meta: Mapping[str, Any]) -> str:
    """One line saying how an export samples, for a node's info output or a log."""
    passes = meta.get('passes', 2)
    head = f"{meta['objective']}: w_train {meta['w_train']}, recommended w {meta['w_sample']:g}"
    if passes == 1:
        told = f", told w through {meta['w_input']}" if meta.get('w_input') else ''
        return f'{head} in one pass per step (host cfg 1, no unconditional pass{told})'
    return f"{head}, host cfg {meta['cfg_scale']:g}, sigma_interval {meta['sigma_interval']}"
