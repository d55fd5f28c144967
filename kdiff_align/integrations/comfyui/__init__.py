"""kdiff-align custom nodes for ComfyUI.

Install: symlink (or copy) this folder into ComfyUI/custom_nodes/ (see docs/integrations.md). ComfyUI
imports it as a top-level package named after the folder; it then imports kdiff_align's core, from the
environment if kdiff-align is installed there, else from the checkout this folder lives in.
"""

import sys
from pathlib import Path

try:
    import kdiff_align  # noqa: F401
except ImportError:  # a symlinked checkout without `pip install`: use the repository this file lives in
    _checkout = Path(__file__).resolve().parents[3]
    if not (_checkout / 'kdiff_align' / '__init__.py').is_file():  # a copied folder: nothing to fall back on
        raise ImportError(f'kdiff-align is not installed in ComfyUI\'s Python; install it with: {sys.executable} '
                          '-m pip install --no-deps /path/to/kdiff-align') from None
    sys.path.insert(0, str(_checkout))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ['NODE_CLASS_MAPPINGS', 'NODE_DISPLAY_NAME_MAPPINGS']
