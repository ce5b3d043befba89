"""train.py: it learns, -sr shrinks exactly the penalised gammas, two processes move the
gammas as one process does, --resume continues; test.py's mAP matches pycocotools."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TEST_CFGS

from darknet.model import Darknet
from darknet.weights import load_weights, save_weights
from data.make_shapes import generate
from pruning.graph import prunable_convs

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')


@pytest.fixture(scope='session')
def shapes64(tmp_path_factory):
    """A small generated set at 64x64: 64 training and 32 validation images."""
    folder = tmp_path_factory.mktemp('shapes64')
    return str(generate(folder, seed=3, n_train=64, n_valid=32, img_size=64, plain=True,
                        workers=1, progress=False))


def _train(*args):
    """Run train.py in a child process (as users do); returns its stdout."""
    command = [sys.executable, os.path.join(ROOT, 'train.py'), '--workers', '0', *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _results(folder):
    with open(os.path.join(folder, 'results.csv')) as f:
        return list(csv.DictReader(f))


def _gammas(path):
    model = load_weights(Darknet(CFG), path)
    return {i: model.module_list[i].BatchNorm2d.weight.detach().abs()
            for i, layer in enumerate(model.module_defs) if layer.get('batch_normalize')}


@pytest.fixture(scope='session')
def trained(shapes64, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('trained'))
    _train('--cfg', CFG, '--data', shapes64, '--epochs', '12', '--batch-size', '4',
           '--img-size', '64', '--lr', '0.02', '--output-dir', folder)
    return folder


@pytest.fixture(scope='session')
def shapes8(tmp_path_factory):
    folder = tmp_path_factory.mktemp('shapes8')
    return str(generate(folder, seed=4, n_train=8, n_valid=4, img_size=64, plain=True,
                        workers=1, progress=False))


def test_sparsity_shrinks_penalised_gammas_alike_in_one_and_two_processes(shapes8, tmp_path):
    """torchrun with 2 processes x batch 1 against 1 process x batch 1 x accumulate 2:
    each optimizer step sees the same two images (one permutation, split in two), so the
    gradients, the once-per-step penalty and the gammas must agree. Against the same run
    without -sr, only the penalised gammas shrink."""
    common = ['--cfg', CFG, '--data', shapes8, '--epochs', '2', '--batch-size', '1',
              '--img-size', '64', '--no-augment', '-sr', '--sparsity', '0.05', '--prune', '2',
              '--warmup-epochs', '0']
    single, double, plain = (str(tmp_path / n) for n in ('single', 'double', 'plain'))
    _train(*common, '--accumulate', '2', '--output-dir', single)
    _train(*[a for a in common if a not in ('-sr',)], '--accumulate', '2', '--output-dir', plain)
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
               '--master_port=29517', os.path.join(ROOT, 'train.py'), '--workers', '0',
               *common, '--output-dir', double]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two, none = (_gammas(os.path.join(d, 'last.pt')) for d in (single, double, plain))
    penalised = prunable_convs(Darknet(CFG).module_defs, 'tiny')
    for i in one:
        torch.testing.assert_close(one[i], two[i], rtol=0, atol=2e-5)
    shrink = [float((none[i] - one[i]).mean()) for i in penalised]
    assert min(shrink) > 0.01
    # unpenalised gammas (the conv feeding the upsample) move only as much as the changed
    # forward passes make them
    kept = [i for i in one if i not in penalised]
    assert kept and max(float((none[i] - one[i]).abs().mean()) for i in kept) < 0.2 * min(shrink)


def test_resume_continues_the_epoch_count(shapes8, tmp_path):
    folder = str(tmp_path / 'run')
    args = ['--cfg', CFG, '--data', shapes8, '--batch-size', '4', '--img-size', '64',
            '--output-dir', folder]
    _train(*args, '--epochs', '1')
    first = torch.load(os.path.join(folder, 'last.pt'), weights_only=True)
    out = _train(*args, '--epochs', '2', '--resume')
    assert 'epochs 2..2' in out
    assert [row['epoch'] for row in _results(folder)] == ['1', '2']
    second = torch.load(os.path.join(folder, 'last.pt'), weights_only=True)
    assert (first['epoch'], second['epoch']) == (0, 1)
    assert not all(torch.equal(first['model'][k], second['model'][k]) for k in first['model'])


def test_training_raises_map_well_above_chance(trained):
    rows = _results(trained)
    assert len(rows) == 12
    # after one epoch the model is near chance; twelve (192 steps) lift it far above
    first, best = float(rows[0]['map50']), max(float(row['map50']) for row in rows)
    assert first < 0.05 and best > 0.15 and best > 5 * first
    assert float(rows[-1]['loss']) < 0.85 * float(rows[0]['loss'])
    assert os.path.getsize(os.path.join(trained, 'bn_gammas.png')) > 1000


def _coco_ground_truth(list_path):
    """COCO ground truth from the Darknet labels, in original image pixels."""
    import cv2
    folder = os.path.dirname(list_path)
    images, annotations = [], []
    with open(list_path) as f:
        paths = [os.path.join(folder, line.strip()) for line in f if line.strip()]
    for path in paths:
        height, width = cv2.imread(path).shape[:2]
        image_id = int(os.path.splitext(os.path.basename(path))[0])
        images.append({'id': image_id, 'width': width, 'height': height})
        label = path.replace('/images/', '/labels/').rsplit('.', 1)[0] + '.txt'
        for line in open(label).read().split('\n') if os.path.exists(label) else []:
            if not line.strip():
                continue
            c, cx, cy, w, h = map(float, line.split())
            annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                                'category_id': int(c), 'iscrowd': 0, 'area': w * width * h * height,
                                'bbox': [(cx - w / 2) * width, (cy - h / 2) * height,
                                         w * width, h * height]})
    return {'images': images, 'annotations': annotations,
            'categories': [{'id': c} for c in range(4)]}


def test_map_agrees_with_pycocotools(trained, shapes64, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    detections, metrics = str(tmp_path / 'det.json'), str(tmp_path / 'metrics.json')
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'test.py'), '--cfg', CFG, '--weights',
         os.path.join(trained, 'best.pt'), '--data', shapes64, '--img-size', '64',
         '--workers', '0', '--save-json', detections, '--metrics-json', metrics],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ours = json.load(open(metrics))
    truth = COCO()
    truth.dataset = _coco_ground_truth(os.path.join(os.path.dirname(shapes64), 'valid.txt'))
    truth.createIndex()
    found = truth.loadRes(detections)
    evaluation = COCOeval(truth, found, 'bbox')
    evaluation.params.maxDets = [300]  # test.py keeps up to 300 per image
    evaluation.evaluate()
    evaluation.accumulate()
    # precision (iou thresholds, recall points, classes, area ranges, max dets); -1: no data
    precision = evaluation.eval['precision'][:, :, :, 0, 0]
    per_threshold = [p[p > -1].mean() for p in precision]
    assert ours['map50'] > 0.1  # a comparison on a model that detects something
    assert abs(ours['map50'] - per_threshold[0]) < 0.01
    assert abs(ours['map50_95'] - np.mean(per_threshold)) < 0.02


def test_pruned_model_trains_with_sparsity_and_prunes_again(shapes8, tmp_path):
    """The iterative road: prune, sparsity-train the compact cfg + weights, prune again."""
    from cli.prune import main as prune_main
    weights = str(tmp_path / 'start.weights')
    model = Darknet(CFG)
    with torch.no_grad():  # give half of every prunable layer small gammas
        for i in prunable_convs(model.module_defs, 'tiny'):
            model.module_list[i].BatchNorm2d.weight[::2] = 1e-3
    save_weights(model, weights)
    first = prune_main('tiny', ['--cfg', CFG, '--weights', weights, '--percent', '0.4',
                                '--img-size', '64', '--output-dir', str(tmp_path / 'p1')])
    run = str(tmp_path / 'run')
    _train('--cfg', first['cfg'], '--weights', first['weights'], '--data', shapes8,
           '--epochs', '1', '--batch-size', '4', '--img-size', '64', '-sr', '--prune', '2',
           '--output-dir', run)
    second = prune_main('tiny', ['--cfg', first['cfg'], '--weights',
                                 os.path.join(run, 'last.pt'), '--percent', '0.3',
                                 '--layer-keep', '0.1', '--img-size', '64',
                                 '--output-dir', str(tmp_path / 'p2')])
    assert second['after']['params'] < first['after']['params'] < first['before']['params']
    assert second['difference'] < 1e-5
