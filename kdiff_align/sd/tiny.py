"""Tiny random Stable Diffusion components saved in diffusers' folder layout, and a captioned image folder.

Built from configs, no download (the tests and the GPU check use them): a UNet2DConditionModel with two
blocks, an AutoencoderKL with four blocks (the real VAE's factor 8, so 32 px images give 4x4 latents), a
2-layer CLIPTextModel and a CLIPTokenizer from a 26-letter vocabulary with a few merges, and a PNDMScheduler
config with SD 1.x's beta schedule, written by StableDiffusionPipeline.save_pretrained (model_index.json
included).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

RESOLUTION = 32
CAPTIONS = ('a cat', 'a dog', 'a red cat', 'a blue dog', 'cat and dog', 'a dog on grass')


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    letters = 'abcdefghijklmnopqrstuvwxyz'
    merges = ['c a', 'ca t</w>', 'd o', 'do g</w>']
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + '</w>': len(letters) + i for i, c in enumerate(letters)})
    for m in merges:
        vocab[m.replace(' ', '')] = len(vocab)
    vocab['<|startoftext|>'] = len(vocab)
    vocab['<|endoftext|>'] = len(vocab)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / 'vocab.json').write_text(json.dumps(vocab))
    (tmp / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
    return CLIPTokenizer(str(tmp / 'vocab.json'), str(tmp / 'merges.txt'), model_max_length=77)


def build_pipeline(tmp: Path, seed: int = 0):
    """A tiny random StableDiffusionPipeline (safety_checker=None)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
        norm_num_groups=4, sample_size=RESOLUTION)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=56, eos_token_id=57, pad_token_id=57, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=77,
        projection_dim=32))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(tmp / '_tok'),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_pipeline(path: Path, *, prediction: str = 'epsilon', seed: int = 0) -> Path:
    """Writes the tiny pipeline in diffusers' layout to path; prediction sets scheduler_config.json."""
    pipe = build_pipeline(path.parent / f'{path.name}_build', seed)
    pipe.save_pretrained(str(path), safe_serialization=True)
    shutil.rmtree(path.parent / f'{path.name}_build', ignore_errors=True)
    set_prediction(path, prediction)
    return path


def set_prediction(path: Path, prediction: str) -> None:
    cfg_path = path / 'scheduler' / 'scheduler_config.json'
    cfg = json.loads(cfg_path.read_text())
    cfg['prediction_type'] = prediction
    cfg_path.write_text(json.dumps(cfg))


def make_captioned_folder(path: Path, *, n: int = 6, size: int = RESOLUTION, layout: str = '.txt') -> Path:
    """n random-colour images (some non-square) with captions in sidecar .txt files or metadata.jsonl."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = (size, size) if i % 2 == 0 else (size + 8, size * 2)
        base = rng.integers(0, 256, 3)
        pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        name = f'img_{i}.png' if i % 3 else f'img_{i}.jpg'
        Image.fromarray(pixels).save(path / name)
        caption = CAPTIONS[i % len(CAPTIONS)]
        if layout == '.txt':
            (path / name).with_suffix('.txt').write_text(caption + '\n')
        else:
            rows.append(json.dumps({'file_name': name, 'text': caption}))
    if layout != '.txt':
        (path / 'metadata.jsonl').write_text('\n'.join(rows) + '\n')
    return path


def sd_config(pretrained: Path, data: Path, *, lora: bool = True, prediction: str = 'epsilon', **align) -> dict:
    """A tiny stable_diffusion config in the format of configs/sd_aligned.json."""
    return {
        'model': {'type': 'stable_diffusion', 'pretrained': str(pretrained), 'prediction': prediction,
                  'resolution': RESOLUTION,
                  'lora': {'rank': 4, 'alpha': 8, 'target_modules': ['to_q', 'to_k', 'to_v', 'to_out.0']}
                  if lora else None,
                  'gradient_checkpointing': True, 'mixed_precision': 'no'},
        'dataset': {'type': 'sd-captions', 'location': str(data), 'caption_ext': '.txt'},
        'optimizer': {'type': 'adamw', 'lr': 1e-2, 'betas': [0.9, 0.99], 'eps': 1e-8, 'weight_decay': 0.0},
        'lr_sched': {'type': 'constant', 'warmup': 0.0},
        'ema_sched': None,
        'align': {'w_train': 1.0, 'uncond_prob': 0.2, 'sample_steps': 4, **align},
    }


def objective_config(objective: str, **align) -> dict:
    """A loaded Stable Diffusion config of align.objective (schema only, nothing loads): gft and distill are full
    fine-tunes, distill's teacher the frozen base UNet."""
    from ..core import registry
    from ..config.sd import load_config

    spec = registry.get(objective)
    defaults = {'teacher': 'base'} if spec.teacher == 'frozen' else {}
    lora = {'lora': None} if spec.tells_w else {}
    return load_config({'model': {'type': 'stable_diffusion', 'pretrained': 'sd15', **lora},
                        'dataset': {'location': 'images'}, 'align': {'objective': objective, **defaults, **align}})


def objective_export(path: str | Path, objective: str, **align) -> Path:
    """A placeholder export (one tensor) carrying the kdiff_align metadata of objective_config: what hosts read."""
    from safetensors.torch import save_file

    from ..storage.metadata import export_metadata

    save_file({'x': torch.zeros(1)}, str(path), metadata=export_metadata(objective_config(objective, **align)))
    return Path(path)
