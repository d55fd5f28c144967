"""Latent Stable Diffusion fine-tuning with the aligned objective (configs/sd_aligned.json, docs/sd.md).

Importing this package imports neither diffusers, transformers nor peft; its modules import them inside
the functions that need them. Entry points: `python -m kdiff_align.sd.train --config CONFIG` and
`python -m kdiff_align.sd.sample --pretrained FOLDER --lora FILE --prompt TEXT`.
"""

from ..config.sd import check_inputs, is_sd_config, load_config

__all__ = ['check_inputs', 'is_sd_config', 'load_config']
