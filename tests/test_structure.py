"""The layering rule, checked rather than hoped for: no module imports a script.

A script is a top-level *.py file with an `if __name__ == '__main__':` block (train.py,
test.py, detect.py, export.py, derive_cfg.py, convert_weights.py, the prune_*.py files):
a command line over the library. The library (models.py and everything under utils/)
and the scripts themselves never import a script, at module level or inside a
function, so every shared function lives in the library (the evaluation is
utils/evaluate.py, not test.py, whose name would also shadow Python's own `test`
package). Tests and benchmarks may import a script to run its command (main,
get_args_parser), as tests/test_catalogue.py does for each one.
"""
import ast
import glob
import os

from conftest import ROOT


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


def imported_scripts(tree, script_names):
    """(line, name) of each import of a script in `tree`, however deeply nested."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split('.')[0] in script_names]
    return found


def test_the_scan_finds_the_scripts_and_only_them():
    found = scripts()
    assert {'train', 'test', 'detect', 'export', 'derive_cfg', 'convert_weights',
            'prune_normal', 'prune_regular', 'prune_shortcut', 'prune_tiny',
            'prune_layer'} <= found
    assert 'models' not in found and 'conftest' not in found


def test_the_scan_sees_an_import_inside_a_function():
    tree = ast.parse('import os\nfrom utils import cli\n\ndef f():\n'
                     '    from test import evaluate\n    import train.x\n')
    assert imported_scripts(tree, {'test', 'train'}) == [(5, 'test'), (6, 'train.x')]


def test_no_library_module_or_script_imports_a_script():
    names = scripts()
    modules = ([os.path.join(ROOT, 'models.py')]
               + glob.glob(os.path.join(ROOT, 'utils', '**', '*.py'), recursive=True)
               + [os.path.join(ROOT, name + '.py') for name in sorted(names)])
    offences = [f'{os.path.relpath(path, ROOT)}:{line} imports the script {name}'
                for path in modules for line, name in imported_scripts(_parse(path), names)]
    assert offences == []
