"""ComfyUI nodes: a guider for SamplerCustomAdvanced, a model patch for KSampler, a metadata reader.

Glue only: each node turns its widgets into a kdiff_align.integrations.HostGuidance and hands ComfyUI's
two predictions to it. ComfyUI conventions (comfy/samplers.py): the sigma ComfyUI passes is the sampler's
noise level; cfg is the scale s = 1 + w; a `sampler_cfg_function` receives args with 'cond' = x - D_c and
'uncond' = x - D_u (and 'cond_denoised', 'uncond_denoised', 'input', 'sigma', 'cond_scale') and returns
x - D; a guider's predict_noise returns D; sampling_function skips the unconditional pass at cfg 1 (unless a
patch sets disable_cfg1_optimization) and lets a `sampler_calc_cond_batch_function` run the step's batches.

One-pass exports (kdiff_align.integrations.exports): an mg model samples at cfg 1 with no unconditional pass;
ComfyUI cannot tell a gft / distill model w (its UNets have no timestep_cond), so the nodes refuse those, naming
the file.
"""

from __future__ import annotations

from typing import Any

import comfy.samplers
import torch

from kdiff_align.core.guidance import w_to_cfg_scale
from kdiff_align.integrations import HostGuidance, make_cfg_function
from kdiff_align.integrations.exports import describe
from kdiff_align.storage.metadata import read_metadata

CATEGORY = 'sampling/kdiff_align'
HOST = 'ComfyUI'
NO_FILE = '(none)'
FOLDERS = ('checkpoints', 'loras', 'diffusion_models')

W_TOOLTIP = "The paper's w (w = 0: unguided conditional sampling). ComfyUI's cfg = 1 + w."
INTERVAL_TOOLTIP = 'Guidance interval [sigma_lo, sigma_hi] in the sampler\'s sigma; sigma_hi = 0: guide at every step.'


def metadata_files() -> list[str]:
    """'<folder>/<name>' for every .safetensors file ComfyUI knows, for the metadata_file widget."""
    try:
        import folder_paths
    except ImportError:
        return [NO_FILE]
    out = [NO_FILE]
    for folder in FOLDERS:
        try:
            names = folder_paths.get_filename_list(folder)
        except (KeyError, AttributeError):
            continue
        out += [f'{folder}/{name}' for name in names if name.endswith('.safetensors')]
    return out


def file_metadata(choice: str) -> dict[str, Any]:
    """The kdiff_align metadata of a metadata_file choice; errors say what is missing."""
    import folder_paths

    if choice == NO_FILE:
        raise ValueError("w_source is 'metadata' but metadata_file is (none): pick the checkpoint or LoRA "
                         "exported by kdiff-align")
    folder, _, name = choice.partition('/')
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f'metadata_file {choice!r} is not in ComfyUI\'s {folder} folders')
    meta = read_metadata(path)
    if meta is None:
        raise ValueError(f'{choice!r} carries no kdiff_align metadata (keys "kdiff_align.*"); set w_source to '
                         "'node' and enter w yourself")
    return meta


def sigma_convention(model) -> str:
    """The noise levels ComfyUI's sigma is in for this model: 'flow' (t in [0, 1]) or 'k-diffusion'."""
    import comfy.model_sampling

    sampling = model.get_model_object('model_sampling')
    return 'flow' if isinstance(sampling, comfy.model_sampling.CONST) else 'k-diffusion'


def make_guidance(w_source: str, w: float, sigma_lo: float, sigma_hi: float, schedule: str, w_end: float,
                  metadata_file: str, convention: str = 'k-diffusion') -> HostGuidance | None:
    """The guidance the widgets describe; None for w_source 'ksampler cfg' (built per call from cfg).

    convention is the model's (sigma_convention): widget intervals are in it; a file's must match it.
    """
    end = w_end if schedule == 'log-linear' else None
    if w_source == 'metadata':
        guidance = HostGuidance.from_metadata(file_metadata(metadata_file), w_end=end, host=HOST,
                                              model=repr(metadata_file))
        guidance.check_convention(convention, 'this model')
        return guidance
    interval = [sigma_lo, sigma_hi] if sigma_hi > 0 else None
    if w_source == 'node':
        return HostGuidance(w, sigma_interval=interval, w_end=end, sigma_convention=convention)
    if w_source == 'ksampler cfg':
        HostGuidance(0.0, sigma_interval=interval, w_end=end)  # validates the widgets now, not mid-sampling
        return None
    raise ValueError(f"w_source must be 'node', 'metadata' or 'ksampler cfg', got {w_source!r}")


def conditional_only(previous=None):
    """A `sampler_calc_cond_batch_function` for guidance that needs no unconditional prediction (w = 0 everywhere:
    a one-pass mg export): the step runs the conditional batch only, and reports it in the unconditional's place,
    so that ComfyUI's combination at any cfg, u + cfg (c - u), is c. previous: a calc function already on the model."""

    def calc(args):
        conds = [args['conds'][0], None]
        if previous is not None:
            out = previous({**args, 'conds': conds})
        else:
            out = comfy.samplers.calc_cond_batch(args['model'], conds, args['input'], args['sigma'],
                                                 args['model_options'])
        return [out[0], out[0]]

    return calc


def _guidance_inputs(sources: list[str]) -> dict[str, Any]:
    return {
        'w_source': (sources, {'default': sources[0], 'tooltip': 'Where w (and the interval) come from.'}),
        'w': ('FLOAT', {'default': 1.0, 'min': -1.0, 'max': 100.0, 'step': 0.05, 'round': 0.001,
                        'tooltip': W_TOOLTIP}),
        'sigma_lo': ('FLOAT', {'default': 0.0, 'min': 0.0, 'max': 1000.0, 'step': 0.01, 'round': 0.001,
                               'tooltip': INTERVAL_TOOLTIP}),
        'sigma_hi': ('FLOAT', {'default': 0.0, 'min': 0.0, 'max': 1000.0, 'step': 0.01, 'round': 0.001,
                               'tooltip': INTERVAL_TOOLTIP}),
        'schedule': (['constant', 'log-linear'], {'default': 'constant', 'tooltip':
                     'log-linear: w at sigma_hi ramps to w_end at sigma_lo (needs the interval).'}),
        'w_end': ('FLOAT', {'default': 0.0, 'min': -1.0, 'max': 100.0, 'step': 0.05, 'round': 0.001}),
        'metadata_file': (metadata_files(), {'tooltip': 'A checkpoint or LoRA exported by kdiff-align; read '
                                             'when w_source is metadata.'}),
    }


class AlignedCFGGuider(comfy.samplers.CFGGuider):
    """CFGGuider with kdiff-align's semantics: the paper's w, a sigma interval, a w schedule.

    Outside the interval it runs the conditional pass only, like the core's GuidedDenoiser. Model patches
    apply as with CFGGuider at cfg = 1 + w(sigma).
    """

    def set_guidance(self, guidance: HostGuidance) -> None:
        self.guidance = guidance
        self.cfg = w_to_cfg_scale(guidance.peak_w)  # for code that reads guider.cfg

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        # This step is plain CFG at scale s = 1 + w(sigma) (cond + w (cond - uncond) = uncond + s (cond - uncond)),
        # so ComfyUI's own sampling_function runs it: every patch it honours (calc-cond-batch, pre-CFG, cfg and
        # post-CFG functions) applies, and at s = 1 (w = 0, outside the interval) it skips the unconditional pass.
        sigma = torch.as_tensor(timestep).reshape(-1)
        w = self.guidance.scale_at(sigma[:1])
        if sigma.numel() > 1 and not torch.equal(self.guidance.scale_at(sigma), w.expand(sigma.numel())):
            raise ValueError(f'Aligned CFG Guider needs one w per step, but the rows\' sigmas {sigma.tolist()} give '
                             'different w; sample the rows at one sigma')
        if 'sampler_cfg_function' not in model_options:  # the core's combination, exactly
            model_options = {**model_options, 'sampler_cfg_function': make_cfg_function(self.guidance)}
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get('negative'),
                                                self.conds.get('positive'), w_to_cfg_scale(float(w[0])),
                                                model_options=model_options, seed=seed)


class KDiffAlignGuider:
    """A GUIDER for SamplerCustomAdvanced."""

    DESCRIPTION = ("Classifier-free guidance in the paper's w (cfg = 1 + w), with an optional sigma interval and "
                   "w schedule; w and interval can come from a kdiff-align export's metadata.")
    RETURN_TYPES = ('GUIDER',)
    FUNCTION = 'get_guider'
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {'model': ('MODEL',), 'positive': ('CONDITIONING',), 'negative': ('CONDITIONING',),
                             **_guidance_inputs(['node', 'metadata'])}}

    def get_guider(self, model, positive, negative, w_source, w, sigma_lo, sigma_hi, schedule, w_end,
                   metadata_file):
        if 'kdiff_align' in model.model_options:
            raise ValueError('the model given to Aligned CFG Guider already went through Aligned CFG for KSampler '
                             '(KDiffAlignCFGPatch), whose cfg function would replace the guider\'s w; use one of '
                             'the two nodes, not both')
        guider = AlignedCFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_guidance(make_guidance(w_source, w, sigma_lo, sigma_hi, schedule, w_end, metadata_file,
                                          sigma_convention(model)))
        return (guider,)


class KDiffAlignCFGPatch:
    """A MODEL patch for the ordinary KSampler (ComfyUI's sampler_cfg_function)."""

    DESCRIPTION = ("Makes KSampler guide with kdiff-align's semantics. w_source 'ksampler cfg' uses KSampler's cfg "
                   "(w = cfg - 1); 'node' and 'metadata' override it. ComfyUI computes both passes before a cfg "
                   "function runs, so the interval changes the result but does not save the unconditional pass; "
                   "the guider node does. A one-pass (mg) export, or w = 0, makes every step one conditional pass.")
    RETURN_TYPES = ('MODEL',)
    FUNCTION = 'patch'
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {'model': ('MODEL',), **_guidance_inputs(['metadata', 'node', 'ksampler cfg'])}}

    def patch(self, model, w_source, w, sigma_lo, sigma_hi, schedule, w_end, metadata_file):
        convention = sigma_convention(model)
        fixed = make_guidance(w_source, w, sigma_lo, sigma_hi, schedule, w_end, metadata_file, convention)
        interval = [sigma_lo, sigma_hi] if sigma_hi > 0 else None
        end = w_end if schedule == 'log-linear' else None
        cfg_function = make_cfg_function(
            fixed if fixed is not None
            else (lambda scale: HostGuidance.from_cfg_scale(scale, sigma_interval=interval, w_end=end,
                                                            sigma_convention=convention)))
        patched = model.clone()
        if fixed is not None and fixed.unguided:
            # No unconditional prediction is needed (a one-pass mg export, or w = 0): one conditional pass per step,
            # whatever KSampler's cfg.
            previous = patched.model_options.get('sampler_calc_cond_batch_function')
            patched.set_model_sampler_calc_cond_batch_function(conditional_only(previous))
        else:
            # With w from the node or metadata, KSampler's cfg may be 1: keep ComfyUI from skipping the uncond pass.
            patched.set_model_sampler_cfg_function(cfg_function, disable_cfg1_optimization=fixed is not None)
        patched.model_options['kdiff_align'] = fixed.describe() if fixed is not None else {'w': 'ksampler cfg - 1'}
        return (patched,)


class KDiffAlignMetadata:
    """Reads a kdiff-align export's recommended sampling: w (paper's), cfg (= 1 + w, for KSampler), a summary."""

    DESCRIPTION = ('The recommended w and cfg of a checkpoint or LoRA exported by kdiff-align: the guidance ComfyUI '
                   'adds (w = cfg - 1; 0 and 1 for one-pass models, whose guidance is in the network).')
    RETURN_TYPES = ('FLOAT', 'FLOAT', 'STRING')
    RETURN_NAMES = ('w', 'cfg', 'info')
    FUNCTION = 'read'
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {'metadata_file': (metadata_files(),)}}

    def read(self, metadata_file):
        meta = file_metadata(metadata_file)
        guidance = HostGuidance.from_metadata(meta, host=HOST, model=repr(metadata_file))
        # w and cfg are what ComfyUI's CFG adds (w = cfg - 1): a one-pass model's guidance is in the network.
        return (guidance.w, w_to_cfg_scale(guidance.w), describe(meta))


NODE_CLASS_MAPPINGS = {
    'KDiffAlignGuider': KDiffAlignGuider,
    'KDiffAlignCFGPatch': KDiffAlignCFGPatch,
    'KDiffAlignMetadata': KDiffAlignMetadata,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    'KDiffAlignGuider': 'Aligned CFG Guider (kdiff-align)',
    'KDiffAlignCFGPatch': 'Aligned CFG for KSampler (kdiff-align)',
    'KDiffAlignMetadata': 'kdiff-align Metadata (w, cfg)',
}
