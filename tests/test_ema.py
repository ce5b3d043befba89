"""The average of the weights (training/ema.py) against its formula written out in
float64, and in train.py: what it validates and saves, and --resume carrying it on."""
import math
import os

import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

import train
from darknet.model import Darknet
from training import ema as ema_module
from training import engine
from training.ema import ModelEMA

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')


def _args(data, folder, epochs, *flags):
    """4 steps an epoch (16 images, batch 4) at 32 px. No augmentation, and the step
    schedule (a constant lr over 3 epochs), so that a resumed run repeats an
    uninterrupted one."""
    return ['--cfg', CFG, '--data', data, '--batch-size', '4', '--img-size', '32',
            '--workers', '0', '--epochs', str(epochs), '--no-augment', '--schedule', 'step',
            '--output-dir', str(folder), *flags]


def test_average_of_a_constant_model_is_that_model():
    model = randomize_weights(Darknet(CFG), 1)
    ema = ModelEMA(model)
    for _ in range(30):
        ema.update()
    for key, value in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[key], value), key


def test_average_follows_the_ramped_formula():
    model = randomize_weights(Darknet(CFG), 1)
    ema = ModelEMA(model, decay=0.9, tau=3)
    expected = {k: v.double().clone() for k, v in model.state_dict().items()}
    for step in range(1, 6):
        randomize_weights(model, step + 1)  # the optimizer moved every weight
        d = 0.9 * (1 - math.exp(-step / 3))
        assert ema.rate() == pytest.approx(d)
        ema.update()
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                expected[key] = d * expected[key] + (1 - d) * value.double()
            else:  # BatchNorm's batch count: copied
                expected[key] = value.double()
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-7)
    assert ema.updates == 5 and not any(p.requires_grad for p in ema.module.parameters())


def test_decay_ramps_from_near_zero_to_its_limit():
    ema = ModelEMA(Darknet(CFG))
    first = ema.rate()
    ema.updates = 100_000
    assert first < 1e-3 and ema.rate() == pytest.approx(ema_module.DECAY, rel=1e-12)


def test_validation_and_checkpoints_use_the_average(shapes16, tmp_path, monkeypatch):
    monkeypatch.setattr(ema_module, 'TAU', 2)  # a real average after a few steps
    scored = []
    real_evaluate = engine.evaluate
    monkeypatch.setattr(engine, 'evaluate', lambda model, *a, **k: scored.append(model)
                        or real_evaluate(model, *a, **k))
    train.main(_args(shapes16, tmp_path / 'run', 2))
    assert scored and all(not any(p.requires_grad for p in m.parameters()) for m in scored)
    last = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    best = torch.load(tmp_path / 'run' / 'best.pt', weights_only=True)
    assert last['ema']['updates'] == 8  # 2 epochs of 4 optimizer steps
    live, average = last['ema']['live_model'], last['model']
    assert any(not torch.equal(live[k], average[k]) for k in live)
    assert 'ema' not in best  # best.pt: the average only
    model = Darknet(CFG)
    model.load_state_dict(average)  # what test.py and the prune scripts load


def test_resume_carries_the_average_on(shapes16, tmp_path, monkeypatch):
    """2 epochs, then --resume to 3, against 3 epochs in one go: the same average and
    live weights. Had the resume restarted the average from the live weights, or its
    ramp from 0, the averages would differ (tau 2: each step moves it a lot)."""
    monkeypatch.setattr(ema_module, 'TAU', 2)
    train.main(_args(shapes16, tmp_path / 'whole', 3))
    train.main(_args(shapes16, tmp_path / 'cut', 2))
    train.main(_args(shapes16, tmp_path / 'cut', 3, '--resume'))
    whole, cut = (torch.load(tmp_path / name / 'last.pt', weights_only=True)
                  for name in ('whole', 'cut'))
    assert whole['ema']['updates'] == cut['ema']['updates'] == 12
    for entry in ('model', 'live'):
        a = whole['model'] if entry == 'model' else whole['ema']['live_model']
        b = cut['model'] if entry == 'model' else cut['ema']['live_model']
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_no_ema_saves_the_live_weights_and_resumes_from_an_average(shapes16, tmp_path):
    train.main(_args(shapes16, tmp_path / 'run', 1))
    first = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    train.main(_args(shapes16, tmp_path / 'run', 2, '--resume', '--no-ema'))
    second = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    assert 'ema' in first and 'ema' not in second and second['epoch'] == 1
