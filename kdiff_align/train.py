"""`python -m kdiff_align.train`, `accelerate launch -m kdiff_align.train` and the `kdiff-align-train` script.

The code lives in kdiff_align/training/trainer.py; this shim runs its main.
"""

from .training.trainer import main

if __name__ == '__main__':
    raise SystemExit(main())
