"""Benchmarks: `python -m kdiff_align.bench speed | claims | converge | gpu`.

speed (kdiff_align.bench.speed): training-step, guidance, sampling and memory cost as ratios to a baseline in the
same process; claims (kdiff_align.bench.claims): the evidence benchmark; converge (kdiff_align.bench.converge):
digits' training length by a stated criterion; gpu (kdiff_align.bench.gpu_check): the prepared GPU check, which
writes docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..env import cli_defaults


def main(argv: list[str] | None = None) -> int | None:
    cli_defaults()  # before k-diffusion is imported

    from . import speed

    parser = argparse.ArgumentParser(prog='python -m kdiff_align.bench', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    speed_p = speed.speed_parser(sub.add_parser('speed', help='training-step, guidance and evaluation cost, as ratios'))
    for name, what in (('claims', 'the evidence benchmark'), ('gpu', 'the prepared GPU check'),
                       ('converge', "digits' training length by its criterion")):
        sub.add_parser(name, help=f'{what} (see python -m kdiff_align.bench {name} --help)', add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['claims']:
        from . import claims
        return claims.main(argv[1:])
    if argv[:1] == ['converge']:
        from . import converge
        return converge.main(argv[1:])
    if argv[:1] == ['gpu']:
        from . import gpu_check
        return gpu_check.main(argv[1:])
    parser.parse_args(argv[:1])  # the subcommand
    args = speed.speed_args(speed_p, argv[1:])
    result = speed.speed(args)
    speed.print_speed(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return None


if __name__ == '__main__':
    sys.exit(main())
