"""Stable Diffusion components as k-diffusion denoisers.

The diffusers UNet predicts eps (or v) from (x_t, t, text embedding). k-diffusion's DiscreteEpsDDPMDenoiser /
DiscreteVDDPMDenoiser wrap such a network given the training schedule's alphas_cumprod, with noise levels
sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod); AlignedDenoiser and GuidedDenoiser use them as they are.
The conditioning keyword argument is `cond` (the text encoder's last hidden state, [B, 77, D]); the null
condition is the empty prompt's embedding, {'cond': empty_embedding} with one row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

COND_KEY = 'cond'

# Noise on every SD command, hidden by exact message: diffusers warns on every ModelMixin.to(dtype) even when no
# module needs float32 (the list is empty), and transformers draws a bar for loading the text encoder's weights.
NO_FP32_MODULES = 'should be kept in float32: []'
LOADING_BAR = 'Loading weights'


class _EmptyFp32Warning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NO_FP32_MODULES not in record.getMessage()


logging.getLogger('diffusers.models.modeling_utils').addFilter(_EmptyFp32Warning())


@contextlib.contextmanager
def no_loading_bar() -> Iterator[None]:
    """Within it, transformers draws no "Loading weights" bar (its other bars, and any hook of the user's, stay)."""
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, 'set_tqdm_hook'):   # older transformers: no such bar either
        yield
        return

    def hook(factory, args, kwargs):
        if kwargs.get('desc') == LOADING_BAR:
            kwargs = {**kwargs, 'disable': True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


class UNetAdapter(nn.Module):
    """inner_model for k-diffusion's DDPM wrappers: forward(x, t, cond) = unet(x, t, encoder_hidden_states=cond).

    A UNet with a guidance embedding (time_cond_proj_dim, see add_guidance_embedding) is told the paper's w
    per row through guidance_cond, as diffusers' latent-consistency pipelines pass it (timestep_cond).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, input: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                guidance_cond: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        dim = self.unet.config.get('time_cond_proj_dim')
        if (guidance_cond is None) != (dim is None):
            raise ValueError('guidance_cond (w per row) goes with a UNet that has a guidance embedding '
                             f'(time_cond_proj_dim {dim}); pass both or neither')
        timestep_cond = None if dim is None else guidance_scale_embedding(
            torch.as_tensor(guidance_cond, device=input.device).expand(input.shape[0]), dim).to(dtype)
        return self.unet(input.to(dtype), t, encoder_hidden_states=cond.to(dtype),
                         timestep_cond=timestep_cond).sample.to(input.dtype)


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [B, dim] of the paper's w, in the form diffusers' latent-consistency pipelines give
    UNet2DConditionModel's timestep_cond (their w is guidance_scale - 1, the paper's w)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=w.device, dtype=torch.float32) * -(math.log(10000.) / (half - 1)))
    angles = (w.float() * 1000.)[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def add_guidance_embedding(unet: nn.Module, dim: int = 256) -> nn.Module:
    """unet with a guidance embedding: a copy built with time_cond_proj_dim = dim (diffusers' own option, so
    the result saves and loads in diffusers), the same weights, and the new projection at zero, so its output
    equals unet's at any w until trained."""
    from diffusers import UNet2DConditionModel

    if unet.config.get('time_cond_proj_dim') is not None:
        raise ValueError(f'the UNet already has a guidance embedding (time_cond_proj_dim '
                         f'{unet.config["time_cond_proj_dim"]})')
    told = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=dim)
    missing, unexpected = told.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {'time_embedding.cond_proj.weight'}:
        raise RuntimeError(f'adding time_cond_proj_dim changed more than the projection: {missing}, {unexpected}')
    nn.init.zeros_(told.time_embedding.cond_proj.weight)
    param = next(unet.parameters())
    return told.to(param.device, param.dtype)


@dataclasses.dataclass
class Components:
    """The parts of a Stable Diffusion checkpoint that kdiff-align uses."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    alphas_cumprod: torch.Tensor
    prediction: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scale(self) -> float:
        """VAE latents are multiplied by this before diffusion (0.18215 for SD 1.x / 2.x)."""
        return float(self.vae.config.scaling_factor)


def alphas_cumprod_from_config(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """alphas_cumprod of the training schedule in a diffusers scheduler config (any scheduler class)."""
    from diffusers import DDPMScheduler

    keys = ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule', 'trained_betas')
    sched = DDPMScheduler(**{k: scheduler_config[k] for k in keys if scheduler_config.get(k) is not None})
    return sched.alphas_cumprod.clone().float()


def load_components(model: Mapping[str, Any], *, unet_path: str | Path | None = None,
                    dtype: torch.dtype = torch.float32) -> Components:
    """Loads the UNet, VAE, text encoder, tokenizer and schedule of model.pretrained without network access.

    unet_path replaces the UNet with a full fine-tune saved in diffusers' layout (a folder with config.json).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    pretrained = Path(model['pretrained'])
    if pretrained.is_dir():
        def part(cls, name):
            return _load_weights(lambda: cls.from_pretrained(str(pretrained), subfolder=name, local_files_only=True,
                                                             torch_dtype=dtype), [pretrained / name])
        unet = part(UNet2DConditionModel, 'unet') if unet_path is None else None
        vae = part(AutoencoderKL, 'vae')
        with no_loading_bar():
            text_encoder = _load_weights(lambda: CLIPTextModel.from_pretrained(
                str(pretrained), subfolder='text_encoder', local_files_only=True, dtype=dtype),
                [pretrained / 'text_encoder'])
        tokenizer = AutoTokenizer.from_pretrained(str(pretrained), subfolder='tokenizer', local_files_only=True)
        scheduler_config = _scheduler_config(pretrained)
    else:
        from diffusers import StableDiffusionPipeline

        kwargs = {'torch_dtype': dtype, 'safety_checker': None, 'requires_safety_checker': False}
        if model.get('pretrained_config'):
            kwargs['config'] = model['pretrained_config']
            kwargs['local_files_only'] = Path(model['pretrained_config']).is_dir()
        with no_loading_bar():
            pipe = _load_weights(lambda: StableDiffusionPipeline.from_single_file(str(pretrained), **kwargs),
                                 [pretrained])
        unet = pipe.unet if unet_path is None else None
        vae, text_encoder, tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        scheduler_config = dict(pipe.scheduler.config)
        if model.get('prediction') is not None:
            scheduler_config['prediction_type'] = model['prediction']
    if unet_path is not None:
        unet = _load_weights(lambda: UNet2DConditionModel.from_pretrained(str(unet_path), local_files_only=True,
                                                                          torch_dtype=dtype), [Path(unet_path)])
    prediction = model.get('prediction') or scheduler_config.get('prediction_type', 'epsilon')
    for module in (vae, text_encoder):
        module.requires_grad_(False).eval()
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      alphas_cumprod=alphas_cumprod_from_config(scheduler_config), prediction=prediction)


@contextlib.contextmanager
def _held_logs(names: Sequence[str]) -> Iterator[None]:
    """Holds the named libraries' log records: emitted afterwards when the block succeeds, dropped when it
    raises (their notices, e.g. "Defaulting to unsafe serialization", would precede the one-line error)."""
    held: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = held.append
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    try:
        yield
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
    for record in held:
        logging.getLogger(record.name).handle(record)


WEIGHT_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.safetensors')


def _load_weights(load: Callable[[], Any], places: Sequence[Path]) -> Any:
    """load() (diffusers' or transformers' loader); when it fails, the weights file it could not read (a file in
    places, or a file of a folder there) is a one-line CheckpointError naming it, never torch's advice to retry
    with weights_only=False. Only the failure path reads the files a second time."""
    from ..storage.checkpoint import CheckpointError, quiet_pickle_warnings, read_torch_file

    try:
        with quiet_pickle_warnings(), _held_logs(('diffusers', 'transformers')):
            return load()
    except Exception as err:  # noqa: BLE001 - reported below as one line naming the file
        if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
            raise
        files = [f for p in places for f in (sorted(p.iterdir()) if p.is_dir() else [p])
                 if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
        for path in files:
            if path.suffix == '.safetensors':
                from safetensors import safe_open
                try:
                    with safe_open(str(path), 'pt') as f:
                        f.keys()
                except Exception as bad:  # noqa: BLE001
                    raise CheckpointError(f'cannot read weights {str(path)!r}: it is truncated, or not a '
                                          f'safetensors file ({type(bad).__name__}); expected diffusers or '
                                          'transformers weights') from None
            else:
                read_torch_file(path, 'weights', 'diffusers or transformers weights')
        lines = [line for line in str(err).splitlines() if line.strip() and 'weights_only' not in line]
        raise CheckpointError(f'cannot load the weights in {", ".join(repr(str(p)) for p in places)} '
                              f'({type(err).__name__}: {lines[0] if lines else ""})') from None


def _scheduler_config(folder: Path) -> dict[str, Any]:
    import json

    return json.loads((folder / 'scheduler' / 'scheduler_config.json').read_text())


def make_denoiser(unet: nn.Module, alphas_cumprod: torch.Tensor, prediction: str) -> nn.Module:
    """The UNet as a k-diffusion denoiser: DiscreteEpsDDPMDenoiser (epsilon) or DiscreteVDDPMDenoiser (v)."""
    from k_diffusion import external

    if prediction == 'epsilon':
        return external.DiscreteEpsDDPMDenoiser(UNetAdapter(unet), alphas_cumprod, quantize=False)
    if prediction == 'v_prediction':
        return external.DiscreteVDDPMDenoiser(UNetAdapter(unet), alphas_cumprod, quantize=False)
    raise ValueError(f'prediction must be \'epsilon\' or \'v_prediction\', got {prediction!r}')


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: nn.Module, prompts: Sequence[str],
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Text embeddings [B, L, D]: the text encoder's last hidden state, as diffusers' SD pipeline uses them."""
    device = device or next(text_encoder.parameters()).device
    tokens = tokenizer(list(prompts), padding='max_length', max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors='pt')
    return text_encoder(tokens.input_ids.to(device))[0]


def null_condition(tokenizer: Any, text_encoder: nn.Module, device: torch.device | str | None = None
                   ) -> dict[str, torch.Tensor]:
    """The null condition: the empty prompt's embedding, one row that broadcasts over a batch."""
    return {COND_KEY: encode_prompts(tokenizer, text_encoder, [''], device)}
