"""The layering rules, checked rather than hoped for.

The code is packages by concern, each allowed to import only the ones below it:

    utils        the shared chores: errors, atomic files, devices and timing, plots
    darknet      the Darknet core: cfg parsing, layer registry, model, weights I/O, loss
    data         the Darknet data layout, loaders, the demo data sets
    evaluation   detections scored against labels (mAP)
    deploy       ONNX export and detection drawing
    pruning      graph, criteria, costs, plans, surgery, calibration, report
    training     the engine, sparsity penalties and monitor, distillation
    cli          what the scripts share: flags, the demo defaults, the prune run

The scripts (train.py, test.py, the prune_*.py files, ...) sit on top; `models.py` is
the model's public face for user code and imports darknet/ only. No library module
imports a script, a cli/ module or argparse (settings reach the library as dataclasses).
No module is over 600 lines, no function over 60.
"""
import ast
import glob
import os

from conftest import ROOT

LEVELS = ('utils', 'darknet', 'data', 'evaluation', 'deploy', 'pruning', 'training', 'cli')
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


def _is_main_guard(node):
    """`if __name__ == '__main__':`"""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == '__name__' and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == '__main__')


def _parse(path):
    with open(path, encoding='utf-8') as f:
        return ast.parse(f.read(), path)


def scripts():
    """The names of the top-level scripts."""
    return {os.path.splitext(os.path.basename(path))[0]
            for path in glob.glob(os.path.join(ROOT, '*.py'))
            if any(_is_main_guard(node) for node in _parse(path).body)}


def imports(tree):
    """(line, module name) of every import in `tree`, however deeply nested."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f'{node.module}.{alias.name}') for alias in node.names
                      if node.module in LEVELS]  # `from cli import demo` imports cli.demo
    return found


def library_modules():
    """(path, package) of every module of the packages in LEVELS."""
    return [(path, package) for package in LEVELS
            for path in sorted(glob.glob(os.path.join(ROOT, package, '**', '*.py'),
                                         recursive=True))]


def offences(path, package, script_names):
    """Imports of `path` (in `package`) that break the layering rules. A module of a
    package that is also a script (data/make_shapes.py) may use the command-line parts."""
    found = []
    rel = os.path.relpath(path, ROOT)
    tree = _parse(path)
    command = any(_is_main_guard(node) for node in tree.body)
    for line, name in imports(tree):
        top = name.split('.')[0]
        if top in script_names or top == 'models':
            found.append(f'{rel}:{line} imports the script {name}')
        elif command and (top == 'argparse' or name == 'cli.common'):
            continue
        elif top == 'argparse' and package != 'cli':
            found.append(f'{rel}:{line} imports argparse')
        elif top in LEVELS and LEVELS.index(top) > LEVELS.index(package):
            found.append(f'{rel}:{line} imports {name}, a package above {package}')
    return found


def test_the_scan_finds_the_scripts_and_only_them():
    found = scripts()
    assert {'train', 'test', 'detect', 'export', 'derive_cfg', 'convert_weights',
            'prune_normal', 'prune_regular', 'prune_shortcut', 'prune_tiny',
            'prune_layer'} <= found
    assert 'models' not in found and 'conftest' not in found


def test_the_scan_sees_upward_imports_scripts_and_argparse_inside_functions(tmp_path):
    module = tmp_path / 'module.py'
    module.write_text('import os\nfrom utils import fileio\n\ndef f():\n'
                      '    from test import evaluate\n    import argparse\n'
                      '    from cli import demo\n    from darknet.cfg import write_cfg\n')
    assert offences(str(module), 'darknet', {'test'}) == [
        f'{os.path.relpath(module, ROOT)}:5 imports the script test',
        f'{os.path.relpath(module, ROOT)}:6 imports argparse',
        f'{os.path.relpath(module, ROOT)}:7 imports cli, a package above darknet',
        f'{os.path.relpath(module, ROOT)}:7 imports cli.demo, a package above darknet']


def test_library_imports_only_go_down():
    names = scripts()
    found = [o for path, package in library_modules() for o in offences(path, package, names)]
    assert found == []


def test_scripts_and_models_never_import_a_script():
    names = scripts()
    found = []
    for name in sorted(names | {'models'}):
        path = os.path.join(ROOT, name + '.py')
        found += [f'{name}.py:{line} imports the script {module}'
                  for line, module in imports(_parse(path))
                  if module.split('.')[0] in names]
    assert found == []


def test_models_is_the_public_face_of_darknet():
    import darknet.model
    import darknet.weights
    import models
    assert models.Darknet is darknet.model.Darknet
    assert models.load_weights is darknet.weights.load_weights
    assert all(top == 'darknet' for _, name in imports(_parse(os.path.join(ROOT, 'models.py')))
               for top in [name.split('.')[0]])


def _sources():
    """The library modules and the scripts (tests and benchmarks apart)."""
    return ([path for path, _ in library_modules()]
            + sorted(glob.glob(os.path.join(ROOT, '*.py')))
            + sorted(glob.glob(os.path.join(ROOT, 'data', '*.py'))))


def test_no_module_is_too_long():
    long = [f'{os.path.relpath(p, ROOT)}: {n} lines' for p in set(_sources())
            for n in [sum(1 for _ in open(p, encoding='utf-8'))] if n > MAX_MODULE_LINES]
    assert long == []


def test_no_function_is_too_long():
    long = []
    for path in sorted(set(_sources())):
        for node in ast.walk(_parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f'{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}: '
                                f'{lines} lines')
    assert long == []
