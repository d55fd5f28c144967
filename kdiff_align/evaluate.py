"""`python -m kdiff_align.evaluate`.

The code lives in kdiff_align/evaluation/evaluate.py; this shim runs its main.
"""

from .evaluation.evaluate import main

if __name__ == '__main__':
    raise SystemExit(main())
