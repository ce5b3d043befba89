"""The shipped demo models: they detect, and the zero-argument prune runs work on them.

The mAP here is computed by `evaluation.evaluate.evaluate` on the generated validation set, apart
from the training runs that reported theirs; the prune script's printed figures are
checked against the written files reloaded and evaluated again.
"""
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from cli import demo
from darknet.cfg import parse_data_cfg
from darknet.model import Darknet
from darknet.weights import load_weights
from data.datasets import create_dataloader
from evaluation.evaluate import evaluate

SHIPPED = [(spec['cfg'], spec[key]) for spec in (demo.YOLOV3, demo.TINY)
           for key in ('weights', 'sparse_weights')]


def _map50(cfg, weights):
    options = parse_data_cfg(demo.ensure_demo_data())
    model = load_weights(Darknet(cfg), weights).eval()
    loader, _ = create_dataloader(options['valid'], demo.IMG_SIZE, 16, options['classes'],
                                  rect=True, workers=0, stride=model.stride)
    return evaluate(model, loader, options['classes'], progress=False).metrics['map50']


@pytest.mark.parametrize('cfg,weights', SHIPPED, ids=[w for _, w in SHIPPED])
def test_shipped_demo_models_detect(cfg, weights, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo's paths are relative to the repository
    # far above an untrained model's ~0.001; the README's table gives the exact figures
    assert _map50(os.path.join(ROOT, cfg), os.path.join(ROOT, weights)) > 0.4


def test_zero_argument_prune_reports_what_it_wrote(tmp_path, monkeypatch):
    """`python prune_tiny.py` (output folder moved to tmp): exit 0, and the mAP it prints
    for the pruned, recalibrated model is that of the files it wrote."""
    result = subprocess.run([sys.executable, 'prune_tiny.py', '--output-dir', str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    # the written model is the BN-recalibrated one (the demo data has a train= list)
    printed = float(re.search(r'\| mAP@0\.5, BN recalibrated +\| [\d.]+ +\| ([\d.]+)',
                              result.stdout).group(1))
    cfg, weights = sorted(tmp_path.glob('*.cfg')), sorted(tmp_path.glob('*.weights'))
    assert len(cfg) == len(weights) == 1
    monkeypatch.chdir(ROOT)
    assert _map50(str(cfg[0]), str(weights[0])) == pytest.approx(printed, abs=1e-4)
