"""benchmarks/mutants.py stays runnable: every mutant's snippet occurs exactly once in
its file (else the runner reports it STALE) and every test it names exists. A failure
here means the code under a mutant changed: refresh the snippet to the new text."""
import ast
import importlib.util
import os

import pytest
from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location('mutants', os.path.join(ROOT, 'benchmarks',
                                                                          'mutants.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTANTS


MUTANTS = _load()


def test_the_list_is_long_enough_and_named_uniquely():
    names = [m.name for m in MUTANTS]
    assert len(names) >= 25 and len(set(names)) == len(names)


def _test_functions(path):
    tree = ast.parse(open(path, encoding='utf-8').read())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize('mutant', MUTANTS, ids=[m.name for m in MUTANTS])
def test_snippet_occurs_once_and_the_named_tests_exist(mutant):
    text = open(os.path.join(ROOT, mutant.file), encoding='utf-8').read()
    assert text.count(mutant.original) == 1, f'{mutant.file}: refresh the snippet'
    assert mutant.replacement != mutant.original
    args = list(mutant.tests)
    expressions = {args[k + 1] for k, a in enumerate(args[:-1]) if a == '-k'}
    paths = [a for a in args if a != '-k' and a not in expressions]
    assert paths
    for item in paths:
        path, _, function = item.partition('::')
        assert os.path.isfile(os.path.join(ROOT, path)), item
        if function:
            assert function.split('[')[0] in _test_functions(os.path.join(ROOT, path)), item
