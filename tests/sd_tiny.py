"""The tiny offline Stable Diffusion components now live in kdiff_align.sd.tiny (the GPU check uses them too)."""

from kdiff_align.sd.tiny import *  # noqa: F401,F403
