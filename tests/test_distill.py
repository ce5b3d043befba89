"""Knowledge distillation: the loss is a divergence (0 only at the teacher), following
its gradient makes a student's detections approach the teacher's, and train.py
fine-tunes a pruned model with it end to end."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TEST_CFGS, randomize_weights

from cli.prune import main as prune_main
from darknet.model import Darknet
from data.make_shapes import generate
from training.distill import bernoulli_kl, distillation_loss

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')  # 64x64, two heads, 4 classes


def test_bernoulli_kl_matches_its_definition():
    s, t = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64) * 3
    q, p = torch.sigmoid(s), torch.sigmoid(t)
    expected = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    assert torch.allclose(bernoulli_kl(s, t), expected, atol=1e-12)


def test_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    teacher = randomize_weights(Darknet(CFG), seed=1).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        heads = teacher(x, raw=True)
        other = randomize_weights(Darknet(CFG), seed=2).eval()(x, raw=True)
    assert float(distillation_loss(heads, heads)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_loss(other, heads)) > 0.01


def test_following_the_loss_brings_the_student_to_the_teacher():
    """A differently initialised student trained on the distillation loss alone (random
    images, no labels) ends with detections much closer to the teacher's."""
    torch.manual_seed(0)
    teacher = randomize_weights(Darknet(CFG), seed=1).eval()
    student = randomize_weights(Darknet(CFG), seed=2)
    probe = torch.rand(4, 3, 64, 64)

    def gap():
        with torch.no_grad():
            a, b = student.eval()(probe), teacher(probe)
        return float((a[..., 4:] - b[..., 4:]).abs().mean())  # objectness and classes

    before = gap()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(60):
        x = torch.rand(4, 3, 64, 64)
        with torch.no_grad():
            taught = teacher(x, raw=True)
        student.train()
        loss = distillation_loss(student(x), taught)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gap() < 0.5 * before


@pytest.fixture(scope='module')
def pruned(tmp_path_factory):
    """A random-weight teacher, its tiny-mode pruned files, and a small data set."""
    folder = tmp_path_factory.mktemp('distill')
    teacher = folder / 'teacher.pt'
    torch.save({'model': randomize_weights(Darknet(CFG), seed=5).state_dict()}, teacher)
    result = prune_main('tiny', ['--cfg', CFG, '--weights', str(teacher), '--percent', '0.3',
                                 '--img-size', '64', '--output-dir', str(folder / 'pruned')])
    data = generate(folder / 'shapes', seed=6, n_train=8, n_valid=4, img_size=64, plain=True,
                    workers=1, progress=False)
    return {'teacher': str(teacher), 'cfg': result['cfg'], 'weights': result['weights'],
            'data': str(data), 'folder': folder}


def _train(*args):
    command = [sys.executable, os.path.join(ROOT, 'train.py'), '--workers', '0', '--epochs', '1',
               '--batch-size', '4', '--img-size', '64', *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_fine_tuning_a_pruned_model_with_a_teacher(pruned):
    out = pruned['folder'] / 'tuned'
    result = _train('--cfg', pruned['cfg'], '--weights', pruned['weights'], '--data',
                    pruned['data'], '--teacher-cfg', CFG, '--teacher-weights', pruned['teacher'],
                    '--distill-weight', '2', '--output-dir', str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'distilling from' in result.stdout
    with open(out / 'results.csv') as f:
        row = next(csv.DictReader(f))
    parts = sum(float(row[k]) for k in ('box', 'obj', 'cls', 'distill'))
    assert float(row['distill']) > 0
    assert float(row['loss']) == pytest.approx(parts, rel=1e-4)


def test_a_teacher_with_other_heads_is_refused(pruned):
    other = os.path.join(TEST_CFGS, 'features.cfg')  # 2 classes, other anchors
    weights = pruned['folder'] / 'features.pt'
    torch.save({'model': Darknet(other).state_dict()}, weights)
    result = _train('--cfg', pruned['cfg'], '--weights', pruned['weights'], '--data',
                    pruned['data'], '--teacher-cfg', other, '--teacher-weights', str(weights),
                    '--output-dir', str(pruned['folder'] / 'refused'))
    assert result.returncode == 2
    assert result.stderr.count('\n') == 1 and 'heads (classes, anchors) differ' in result.stderr
    assert not (pruned['folder'] / 'refused' / 'last.pt').exists()
