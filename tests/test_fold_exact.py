"""The constant fold checked against a model that never folds.

A pruned channel (gamma = 0) outputs exactly act(beta) at every pixel, so the original
model with such channels *is* the reference: the compact model, which removed them and
folded their constants into every consumer, must compute the same thing. Two roads:
- every conv's padding made circular in both models, so a constant channel stays
  constant in the padding and the fold `W.sum((2, 3)) @ c` is exact on every pixel:
  the whole compact model against the whole original;
- with the real zero padding, each consumer conv on its own: the compact conv block on
  the original's input (its constant channels dropped) against the original block, on
  the pixels whose window lies inside the image.
The cfg (tests/cfgs/fold_kxk.cfg) has 3x3 consumers, two shortcut groups pruned with
non-zero constants (one summed through a leaky shortcut), a maxpool, a route and an
upsample. Which channels are constant is measured on the original's feature maps, not
taken from the library.
"""
import copy
import math
import os

import numpy as np
import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

from darknet.model import Darknet
from pruning.plan import plan_masks
from pruning.surgery import prune

CFG = os.path.join(TEST_CFGS, 'fold_kxk.cfg')
IMG = 64
# read from the cfg by hand: convs summed by a [shortcut], and shortcut mode's prunable
# convs (every BN conv but 14, which feeds the upsample)
GROUPS = [[2, 4], [6, 8]]
PRUNABLE = [0, 2, 3, 4, 6, 7, 8, 10, 17]
# every conv after the first reads a constant channel; these have 3x3 kernels
CONSUMERS = {2, 3, 4, 6, 7, 8, 10, 11, 14, 17, 18}
KXK_CONSUMERS = {2, 4, 6, 7, 8, 10, 17}

pytestmark = pytest.mark.usefixtures('one_thread')


def _doomed_model(seed):
    """A random model whose doomed channels (a quarter to a half of each prunable conv,
    the same ones across a shortcut group) have gamma 0 and |beta| in [0.3, 1], both
    signs. Returns (model, {conv: bool mask of its doomed channels})."""
    model = randomize_weights(Darknet(CFG), seed).eval()
    rng = np.random.default_rng(seed)
    units = GROUPS + [[i] for i in PRUNABLE if not any(i in g for g in GROUPS)]
    doomed = {}
    with torch.no_grad():
        for unit in units:
            width = model.module_list[unit[0]].BatchNorm2d.num_features
            mask = torch.zeros(width, dtype=torch.bool)
            count = int(rng.integers(width // 4, width // 2 + 1))
            mask[torch.from_numpy(rng.choice(width, count, replace=False))] = True
            for conv in unit:
                bn = model.module_list[conv].BatchNorm2d
                bn.weight[mask] = 0
                beta = rng.uniform(0.3, 1.0, count) * rng.choice([-1, 1], count)
                bn.bias[mask] = torch.from_numpy(beta).float()
                doomed[conv] = mask
    return model, doomed


def _pruned(seed):
    """(original, compact, doomed), pruned in shortcut mode. At least a quarter of every
    unit's channels have gamma 0 and the others >= 0.5, so a global threshold at 20% of
    the channels (however a group's channels are counted) is one of the zeros: exactly
    the doomed channels go."""
    model, doomed = _doomed_model(seed)
    plan = plan_masks(model, 'shortcut', 0.2)
    for conv, mask in doomed.items():
        assert torch.equal(plan.masks[conv], ~mask), f'conv {conv}: the plan keeps other channels'
    _, compact = prune(model, plan)
    return model, compact.eval(), doomed


def _circular(model):
    """A copy whose padded convs wrap around: a constant map stays constant in the pad."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and any(module.padding):
            module.padding_mode = 'circular'
    return model


def _inputs_of_convs(model, x):
    """{conv layer: its input feature map} from one forward of `model`."""
    seen, hooks = {}, []
    for j, layer in enumerate(model.module_defs):
        if layer['type'] == 'convolutional':
            hooks.append(model.module_list[j].register_forward_hook(
                lambda module, inputs, output, j=j: seen.__setitem__(j, inputs[0])))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _interior(size, kernel, stride, padding):
    """The output positions along one axis whose window lies inside the input."""
    return slice(math.ceil(padding / stride), (size - kernel + padding) // stride + 1)


@pytest.mark.parametrize('seed', [0, 1])
def test_compact_model_equals_the_unfolded_original_with_circular_padding(seed):
    model, compact, doomed = _pruned(seed)
    silent = copy.deepcopy(model)  # the doomed channels output act(0) = 0 instead
    with torch.no_grad():
        for conv, mask in doomed.items():
            silent.module_list[conv].BatchNorm2d.bias[mask] = 0
    x = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        theirs = _circular(model)(x, raw=True)
        ours = _circular(compact)(x, raw=True)
        unfolded = _circular(silent)(x, raw=True)
    for head, (a, b, c) in enumerate(zip(ours, theirs, unfolded)):
        scale = float(b.abs().max())
        assert float((a - b).abs().max()) <= 1e-5 * scale, f'head {head}'
        # the constants move every head: a model that lost them fails the check above
        assert float((c - b).abs().max()) > 1e-2 * scale, f'head {head}'


@pytest.mark.parametrize('seed', [0, 1])
def test_each_consumer_folds_its_constants_exactly_inside_the_image(seed):
    model, compact, doomed = _pruned(seed)
    x = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(10 + seed))
    inputs = _inputs_of_convs(model, x)
    consumers, border_moved = set(), set()
    for j, features in inputs.items():
        flat = features.transpose(0, 1).reshape(features.shape[1], -1)  # (C, B*H*W)
        constant = flat.amax(1) == flat.amin(1)
        if not constant.any():
            continue
        consumers.add(j)
        conv = model.module_list[j].Conv2d
        keep = ~doomed[j] if j in doomed else torch.ones(conv.out_channels, dtype=torch.bool)
        with torch.no_grad():
            theirs = model.module_list[j](features)[:, keep]
            ours = compact.module_list[j](features[:, ~constant])
        assert ours.shape == theirs.shape, f'conv {j}'
        rows, cols = (_interior(features.shape[d], conv.kernel_size[k], conv.stride[k],
                                conv.padding[k]) for k, d in ((0, 2), (1, 3)))
        scale = float(theirs.abs().max())
        difference = (ours - theirs).abs()
        assert float(difference[..., rows, cols].max()) <= 1e-5 * scale, f'conv {j}'
        if float(difference.max()) > 1e-3 * scale:
            border_moved.add(j)
    assert consumers == CONSUMERS
    # zero padding differs from the folded constant on the borders of 3x3 consumers
    # only: the interior restriction is needed there and nowhere else
    assert border_moved == KXK_CONSUMERS
