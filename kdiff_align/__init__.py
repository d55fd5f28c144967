"""kdiff-align: classifier-free-guidance training aligned with guided sampling, for k-diffusion.

`import kdiff_align` is light: it imports torch and nothing of k-diffusion, hosts or optional packages
until a name that needs them is used. It hides one warning, clip's pkg_resources deprecation (kdiff_align.env).
"""

from importlib import import_module

from .env import hide_import_warnings

hide_import_warnings()

__version__ = '0.1.0'

_EXPORTS = {
    'AlignedDenoiser': 'core.objective',
    'AutoGuidedDenoiser': 'sampling.autoguidance',
    'GFTDenoiser': 'core.objective',
    'TeacherTargetDenoiser': 'core.objective',
    'OnePassDenoiser': 'core.guidance',
    'GuidanceEmbedding': 'core.models',
    'ScaleDistribution': 'core.objective',
    'GuidedDenoiser': 'core.guidance',
    'guided_denoiser': 'core.guidance',
    'GuidanceToldTransformer': 'core.models',
    'guide': 'core.guidance',
    'w_to_cfg_scale': 'core.guidance',
    'cfg_scale_to_w': 'core.guidance',
    'ClassConditionedModel': 'core.models',
    'load_config': 'config',
    'make_model': 'config',
    'make_denoiser_wrapper': 'config',
    'make_guided_denoiser': 'config',
    'make_teacher': 'training.teachers',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f'.{_EXPORTS[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
