"""Every benchmark script imports: a library change that moves or renames what one
uses breaks it here, not an hour into a benchmark run."""
import glob
import importlib.util
import os

import pytest
from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, 'benchmarks', '*.py')))


@pytest.mark.parametrize('path', SCRIPTS, ids=[os.path.basename(p) for p in SCRIPTS])
def test_benchmark_script_imports(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the scripts chdir to the repository; undone after the test
    monkeypatch.syspath_prepend(os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(f'benchmark_{os.path.basename(path)[:-3]}',
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, 'main', None)), f'{path}: no main()'
