"""`python -m kdiff_align.bench`: the benchmarks' CLI (kdiff_align/bench/__init__.py)."""

from . import main

raise SystemExit(main())
