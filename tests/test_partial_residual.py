"""Partial residuals: a [shortcut] that adds layers of different widths.

Darknet sums over the smaller channel count and keeps the previous layer's width
(Partial Residual Networks, yolov3-tiny-prn.cfg). tests/cfgs/partial_residual.cfg has
one of each kind: a wider from= layer (layer 7), a narrower one (layer 10) and one
behind a maxpool (layer 16). The model is checked against OpenCV and a NumPy loop in
test_models_conformance.py, and the prune modes end to end in test_prune.py; here are
the graph, the refusals and the cfg tools.
"""
import os

import numpy as np
import pytest
import torch
from conftest import TEST_CFGS, opencv_detections, our_detections, randomize_weights

from darknet.cfg import parse_model_cfg
from darknet.model import Darknet
from darknet.weights import save_weights
from derive_cfg import derive_cfg
from pruning.graph import analyze_graph, prunable_convs
from pruning.layer_prune import find_blocks
from pruning.plan import plan_masks
from pruning.surgery import prune

CFG = os.path.join(TEST_CFGS, 'partial_residual.cfg')


def test_the_graph_ties_only_the_summed_channels():
    info = analyze_graph(parse_model_cfg(CFG)[1])
    # layer 7 = layer 6 (16) + the first 16 of layer 4 (32): 16 channels, each tied
    assert [sorted(o) for o in info.origins[7]] == [[(4, k), (6, k)] for k in range(16)]
    # layer 10 = layer 9 (24) + layer 7 (16): the first 16 summed, the last 8 layer 9's own
    assert [sorted(o) for o in info.origins[10]] == (
        [[(4, k), (6, k), (9, k)] for k in range(16)] + [[(9, k)] for k in range(16, 24)])
    # layer 16 = layer 15 (24) + the first 24 of layer 12 (32), through a stride-1 pool
    assert [sorted(o) for o in info.origins[16]] == [[(12, k), (15, k)] for k in range(24)]
    assert sorted(map(sorted, info.shortcut_groups)) == [[4, 6, 9], [12, 15]]
    assert not info.unaligned


def test_shortcut_mode_gives_a_narrower_conv_the_first_part_of_its_groups_mask():
    model = randomize_weights(Darknet(CFG), seed=4).eval()
    plan = plan_masks(model, 'shortcut', 0.4)
    assert [4, 6, 9] in plan.units and [12, 15] in plan.units
    masks = plan.masks
    assert len(masks[4]) == 32 and len(masks[6]) == 16 and len(masks[9]) == 24
    assert torch.equal(masks[6], masks[4][:16]) and torch.equal(masks[9][:16], masks[4][:16])
    assert torch.equal(masks[15], masks[12][:24])
    assert not all(masks[i].all() for i in (4, 6, 9, 12, 15))  # the groups were cut
    keep_size, compact = prune(model, plan)
    image = np.random.default_rng(5).random((1, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(our_detections(compact, image), our_detections(keep_size, image),
                               rtol=0, atol=1e-4)


ROUTED_SUM = """[net]
width=32
height=32

[convolutional]
batch_normalize=1
filters=8
size=1
activation=leaky

[convolutional]
batch_normalize=1
filters=8
size=1
activation=leaky

[route]
layers=-1,-2

[convolutional]
batch_normalize=1
filters=16
size=1
activation=leaky

[shortcut]
from=-2
activation=linear

[convolutional]
size=1
filters=7
activation=linear

[yolo]
mask=0
anchors=8,8
classes=2
num=1
"""


def test_a_sum_behind_a_concatenation_keeps_its_group_whole(tmp_path):
    """Layer 4 adds a route of two 8-channel convs to a 16-channel conv: channel 8 of
    the sum is channel 0 of layer 0, so one mask by position cannot serve the group."""
    cfg = tmp_path / 'routed.cfg'
    cfg.write_text(ROUTED_SUM)
    model = randomize_weights(Darknet(str(cfg)), seed=6).eval()
    info = analyze_graph(model.module_defs)
    assert info.unaligned == {0}
    assert sorted(map(sorted, info.shortcut_groups)) == [[0, 1, 3]]
    assert prunable_convs(model.module_defs, 'shortcut', info=info) == []
    weights = str(tmp_path / 'routed.weights')
    save_weights(model, weights)
    image = np.random.default_rng(7).random((1, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(our_detections(model, image)[:, :4],
                               opencv_detections(str(cfg), weights, image, model)[:, :4],
                               rtol=0, atol=0.01)


def test_layer_pruning_leaves_partial_residuals_alone():
    """Without its branch a partial residual would change width, so no block goes;
    layer 10, a linear sum over a branch of two convs, is refused for that alone."""
    blocks = find_blocks(randomize_weights(Darknet(CFG), seed=8))
    assert [b.shortcut for b in blocks] == [7, 10, 16]
    assert not any(block.removable for block in blocks)
    assert blocks[1].obstacle == 'a partial residual: layer 7 has 16 channels, the sum 24'


@pytest.mark.parametrize('width', [0.5, 0.25, 1.5])
def test_derived_widths_keep_each_sums_order_and_build(width):
    hyperparams, layers = parse_model_cfg(CFG)
    derived = derive_cfg(hyperparams, layers, classes=3, width=width)[1]
    for i, layer in enumerate(layers):
        if layer['type'] == 'shortcut':
            source = i + layer['from'][0]
            before, after = (Darknet((hyperparams, x)).out_channels for x in (layers, derived))
            assert (before[source] > before[i - 1]) <= (after[source] >= after[i - 1])
            assert (before[source] < before[i - 1]) <= (after[source] <= after[i - 1])
    model = Darknet((hyperparams, derived)).eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape[-1] == 8  # 3 classes
