"""The package's shape: no import cycle among kdiff_align's modules (function-level imports included), and the
Stable Diffusion package imports no private name of another module."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'kdiff_align'


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports(path: Path, modules: set[str]) -> list[tuple[str, str]]:
    """(imported kdiff_align module, imported name or '') for every import statement in the file."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, '') for a in node.names if a.name.split('.')[0] == 'kdiff_align']
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([node.module] if node.module else []))
            if base.split('.')[0] != 'kdiff_align':
                continue
            for a in node.names:
                found.append((f'{base}.{a.name}', '') if f'{base}.{a.name}' in modules else (base, a.name))
    return found


def graph() -> dict[str, dict[str, list[str]]]:
    files = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    return {name: {target: [n for t, n in imports(path, set(files)) if t == target]
                   for target, _ in imports(path, set(files)) if target in files and target != name}
            for name, path in files.items()}


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for target in edges[node]:
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(c) for c in cycles)


def test_sd_imports_no_private_name_of_another_module():
    private = [(source, target, name) for source, targets in graph().items() if source.startswith('kdiff_align.sd')
               for target, names in targets.items() if not target.startswith('kdiff_align.sd')
               for name in names if name.startswith('_')]
    assert not private, private
