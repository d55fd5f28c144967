"""LR schedules and EMA for training, in upstream k-diffusion's config vocabulary.

Upstream's InverseLR / ExponentialLR / ConstantLRWithWarmup pass `verbose` to the torch scheduler base
class, which torch >= 2.7 rejects. These are the same formulas as LambdaLR multipliers (one per parameter
group), so they work on every torch and checkpoint as plain state dicts:

    warmup(t)      = 1 - warmup ** (t + 1)                 (exponential warmup; 0 disables)
    constant:      lr(t) = warmup(t) * base_lr
    inverse:       lr(t) = warmup(t) * max(min_lr, base_lr * (1 + t / inv_gamma) ** -power)
    exponential:   lr(t) = warmup(t) * max(min_lr, base_lr * decay ** (t / num_steps))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

LR_SCHEDULES = ('constant', 'inverse', 'exponential')


def _get(config: Mapping[str, Any], key: str, default: Any, section: str = 'lr_sched') -> float:
    value = config.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f'config key {section + "." + key!r}: got {value!r}; allowed: a number')
    return float(value)


def lr_multiplier(sched_config: Mapping[str, Any], base_lr: float) -> Callable[[int], float]:
    """lr(t) / base_lr for one parameter group, t = the number of scheduler steps taken."""
    kind = sched_config.get('type', 'constant')
    warmup = _get(sched_config, 'warmup', 0.)
    if not 0 <= warmup < 1:
        raise ConfigError(f'config key \'lr_sched.warmup\': got {warmup!r}; allowed: a number in [0, 1)')
    min_lr = _get(sched_config, 'min_lr', 0.)
    if kind == 'constant':
        return lambda t: 1 - warmup ** (t + 1)
    if kind == 'inverse':
        inv_gamma, power = _get(sched_config, 'inv_gamma', 1.), _get(sched_config, 'power', 1.)
        if inv_gamma <= 0:
            raise ConfigError(f'config key \'lr_sched.inv_gamma\': got {inv_gamma!r}; allowed: a number > 0')
        return lambda t: (1 - warmup ** (t + 1)) * max(min_lr / base_lr, (1 + t / inv_gamma) ** -power)
    if kind == 'exponential':
        if 'num_steps' not in sched_config:
            raise ConfigError('config key \'lr_sched.num_steps\' is required for an exponential schedule '
                              '(the steps over which the lr decays by lr_sched.decay)')
        num_steps, decay = _get(sched_config, 'num_steps', None), _get(sched_config, 'decay', 0.5)
        if num_steps <= 0:
            raise ConfigError(f'config key \'lr_sched.num_steps\': got {num_steps!r}; allowed: a number > 0')
        return lambda t: (1 - warmup ** (t + 1)) * max(min_lr / base_lr, decay ** (t / num_steps))
    raise ConfigError(f'config key \'lr_sched.type\': got {kind!r}; allowed: ' + ', '.join(map(repr, LR_SCHEDULES)))


def make_lr_scheduler(opt: torch.optim.Optimizer, sched_config: Mapping[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """The config's lr_sched as a LambdaLR (works on torch >= 2.7, unlike upstream's schedulers)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, [lr_multiplier(sched_config, group['lr']) for group in opt.param_groups])


def make_ema_sched(ema_config: Mapping[str, Any]):
    """Upstream's EMAWarmup from the config's ema_sched (decay = 1 - (1 + t / inv_gamma) ** -power)."""
    from k_diffusion.utils import EMAWarmup

    if ema_config.get('type', 'inverse') != 'inverse':
        raise ConfigError(f'config key \'ema_sched.type\': got {ema_config["type"]!r}; allowed: \'inverse\'')
    kwargs = {k: _get(ema_config, k, d, 'ema_sched') for k, d in
              (('inv_gamma', 1.), ('power', 1.), ('min_value', 0.), ('max_value', 1.))}
    if not 0 <= kwargs['min_value'] <= kwargs['max_value'] <= 1:
        raise ConfigError(f'config section \'ema_sched\' needs 0 <= min_value <= max_value <= 1, got '
                          f'[{kwargs["min_value"]}, {kwargs["max_value"]}]')
    return EMAWarmup(**kwargs, start_at=int(ema_config.get('start_at', 0)))


@torch.no_grad()
def ema_update(model: nn.Module, averaged_model: nn.Module, decay: float) -> None:
    """Upstream's EMA update: averaged = decay * averaged + (1 - decay) * model; buffers copied."""
    from k_diffusion.utils import ema_update as k_ema_update

    k_ema_update(model, averaged_model, decay)


def make_optimizer(params: Any, opt_config: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    """The config's optimizer (adamw, adam or sgd, upstream's keys) over params or parameter groups."""
    kind = opt_config.get('type', 'adamw')
    wd = opt_config.get('weight_decay', 0.)
    if kind in ('adamw', 'adam'):
        cls = torch.optim.AdamW if kind == 'adamw' else torch.optim.Adam
        return cls(params, lr=lr, betas=tuple(opt_config.get('betas', (0.9, 0.999))),
                   eps=opt_config.get('eps', 1e-8), weight_decay=wd)
    if kind == 'sgd':
        return torch.optim.SGD(params, lr=lr, momentum=opt_config.get('momentum', 0.),
                               nesterov=opt_config.get('nesterov', False), weight_decay=wd)
    raise ConfigError(f'config key \'optimizer.type\': got {kind!r}; allowed: \'adamw\', \'adam\', \'sgd\'')


def param_groups(model: nn.Module, lr: float) -> list[dict]:
    """The model's own parameter groups (upstream's weight-decay split) or one group of all parameters."""
    if hasattr(model, 'param_groups'):
        return model.param_groups(lr)
    return [{'params': [p for p in model.parameters() if p.requires_grad], 'lr': lr}]
