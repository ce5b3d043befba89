"""The rules of sparsity training, each against a reading made here: the L1 penalty's
gradient joins the loss gradient (checked against autograd of loss + s * sum|gamma|), no
weight decay on BatchNorm weights/biases and conv biases (one optimizer step), the
learning rates of warm-up, cos and step (values worked out from the definitions), and
the BatchNorm sets `--prune 0/1/2` penalise (read from the cfgs by hand, then seen
inside a real train.py run)."""
import math
import os

import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

import train
from darknet.model import Darknet
from training import engine
from training import sparsity as sparsity_module
from training.sparsity import add_sparsity_gradient, prunable_bn_modules
from utils.errors import UserInputError

FOLD = os.path.join(TEST_CFGS, 'fold_kxk.cfg')                  # two shortcut groups, 4 classes
SMALL_DETECTOR = os.path.join(TEST_CFGS, 'small_detector.cfg')  # no shortcut, 4 classes
# The BN convs each --prune value penalises, read from the cfgs' comments by hand.
# fold_kxk.cfg: BN convs 0 2 3 4 6 7 8 10 14 17; 2+4 and 6+8 are summed by shortcuts,
# 14 feeds the upsample. small_detector.cfg: BN convs 0 2 4 6 7 11 14; 11 feeds the upsample.
PENALISED = {0: (FOLD, [0, 3, 7, 10, 17]),               # normal: neither summed nor upsampled
             1: (FOLD, [0, 2, 3, 4, 6, 7, 8, 10, 17]),   # shortcut: all but the upsample feeder
             2: (SMALL_DETECTOR, [0, 2, 4, 6, 7, 14])}   # tiny: all but the upsample feeder

pytestmark = pytest.mark.usefixtures('one_thread')


# ---------------------------------------------------------------- sparsity gradient

def test_sparsity_gradient_is_added_to_the_loss_gradient():
    """backward(loss) then the penalty == backward(loss + s * sum |gamma|): autograd's
    gradient of |gamma| is sign(gamma), 0 at 0."""
    s = 0.01
    grads = []
    for penalised_in_loss in (False, True):
        model = randomize_weights(Darknet(FOLD), seed=2).eval()
        bns = prunable_bn_modules(model, 'shortcut')
        with torch.no_grad():
            bns[0].weight[:3] = 0  # sign 0: no penalty
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        loss = sum(h.square().sum() for h in model(x, raw=True))
        if penalised_in_loss:
            (loss + s * sum(bn.weight.abs().sum() for bn in bns)).backward()
        else:
            loss.backward()
            assert all(float(bn.weight.grad.abs().max()) > 10 * s for bn in bns)
            add_sparsity_gradient(bns, s)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_sparsity_gradient_by_hand():
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.2, -0.5, 0.0, 1e-3]))
    bn.weight.grad = torch.tensor([0.3, -0.1, 0.7, -2.0])
    untouched = torch.nn.BatchNorm2d(2)  # no gradient yet: left without one
    add_sparsity_gradient([bn, untouched], 0.01)
    assert bn.weight.grad.tolist() == pytest.approx([0.31, -0.11, 0.7, -1.99])
    assert untouched.weight.grad is None


# ---------------------------------------------------------------- weight decay

@pytest.mark.parametrize('kind', ['sgd', 'adam'])
def test_weight_decay_moves_conv_weights_only(kind):
    """One step with zero loss gradients: only weight decay moves anything, so conv
    weights move towards 0 and BN weights/biases and conv biases stay exactly where they
    are."""
    model = randomize_weights(Darknet(FOLD), seed=1)
    optimizer = engine.make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.05, kind=kind)
    listed = [id(p) for group in optimizer.param_groups for p in group['params']]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())  # each one, once
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    convs = biases = 0
    for name, p in model.named_parameters():
        if name.endswith('Conv2d.weight'):
            assert ((p - before[name]) * before[name].sign() < 0).all(), name
            convs += 1
        else:
            assert name.endswith(('Conv2d.bias', 'BatchNorm2d.weight', 'BatchNorm2d.bias')), name
            assert torch.equal(p, before[name]), f'{name} decayed'
            biases += 1
    assert convs == 12 and biases == 10 * 2 + 2  # 10 BN convs, 2 head convs with a bias


# ---------------------------------------------------------------- learning rate

def test_cosine_schedule_values():
    """lr0 * (f + (1 - f) * (1 + cos(pi * epoch / epochs)) / 2), f = 0.01, no warm-up:
    cos 0 = 1, cos(pi/3) = 1/2, cos(pi/2) = 0, cos(2 pi/3) = -1/2."""
    lr = lambda epoch, epochs: engine.learning_rate(100, epoch, 0.02, epochs, 0, 'cos')
    assert lr(0, 3) == pytest.approx(0.02)
    assert lr(1, 3) == pytest.approx(0.02 * (0.01 + 0.99 * 0.75))
    assert lr(2, 4) == pytest.approx(0.02 * (0.01 + 0.99 * 0.5))
    assert lr(2, 3) == pytest.approx(0.02 * (0.01 + 0.99 * 0.25))
    assert engine.learning_rate(0, 1, 0.02, 4, 0, 'cos', final_ratio=0.1) == pytest.approx(
        0.02 * (0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2))


def test_step_schedule_divides_by_ten_at_80_and_90_percent():
    for epochs, rates in ((10, [1] * 8 + [0.1, 0.01]),
                          (20, [1] * 16 + [0.1, 0.1, 0.01, 0.01])):
        got = [engine.learning_rate(100, e, 0.5, epochs, 0, 'step') for e in range(epochs)]
        assert got == pytest.approx([0.5 * r for r in rates])


@pytest.mark.parametrize('schedule', ['cos', 'step'])
def test_warm_up_rises_linearly_to_the_schedule(schedule):
    """With 4 warm-up steps, optimizer step k (from 0) runs at (k + 1) / 4 of the rate
    the schedule gives; from step 4 on, at the full rate."""
    full = engine.learning_rate(0, 0, 0.01, 10, 0, schedule)
    assert full == pytest.approx(0.01)
    warm = [engine.learning_rate(k, 0, 0.01, 10, 4, schedule) for k in range(7)]
    assert warm == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01])


# ---------------------------------------------------------------- --prune sets

def test_prune_flag_takes_mode_names_and_the_seed_numbers():
    assert [train.prune_mode(t) for t in ('0', '1', '2')] == ['normal', 'shortcut', 'tiny']
    assert [train.prune_mode(t) for t in ('normal', 'regular', 'shortcut', 'tiny')] == [
        'normal', 'normal', 'shortcut', 'tiny']
    with pytest.raises(UserInputError, match='--prune'):
        train.get_args_parser().parse_args(['--prune', '3'])


@pytest.mark.parametrize('prune', sorted(PENALISED))
def test_prune_flag_penalises_the_modes_bn_layers(prune):
    cfg, convs = PENALISED[prune]
    model = Darknet(cfg)
    got = prunable_bn_modules(model, train.prune_mode(str(prune)))
    assert [id(bn) for bn in got] == [id(model.module_list[i].BatchNorm2d) for i in convs]


class _Penalised(Exception):
    """Raised by the stand-in penalty to end a train.py run at its first step."""


@pytest.fixture(scope='module')
def shapes4(tmp_path_factory):
    from data.make_shapes import generate
    folder = tmp_path_factory.mktemp('shapes4')
    return str(generate(folder, seed=5, n_train=4, n_valid=2, img_size=64, plain=True,
                        workers=1, progress=False))


@pytest.mark.parametrize('prune', sorted(PENALISED))
def test_training_penalises_the_prune_flags_set(prune, shapes4, tmp_path, monkeypatch):
    """train.py -sr --prune N: the BatchNorm layers its first optimizer step penalises,
    and with which rate."""
    cfg, convs = PENALISED[prune]
    seen = []

    def penalty(bn_modules, s, factors=None):
        seen.append((list(bn_modules), s))
        raise _Penalised()

    monkeypatch.setattr(sparsity_module, "add_sparsity_gradient", penalty)
    models = []
    real_make_optimizer = engine.make_optimizer
    monkeypatch.setattr(engine, 'make_optimizer',
                        lambda model, *a, **k: models.append(model) or real_make_optimizer(
                            model, *a, **k))
    with pytest.raises(_Penalised):
        train.main(['--cfg', cfg, '--data', shapes4, '--epochs', '1', '--batch-size', '2',
                    '--img-size', '64', '--workers', '0', '--no-augment', '-sr',
                    '--s', '0.007', '--prune', str(prune),
                    '--output-dir', str(tmp_path / 'run')])
    (bn_modules, s), = seen
    (model,) = models
    assert s == 0.007
    assert [id(bn) for bn in bn_modules] == [id(model.module_list[i].BatchNorm2d)
                                             for i in convs]
