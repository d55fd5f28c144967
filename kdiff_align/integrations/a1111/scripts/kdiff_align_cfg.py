"""kdiff-align for AUTOMATIC1111 / Forge: an AlwaysVisible script that guides with the paper's w.

A1111 path (CFG callbacks): on_cfg_denoiser records the step's sigma and batch; on_cfg_denoised rewrites the
unconditional rows of x_out so that A1111's own combine, u + s (c - u) with s = p.cfg_scale, returns
kdiff-align's D_w = c + w(sigma) (c - u) (w = 0 outside the interval). Forge path: Forge's UNet patcher
takes a ComfyUI-style sampler_cfg_function, set in process_before_every_sampling. The settings go into the
image's infotext (p.extra_generation_params) and paste back through infotext_fields.

Guidance that needs no unconditional prediction (a one-pass mg export, or w = 0) runs one conditional pass per
step: CFG scale 1, in Forge also Hires CFG Scale 1 (Forge then leaves the unconditional out), in A1111 its own
"skip early CFG" option for the whole generation (A1111 has no cfg-1 shortcut), set through p.override_settings,
which A1111 restores afterwards. Neither host can tell a gft / distill model w: those exports are refused, in
one line naming the file.
"""

import re
import sys
from pathlib import Path

import gradio as gr

import torch
from modules import script_callbacks, scripts

try:
    import kdiff_align  # noqa: F401
except ImportError:  # a symlinked checkout without `pip install`: use the repository this file lives in
    _checkout = Path(__file__).resolve().parents[4]
    if not (_checkout / 'kdiff_align' / '__init__.py').is_file():  # a copied folder: nothing to fall back on
        raise ImportError(f'kdiff-align is not installed in the web UI\'s Python; install it with: {sys.executable} '
                          '-m pip install --no-deps /path/to/kdiff-align') from None
    sys.path.insert(0, str(_checkout))

from kdiff_align.core.guidance import cfg_scale_to_w, w_to_cfg_scale  # noqa: E402
from kdiff_align.integrations import HostGuidance, make_cfg_function  # noqa: E402
from kdiff_align.storage.metadata import read_metadata  # noqa: E402

# Forge's pre-CFG hook marks the steps whose unconditional pass Forge left out (hires at CFG 1, its skips).
NO_UNCOND = 'kdiff_align_no_uncond'
FLOAT = r'[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?inf'
INTERVAL_TEXT = re.compile(rf'\s*\[?\s*({FLOAT})\s*(?:-|,|\.\.|to)\s*({FLOAT})\s*\]?\s*')
SOURCES = ['CFG scale', 'this panel', 'checkpoint metadata', 'metadata file']
KEY_W, KEY_INTERVAL, KEY_W_END, KEY_SOURCE = 'Aligned CFG w', 'Aligned CFG sigma interval', 'Aligned CFG w end', \
    'Aligned CFG source'


class _Active:
    """The guidance of the generation in progress and what on_cfg_denoiser saw of the current step."""

    guidance = None
    cfg_scale = None
    step = None  # (sigma per image, batch size)
    warned = False


def is_forge(p):
    """Whether p comes from Forge (its model carries forge_objects) rather than A1111."""
    return hasattr(p.sd_model, 'forge_objects')


def resolve_guidance(p, source, w, sigma_lo, sigma_hi, schedule, w_end, metadata_path):
    """HostGuidance from the panel, A1111's CFG scale or metadata; sets p.cfg_scale to 1 + w when w is ours.

    From metadata: the export's host CFG (kdiff_align.integrations.HostGuidance.from_metadata), so a one-pass
    model gets w = 0 (CFG scale 1) and a model told w (gft, distill) is refused (HostCannotPassW)."""
    end = float(w_end) if schedule == 'log-linear' else None
    interval = [float(sigma_lo), float(sigma_hi)] if float(sigma_hi) > 0 else None
    if source == 'CFG scale':
        return HostGuidance(cfg_scale_to_w(float(p.cfg_scale)), sigma_interval=interval, w_end=end)
    if source == 'this panel':
        guidance = HostGuidance(float(w), sigma_interval=interval, w_end=end)
    elif source in ('checkpoint metadata', 'metadata file'):
        if source == 'metadata file':
            path = metadata_path
        else:
            info = getattr(p.sd_model, 'sd_checkpoint_info', None)
            path = getattr(info, 'filename', None)
        if not path or not str(path).endswith('.safetensors'):
            raise ValueError(f'kdiff-align: {source} needs a .safetensors file, got {path!r}')
        meta = read_metadata(path)
        if meta is None:
            raise ValueError(f'kdiff-align: {path} carries no kdiff_align metadata; choose "this panel" and set w')
        guidance = HostGuidance.from_metadata(meta, w_end=end, host='Forge' if is_forge(p) else 'A1111',
                                              model=repr(Path(path).name))
    else:
        raise ValueError(f'kdiff-align: source must be one of {SOURCES}, got {source!r}')
    p.cfg_scale = w_to_cfg_scale(guidance.peak_w)
    return guidance


def format_interval(interval):
    """The infotext value of a sigma interval: exact floats (repr), so that pasting it back gives the same numbers."""
    return '{!r}-{!r}'.format(*map(float, interval))


def parse_interval(text):
    """[sigma_lo, sigma_hi] from an infotext value ('1e-05-5.0', '0.5-3'); the error names the value."""
    match = INTERVAL_TEXT.fullmatch(str(text))
    if match is None:
        raise ValueError(f'kdiff-align: cannot read the sigma interval {text!r}; expected "<sigma_lo>-<sigma_hi>"')
    return [float(match[1]), float(match[2])]


def step_sigma(params):
    """The step's noise levels sigma. A1111's timestep samplers (DDIM, PLMS, UniPC: CFGDenoiserTimesteps) pass
    the integer timestep t as params.sigma; its sigma is sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])."""
    denoiser = getattr(params, 'denoiser', None)
    if type(denoiser).__name__ != 'CFGDenoiserTimesteps':  # (Forge converts t itself; it patches its UNet instead)
        return params.sigma
    alphas = getattr(denoiser, 'alphas', None)
    if alphas is None:
        from modules import shared
        alphas = shared.sd_model.alphas_cumprod
    alphas = alphas.to(params.sigma.device, torch.float64)
    a_t = alphas[params.sigma.round().long().clamp(0, len(alphas) - 1)]
    return ((1 - a_t) / a_t).sqrt().to(torch.float32)


def on_cfg_denoiser(params):
    if _Active.guidance is None:
        return
    uncond = params.text_uncond['crossattn'] if isinstance(params.text_uncond, dict) else params.text_uncond
    batch_size = uncond.shape[0]
    _Active.step = (step_sigma(params)[-batch_size:], batch_size)


def on_cfg_denoised(params):
    if _Active.guidance is None or _Active.step is None:
        return
    sigma, batch_size = _Active.step
    _Active.step = None
    x_out = params.x
    if x_out.shape[0] != 2 * batch_size:  # AND prompts or an edit model: A1111's own layout, left alone
        if not _Active.warned:
            print('kdiff-align: prompts with AND / edit models are sampled with plain CFG', file=sys.stderr)
            _Active.warned = True
        return
    cond, uncond = x_out[:batch_size], x_out[batch_size:]
    guided = _Active.guidance.combine(cond, uncond, sigma)
    s = _Active.cfg_scale
    if s == 1:  # A1111 returns c at scale 1; only w = 0 is representable
        return
    # A1111 computes u' + s (c - u'); with u' = c - (D_w - c) / (s - 1) that is D_w.
    x_out[batch_size:] = cond - (guided - cond) / (s - 1)


script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name='kdiff_align')
script_callbacks.on_cfg_denoised(on_cfg_denoised, name='kdiff_align')


def mark_missing_uncond(model, cond, uncond, x, timestep, model_options):
    """Forge's sampler_pre_cfg_function: tells the cfg function whether this step has an unconditional pass."""
    return model, cond, uncond, x, timestep, {**model_options, NO_UNCOND: uncond is None}


def forge_cfg_function(guidance):
    """Forge's sampler_cfg_function: kdiff-align's guidance, or the conditional where Forge left uncond out."""
    guided = make_cfg_function(guidance)

    def cfg_function(args):
        if args['model_options'].get(NO_UNCOND):
            return args['cond']  # x - D_c: the conditional prediction
        return guided(args)

    return cfg_function


class Script(scripts.Script):
    def title(self):
        return 'kdiff-align CFG'

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion('kdiff-align CFG (paper\'s w; CFG scale = 1 + w)', open=False):
            enabled = gr.Checkbox(label='Enable', value=False)
            source = gr.Radio(SOURCES, value='checkpoint metadata', label='w from')
            w = gr.Number(value=1.0, label="w (the paper's; used when w from = this panel)")
            with gr.Row():
                sigma_lo = gr.Number(value=0.0, label='sigma_lo')
                sigma_hi = gr.Number(value=0.0, label='sigma_hi (0: guide at every step)')
            schedule = gr.Radio(['constant', 'log-linear'], value='constant', label='w schedule')
            w_end = gr.Number(value=0.0, label='w at sigma_lo (log-linear schedule)')
            metadata_path = gr.Textbox(label='metadata file (.safetensors; for w from = metadata file)')
        self.infotext_fields = [
            (enabled, lambda d: KEY_W in d),
            (source, lambda d: 'this panel' if KEY_W in d else gr.update()),
            (w, KEY_W),
            (sigma_lo, lambda d: parse_interval(d[KEY_INTERVAL])[0] if KEY_INTERVAL in d else 0.0),
            (sigma_hi, lambda d: parse_interval(d[KEY_INTERVAL])[1] if KEY_INTERVAL in d else 0.0),
            (schedule, lambda d: 'log-linear' if KEY_W_END in d else 'constant'),
            (w_end, lambda d: float(d[KEY_W_END]) if KEY_W_END in d else 0.0),
        ]
        self.paste_field_names = [KEY_W, KEY_INTERVAL, KEY_W_END]
        return [enabled, source, w, sigma_lo, sigma_hi, schedule, w_end, metadata_path]

    def before_process(self, p, enabled, source, w, sigma_lo, sigma_hi, schedule, w_end, metadata_path):
        """A1111: guidance without an unconditional prediction skips A1111's unconditional pass, through its own
        skip_early_cond option for this generation (p.override_settings, restored by A1111 afterwards)."""
        if not enabled or is_forge(p):
            return
        guidance = resolve_guidance(p, source, w, sigma_lo, sigma_hi, schedule, w_end, metadata_path)
        if not guidance.unguided:
            return
        from modules import shared
        if 'skip_early_cond' in getattr(shared.opts, 'data_labels', {}) and \
                getattr(p, 'override_settings_restore_afterwards', True):
            p.override_settings['skip_early_cond'] = 1.0
        else:
            print('kdiff-align: this A1111 cannot skip the unconditional pass for this generation (no skip_early_cond '
                  'option, or override settings kept afterwards); each step computes it, and the result is the same',
                  file=sys.stderr)

    def process(self, p, enabled, source, w, sigma_lo, sigma_hi, schedule, w_end, metadata_path):
        _Active.guidance = _Active.step = None
        if not enabled:
            return
        guidance = resolve_guidance(p, source, w, sigma_lo, sigma_hi, schedule, w_end, metadata_path)
        p.extra_generation_params[KEY_W] = guidance.w
        p.extra_generation_params[KEY_SOURCE] = source
        if guidance.sigma_interval is not None:
            p.extra_generation_params[KEY_INTERVAL] = format_interval(guidance.sigma_interval)
        if guidance.w_end is not None:
            p.extra_generation_params[KEY_W_END] = guidance.w_end
        if is_forge(p):  # Forge: patch its UNet instead of the A1111 callbacks
            if guidance.unguided and hasattr(p, 'hr_cfg'):
                p.hr_cfg = 1.0  # the hires pass is one conditional pass too (Forge gives it no unconditional)
            self.forge_guidance = None if guidance.unguided else guidance  # at CFG scale 1 Forge runs one pass
            return
        if guidance.unguided:  # A1111 at scale 1 returns the conditional; before_process skipped the uncond pass
            return
        _Active.guidance, _Active.cfg_scale = guidance, float(p.cfg_scale)

    def process_before_every_sampling(self, p, *args, **kwargs):
        guidance = getattr(self, 'forge_guidance', None)
        if guidance is None or not args or not args[0]:
            return
        unet = p.sd_model.forge_objects.unet.clone()
        # Where Forge asks for CFG scale 1 (its skip-early-CFG / NGMS skips) it leaves the unconditional pass
        # out, and where it gives no unconditional (hires pass at Hires CFG Scale 1) so does the step: both are
        # sampled unguided, as Forge means. Guidance that is w = 0 everywhere (a one-pass export) is not patched
        # at all (process): at CFG scale 1 Forge's own step is one conditional pass.
        unet.add_sampler_pre_cfg_function(mark_missing_uncond)
        unet.set_model_sampler_cfg_function(forge_cfg_function(guidance))
        p.sd_model.forge_objects.unet = unet

    def postprocess(self, p, processed, *args):
        _Active.guidance = _Active.step = None
        self.forge_guidance = None

