"""`python -m kdiff_align.demo` (`make demo`).

The code lives in kdiff_align/bench/demo.py; this shim runs its main.
"""

from .bench.demo import main

if __name__ == '__main__':
    raise SystemExit(main())
