"""Evaluation streams its data: peak memory does not grow with the number of images
beyond what the detections themselves take.

`test.py` runs in a fresh child process (one per measurement; its peak RSS is read
from /proc, so Linux only) on 200 and on 2000 generated 128x128 images, evaluated at
32x32. With a score
threshold that leaves no detections, ten times the images may add only bookkeeping
(labels, paths, a few small tensors per image): under 30 MB. At the default threshold
the growth may add at most 400 bytes per extra detection (the matches, scores and
classes kept for the AP, and the sorted copies the AP computation makes). A control
run that keeps every decoded image, as a caching loader would, must break the bound:
2000 such images take about 100 MB, so the test can see a loader that does not stream.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TEST_CFGS

from darknet.model import Darknet
from darknet.weights import save_weights
from data.make_shapes import generate

pytestmark = pytest.mark.skipif(not os.path.exists('/proc/self/status'),
                                reason='peak RSS is read from /proc (Linux)')

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')
BOOKKEEPING_MB = 30        # allowed growth from 200 to 2000 images without detections
BYTES_PER_DETECTION = 400  # and per extra detection on top

MEASURE = r'''
import json, sys
root, cfg, weights, data_file, conf, cache = sys.argv[1:7]
sys.path.insert(0, root)
import test
import evaluation.evaluate
found = {'detections': 0}
summarise = evaluation.evaluate._summarise
def counting_summarise(matched, *args):
    found['detections'] = sum(len(scores) for _, scores, _ in matched)
    return summarise(matched, *args)
evaluation.evaluate._summarise = counting_summarise
if cache == '1':  # the control: a loader that keeps every decoded image
    import data.datasets as datasets  # `data` names the .data path here
    kept, load_image = [], datasets.load_image
    datasets.load_image = lambda path: kept.append(load_image(path)) or kept[-1]
test.main(['--cfg', cfg, '--weights', weights, '--data', data_file, '--img-size', '32',
           '--batch-size', '16', '--workers', '0', '--conf-thres', conf])
# VmHWM: this process image's own peak RSS. ru_maxrss would not do: a child started by a
# big process (pytest after other tests) inherits its parent's maxrss across fork + exec
with open('/proc/self/status') as f:
    peak_kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
print(json.dumps({'peak_mb': peak_kb / 1024, **found}))
'''


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    """One generated set of 2000 validation images; .data files for all and the first 200."""
    folder = tmp_path_factory.mktemp('many')
    data = generate(folder, seed=7, n_train=0, n_valid=2000, img_size=128, plain=True,
                    workers=1, progress=False)
    lines = (folder / 'valid.txt').read_text().splitlines()
    assert len(lines) == 2000
    (folder / 'valid200.txt').write_text('\n'.join(lines[:200]) + '\n')
    (folder / 'first200.data').write_text(f'classes=4\nvalid={folder}/valid200.txt\n')
    weights = str(folder / 'model.weights')
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the default init, the same every run
        save_weights(Darknet(CFG), weights)
    return {200: str(folder / 'first200.data'), 2000: str(data), 'weights': weights}


def _measure(sets, n, conf, cache=False):
    result = subprocess.run(
        [sys.executable, '-c', MEASURE, ROOT, CFG, sets['weights'], sets[n], str(conf),
         '1' if cache else '0'],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'{n} images' in result.stdout  # it did evaluate every image
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_evaluation_memory_does_not_grow_with_the_number_of_images(sets):
    few, many = _measure(sets, 200, 0.6), _measure(sets, 2000, 0.6)
    assert few['detections'] == many['detections'] == 0
    assert many['peak_mb'] - few['peak_mb'] < BOOKKEEPING_MB, (few, many)
    # the control: keeping the decoded images (about 100 MB of them) breaks the bound
    cached = _measure(sets, 2000, 0.6, cache=True)
    assert cached['peak_mb'] - few['peak_mb'] > BOOKKEEPING_MB + 40, (few, cached)


def test_evaluation_memory_beyond_the_images_is_the_detections(sets):
    few, many = _measure(sets, 200, 0.001), _measure(sets, 2000, 0.001)
    extra = many['detections'] - few['detections']
    assert extra > 100_000  # an untrained model at 0.001 finds plenty
    allowed = BOOKKEEPING_MB + extra * BYTES_PER_DETECTION / 2 ** 20
    assert many['peak_mb'] - few['peak_mb'] < allowed, (few, many, allowed)
