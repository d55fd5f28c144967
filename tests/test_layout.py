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


OBJECTIVE_NAMES = {'aligned', 'gft', 'mg', 'distill', 'aligned-cfg', 'standard-cfg'}
REGISTRY_MODULES = {'kdiff_align.registry'}   # the one place that names the objectives' rules


def objective_name_comparisons(source: str, label: str) -> list[str]:
    """'label:line' of every ==, !=, in or not in whose operand is an objective's name (or a literal collection
    holding one): a rule of an objective written outside its registry Spec."""
    def names_an_objective(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in OBJECTIVE_NAMES
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_an_objective(e) for e in node.elts)
        return False

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(names_an_objective(n) for n in [node.left, *node.comparators]):
            found.append(f'{label}:{node.lineno}')
    return found


def test_no_string_branch_on_objective_names_outside_the_registry():
    branches = [hit for path in sorted(PACKAGE.rglob('*.py')) if module_name(path) not in REGISTRY_MODULES
                for hit in objective_name_comparisons(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert not branches, 'compare objective names only in kdiff_align/registry.py (read the Spec): ' + ', '.join(
        branches)


def test_the_name_check_finds_a_branch():
    """The check above is live: it finds the kind of line it forbids."""
    source = "def f(kind):\n    return kind == 'mg' or kind in ('gft', 'x') or kind != 'x'\n"
    assert objective_name_comparisons(source, 'probe.py') == ['probe.py:2', 'probe.py:2']


def test_errors_is_a_leaf_and_the_lower_modules_do_not_import_config():
    """errors imports nothing of ours; data, schedulers and engine take ConfigError from errors, not config (so that
    importing them loads no schema); the registry sits below the schema; config reaches the Stable Diffusion
    schema only through its load_config facade (an import inside that function, not at import time)."""
    edges = graph()
    assert edges['kdiff_align.errors'] == {}
    for low in ('kdiff_align.data', 'kdiff_align.schedulers', 'kdiff_align.engine', 'kdiff_align.registry'):
        assert not {'kdiff_align.config', 'kdiff_align.schema'} & set(edges[low]), low
    top_level = [n for n in ast.parse((PACKAGE / 'config.py').read_text()).body
                 if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level if isinstance(n, ast.ImportFrom) and (n.module or '').startswith('sd')]
    assert 'kdiff_align.sd.config' not in edges['kdiff_align.metadata']


def test_the_engine_knows_no_objective():
    """The training engine's options hold no objective fields; the objectives' overrides are the trainers' (their
    shared base in train_cli)."""
    import dataclasses

    from kdiff_align import engine, train_cli

    engine_fields = {f.name for f in dataclasses.fields(engine.RunOptions)}
    assert not engine_fields & {'w_train', 'w_sample', 'objective'}
    assert {'w_train', 'w_sample'} <= {f.name for f in dataclasses.fields(train_cli.TrainerOptions)}
    source = (PACKAGE / 'engine.py').read_text()
    assert "['align']" not in source and "getattr(options, '" not in source   # no subclass field by name
