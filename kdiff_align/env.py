"""Process defaults of kdiff-align's command-line entry points, and the one warning `import kdiff_align` hides.

- K_DIFFUSION_USE_COMPILE: upstream compiles small kernels with torch.compile by default, which costs CPUs
  more than it saves; the entry points default it to '0' (never `import kdiff_align`). A value the user set wins.
- The "pkg_resources is deprecated" UserWarning that clip prints when k-diffusion is imported is hidden, by the
  entry points and by `import kdiff_align` (hide_import_warnings); every other warning is left alone.
"""

from __future__ import annotations

import argparse
import os
import warnings

COMPILE_ENV = 'K_DIFFUSION_USE_COMPILE'
PKG_RESOURCES_WARNING = r'pkg_resources is deprecated as an API'


def hide_import_warnings() -> None:
    """Hides clip's pkg_resources UserWarning (k-diffusion imports clip); call it before k-diffusion is imported."""
    warnings.filterwarnings('ignore', message=PKG_RESOURCES_WARNING, category=UserWarning)


def cli_defaults() -> None:
    """Applies the defaults above; call it before k-diffusion is imported."""
    os.environ.setdefault(COMPILE_ENV, '0')
    hide_import_warnings()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with '(default: X)' added only where the text says no default itself and X is not None or
    False (never "(default: all) (default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if 'default' in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)
