"""Captioned image folders as cached VAE latents and text embeddings.

The first run encodes every image once with the VAE (its latent distribution's mean and std, times the
VAE's scaling factor) and every distinct caption once with the text encoder, and saves them to one
safetensors file keyed by a fingerprint of the images, captions, weights and resolution. Training then
samples latents as mean + std * n each step and never runs the VAE or the text encoder; a later run with
the same inputs loads the file and skips both models entirely.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..storage.checkpoint import atomic_write

CACHE_VERSION = 1


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """An RGB image as [3, resolution, resolution] in [-1, 1]: shorter side resized (bicubic), centre crop."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert('RGB')
        w, h = img.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def fingerprint(items: Sequence[tuple[Path, str]], model: dict[str, Any]) -> str:
    """A hash of everything the cache depends on: image files, captions, weights and resolution."""
    pretrained = Path(model['pretrained']).resolve()
    weights = [pretrained] if pretrained.is_file() else [pretrained / 'vae', pretrained / 'text_encoder',
                                                         pretrained / 'tokenizer']
    stamps = []
    for folder in weights:
        files = [folder] if folder.is_file() else sorted(p for p in folder.rglob('*') if p.is_file())
        stamps += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    rows = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns, c) for p, c in items]
    blob = json.dumps({'version': CACHE_VERSION, 'resolution': model['resolution'], 'weights': stamps,
                       'items': rows})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class LatentCache:
    """Cached latents (mean, std of the VAE posterior, scaled) and text embeddings for a captioned folder."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, embeddings: torch.Tensor, caption_index: torch.Tensor,
                 captions: Sequence[str]):
        # Contiguous, as they are when read back from the file: the same memory layout gives the same floats.
        self.mean, self.std = mean.contiguous(), std.contiguous()
        self.embeddings, self.caption_index = embeddings.contiguous(), caption_index.contiguous()
        self.captions = list(captions)

    def __len__(self) -> int:
        return self.mean.shape[0]

    def batch(self, index: torch.Tensor, generator: torch.Generator | None = None,
              device: torch.device | str = 'cpu') -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, text embeddings) for rows index; latents drawn from the cached posterior."""
        mean, std = self.mean[index].float(), self.std[index].float()
        latents = mean + std * torch.randn(mean.shape, generator=generator)
        cond = self.embeddings[self.caption_index[index]].float()
        return latents.to(device), cond.to(device)

    def save(self, path: Path, key: str) -> None:
        from safetensors.torch import save_file

        tensors = {'mean': self.mean, 'std': self.std, 'embeddings': self.embeddings,
                   'caption_index': self.caption_index}
        meta = {'fingerprint': key, 'captions': json.dumps(self.captions)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Path, key: str) -> LatentCache | None:
        """The cache at path if its fingerprint is key, else None."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
            if meta.get('fingerprint') != key:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tensors['mean'], tensors['std'], tensors['embeddings'], tensors['caption_index'],
                   json.loads(meta['captions']))


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f'sd_latents_{key}.safetensors'


@torch.no_grad()
def build_cache(items: Sequence[tuple[Path, str]], components: Any, model: dict[str, Any], cache_dir: str | Path,
                *, device: torch.device | str = 'cpu', batch_size: int = 8, progress: bool = False
                ) -> tuple[LatentCache, bool]:
    """Loads the cache for items, or encodes them once and saves it; returns (cache, whether it was built)."""
    from .model import encode_prompts

    key = fingerprint(items, model)
    path = cache_path(cache_dir, key)
    cached = LatentCache.load(path, key)
    if cached is not None:
        return cached, False
    resolution = model['resolution']
    small = [p for p, _ in items[:1000] if min(_image_size(p)) < resolution]
    if small:
        warnings.warn(f'{len(small)} image(s) are smaller than the training resolution {resolution} and are '
                      f'upscaled, e.g. {str(small[0])!r}')
    vae, text_encoder = components.vae.to(device), components.text_encoder.to(device)
    vae_dtype = next(vae.parameters()).dtype
    means, stds = [], []
    starts = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc='caching latents', total=math.ceil(len(items) / batch_size))
    for start in starts:
        pixels = torch.stack([load_image(p, resolution) for p, _ in items[start:start + batch_size]])
        dist = vae.encode(pixels.to(device, vae_dtype)).latent_dist
        means.append((dist.mean * components.latent_scale).to('cpu', torch.float16))
        stds.append((dist.std * components.latent_scale).to('cpu', torch.float16))
    captions = sorted({c for _, c in items})
    lookup = {c: i for i, c in enumerate(captions)}
    embeddings = torch.cat([encode_prompts(components.tokenizer, text_encoder, captions[i:i + 64], device)
                            .to('cpu', torch.float16) for i in range(0, len(captions), 64)])
    caption_index = torch.tensor([lookup[c] for _, c in items], dtype=torch.long)
    cache = LatentCache(torch.cat(means), torch.cat(stds), embeddings, caption_index, captions)
    cache.save(path, key)
    return cache, True


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def batch_indices(n: int, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, row indices) for each step from start_step on: a fresh permutation per epoch, last partial
    batch dropped (kept when the dataset is smaller than a batch), rows split between processes."""
    per_epoch = max(1, n // (batch_size * world_size))
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        if n < batch_size * world_size:
            perm = perm.repeat(math.ceil(batch_size * world_size / n))
        for i in range(offset, per_epoch):
            rows = perm[i * batch_size * world_size:(i + 1) * batch_size * world_size]
            yield epoch, rows[rank::world_size]
            step += 1
