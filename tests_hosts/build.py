"""Builds the real-host tier's environment: extracts ../shared/hosts archives, makes a venv layered over .venv.

    python tests_hosts/build.py --sources ../shared/hosts --cache .hosts --base-venv .venv
    python tests_hosts/build.py --sources ../shared/hosts --cache .hosts --extract-only

Each archive <name>.tar.xz is extracted once into <cache>/src/<name>/ (again when the archive changes). The
host venv sees .venv's packages (torch, diffusers, kdiff-align itself) through a .pth file and installs on top
only what the hosts add: ComfyUI's requirements.txt (less torch, torchvision, torchaudio: the first two come
from .venv, the last is not used by the tests and would pull another torch) and tests_hosts/requirements.txt.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_FROM_COMFYUI = ('torch', 'torchvision', 'torchaudio')


def extract(sources: Path, dest: Path) -> dict[str, Path]:
    """Each <sources>/<name>.tar.xz into <dest>/<name>/, skipped when its stamp matches the archive."""
    archives = sorted(sources.glob('*.tar.xz'))
    if not archives:
        raise SystemExit(f'{sources} holds no *.tar.xz archives (expected the pinned ComfyUI / Forge sources)')
    out = {}
    for archive in archives:
        name = archive.name[:-len('.tar.xz')]
        target, stamp = dest / name, dest / f'{name}.extracted'
        key = f'{archive.stat().st_size} {archive.stat().st_mtime_ns}'
        if not (stamp.exists() and stamp.read_text() == key and target.is_dir()):
            print(f'extracting {archive} -> {target}', flush=True)
            subprocess.run(['rm', '-rf', str(target)], check=True)
            target.mkdir(parents=True)
            with tarfile.open(archive) as tar:
                tar.extractall(target, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
            stamp.write_text(key)
        out[name] = target
    return out


def site_packages(python: Path) -> Path:
    code = 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
    return Path(subprocess.run([str(python), '-c', code], check=True, capture_output=True, text=True).stdout.strip())


def comfyui_requirements(src: dict[str, Path], out: Path) -> Path:
    """ComfyUI's requirements.txt without the torch family."""
    comfy = next((p / 'ComfyUI' for name, p in src.items() if name.startswith('comfyui')), None)
    if comfy is None or not (comfy / 'requirements.txt').exists():
        raise SystemExit(f'no ComfyUI/requirements.txt among the extracted sources {sorted(src)}')
    keep = []
    for line in (comfy / 'requirements.txt').read_text().splitlines():
        name = line.split('#')[0].strip().split('>')[0].split('=')[0].split('<')[0].split('~')[0].strip()
        if name.lower() not in NOT_FROM_COMFYUI:
            keep.append(line)
    out.write_text('\n'.join(keep) + '\n')
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sources', type=Path, required=True, help='folder with the *.tar.xz host archives')
    parser.add_argument('--cache', type=Path, required=True, help='cache folder (git-ignored)')
    parser.add_argument('--base-venv', type=Path, help="the project's venv, whose packages the host venv sees")
    parser.add_argument('--extract-only', action='store_true')
    args = parser.parse_args()
    src = extract(args.sources, args.cache / 'src')
    if args.extract_only:
        return
    if args.base_venv is None:
        parser.error('--base-venv is needed unless --extract-only')
    host = args.cache / 'venv'
    subprocess.run(['rm', '-rf', str(host)], check=True)
    venv.EnvBuilder(with_pip=True).create(host)
    python = host / 'bin' / 'python'
    base = site_packages(args.base_venv / "bin" / "python")
    (site_packages(python) / '_kdiff_align_base_venv.pth').write_text(f'{base}\n')
    reqs = comfyui_requirements(src, args.cache / 'comfyui-requirements.txt')
    subprocess.run([str(python), '-m', 'pip', 'install', '-q', '-r', str(reqs), '-r', str(HERE / 'requirements.txt')],
                   check=True)


if __name__ == '__main__':
    sys.exit(main())
