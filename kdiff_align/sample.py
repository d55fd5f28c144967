"""`python -m kdiff_align.sample` and the `kdiff-align-sample` script.

The code lives in kdiff_align/sampling/sample.py; this shim runs its main.
"""

from .sampling.sample import main

if __name__ == '__main__':
    raise SystemExit(main())
