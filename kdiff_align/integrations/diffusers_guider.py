"""A diffusers guider (diffusers >= 0.35 guiders API) with kdiff-align's semantics.

    from kdiff_align.integrations.diffusers_guider import AlignedGuidance
    guider = AlignedGuidance.from_metadata('lora.safetensors').set_scheduler(pipe.scheduler)
    pipe.update_components(guider=guider)          # a modular pipeline (e.g. Stable Diffusion XL)

guidance_scale is diffusers' convention, s = 1 + w; w is the paper's (w = 0: unguided); pass one. A
sigma_interval (in the model family's noise levels: k-diffusion sigma, or t in [0, 1] for flow models) or w
schedule needs the scheduler, to turn the loop's timestep into sigma: set_scheduler(scheduler). Outside the
interval the guider asks for the conditional batch only.

One-pass exports (kdiff_align.storage.metadata passes 1): an mg model samples at guidance_scale 1 (one conditional
batch). A gft / distill Stable Diffusion UNet is told w through diffusers' own guidance embedding
(time_cond_proj_dim): diffusers' pipelines then compute timestep_cond from guidance_scale - 1 (the paper's w)
and run one pass, as for latent-consistency models, so its guidance_scale is 1 + w and no CFG is added.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from ..core.guidance import cfg_scale_to_w, w_to_cfg_scale
from ..storage.metadata import read_metadata
from . import HostGuidance
from .exports import check_w_input

HOST = 'diffusers'
W_INPUTS = ('timestep_cond',)   # what diffusers passes: UNet2DConditionModel's timestep_cond


def _read(path_or_meta: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    meta = path_or_meta if isinstance(path_or_meta, dict) else read_metadata(path_or_meta)
    name = 'this export' if isinstance(path_or_meta, dict) else repr(str(path_or_meta))
    if meta is None:
        raise ValueError(f'{name} carries no kdiff_align metadata (keys "kdiff_align.*")')
    check_w_input(meta, host=HOST, model=name, w_inputs=W_INPUTS)
    if meta.get('w_input') is not None and meta['sigma_interval'] is not None:
        raise ValueError(f'{name} is a {meta["objective"]} model told w with the guidance interval '
                         f'{meta["sigma_interval"]}, but diffusers pipelines pass one timestep_cond per call; sample '
                         'it with kdiff-align (make_guided_denoiser), which tells it w = 0 outside the interval')
    return meta, name


def check_unet(unet: Any, name: str = 'this model') -> None:
    """Refuses a UNet without a guidance embedding (time_cond_proj_dim) for a model told w through timestep_cond."""
    if getattr(unet, 'config', {}).get('time_cond_proj_dim') is None:
        raise ValueError(f'{name} is told w through timestep_cond, but this UNet has no guidance embedding '
                         '(config time_cond_proj_dim is None), so the pipeline would not pass w; load the exported '
                         'UNet (its config has time_cond_proj_dim)')


def recommended_guidance_scale(path: str | Path, unet: Any | None = None) -> float:
    """diffusers' guidance_scale for a kdiff-align export, for pipelines without guiders (StableDiffusionPipeline).

    Two-pass models: s = 1 + w of the host's CFG (an export with a sigma_interval needs AlignedGuidance, since such
    pipelines guide at every step). One-pass mg models: 1.0 (one conditional batch). Models told w through
    timestep_cond (gft, distill): 1 + w, which the pipeline passes to a UNet with time_cond_proj_dim as
    timestep_cond while running one pass; give unet (pipe.unet) to check that it has one.
    """
    meta, name = _read(path)
    if meta.get('w_input') is not None:
        if unet is not None:
            check_unet(unet, name)
        return w_to_cfg_scale(meta['w_sample'])
    if meta['sigma_interval'] is not None:
        raise ValueError(f'{name} recommends the guidance interval {meta["sigma_interval"]}, which a '
                         'guidance_scale alone cannot express; use AlignedGuidance.from_metadata with a modular '
                         'pipeline, or sample with kdiff_align.GuidedDenoiser')
    return meta['cfg_scale']


class AlignedGuidance(BaseGuidance):
    """Classifier-free guidance in the paper's w, with a sigma interval and an optional w schedule.

    Args:
        guidance_scale: diffusers' scale s = 1 + w. Give this or w.
        w: the paper's guidance weight (w = 0: unguided conditional sampling).
        sigma_interval: [sigma_lo, sigma_hi] in sigma_convention's noise levels; guide only there.
        w_end: with sigma_interval, w ramps from w at sigma_hi to w_end at sigma_lo (linear in log sigma).
        sigma_convention: the family whose noise levels the interval is in: 'k-diffusion' (VP schedulers) or
            'flow' (flow-matching schedulers, sigma = t in [0, 1]); from_metadata reads it from the export.
        told_w: the UNet is told w (a gft / distill export; time_cond_proj_dim): the pipeline passes guidance_scale
            - 1 = w as timestep_cond, and the guider asks for the conditional batch only (no CFG on top).
        start, stop, enabled: as BaseGuidance (fractions of the steps).
    """

    _input_predictions = ['pred_cond', 'pred_uncond']

    @register_to_config
    def __init__(self, guidance_scale: float | None = None, w: float | None = None,
                 sigma_interval: Sequence[float] | None = None, w_end: float | None = None,
                 sigma_convention: str = 'k-diffusion', told_w: bool = False, start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        if (guidance_scale is None) == (w is None):
            raise ValueError(f'pass exactly one of guidance_scale (diffusers\' s = 1 + w) or w (the paper\'s w); '
                             f'got guidance_scale={guidance_scale!r}, w={w!r}')
        w = cfg_scale_to_w(guidance_scale) if w is None else w
        if told_w and (sigma_interval is not None or w_end is not None):
            raise ValueError('told_w: diffusers pipelines pass one timestep_cond per call, so a model told w cannot '
                             'take a sigma_interval or w schedule here')
        self.told_w = told_w
        self.source: str | None = None   # the export from_metadata read, named in refusals
        self.guidance = HostGuidance(w, sigma_interval=sigma_interval, w_end=w_end, sigma_convention=sigma_convention)
        self.guidance_scale = w_to_cfg_scale(self.guidance.w)
        self._sigma_table: torch.Tensor | None = None
        self._flow_timesteps: float | None = None

    @classmethod
    def from_metadata(cls, path_or_meta: str | Path | dict[str, Any], **kwargs: Any) -> AlignedGuidance:
        """The recommended guidance of a kdiff-align export (a .safetensors path or parsed metadata): CFG at its
        host scale and interval for two-pass models; one conditional batch for one-pass ones, a model told w
        through timestep_cond getting guidance_scale 1 + w (told_w). A model told w otherwise (a k-diffusion
        guidance_cond) is refused (HostCannotPassW)."""
        meta, name = _read(path_or_meta)
        if meta.get('w_input') is not None:
            try:
                guider = cls(w=meta['w_sample'], told_w=True, **kwargs)
            except ValueError as err:
                raise ValueError(f'{name}: {err}') from None
            guider.source = name
            return guider
        host = HostGuidance.from_metadata(meta, host=HOST, model=name, w_inputs=W_INPUTS)
        return cls(w=host.w, sigma_interval=host.sigma_interval, sigma_convention=host.sigma_convention, **kwargs)

    def set_scheduler(self, scheduler: Any) -> AlignedGuidance:
        """Lets the guider turn timesteps into sigma: VP schedulers (alphas_cumprod: k-diffusion's sigma) or flow
        matching (sigma = t / num_train_timesteps in [0, 1], as ComfyUI's sigma for flow models)."""
        if getattr(scheduler, 'alphas_cumprod', None) is not None:
            self.guidance.check_convention('k-diffusion', type(scheduler).__name__)
            alphas = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
            self._sigma_table = ((1 - alphas) / alphas) ** 0.5
        elif hasattr(scheduler, 'config') and 'shift' in scheduler.config:
            self.guidance.check_convention('flow', type(scheduler).__name__)
            self._flow_timesteps = float(scheduler.config.get('num_train_timesteps', 1000))
        else:
            raise ValueError(f'{type(scheduler).__name__} has neither alphas_cumprod (a VP schedule) nor a '
                             'flow-matching config; cannot map timesteps to sigma')
        return self

    def current_sigma(self) -> torch.Tensor:
        """The k-diffusion sigma of the current step (set_state's timestep)."""
        if self._timestep is None:
            raise RuntimeError('call set_state(step, num_inference_steps, timestep) first')
        t = torch.as_tensor(self._timestep, dtype=torch.float64).reshape(-1)[:1].cpu()
        if self._sigma_table is not None:
            # Linear interpolation in t, as diffusers' discrete schedulers do for fractional timesteps.
            lo = t.floor().clamp(0, len(self._sigma_table) - 1)
            hi = (lo + 1).clamp(max=len(self._sigma_table) - 1)
            frac = t - lo
            return (self._sigma_table[lo.long()] * (1 - frac) + self._sigma_table[hi.long()] * frac).float()
        if self._flow_timesteps is not None:
            return (t / self._flow_timesteps).float()  # the flow family's sigma: t in [0, 1]
        if self.guidance.sigma_interval is None:
            return torch.ones(1)  # no interval and no schedule: any sigma gives the same w
        raise RuntimeError('sigma_interval / w_end need set_scheduler(pipe.scheduler) to know each step\'s sigma')

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        if self.told_w:
            check_unet(denoiser, (self.source or "this guider's model") + ' (told_w)')
        super().prepare_models(denoiser)

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled or self.told_w:
            return False
        if self._num_inference_steps is not None:
            start = int(self._start * self._num_inference_steps)
            stop = int(self._stop * self._num_inference_steps)
            if not start <= self._step < stop:
                return False
        if self._timestep is None:
            return not math.isclose(self.guidance.peak_w, 0.0) or self.guidance.w_end is not None
        return self.guidance.needs_uncond(self.current_sigma())

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, str | tuple[str, str]]) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch_from_block_state(input_fields, data, i, name)
                for i, name in zip(indices, self._input_predictions)]

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if not self._is_cfg_enabled():
            pred = pred_cond
        else:
            pred = self.guidance.combine(pred_cond, pred_uncond, self.current_sigma().to(pred_cond.device))
        # The step is done: forget it, so that the next pipeline call's encoder steps, which ask num_conditions
        # before the first set_state, see the guider as new (a stale last step may lie outside the interval).
        self._step = self._num_inference_steps = self._timestep = None
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_cfg_enabled() else 1
