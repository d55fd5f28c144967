"""The package's shape: no import cycle among kdiff_align's modules (function-level imports included), and the
Stable Diffusion package imports no private name of another module."""

import ast
import functools
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


@functools.lru_cache(maxsize=None)
def graph() -> dict[str, dict[str, list[str]]]:
    """module -> {imported module: the names imported from it}; each file parsed once, for every test."""
    files = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    edges = {}
    for name, path in files.items():
        found = imports(path, set(files))
        edges[name] = {target: [n for t, n in found if t == target]
                       for target, _ in found if target in files and target != name}
    return edges


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
REGISTRY_MODULES = {'kdiff_align.core.registry'}   # the one place that names the objectives' rules


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
    assert not branches, 'compare objective names only in kdiff_align/core/registry.py (read the Spec): ' + ', '.join(
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
    for low in ('kdiff_align.data', 'kdiff_align.training.schedulers', 'kdiff_align.training.engine',
                'kdiff_align.core.registry'):
        assert not {'kdiff_align.config', 'kdiff_align.config.schema'} & set(edges[low]), low
    top_level = [n for n in ast.parse((PACKAGE / 'config' / '__init__.py').read_text()).body
                 if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level if isinstance(n, ast.ImportFrom) and (n.module or '').startswith('sd')]
    assert 'kdiff_align.config.sd' not in edges['kdiff_align.storage.metadata']


def test_the_engine_knows_no_objective():
    """The training engine's options hold no objective fields; the objectives' overrides are the trainers' (their
    shared base in train_cli)."""
    import dataclasses

    from kdiff_align.training import engine, cli as train_cli

    engine_fields = {f.name for f in dataclasses.fields(engine.RunOptions)}
    assert not engine_fields & {'w_train', 'w_sample', 'objective'}
    assert {'w_train', 'w_sample'} <= {f.name for f in dataclasses.fields(train_cli.TrainerOptions)}
    source = (PACKAGE / 'training' / 'engine.py').read_text()
    assert "['align']" not in source and "getattr(options, '" not in source   # no subclass field by name


# --- layers (issue 19): folders by role, imports only downward. Written by move_layout.py. ---
LAYERS = [  # low -> high: a module may import its own layer or a lower one
    ('errors', 'env'),                            # 0 leaves
    ('core',),                                    # 1 objectives, guidance, conditioning, models (registry)
    ('data',),                                    # 2
    ('config',),                                  # 3 the schema, shipped configs, the SD schema, the facade
    ('storage',),                                 # 4 checkpoints, export metadata
    ('sampling',),                                # 5
    ('training',),                                # 6
    ('evaluation',),                              # 7
    ('sd',),                                      # 8 Stable Diffusion fine-tuning
    ('integrations',),                            # 9 hosts
    ('bench',),                                   # 10 benchmarks, claims, demo
    ('train', 'sample', 'evaluate', 'demo'),      # 11 top-level CLI shims
]
# (importer, imported) -> why an upward import is unavoidable. Keep empty unless a reason is written here.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {}


def layer(module: str) -> int:
    """The layer of a kdiff_align module: its first name under kdiff_align (the package itself: 0)."""
    parts = module.split('.')
    if parts == ['kdiff_align']:
        return 0
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def upward_imports(edges: dict[str, dict[str, list[str]]]) -> list[str]:
    return [f'{source} (layer {layer(source)}) imports {target} (layer {layer(target)})'
            for source, targets in sorted(edges.items()) if source != 'kdiff_align'   # the lazy export table
            for target in targets if layer(target) > layer(source) and (source, target) not in UPWARD_EXCEPTIONS]


def test_every_module_has_a_layer():
    unplaced = []
    for module in graph():
        try:
            layer(module)
        except StopIteration:
            unplaced.append(module)
    assert not unplaced, f'modules in no layer (add their folder to LAYERS): {unplaced}'


def test_imports_run_down_the_layers():
    """Module-level and function-level imports alike (kdiff_align/__init__.py's lazy export table is exempt)."""
    upward = upward_imports(graph())
    assert not upward, 'imports upward: ' + '; '.join(upward)
    stale = [pair for pair in UPWARD_EXCEPTIONS if pair[1] not in graph().get(pair[0], {})]
    assert not stale, f'exceptions no longer needed: {stale}'


def test_every_import_names_a_module_of_the_package():
    """No import (nor lazy export) names a kdiff_align module that is not there: an editable install of another
    checkout would otherwise answer it silently."""
    files = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    tests = [p for folder in ('tests', 'tests_hosts') for p in (PACKAGE.parent / folder).rglob('*.py')]
    missing = sorted({f'{path.relative_to(PACKAGE.parent)} imports {target}' for path in [*files.values(), *tests]
                      for target, _ in imports(path, set(files)) if target not in files})
    init = ast.parse((PACKAGE / '__init__.py').read_text())
    table = next(n.value for n in init.body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == '_EXPORTS')
    missing += [f'_EXPORTS: {v.value}' for v in table.values if f'kdiff_align.{v.value}' not in files]
    assert not missing, missing


def test_the_layer_check_finds_an_upward_import():
    """The check above is live: an import of a higher layer is reported."""
    edges = {'kdiff_align.core.objective': {'kdiff_align.training.engine': []}, 'kdiff_align.bench.speed':
             {'kdiff_align.core.objective': []}}
    assert upward_imports(edges) == ['kdiff_align.core.objective (layer 1) imports kdiff_align.training.engine '
                                     '(layer 6)']
