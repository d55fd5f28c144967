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
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ['NODE_CLASS_MAPPINGS', 'NODE_DISPLAY_NAME_MAPPINGS']
